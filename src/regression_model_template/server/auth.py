"""MLflow's basic-auth app for a server facing a network: its files, its environment, its admin.

The admin is the person starting the server: the name and password in the server's
``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``, the variables MLflow's clients
already read. MLflow creates that admin the first time it opens an empty users' database;
other users are added with MLflow's own client (see the README, "Serving a team on a network").

Kept in ``<folder>/auth`` (a folder only its owner can open):

- ``basic_auth.ini``: the app's settings (``MLFLOW_AUTH_CONFIG_PATH``), 0600;
- ``users.db``: the users, their hashed passwords and permissions (SQLite);
- ``secret_key``: the key signing the app's CSRF tokens (``MLFLOW_FLASK_SERVER_SECRET_KEY``),
  made once and kept, 0600: every worker, and every restart, must use the same one.

Neither the admin's password nor the key is ever written to the ini, printed or put on a
command line (``ps`` shows those to every user): they reach the server in its environment.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> env = auth_environment(folder, Admin("alice", "correct horse battery"))
    >>> sorted(env)  # doctest: +NORMALIZE_WHITESPACE
    ['MLFLOW_AUTH_ADMIN_PASSWORD', 'MLFLOW_AUTH_ADMIN_USERNAME', 'MLFLOW_AUTH_CONFIG_PATH',
     'MLFLOW_FLASK_SERVER_SECRET_KEY']
    >>> Admin("alice", "correct horse battery")
    Admin(username='alice', password='***')
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import typing as T
import urllib.error
import urllib.request
from pathlib import Path

from regression_model_template.server.processes import write_private

__all__ = ["MIN_PASSWORD", "Admin", "admin_from", "auth_environment", "check_admin", "secrets_of"]

USERNAME, PASSWORD = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
#: MLflow's own rule for a user's password (3.x refuses shorter ones when it creates a user).
MIN_PASSWORD = 12
# The password that MLflow versions before 3.17 shipped in their ini: refused for an admin.
_PUBLIC_PASSWORD = "password1234"


class Admin(T.NamedTuple):
    """The server's admin: a user name and a password (never shown)."""

    username: str
    password: str

    def __repr__(self) -> str:
        return f"Admin(username={self.username!r}, password='***')"


def admin_from(environ: T.Mapping[str, str]) -> Admin:
    """The admin named by ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``.

    Raises:
        ValueError: one of them is missing or empty, or the password is refused by MLflow's
            rules; the message names the variables, never the password.

    Example:
        >>> admin_from({"MLFLOW_TRACKING_USERNAME": "alice"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: a server facing a network needs its admin: set MLFLOW_TRACKING_USERNAME and ...
    """
    username, password = environ.get(USERNAME, ""), environ.get(PASSWORD, "")
    if not username or not password:
        raise ValueError(
            f"a server facing a network needs its admin: set {USERNAME} and {PASSWORD} "
            f"(at least {MIN_PASSWORD} characters)"
        )
    if len(password) < MIN_PASSWORD or password == _PUBLIC_PASSWORD:
        raise ValueError(
            f"{PASSWORD} must be at least {MIN_PASSWORD} characters, and not the default "
            "password older MLflow versions shipped (MLflow refuses both for a user)"
        )
    return Admin(username, password)


#: Seconds a server worker trusts a password it has checked. MLflow checks the password's hash
#: (PBKDF2, slow by design) on every request unless this is set: measured here from another
#: host, 432 ms per authenticated request without it, 19.5 ms with it. A password changed or
#: a user deleted through MLflow takes effect at once on the worker that handled the change,
#: and within this many seconds on the others.
AUTH_CACHE_SECONDS = 60


def auth_environment(folder: Path, admin: Admin) -> dict[str, str]:
    """Prepare ``folder/auth`` and return the environment that turns the app on for ``admin``.

    The ini is written at each start (it holds paths, no secret); the secret key is made the
    first time and read back afterwards.
    """
    home = Path(folder).absolute() / "auth"
    home.mkdir(parents=True, exist_ok=True)
    home.chmod(0o700)
    key_file = home / "secret_key"
    if not key_file.exists():
        write_private(key_file, secrets.token_urlsafe(32).encode())
    key = key_file.read_text(encoding="utf-8").strip()
    ini = home / "basic_auth.ini"
    # READ: every user sees every experiment; writes need a grant (or being its creator).
    settings = (
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{home / 'users.db'}\n"
        f"admin_username = {admin.username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
    )
    write_private(ini, settings.encode())
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": key,
        "MLFLOW_AUTH_ADMIN_USERNAME": admin.username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin.password,
    }


def secrets_of(auth_env: T.Mapping[str, str]) -> list[str]:
    """The values of ``auth_env`` that must never be shown: the password and the key."""
    names = ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
    return [auth_env[name] for name in names if auth_env.get(name)]


def check_admin(url: str, auth_env: T.Mapping[str, str], certificate: Path | None = None) -> None:
    """Check that the server at ``url`` lets its admin in, with the admin's rights.

    MLflow sets the admin's password only when it creates the users' database: a database
    kept from an earlier start, with another password, would leave the admin locked out
    while the server looks fine. This makes that one clear error at start instead.

    Raises:
        RuntimeError: the password is refused, or the user is not an admin; what to do.
    """
    username = auth_env["MLFLOW_AUTH_ADMIN_USERNAME"]
    token = base64.b64encode(f"{username}:{auth_env['MLFLOW_AUTH_ADMIN_PASSWORD']}".encode())
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/users/current", headers={"Authorization": f"Basic {token.decode()}"}
    )
    context = ssl.create_default_context(cafile=certificate) if certificate else None
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    database = Path(auth_env["MLFLOW_AUTH_CONFIG_PATH"]).with_name("users.db")
    try:
        with opener.open(request, timeout=30) as response:
            user = json.load(response).get("user", {})
    except urllib.error.HTTPError as error:
        if error.code != 401:
            raise RuntimeError(f"the server answered {error.code} to its admin's login") from None
        raise RuntimeError(
            f"the users' database {database} holds the user {username!r} with another password "
            f"than {PASSWORD} (MLflow sets the admin's password only when it creates the "
            f"database): start with {PASSWORD} set to the stored password, then change it with "
            f"mlflow.server.get_app_client('basic-auth', tracking_uri=...)"
            f".update_user_password({username!r}, NEW); or delete {database} to start anew "
            "(its users and permissions are lost)"
        ) from None
    if not user.get("is_admin"):
        raise RuntimeError(
            f"the user {username!r} in {database} is not an admin: start the server as an "
            f"admin ({USERNAME}), or have one run update_user_admin({username!r}, True)"
        )
