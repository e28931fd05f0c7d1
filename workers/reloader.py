"""Profile hot reload: each profile prepared once, and prepared again when its reference or
calibration folder changes (the console adds a false alarm's frames there), with no restart.

Looking at the folders costs a directory scan, so it happens at most every ``reload_s`` per
profile (0: at every use). A folder that changed but cannot be read keeps the previous
preparation scoring (its references and threshold) and is tried again at its next change;
only the first preparation of a profile lets the error through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from .prepared import PreparedProfile, folder_signature
from .profiles import StreamProfile

log = logging.getLogger("linewatch.workers.worker")  # the worker's lines, under the name operators filter on


class ProfileReloader:
    def __init__(self, build: Callable[[StreamProfile], PreparedProfile], reload_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic):
        """``build(profile)``: a fresh preparation (``PreparedProfile`` or anything with its
        ``profile``, ``signature`` and ``stale()``)."""
        self.build, self.reload_s, self.clock = build, reload_s, clock
        self.prepared: dict[str, PreparedProfile] = {}  # by ``profile.key()``
        self._looked_at: dict[str, float] = {}  # clock() the folders were last looked at, by key

    def get(self, profile: StreamProfile) -> PreparedProfile:
        """The profile prepared: built at first use, built again once its folders changed."""
        key = profile.key()
        current = self.prepared.get(key)
        if current is None or (self._due(key) and current.stale()):
            try:
                self.prepared[key] = self.build(profile)
            except (ValueError, OSError) as err:  # a folder changed under us: keep scoring with what was there
                if current is None:
                    raise
                current.signature = folder_signature(profile)  # tried again at the next change
                log.warning("profile %s/%s: its folders changed but cannot be read (%s); keeping the previous "
                            "references and threshold", profile.method, profile.class_name, err)
            else:
                if current is not None:
                    log.info("profile %s/%s re-prepared: its reference or calibration folder changed",
                             profile.method, profile.class_name)
        return self.prepared[key]

    def _due(self, key: str) -> bool:
        """At most every ``reload_s`` per profile (0: every time) the folders are looked at."""
        now = self.clock()
        if now - self._looked_at.get(key, 0.0) < self.reload_s:
            return False
        self._looked_at[key] = now
        return True
