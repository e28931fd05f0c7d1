"""A scored frame as the scores topic carries it: the ``ScoreMsg`` and its bytes.

- ``reduce_maps``: the model's square anomaly maps cut to the size messages carry, on the
  model's device (a few KB per frame cross to the host instead of the whole map);
- ``score_message``: the message of one frame (anomalous at or above its profile's
  threshold, and then carrying the frame's JPEG, so the archive and alerts need not fetch it);
- ``encode_within``: its bytes within the bus's message size, the frame re-encoded smaller
  or left out where the whole would not fit (a score too large is otherwise refused by the
  broker, and the frame would be lost to the sinks).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..bus import Record, record_size
from ..bus.jpeg import shrink_jpeg
from ..bus.maps import MAP_MAX_SIDE, encode_map
from ..bus.messages import FrameMeta, FrameRef, Latency, ScoreMsg, encode
from .prepared import PreparedProfile

log = logging.getLogger("linewatch.workers.worker")  # the worker's lines, under the name operators filter on


def score_message(record: Record, meta: FrameMeta, value: float, anomaly_map: np.ndarray | None,
                  prepared: PreparedProfile, worker: str, latency: Latency) -> ScoreMsg:
    """The message of frame ``record`` (``meta``) scored ``value`` by ``prepared``; an
    anomalous frame carries its JPEG."""
    anomalous = value >= prepared.threshold
    return ScoreMsg(
        frame=meta, frame_ref=FrameRef(topic=record.topic, partition=record.partition, offset=record.offset),
        image_score=value, threshold=prepared.threshold, anomalous=anomalous,
        map=encode_map(anomaly_map), method=prepared.profile.method,
        class_name=prepared.profile.class_name, anchor_key=prepared.anchor_key,
        model=prepared.model, worker=worker, latency=latency,
        frame_jpeg=record.value if anomalous else None)


def encode_within(message: ScoreMsg, limit: int) -> bytes:
    """The score's bytes, within ``limit`` (the bus's message size): an anomalous frame too
    large to travel whole is re-encoded smaller (``frame_jpeg_note="reduced"``) or left out
    (``"dropped"``); the bus raises RecordTooLarge if even that does not fit."""
    data, key = encode(message), message.frame.stream.encode()
    if record_size(data, key) <= limit or message.frame_jpeg is None:
        return data
    bare = encode(message.model_copy(update={"frame_jpeg": None, "frame_jpeg_note": "dropped"}))
    room = (limit - record_size(bare, key) - 64) * 3 // 4  # base64 inflates the JPEG by 4/3
    smaller = shrink_jpeg(message.frame_jpeg, room) if room > 0 else None
    log.warning("frame %s seq %d: its score with the %d-byte frame exceeds the %d-byte message limit; "
                "sending it %s", message.frame.stream, message.frame.seq, len(message.frame_jpeg), limit,
                "with the frame re-encoded smaller" if smaller else "without the frame")
    if smaller is None:
        return bare
    return encode(message.model_copy(update={"frame_jpeg": smaller, "frame_jpeg_note": "reduced"}))


def reduce_maps(maps: torch.Tensor, frame_sizes: list[tuple[int, int]],
                max_side: int = MAP_MAX_SIDE) -> tuple[list[list[int]], list[torch.Tensor]]:
    """The model's square maps ``[B, S, S]`` as the messages carry them, still on their device:
    each at its frame's (width, height) aspect (the model saw a squashed square), long side at
    most ``max_side``, area-averaged, NaN and infinities as 0. Returns the batch rows and the
    ``[n, h, w]`` maps of each wire size. On a GPU a few KB per frame then cross to the host
    instead of the whole map (1 MB at 518 px), and the host does no per-frame resizing."""
    maps = torch.nan_to_num(maps.float(), nan=0.0, posinf=0.0, neginf=0.0)
    side = maps.shape[-1]
    rows_by_size: dict[tuple[int, int], list[int]] = {}
    for row, (width, height) in enumerate(frame_sizes):
        rows_by_size.setdefault(_wire_size(side, width, height, max_side), []).append(row)
    rows, reduced = [], []
    for size, members in rows_by_size.items():
        group = maps if len(members) == len(frame_sizes) else maps[members]
        rows.append(members)
        reduced.append(F.interpolate(group[:, None], size=size, mode="area")[:, 0])
    return rows, reduced


def wire_maps(maps: torch.Tensor, frame_sizes: list[tuple[int, int]], max_side: int = MAP_MAX_SIDE) -> list[np.ndarray]:
    """``reduce_maps``, on the host, one array per frame in batch order."""
    out: list[np.ndarray | None] = [None] * len(frame_sizes)
    for members, reduced in zip(*reduce_maps(maps, frame_sizes, max_side)):
        for row, anomaly_map in zip(members, reduced.cpu().numpy()):
            out[row] = anomaly_map
    return out


def _wire_size(side: int, width: int, height: int, max_side: int) -> tuple[int, int]:
    """(rows, cols) of a ``side``-square map at a width x height frame's aspect, long side <= max_side."""
    long = min(side, max_side)
    if width >= height:
        return max(1, round(long * height / width)), long
    return long, max(1, round(long * width / height))
