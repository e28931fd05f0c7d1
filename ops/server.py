"""The operations endpoint: ``/metrics`` (Prometheus text format), ``/healthz`` and
``/readyz`` (200 or 503 with a JSON body saying why) on one port, bound to 127.0.0.1 unless
configured otherwise. A daemon thread serves it; the process's own loops never wait on it."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import REGISTRY, CollectorRegistry

from .health import HEALTH, Health

log = logging.getLogger(__name__)


class OpsServer:
    """``port=0`` picks a free port (read it from ``.port`` or the log line)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 9400, health: Health = HEALTH,
                 registry: CollectorRegistry = REGISTRY):
        handler = _handler(health, registry)
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as err:
            raise OSError(f"cannot serve metrics and health on {host}:{port}: {err.strerror or err} "
                          "(another process there? pick another --metrics-port, or 0 for any free one)") from None
        self.httpd.daemon_threads = True
        self.host, self.port = host, self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ops-http", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> OpsServer:
        self.thread.start()
        log.info("metrics and health on %s (/metrics, /healthz, /readyz)", self.url)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> OpsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _handler(health: Health, registry: CollectorRegistry):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the stdlib's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/readyz"):
                ok, body = health.liveness() if path == "/healthz" else health.readiness()
                self._send(200 if ok else 503, json.dumps({"ok": ok, **body}).encode() + b"\n", "application/json")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args) -> None:  # probes every few seconds: no access log
            pass

    return Handler
