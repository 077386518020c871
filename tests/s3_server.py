"""An S3 server for tests: moto in server mode on 127.0.0.1 (a port the OS picks), one per session.

``use_fake_aws_credentials()`` runs when tests/conftest.py is imported, before any Ray process
starts, so Ray Train's controller and workers inherit the fake credentials. The real ones are
never used. pyarrow sends unsigned requests when it finds no credentials, and moto then stores
the chunked-upload framing as the object's bytes. The endpoint is set only when the server
starts (``AWS_ENDPOINT_URL_S3``); processes started before that get it inside the pickled
filesystem (see rayapp/storage.py).
"""

from __future__ import annotations

import logging
import os
import urllib.request
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",   # no instance-metadata lookups (they time out off EC2)
}
REAL_AWS_VARS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def use_fake_aws_credentials() -> None:
    for name in REAL_AWS_VARS:
        os.environ.pop(name, None)
    os.environ.update(FAKE_AWS_ENV)


@dataclass
class S3Server:
    endpoint: str   # http://127.0.0.1:PORT

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def create_bucket(self) -> str:
        name = f"rayapp-test-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    @contextmanager
    def require_auth(self):
        """Make moto check credentials (it accepts any by default): the fake ones are then refused
        as unknown access keys. This is moto's documented /moto-api/reset-auth switch."""
        self._set_auth(b"0")
        try:
            yield
        finally:
            self._set_auth(b"inf")

    def _set_auth(self, count: bytes) -> None:
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=count, method="POST",
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()


@pytest.fixture(scope="session")
def s3_server():
    """moto's ThreadedMotoServer on 127.0.0.1 only; AWS_ENDPOINT_URL_S3 points at it until the session ends."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1", host
    patch = pytest.MonkeyPatch()
    patch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    try:
        yield S3Server(f"http://127.0.0.1:{port}")
    finally:
        patch.undo()
        server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket for one test; its name."""
    return s3_server.create_bucket()
