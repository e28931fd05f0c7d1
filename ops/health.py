"""Liveness and readiness of a process, as ``/healthz`` and ``/readyz`` report them.

- **Liveness** (``/healthz``): every loop that has started beating (``beat``) has beaten
  within its bound. A loop that has not started yet (the worker building its model) does not
  count against it, and a loop that ends says so (``stop_beating``). A loop stuck on a call
  that never returns stops beating, and the orchestrator restarts the process.
- **Readiness** (``/readyz``): every named condition the process declared (``expect``) holds:
  model built, bus connected, assignment received ... A condition can be withdrawn later with
  its reason (``set(name, False, "Kafka unreachable")``), or read at each probe from elsewhere
  (``watch(name, check)``: e.g. the outage state of the services a process rides out), so a
  load balancer or an operator sees it without a restart.

One ``Health`` per process (``HEALTH``), shared by its threads; the embedded run's loops
beat under their own names.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_BOUND_S = 120.0


@dataclass
class _Loop:
    bound_s: float
    last: float


class Health:
    def __init__(self, clock: Callable[[], float] = time.monotonic, bound_s: float = DEFAULT_BOUND_S):
        self.clock = clock
        self.bound_s = bound_s  # a loop's default bound (the process's configured heartbeat_s)
        self._lock = threading.Lock()
        self._loops: dict[str, _Loop] = {}
        self._conditions: dict[str, tuple[bool, str]] = {}
        self._watched: dict[str, Callable[[], tuple[bool, object]]] = {}

    # ---- liveness ----------------------------------------------------------------------
    def beat(self, loop: str, bound_s: float | None = None) -> None:
        """``loop`` is alive now and promises to beat again within ``bound_s`` seconds (default:
        the process's ``bound_s``)."""
        with self._lock:
            self._loops[loop] = _Loop(self.bound_s if bound_s is None else bound_s, self.clock())

    def stop_beating(self, loop: str) -> None:
        """``loop`` ended on purpose: its silence is not a hang."""
        with self._lock:
            self._loops.pop(loop, None)

    def liveness(self) -> tuple[bool, dict]:
        now = self.clock()
        with self._lock:
            loops = {name: {"seconds_since_beat": round(now - loop.last, 3), "bound_s": loop.bound_s,
                            "alive": now - loop.last <= loop.bound_s} for name, loop in self._loops.items()}
        return all(loop["alive"] for loop in loops.values()), {"loops": loops}

    # ---- readiness ---------------------------------------------------------------------
    def expect(self, *names: str) -> None:
        """Declare conditions the process needs before it is ready; each starts as waiting."""
        with self._lock:
            for name in names:
                self._conditions.setdefault(name, (False, "waiting"))

    def set(self, name: str, ok: bool, detail: str = "") -> None:
        """Report a condition (declaring it if new); ``detail`` says why, for the operator."""
        with self._lock:
            self._conditions[name] = (ok, detail or ("ok" if ok else "not ready"))

    def watch(self, name: str, check: Callable[[], tuple[bool, object]]) -> None:
        """A condition read at each probe: ``check()`` -> (ok, detail), e.g. another registry's
        view of the outages a process rides out. A check that raises counts as not ready."""
        with self._lock:
            self._watched[name] = check

    def readiness(self) -> tuple[bool, dict]:
        with self._lock:
            conditions = {name: {"ok": ok, "detail": detail} for name, (ok, detail) in self._conditions.items()}
            watched = dict(self._watched)
        for name, check in watched.items():
            try:
                ok, detail = check()
            except Exception as err:  # noqa: BLE001 (a probe must answer; the failure is the answer)
                ok, detail = False, f"check failed: {type(err).__name__}: {err}"
            conditions[name] = {"ok": bool(ok), "detail": detail}
        return all(c["ok"] for c in conditions.values()), {"conditions": conditions}

    def reset(self) -> None:
        """Forget every loop and condition (a process that runs several commands: tests)."""
        with self._lock:
            self._loops.clear()
            self._conditions.clear()
            self._watched.clear()


HEALTH = Health()
