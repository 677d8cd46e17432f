"""A real S3 endpoint for tests: moto's standalone server on loopback (never a patched boto3).

``tests/conftest.py`` loads this module as a pytest plugin, so a test only takes an ``s3_server`` argument; or wrap
:func:`clean_s3` in a fixture of your own. The
server starts once per test process on a free port of 127.0.0.1; each test gets a clean state (every bucket
deleted), fake credentials in the environment (``AWS_ACCESS_KEY_ID=testing`` ...) and isolation from any AWS config
or credentials file on the machine.

Fault tests can wrap :attr:`S3Server.endpoint_url` in their own proxy (throttling, resets, slow reads) and point
``S3Settings.endpoint_url`` at the proxy instead.
"""

from __future__ import annotations

import atexit
import os
import threading
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REGION = "us-east-1"


def aws_environment(
    access_key_id: str = "testing", secret: str = "testing", session_token: str = "testing"
) -> dict[str, str]:
    """Environment variables for talking to the loopback server: throwaway credentials, none of the host's AWS config
    files or instance metadata, and no proxy for loopback. For ``monkeypatch.setenv`` and for subprocess ``env``."""
    return {
        "AWS_ACCESS_KEY_ID": access_key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_SECURITY_TOKEN": session_token,
        "AWS_SESSION_TOKEN": session_token,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


@dataclass(frozen=True)
class S3Server:
    """A running moto server and helpers to fill it."""

    endpoint_url: str
    region: str = REGION

    def client(self) -> Any:
        """A boto3 S3 client for this server (credentials from the environment the fixture set)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region)

    def create_bucket(self, bucket: str, objects: Mapping[str, bytes] | None = None) -> None:
        """Create ``bucket`` and upload ``objects`` (key -> bytes)."""
        client = self.client()
        client.create_bucket(Bucket=bucket)
        for key, data in (objects or {}).items():
            client.put_object(Bucket=bucket, Key=key, Body=data)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        """Upload one object."""
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def upload_folder(self, bucket: str, folder: Path, prefix: str = "") -> list[str]:
        """Upload every file below ``folder`` as ``prefix + relative path``; returns the keys."""
        keys = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = prefix + path.relative_to(folder).as_posix()
            self.put(bucket, key, path.read_bytes())
            keys.append(key)
        return keys

    def reset(self) -> None:
        """Delete every bucket and object (moto's reset API)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()


_SERVER: S3Server | None = None
_SERVER_LOCK = threading.Lock()


def shared_server() -> S3Server:
    """The process-wide moto server, started on first use on a free loopback port and stopped at exit."""
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None:
            from moto.server import ThreadedMotoServer

            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            atexit.register(server.stop)
            host, port = server.get_host_and_port()
            _SERVER = S3Server(endpoint_url=f"http://{host}:{port}")
        return _SERVER


def clean_s3(monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Reset the shared server and point the AWS environment at fake credentials; returns the server.

    For a fixture of another name: ``@pytest.fixture def s3(monkeypatch): return clean_s3(monkeypatch)``.
    """
    server = shared_server()
    for name, value in aws_environment().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    server.reset()
    return server


@pytest.fixture
def s3_server(monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """A clean moto S3 server on loopback with fake credentials in the environment."""
    return clean_s3(monkeypatch)
