"""What a starting process is doing, and how long each step took.

Each start-up stage (the model, the text anchors, the reference memory, the calibration)
logs one line with its time when it ends, e.g. ``loading model ViT-B-16 (random weights)
... 3.2 s``, and ``STARTUP.state()`` names the stage under way, for the console's live
status (``{"stage": "calibrating", "step": 3, "steps": 4, "text": "starting: calibrating
(3/4)"}``; None once the process is ready or before it starts).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

log = logging.getLogger("linewatch.startup")


class Startup:
    def __init__(self):
        self._lock = threading.Lock()
        self._state: dict | None = None
        self._steps = 0

    def begin(self, steps: int) -> None:
        """A start of ``steps`` stages begins (the count shown as "(3/8)")."""
        with self._lock:
            self._steps, self._state = steps, {"stage": "starting", "step": 0, "steps": steps,
                                               "text": "starting"}

    @contextlib.contextmanager
    def stage(self, stage: str, text: str):
        """One stage: ``stage`` is its short name for the console ("calibrating"), ``text`` the
        log line's ("calibrating aprilgan/insulator on 16 images"). A stage that fails logs nothing."""
        with self._lock:
            step = (self._state or {}).get("step", 0) + 1
            steps = max(self._steps, step)
            self._state = {"stage": stage, "step": step, "steps": steps,
                           "text": f"starting: {stage} ({step}/{steps})"}
        started = time.monotonic()
        yield
        log.info("%s ... %.1f s", text, time.monotonic() - started)

    def ready(self) -> None:
        with self._lock:
            self._state, self._steps = None, 0

    def state(self) -> dict | None:
        with self._lock:
            return None if self._state is None else dict(self._state)


STARTUP = Startup()
