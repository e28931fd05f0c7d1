"""Review feeding back into scoring: a false alarm's frames, added with one action as normal
references or calibration frames of the stream's scoring profile.

The frames are the archive's copies of the event's anomalous frames (the JPEG as the worker
scored it), at most ``most`` of them spread over the event, written into the folder the
profile names (``profile.references`` or ``profile.calibration``, as the workers read it) as
``feedback-<stream>-<session>-<seq>.jpg``: whole files only (written aside, then renamed),
the same name for the same frame, so adding twice adds nothing. A worker sees the folder
change and prepares the profile again within ``worker.reload_s`` (``workers/prepared.py``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..sinks.archive import safe_component
from ..workers.profiles import StreamProfile
from .files import ArchiveFiles

TARGETS = {"references": "references", "calibration": "calibration"}


class FeedbackError(ValueError):
    """The frames cannot be added (no such folder in the profile, not a false alarm, ...)."""


def spread(items: list[int], most: int) -> list[int]:
    """At most ``most`` of ``items``, evenly spaced, first and last included."""
    if len(items) <= most:
        return list(items)
    if most == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (most - 1))] for i in range(most)]


def add_frames(event: dict, target: str, profile: StreamProfile, files: ArchiveFiles, most: int) -> dict:
    if target not in TARGETS:
        raise FeedbackError(f"target must be one of {', '.join(TARGETS)}")
    review = event.get("review") or {}
    if review.get("verdict") != "false_alarm":
        raise FeedbackError("only a false alarm's frames are normal: mark the event a false alarm first")
    folder = getattr(profile, TARGETS[target])
    if folder is None:
        raise FeedbackError(f"the profile of stream {event['stream']!r} has no {target} folder "
                            f"(set profile.{target}, or {target} under its streams: pattern)")
    folder = Path(folder)
    if not folder.is_dir():
        raise FeedbackError(f"the profile's {target} folder {folder} is not here (is it mounted in the console?)")
    stream, session = event["stream"], event["session"]
    added, missing = [], 0
    for seq in spread(sorted(set(event["alert"]["frames"])), most):
        row = files.row(stream, session, seq)
        image = files.image(row, "frame") if row is not None else None
        if image is None:
            missing += 1
            continue
        name = f"feedback-{safe_component(stream)}-{safe_component(session or 'none')}-{seq:06d}.jpg"
        _write_whole(folder / name, image[0])
        added.append(name)
    if not added:
        raise FeedbackError("none of the event's frames is in the archive (is the archive sink running?)")
    return {"target": target, "folder": str(folder), "added": added, "missing": missing}


def _write_whole(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".feedback-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
