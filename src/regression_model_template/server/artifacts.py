"""Where the team server keeps artifacts: a folder, or an S3 bucket (the ``s3`` extra).

The stack hands the destination to ``mlflow server --artifacts-destination``; clients upload
through the server (proxied artifacts), so only the server needs the storage's credentials.
For S3 they come, as MLflow reads them, from ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN`` (or ``AWS_PROFILE``, or an IAM role) and ``AWS_DEFAULT_REGION``; an
S3-compatible store (MinIO, Ceph, moto) is named by ``MLFLOW_S3_ENDPOINT_URL``.

boto3 is imported only here, and only when an S3 destination is checked: the package installed
without the ``s3`` extra has no boto3, and says how to get it.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import typing as T
import urllib.parse
from pathlib import Path

from regression_model_template.io.masking import mask_uri, redact

__all__ = ["OPTION", "artifacts_destination", "check_destination", "storage_secrets"]

#: The command line's option, named by every error of this module.
OPTION = "--artifacts-destination"

_INSTALL = "pip install 'regression-model-template[s3]'"

#: The variables whose values must never be shown (see :func:`storage_secrets`).
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")

#: A check gives up fast: a wrong destination should fail the start in seconds, not minutes.
_CONNECT_TIMEOUT = 5.0
_READ_TIMEOUT = 10.0
_ATTEMPTS = 2


def artifacts_destination(value: str | None, folder: Path) -> str:
    """The destination ``mlflow server`` is given, from the option's ``value``.

    None gives ``folder/artifacts``; a path gives itself, absolute; ``s3://bucket[/prefix]``
    gives itself. Nothing is created or contacted here (see :func:`check_destination`).

    Example:
        >>> artifacts_destination(None, Path("/srv/team"))
        '/srv/team/artifacts'
        >>> artifacts_destination("/data/artifacts", Path("/srv/team"))
        '/data/artifacts'
        >>> artifacts_destination("gs://bucket/x", Path("/srv/team"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: --artifacts-destination gs://bucket/x: the scheme gs:// is not supported; ...

    Raises:
        ValueError: naming the option and the cause: an empty value, a scheme other than
            ``s3://``, ``s3://`` without a bucket or with credentials in it, or an S3
            destination while boto3 is not installed.
    """
    if value is None:
        return str((folder / "artifacts").absolute())
    if not value.strip():
        raise ValueError(f"{OPTION} is empty: give a folder or s3://bucket[/prefix]")
    scheme, separator, _ = value.partition("://")
    if not separator or "/" in scheme:  # no scheme: a path (a colon may be in a file name)
        return str(Path(value).expanduser().absolute())
    if scheme.lower() != "s3":
        raise ValueError(
            f"{OPTION} {value}: the scheme {scheme}:// is not supported; "
            "give a folder or s3://bucket[/prefix]"
        )
    parts = urllib.parse.urlsplit(value)
    if "@" in parts.netloc:  # never echo it: what stands before @ may be a secret
        raise ValueError(
            f"{OPTION}: credentials do not go into the S3 URI; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY in the server's environment"
        )
    if not parts.netloc:
        raise ValueError(f"{OPTION} {value}: no bucket; give s3://bucket[/prefix]")
    if parts.query or parts.fragment:
        raise ValueError(f"{OPTION} {value}: an S3 destination has no ? or #")
    if not _boto3_installed():
        raise ValueError(f"{OPTION} {value}: an S3 destination needs boto3: {_INSTALL}")
    return "s3://" + value[len("s3://") :]  # S3:// too: one spelling for the checks after


def check_destination(uri: str) -> None:
    """Make sure the server will be able to store artifacts at ``uri``; raise if not.

    The stack runs this once at start, so that a wrong destination fails the start with a
    clear message instead of the first upload of a training job hours later.

    A folder is created when missing, and a file is written into it and removed. For
    ``s3://bucket[/prefix]``, the bucket is asked for (``HeadBucket``) with the settings
    MLflow's own S3 client reads from this process's environment: the ``AWS_*`` credentials,
    profile and region, ``MLFLOW_S3_ENDPOINT_URL``, ``MLFLOW_S3_IGNORE_TLS``,
    ``MLFLOW_S3_EXPECTED_BUCKET_OWNER``, ``MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE`` and
    ``MLFLOW_EXPERIMENTAL_S3_SIGNATURE_VERSION``. A silent endpoint is given up on within
    about half a minute (short timeouts, one retry).

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     check_destination(f"{folder}/artifacts")

    Raises:
        RuntimeError: naming the option, the destination and the cause (a folder that cannot
            be created or written; no S3 credentials, a missing bucket, refused credentials,
            an unreachable endpoint, boto3 missing). No secret is ever in it.
    """
    if uri.startswith("s3://"):
        _check_bucket(uri)
    else:
        _check_folder(Path(uri))


def storage_secrets(environ: T.Mapping[str, str]) -> set[str]:
    """The storage's secrets in ``environ``, to mask wherever output is shown.

    Example:
        >>> sorted(storage_secrets({"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_SESSION_TOKEN": "",
        ...                         "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE"}))
        ['s3cr3t']
    """
    return {environ[name] for name in _SECRET_VARIABLES if environ.get(name)}


def _boto3_installed() -> bool:
    # find_spec, not an import: importing boto3 takes ~0.7 s, and only a check needs it.
    return all(importlib.util.find_spec(name) is not None for name in ("boto3", "botocore"))


def _check_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        cause = error.strerror or str(error)
        raise RuntimeError(
            f"{OPTION} {folder}: the folder cannot be created or written: {cause}"
        ) from None


def _check_bucket(uri: str) -> None:
    secrets = storage_secrets(os.environ)

    def failure(cause: str) -> RuntimeError:
        return RuntimeError(redact(f"{OPTION} {uri}: {cause}", secrets))

    try:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )
    except ImportError as error:
        raise failure(f"an S3 destination needs boto3 ({error}): {_INSTALL}") from None

    bucket = urllib.parse.urlsplit(uri).netloc
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    where = mask_uri(endpoint) if endpoint else "AWS S3"
    signature = os.environ.get("MLFLOW_EXPERIMENTAL_S3_SIGNATURE_VERSION", "s3v4")
    config = Config(
        signature_version=UNSIGNED if signature.lower() == "unsigned" else signature,
        s3={"addressing_style": os.environ.get("MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE", "auto")},
        connect_timeout=_CONNECT_TIMEOUT,
        read_timeout=_READ_TIMEOUT,
        retries={"max_attempts": _ATTEMPTS, "mode": "standard"},
    )
    ignore_tls = os.environ.get("MLFLOW_S3_IGNORE_TLS", "").lower() in ("true", "1")
    owner = os.environ.get("MLFLOW_S3_EXPECTED_BUCKET_OWNER")
    try:
        # A session of its own: boto3's default session keeps the credentials it found first.
        client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, verify=False if ignore_tls else None, config=config
        )
        client.head_bucket(Bucket=bucket, **({"ExpectedBucketOwner": owner} if owner else {}))
    except NoCredentialsError:
        raise failure(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
            "in the server's environment"
        ) from None
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as error:
        raise failure(
            f"cannot reach {where} (MLFLOW_S3_ENDPOINT_URL sets the endpoint): {error}"
        ) from None
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", "?"))
        if code in ("404", "NoSuchBucket"):
            raise failure(f"the bucket {bucket} does not exist at {where}; create it") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise failure(
                f"{where} refused access to the bucket {bucket} ({code}): check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions"
            ) from None
        raise failure(f"{where} answered {code}: {error}") from None
    except (BotoCoreError, ValueError) as error:  # ValueError: e.g. a malformed endpoint URL
        raise failure(f"S3 client error: {error}") from None
