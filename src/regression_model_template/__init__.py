"""Logger, alerts and MLflow tracking for ML jobs, composed by a dependency-injector container."""
