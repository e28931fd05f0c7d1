"""Log setup for the long-running commands: every line has a UTC timestamp and a level.

- ``text``: ``2026-12-01T16:50:00.123Z INFO linewatch.workers.worker: message``
- ``json``: one JSON object per line (python-json-logger) with ``time``, ``level``,
  ``logger``, ``message`` and any ``extra=`` fields a line carries (the worker's periodic
  summary puts its figures there), for log pipelines (Loki, Elasticsearch, CloudWatch).

``redact`` (text -> text) is applied to every formatted line, so secrets never reach a
handler. kafka-python logs its client configuration, SASL password included, at DEBUG: its
logger stays at CRITICAL whatever the level asked for (linewatch says what failed itself).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

from pythonjsonlogger.json import JsonFormatter

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error")
# third-party loggers kept at CRITICAL (see the module docstring): their lines would only repeat,
# at length, what linewatch's own line says (kafka-python's reconnects, huggingface_hub's
# download retries, botocore's and urllib3's retries)
QUIET = ("kafka", "huggingface_hub", "urllib3", "botocore", "boto3", "s3transfer", "filelock")


def _utc(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def __init__(self, redact: Callable[[str], str] | None = None):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.redact = redact

    def formatTime(self, record, datefmt=None) -> str:  # the stdlib's name
        return _utc(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return self.redact(line) if self.redact else line


class JsonLineFormatter(JsonFormatter):
    def __init__(self, redact: Callable[[str], str] | None = None):
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s",
                         rename_fields={"asctime": "time", "levelname": "level", "name": "logger"})
        self.redact = redact

    def formatTime(self, record, datefmt=None) -> str:
        return _utc(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return self.redact(line) if self.redact else line


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at each line (a test harness swaps it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(fmt: str = "text", level: str = "info", redact: Callable[[str], str] | None = None,
                  stream=None) -> logging.Handler:
    """Route linewatch's logs (at ``level``) and other libraries' warnings to ``stream``
    (stderr) in ``fmt``; replaces the handlers a previous call installed."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(stream) if stream is not None else _Stderr()
    handler.setFormatter(JsonLineFormatter(redact) if fmt == "json" else TextFormatter(redact))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_linewatch", False)]:
        root.removeHandler(old)
    handler._linewatch = True
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("linewatch").setLevel(level.upper())
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return handler
