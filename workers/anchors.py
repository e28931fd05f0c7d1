"""Text anchors cached by anchor key: a small in-process LRU in front of Redis and/or a folder.

Encoding a prompt pack costs seconds (hundreds of sentences through the text tower), so a
worker encodes a class once and shares it through Redis; every other worker, and every
restart, fetches the bytes instead. The key hashes the backbone identity and every prompt
sentence (``AnomalyMethod.anchor_key``), so a stale entry can never be served for another
model or prompt set. Redis is an optimisation, not a dependency: when it is down the worker
computes locally and says so once (``bus.outages``: one line when the outage begins, one when it
ends). While a worker runs it looks every ``UPKEEP_S`` whether Redis still holds the anchors it
knows, and writes back the ones it lacks: after an outage, or a Redis restarted empty, the
next worker to start fetches them instead of encoding them again. The folder (the embedded run's default,
``~/.cache/linewatch/anchors``) keeps them across runs on one machine: a second
``linewatch run`` starts in seconds instead of re-encoding the pack.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from ..bus.outages import OUTAGES, Outages, describe
from ..bus.redact import redact
from ..ops import metrics
from ..scoring.prompts import TextAnchors

log = logging.getLogger(__name__)

TTL_S = 30 * 24 * 3600  # anchors are immutable per key; the TTL only clears keys nobody uses
UPKEEP_S = 10.0  # how often a running worker checks that Redis still holds its anchors


class AnchorCache:
    def __init__(self, redis_url: str | None = None, capacity: int = 32, folder: str | Path | None = None,
                 redis_options: dict | None = None, part: str = "worker", outages: Outages = OUTAGES):
        """``outages``: where a Redis outage is reported (the process's own by default)."""
        self.capacity = capacity
        self.folder = Path(folder).expanduser() if folder else None
        self.local: OrderedDict[str, TextAnchors] = OrderedDict()
        self.lock = threading.Lock()  # ``local`` is read by the upkeep thread too
        self.redis = None
        self.redis_url = redis_url
        self.part, self.dependency, self.outages = part, f"Redis at {redact(redis_url)}", outages
        self.stats = {"local_hits": 0, "redis_hits": 0, "file_hits": 0, "computed": 0, "redis_errors": 0,
                      "republished": 0}
        if redis_url:
            import redis

            try:
                self.redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2,
                                                  **(redis_options or {}))
            except ValueError as err:
                raise ValueError(f"--redis-url {redact(redis_url)!r}: {redact(err)}") from None

    def get(self, key: str, build: Callable[[], TextAnchors]) -> TextAnchors:
        with self.lock:
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
        with self.lock:
            self.local[key] = anchors
            if len(self.local) > self.capacity:
                self.local.popitem(last=False)
        return anchors

    def keep_in_redis(self, stop: threading.Event) -> threading.Event:
        """Until ``stop`` or the returned event is set, every UPKEEP_S, write back to Redis the
        anchors it lacks (a thread; nothing to do without Redis)."""
        done = threading.Event()
        if self.redis is not None:
            def upkeep() -> None:
                while not done.wait(UPKEEP_S) and not stop.is_set():
                    self.republish()
            threading.Thread(target=upkeep, name="anchor-upkeep", daemon=True).start()
        return done

    def republish(self) -> int:
        """Write the anchors this process knows and Redis lacks back to Redis; how many."""
        with self.lock:
            known = list(self.local.items())
        if not known:
            return 0

        def missing(r):
            pipe = r.pipeline(transaction=False)
            for key, _ in known:
                pipe.exists(key)
            return [(key, anchors) for (key, anchors), found in zip(known, pipe.execute()) if not found]

        lacking = self._redis_call(missing) or []
        written = sum(self._redis_call(lambda r, k=key, a=anchors: r.set(k, a.to_bytes(), ex=TTL_S)) is not None
                      for key, anchors in lacking)
        if written:
            self.stats["republished"] += written
            log.info("wrote %d anchor set(s) back to %s, which had lost them", written, self.dependency)
        return written

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
            self.outages.down(self.part, self.dependency, f"{describe(err)}; text anchors computed locally", "anchors",
                              critical=False)
            return None
        self.outages.up(self.part, self.dependency, "anchors")
        return result

