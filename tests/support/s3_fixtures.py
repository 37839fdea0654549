"""A real S3-protocol server for the tests: moto's standalone server on a free 127.0.0.1 port.

``s3_server`` (session) starts it once; ``s3`` (per test) creates a fresh bucket, points the storage
layer at the server through the environment (``AWS_*`` test credentials, ``LMFORGE_S3_ENDPOINT``) and
yields an :class:`S3` with the bucket's ``s3://`` URI. ``s3.enforce_auth()`` makes the server check
credentials (moto accepts any by default) until the test ends.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class S3:
    endpoint: str
    bucket: str
    client: Any

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}"

    def enforce_auth(self) -> None:
        from moto import settings
        from moto.core.authorization import ActionAuthenticatorMixin

        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=HOST, port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == HOST
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.stop()


_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def filled_bucket(server: str, bucket: str, trees: dict[str, str | Path]) -> str:
    """Create ``bucket`` on ``server`` holding every file under each local directory of ``trees`` at
    ``<key>/<relative path>``; return ``s3://bucket``. For module-scoped fixtures that upload read-only data
    once (the per-test ``s3`` fixture sets the environment the jobs read; this needs none)."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=server,
        region_name=_ENV["AWS_DEFAULT_REGION"],
        aws_access_key_id=_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=_ENV["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=bucket)
    for prefix, local in trees.items():
        for f in sorted(p for p in Path(local).rglob("*") if p.is_file()):
            client.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}")
    return f"s3://{bucket}"


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[S3]:
    import boto3
    from moto import settings

    for key in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    for key, value in _ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("LMFORGE_S3_ENDPOINT", s3_server)
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    try:
        yield S3(s3_server, name, client)
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before


__all__ = ["S3", "filled_bucket", "s3", "s3_server"]
