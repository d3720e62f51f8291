"""An S3-compatible server for tests: moto's server on 127.0.0.1, stopped with its test.

The fixture ``moto_s3`` (tests/conftest.py) gives each test one, with an empty bucket.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
import typing as T
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from regression_model_template.server.processes import free_port, stop_group, tail

#: Seconds moto may take to answer (measured: ~1.2 s; the machine may be busy).
STARTUP_TIMEOUT = 60.0


class MotoS3(T.NamedTuple):
    """A running moto server: its URL, a bucket in it, and the variables that reach it.

    ``environ`` is what a server storing artifacts there is given: the endpoint
    (``MLFLOW_S3_ENDPOINT_URL``), credentials (the secret is new for each server, so that a test
    can look for it in any output) and a region.
    """

    endpoint_url: str
    bucket: str
    environ: dict[str, str]

    def keys(self, prefix: str = "") -> list[str]:
        """The keys of the objects in the bucket under ``prefix``."""
        client = self.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        """The object at ``key`` in the bucket."""
        return T.cast(bytes, self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def client(self) -> T.Any:
        """A boto3 S3 client with this server's credentials (not this process's variables)."""
        import boto3

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.environ["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.environ["AWS_SECRET_ACCESS_KEY"],
            region_name=self.environ["AWS_DEFAULT_REGION"],
        )


@contextlib.contextmanager
def moto_server(
    folder: Path, bucket: str = "team-artifacts", *, refuse_credentials: bool = False
) -> Iterator[MotoS3]:
    """Run ``python -m moto.server`` on 127.0.0.1 for the block, with ``bucket`` made in it.

    ``refuse_credentials``: moto checks every request's access key against its own (empty)
    IAM, so each one is refused with 403; no bucket is made then. The output goes to
    ``folder/moto-PORT.log``. The server's process group is stopped when the block ends, even
    when it fails.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = folder / f"moto-{port}.log"
    environ = {
        "MLFLOW_S3_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "moto-test-key",
        "AWS_SECRET_ACCESS_KEY": f"moto-secret-{secrets.token_hex(8)}",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Where credentials are missing, boto3 would next ask 169.254.169.254: never.
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    server_environ = dict(os.environ)
    if refuse_credentials:
        server_environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # moto's switch for IAM checks
    with log.open("ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env=server_environ,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole
        )
    try:
        _wait_until_answering(process, url, log)
        s3 = MotoS3(url, bucket, environ)
        if not refuse_credentials:
            s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        stop_group(process)


def _wait_until_answering(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto exited ({process.returncode}) before answering; {tail(log)}")
        try:
            with opener.open(f"{url}/moto-api/", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # an answer, whatever it says
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto did not answer within {STARTUP_TIMEOUT:g} s; {tail(log)}"
                ) from None
            time.sleep(0.05)


def served_artifact(url: str, run_id: str, path: str) -> bytes:
    """An artifact of the run as the UI gets it: from the tracking server at ``url``."""
    query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    with opener.open(f"{url}/get-artifact?{query}", timeout=60) as response:
        return bytes(response.read())
