"""Outages of the services a part depends on (Kafka, Redis, S3): wait, retry, and say so once.

- ``Backoff``: retry delays, doubling to a cap, jittered.
- ``OUTAGES``: the process's outage state, per part (``ingest``, ``worker``, ``sink-archive``,
  ...) and dependency. An outage logs one warning when it begins and one line when it ends,
  never a line per retry; ``OUTAGES.ready()`` and ``OUTAGES.snapshot()`` are what a
  ``/readyz`` endpoint reports (a readiness check reads them at each probe). A part is not
  ready while a dependency it cannot work without is down; one it can do without (Redis for
  a worker, which then computes its text anchors itself) only degrades it.
- ``retrying(call, ...)``: run ``call`` until it stops raising the given transient errors,
  through ``OUTAGES``; ``StopRequested`` when the process is asked to stop meanwhile.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .redact import redact

log = logging.getLogger("linewatch.outages")

T = TypeVar("T")


class StopRequested(Exception):
    """The process was asked to stop (SIGTERM, Ctrl-C) while a part waited for a dependency;
    what was not finished is left for the next run (nothing was committed past it)."""


@dataclass(frozen=True)
class Backoff:
    """Retry delays: ``initial`` doubling up to ``cap`` seconds, each jittered by +-20 % so
    parts (or cameras) that lost a service together do not retry in lockstep;
    ``max_retries=None`` retries forever."""

    initial: float = 0.5
    cap: float = 30.0
    max_retries: int | None = None

    def delay(self, attempt: int) -> float:
        return min(self.cap, self.initial * 2 ** attempt) * random.uniform(0.8, 1.2)


SERVICE_BACKOFF = Backoff(initial=0.25, cap=5.0)  # a service back is noticed within ~5 s


@dataclass
class Outage:
    reason: str
    since: float  # time.time() it began
    began: float  # time.monotonic() it began
    sources: set[str] = field(default_factory=set)  # which clients of the part see it (produce, consume, ...)
    critical: bool = True  # the part cannot work without the dependency (else: degraded)
    back_at: float | None = None  # time.monotonic() every client saw it back; over once that lasts


RECOVERY_S = 3.0  # how long a dependency must stay back before its outage is over (said once)


class Outages:
    """Open outages by (part, dependency). Several clients of one part (a worker's producer
    and consumer) report the same outage: it begins with the first report and ends when every
    client that reported it has seen the dependency back and it has stayed back ``recovery_s``
    (clients recover at different moments: a producer's first acknowledgement can come before
    the consumer's first commit fails again). A report meanwhile continues the same outage:
    one warning, one line, however it flaps. While it recovers the part counts as ready."""

    def __init__(self, recovery_s: float = RECOVERY_S):
        self.recovery_s = recovery_s
        self._lock = threading.Lock()
        self._parts: set[str] = set()
        self._outages: dict[tuple[str, str], Outage] = {}

    def reset(self) -> None:
        """Forget every part and outage (a process that runs several commands: tests)."""
        with self._lock:
            self._parts.clear()
            self._outages.clear()

    def register(self, part: str) -> None:
        with self._lock:
            self._parts.add(part)

    def down(self, part: str, dependency: str, reason: object, source: str = "", critical: bool = True) -> None:
        reason, dependency = redact(reason), redact(dependency)
        with self._lock:
            self._parts.add(part)
            outage = self._outages.get((part, dependency))
            if outage is not None:
                outage.sources.add(source)
                outage.back_at = None  # not over yet: the same outage goes on
                return
            self._outages[(part, dependency)] = Outage(reason, time.time(), time.monotonic(), {source}, critical)
        log.warning("%s: %s unavailable (%s); %s until it is back", part, dependency, reason,
                    "retrying with backoff" if critical else "going on without it")

    def up(self, part: str, dependency: str, source: str = "") -> None:
        if not self._outages:  # the common case (every acknowledged record): nothing to end
            return
        dependency = redact(dependency)
        with self._lock:
            outage = self._outages.get((part, dependency))
            if outage is None:
                return
            outage.sources.discard(source)
            if outage.sources or outage.back_at is not None:
                return
            outage.back_at = back_at = time.monotonic()
        if self.recovery_s <= 0:
            self._over(part, dependency, back_at)
            return
        timer = threading.Timer(self.recovery_s, self._over, (part, dependency, back_at))
        timer.daemon = True
        timer.start()

    def settle(self) -> None:
        """End every outage that is recovering now, at once (a part finishing its work: its
        "is back" line must not be lost with the process)."""
        with self._lock:
            recovering = [(part, dependency, outage.back_at) for (part, dependency), outage in self._outages.items()
                          if outage.back_at is not None]
        for part, dependency, back_at in recovering:
            self._over(part, dependency, back_at)

    def _over(self, part: str, dependency: str, back_at: float) -> None:
        """The outage is over if it has stayed back since ``back_at``."""
        with self._lock:
            outage = self._outages.get((part, dependency))
            if outage is None or outage.back_at != back_at:
                return
            del self._outages[(part, dependency)]
        log.info("%s: %s is back after %.1f s", part, dependency, back_at - outage.began)

    def ready(self, part: str | None = None) -> bool:
        with self._lock:
            return not any(outage.critical and outage.back_at is None and part in (p, None)
                           for (p, _), outage in self._outages.items())

    def snapshot(self) -> dict:
        """{"ready": bool, "parts": {part: {"ready": bool, "down": {dependency: {"reason", "since",
        "critical"}}}}}: what a /readyz endpoint reports."""
        with self._lock:
            parts = {part: {"ready": True, "down": {}} for part in self._parts}
            for (part, dependency), outage in self._outages.items():
                if outage.back_at is not None:
                    continue  # recovering
                parts[part]["ready"] &= not outage.critical
                parts[part]["down"][dependency] = {"reason": outage.reason, "since": outage.since,
                                                   "critical": outage.critical}
        return {"ready": all(p["ready"] for p in parts.values()), "parts": parts}


OUTAGES = Outages()


def retrying(call: Callable[[], T], *, part: str, dependency: str, transient: tuple[type[BaseException], ...],
             stop: threading.Event | None, backoff: Backoff = SERVICE_BACKOFF, source: str = "",
             outages: Outages = OUTAGES) -> T:
    """``call()``, retried with ``backoff`` while it raises one of ``transient`` (the outage is
    reported to ``outages``); other errors pass through. StopRequested once ``stop`` is set."""
    attempt = 0
    while True:
        try:
            result = call()
        except transient as err:
            outages.down(part, dependency, describe(err), source)
            if stop is None:
                time.sleep(backoff.delay(attempt))
            elif stop.wait(backoff.delay(attempt)):
                raise StopRequested(f"{part}: stopped while {dependency} was unavailable") from None
            attempt += 1
            continue
        outages.up(part, dependency, source)
        return result


def describe(err: BaseException) -> str:
    """One line for an exception: its type and first line, secrets redacted."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    name = type(err).__name__
    return redact(text if text.startswith(name) else f"{name}: {text}" if text else name)
