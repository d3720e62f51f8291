"""pytest plugin: fixtures for testing jobs with the container (filled in by the container work)."""
