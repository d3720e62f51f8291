"""Jobs: ``@inject`` functions that receive the services from the container."""
