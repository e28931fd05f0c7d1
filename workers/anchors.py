"""Text anchors cached by anchor key: a small in-process LRU in front of Redis and/or a folder.

Encoding a prompt pack costs seconds (hundreds of sentences through the text tower), so a
worker encodes a class once and shares it through Redis; every other worker, and every
restart, fetches the bytes instead. The key hashes the backbone identity and every prompt
sentence (``AnomalyMethod.anchor_key``), so a stale entry can never be served for another
model or prompt set. Redis is an optimisation, not a dependency: when it is down the worker
computes locally and says so once. The folder (the embedded run's default,
``~/.cache/linewatch/anchors``) keeps them across runs on one machine: a second
``linewatch run`` starts in seconds instead of re-encoding the pack.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from ..ops import metrics
from ..scoring.prompts import TextAnchors

log = logging.getLogger(__name__)

TTL_S = 30 * 24 * 3600  # anchors are immutable per key; the TTL only clears keys nobody uses


class AnchorCache:
    def __init__(self, redis_url: str | None = None, capacity: int = 32, folder: str | Path | None = None,
                 redis_options: dict | None = None):
        self.capacity = capacity
        self.folder = Path(folder).expanduser() if folder else None
        self.local: OrderedDict[str, TextAnchors] = OrderedDict()
        self.redis = None
        self.redis_url = redis_url
        self.redis_where = _where(redis_url)  # host:port for log lines: the URL may hold a password
        self.redis_down = False  # logged once per outage
        self.stats = {"local_hits": 0, "redis_hits": 0, "file_hits": 0, "computed": 0, "redis_errors": 0}
        if redis_url:
            import redis

            try:
                self.redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2,
                                                  **(redis_options or {}))
            except ValueError as err:
                raise ValueError(f"--redis-url {self.redis_where}: {err}") from None

    def get(self, key: str, build: Callable[[], TextAnchors]) -> TextAnchors:
        if key in self.local:
            self.local.move_to_end(key)
            self.stats["local_hits"] += 1
            metrics.ANCHOR_LOOKUPS.labels("local").inc()
            return self.local[key]
        anchors = self._fetch(key)
        if anchors is not None:
            self.stats["redis_hits"] += 1
            metrics.ANCHOR_LOOKUPS.labels("redis").inc()
        else:
            anchors = self._read_file(key)
            if anchors is None:
                anchors = build()
                self.stats["computed"] += 1
                metrics.ANCHOR_LOOKUPS.labels("miss").inc()
                self._write_file(key, anchors)
            else:
                self.stats["file_hits"] += 1
                metrics.ANCHOR_LOOKUPS.labels("file").inc()
            self._store(key, anchors)
        self.local[key] = anchors
        if len(self.local) > self.capacity:
            self.local.popitem(last=False)
        return anchors

    def _path(self, key: str) -> Path:
        return self.folder / f"{key.replace(':', '-')}.safetensors"  # keys are "anchors:v1:<hex>"

    def _read_file(self, key: str) -> TextAnchors | None:
        if self.folder is None or not self._path(key).is_file():
            return None
        try:
            anchors = TextAnchors.from_bytes(self._path(key).read_bytes())
        except Exception as err:  # truncated or foreign: rebuild and overwrite
            log.warning("anchor file %s unreadable (%s); recomputing", self._path(key), err)
            return None
        return anchors if anchors.key == key else None

    def _write_file(self, key: str, anchors: TextAnchors) -> None:
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            scratch = self._path(key).with_suffix(".tmp")
            scratch.write_bytes(anchors.to_bytes())
            scratch.replace(self._path(key))  # atomic: a reader never sees half a file
        except OSError as err:  # a read-only home must not stop scoring
            log.warning("cannot cache anchors in %s (%s)", self.folder, err)

    def _fetch(self, key: str) -> TextAnchors | None:
        blob = self._redis_call(lambda r: r.get(key))
        if blob is None:
            return None
        try:
            anchors = TextAnchors.from_bytes(blob)
        except Exception as err:  # a foreign or truncated value under our key: rebuild it
            log.warning("anchor cache entry %s unreadable (%s); recomputing", key, err)
            return None
        return anchors if anchors.key == key else None

    def _store(self, key: str, anchors: TextAnchors) -> None:
        self._redis_call(lambda r: r.set(key, anchors.to_bytes(), ex=TTL_S))

    def _redis_call(self, call):
        if self.redis is None:
            return None
        import redis

        try:
            result = call(self.redis)
        except redis.RedisError as err:
            self.stats["redis_errors"] += 1
            metrics.REDIS_ERRORS.inc()
            if not self.redis_down:
                log.warning("Redis at %s unavailable (%s); computing text anchors locally until it is back",
                            self.redis_where, err)
                self.redis_down = True
            return None
        if self.redis_down:
            log.warning("Redis at %s is back", self.redis_where)
            self.redis_down = False
        return result


def _where(url: str | None) -> str | None:
    """``scheme://host:port/db`` of a Redis URL, without its credentials."""
    if url is None:
        return None
    parts = urlsplit(url)
    try:
        host = f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
    except ValueError:  # a malformed port: redis-py says what is wrong
        host = "?"
    return f"{parts.scheme}://{host}{parts.path}"
