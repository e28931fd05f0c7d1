"""Micro-batches off the frames consumer: up to ``max_batch`` records, waiting at most
``max_wait_s`` after the first for company.

Batching pays for the model (one forward for several frames) and costs latency (the first
frame waits for the others), so the wait is bounded and starts at the first record, not at
the poll. The very first batch holds one frame: the first score then comes as soon as the
model is ready, not a whole batch later. With a batch in flight on the device (``busy``) the
poll takes what is there and does not wait: nothing waiting means the pending batch is
published first.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..bus import Consumer, Record

IDLE_POLL_S = 0.5  # how long a poll with nothing in flight waits for a first record


class Batcher:
    def __init__(self, max_batch: int = 8, max_wait_s: float = 0.02,
                 clock: Callable[[], float] = time.monotonic):
        self.max_batch, self.max_wait_s, self.clock = max_batch, max_wait_s, clock

    def size(self, first: bool) -> int:
        """The most records a batch takes: one for the first (its score at once), else ``max_batch``."""
        return 1 if first else self.max_batch

    def gather(self, consumer: Consumer, *, first: bool = False, busy: bool = False) -> list[Record]:
        """Up to ``size(first)`` records; [] when none came within the poll."""
        size = self.size(first)
        records = consumer.poll(0.0 if busy else IDLE_POLL_S, size)
        deadline = self.clock() + self.max_wait_s
        while records and len(records) < size:
            left = deadline - self.clock()
            if left <= 0:
                break
            more = consumer.poll(left, size - len(records))
            if not more:
                break
            records += more
        return records
