"""The JSONL file channel: one JSON line per alert, never the same alert twice (``alerts.jsonl``,
``--jsonl`` on ``linewatch sink alerts``; ``linewatch run`` writes ``OUT/alerts.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ...bus.messages import AlertMsg, encode
from .base import AlertChannel, DeliveryPolicy, Flag, OutputError, register_channel


class JsonlSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    jsonl: str | None = None  # the file; None: no JSONL channel


@register_channel
class JsonlOutput(AlertChannel):
    """One JSON line per alert, appended and flushed (not fsynced). The (event_id, status) pairs
    already in the file are read at start and never written again, so an alert the sink was
    killed before recording as delivered is not repeated."""

    name = "jsonl"
    Settings = JsonlSettings
    flags = (Flag("--jsonl", "jsonl", "append each alert to this JSONL file", sink_only=True),)

    @classmethod
    def from_settings(cls, settings: JsonlSettings, delivery: DeliveryPolicy) -> list[AlertChannel]:
        return [cls(settings.jsonl)] if settings.jsonl else []

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.written: set[tuple[str, str]] = set()
        torn_tail = False
        if self.path.exists():
            with self.path.open("rb") as existing:
                for line in existing:
                    try:
                        row = json.loads(line)
                        self.written.add((row["event_id"], row["status"]))
                    except (ValueError, KeyError, TypeError):
                        pass  # a line torn by a crash mid-write: that alert gets written again
                    torn_tail = not line.endswith(b"\n")
        self.file = self.path.open("ab")
        if torn_tail:  # never glue a new line onto a torn one
            self.file.write(b"\n")

    def send(self, alert: AlertMsg) -> None:
        key = (alert.event_id, alert.status)
        if key in self.written:
            return
        try:
            self.file.write(encode(alert) + b"\n")
            self.file.flush()
        except OSError as err:  # disk full, ...
            raise OutputError(f"{self.path}: {err}") from None
        self.written.add(key)

    def close(self) -> None:
        self.file.close()
