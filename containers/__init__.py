"""The bundled profiles: installed as the package ``regression_model_template.profiles``.

This folder is their source (see ``[tool.setuptools.package-dir]`` in pyproject.toml); the
file makes it a regular package, which an editable install can map as well as a wheel.
"""
