"""The team's tracking stack: a PostgreSQL cluster and an ``mlflow server`` (127.0.0.1 by default).

``make server`` (``regression-model-template server``) runs :func:`.stack.team_server` in the
foreground; the test suite starts the same stack with the same functions, so there is one way
to do it. Each part stops with its context manager (SIGTERM to the server's process group, a fast
PostgreSQL shutdown): nothing is left running.

One module per engine; this package only supervises their processes:

- :mod:`.stack`: :func:`~.stack.team_server`, the whole stack for a block;
- :mod:`.postgres`: Debian's PostgreSQL, a cluster kept in a folder, the ``mlflow`` database;
- :mod:`.tracking_server`: ``mlflow server`` with proxied artifacts, served by gunicorn;
- :mod:`.tls`: the server's TLS pair, given or self-signed for its host;
- :mod:`.auth`: MLflow's basic-auth app, its admin and files, for a server facing a network;
- :mod:`.processes`: free ports, process groups stopped as a whole, their output, Debian installs.

The reaper the stack runs is :mod:`regression_model_template.io.reaper` (``reap`` uses it too).

Example (not run here: it starts servers)::

    from regression_model_template.server.stack import team_server

    with team_server(Path(".server"), port=5000) as stack:
        print(f"MLFLOW_TRACKING_URI={stack.url}")
"""
