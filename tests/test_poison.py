"""Poison records (issue 13, item 1) on the in-process bus: every reader validates before acting,
and whatever one record causes in the worker or the archive sink sends that record to the
dead-letter topic with its stage and reason while the loop goes on."""

from __future__ import annotations

import json
import sqlite3
import threading

import cv2
import numpy as np
import pytest

from linewatch.bus import RecordTooLarge, Topics
from linewatch.bus.jpeg import FrameTooLarge, check_pixels, jpeg_size
from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import (
    MAX_HEADER_BYTES,
    DeadLetter,
    FrameMeta,
    MessageError,
    ScoreMsg,
    decode,
    encode,
    frame_meta,
)
from linewatch.scoring.checkpoint import CheckpointError, read_header
from linewatch.sinks.archive import Archive
from linewatch.sinks.archive_sink import run_archive_sink
from linewatch.workers.anchors import AnchorCache
from linewatch.workers.profiles import ProfileTable, StreamProfile
from linewatch.workers.worker import ScoringWorker

from helpers import jpeg, publish, read_all, score_msg, wait_for

META = {"kind": "frame", "v": 1, "stream": "cam", "seq": 0, "ts": 1000.0, "source": "t", "width": 64, "height": 48}


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def meta_with(**fields) -> bytes:
    return json.dumps({**META, **fields}).encode()


# ---- the schema: refused as one MessageError line, never RecursionError or OverflowError later ----
@pytest.mark.parametrize("header, reason", [
    (b'{"kind":"frame","v":1,"telemetry":' + nested(30_000) + b"}", "nested deeper"),  # within the size bound
    (b'{"kind":"frame","v":1,"telemetry":' + nested(200_000) + b"}", "larger than"),
    (b'{"kind":"frame","v":1,"telemetry":' + nested(40) + b"}", "nested deeper"),  # parses, then refused
    (meta_with(seq=2 ** 63), "seq"),
    (meta_with(seq=-1), "seq"),
    (meta_with(ts=float("nan")), "ts"),
    (meta_with(pts=float("inf")), "pts"),
    (meta_with(width=70_000), "width"),
    (meta_with(source="x" * MAX_HEADER_BYTES), "larger than"),
])
def test_frame_headers_are_validated_before_use(header, reason):
    with pytest.raises(MessageError, match=reason):
        frame_meta([("lw", header)])


def test_score_values_are_validated_before_use():
    with pytest.raises(MessageError, match="expected bytes, got NoneType"):  # a tombstone
        decode(None, ScoreMsg)
    with pytest.raises(MessageError, match="nested deeper"):
        decode(b'{"kind":"score","v":1,"frame":' + nested(100_000) + b"}", ScoreMsg)
    good = json.loads(encode(score_msg(3, 0.9)))
    for field, value in [("seq", 2 ** 63), ("ts", float("nan"))]:
        bad = {**good, "frame": {**good["frame"], field: value}}
        with pytest.raises(MessageError, match=f"frame.{field}"):
            decode(json.dumps(bad).encode(), ScoreMsg)
    with pytest.raises(MessageError, match="image_score"):
        decode(json.dumps({**good, "image_score": float("inf")}).encode(), ScoreMsg)


# ---- the worker ------------------------------------------------------------------------------------------
def make_worker(bus, tiny, **kwargs):
    worker = ScoringWorker(bus, tiny, ProfileTable(StreamProfile(method="aprilgan", threshold=0.0)), AnchorCache(),
                           max_batch=4, **kwargs)
    worker.prepare_all()
    return worker


def test_poison_frames_are_dead_lettered_and_the_worker_goes_on(tiny):
    bus = MemoryBus(Topics("p"))
    worker = make_worker(bus, tiny, max_pixels=100 * 100)
    publish(bus, "cam", 0)
    publish(bus, "cam", 1, meta=b'{"kind":"frame","v":1,"telemetry":' + nested(30_000) + b"}")
    publish(bus, "cam", 2, meta=meta_with(seq=2 ** 63))
    publish(bus, "cam", 3, meta=meta_with(ts=float("nan")))
    publish(bus, "cam", 4, value=jpeg(4, size=(120, 160)))  # 19200 px, above the 10000 px budget
    publish(bus, "cam", 5)
    worker.run(threading.Event(), until_idle_s=0.3)
    scored = sorted(decode(r.value, ScoreMsg).frame.seq for r in read_all(bus, bus.topics.scores))
    dead = [decode(r.value, DeadLetter) for r in read_all(bus, bus.topics.dead)]
    assert scored == [0, 5] and len(dead) == 4 and all(d.stage == "worker" for d in dead)
    reasons = " | ".join(d.reason for d in dead)
    for expected in ("nested deeper", "seq", "ts", "above the pixel budget"):
        assert expected in reasons, reasons
    with bus.cond:
        assert bus.drained(bus.topics.frames)


def test_the_pixel_budget_is_read_from_the_header_before_decoding():
    blob = jpeg(0, size=(300, 500))
    assert jpeg_size(blob) == (500, 300) and check_pixels(blob, 500 * 300) == (500, 300)
    with pytest.raises(FrameTooLarge, match="500x300"):
        check_pixels(blob, 500 * 300 - 1)
    progressive = cv2.imencode(".jpg", np.zeros((7, 9, 3), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1]
    assert jpeg_size(progressive.tobytes()) == (9, 7)
    assert jpeg_size(b"\xff\xd8 not a jpeg") is None and jpeg_size(b"") is None
    # a 20000 x 20000 frame header on a few bytes: refused without any decoding
    sof = b"\xff\xd8\xff\xc0\x00\x11\x08" + (20000).to_bytes(2, "big") * 2 + b"\x03" + b"\x00" * 9
    with pytest.raises(FrameTooLarge, match="20000x20000"):
        check_pixels(sof, 40_000_000)


def test_a_frame_the_model_fails_on_is_dead_lettered_alone(tiny):
    """The model raises on one frame of a batch: the batch is scored frame by frame, that
    frame alone is dead-lettered (a blank frame still scores, so the model is fine)."""
    bus = MemoryBus(Topics("p"))
    worker = make_worker(bus, tiny)
    method = next(iter(worker.prepared.values())).method
    score_batch = method.score_batch

    def fails_on_white(images):
        if (images > 0.99).all(dim=(1, 2, 3)).any():
            raise RuntimeError("kernel failed on this input")
        return score_batch(images)

    method.score_batch = fails_on_white
    white = cv2.imencode(".jpg", np.full((48, 64, 3), 255, np.uint8))[1].tobytes()
    for seq in range(4):
        publish(bus, "cam", seq, value=white if seq == 2 else None)
    worker.run(threading.Event(), until_idle_s=0.3)
    scored = sorted(decode(r.value, ScoreMsg).frame.seq for r in read_all(bus, bus.topics.scores))
    (dead,) = [decode(r.value, DeadLetter) for r in read_all(bus, bus.topics.dead)]
    assert scored == [0, 1, 3] and dead.seq == 2 and "kernel failed" in dead.reason


def test_a_score_too_large_for_the_bus_carries_its_frame_reduced(tiny):
    """A frame that scores anomalous and whose score would exceed the bus's message size travels
    re-encoded smaller, flagged; the archive still gets it. (On Kafka this was a
    MessageSizeTooLargeError and the worker's exit.)"""
    bus = MemoryBus(Topics("p"), max_message_bytes=200_000)
    worker = make_worker(bus, tiny)
    noise = np.random.default_rng(0).integers(0, 255, (250, 340, 3), dtype=np.uint8)
    big = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    assert 150_000 < len(big) < 190_000  # fits a frame record, not a score message (base64)
    publish(bus, "cam", 0, value=big)
    publish(bus, "cam", 1)
    worker.run(threading.Event(), until_idle_s=0.3)
    scores = {s.frame.seq: s for s in (decode(r.value, ScoreMsg) for r in read_all(bus, bus.topics.scores))}
    assert sorted(scores) == [0, 1] and worker.stats.dead == 0
    reduced = scores[0]
    assert reduced.anomalous and reduced.frame_jpeg_note == "reduced" and len(reduced.frame_jpeg) < len(big)
    assert cv2.imdecode(np.frombuffer(reduced.frame_jpeg, np.uint8), cv2.IMREAD_COLOR) is not None
    assert scores[1].frame_jpeg_note is None and scores[1].frame_jpeg == jpeg(1)


def test_a_dead_letter_too_large_for_the_bus_keeps_its_reason(tiny):
    bus = MemoryBus(Topics("p"), max_message_bytes=200_000)
    worker = make_worker(bus, tiny)
    publish(bus, "cam", 0, value=b"\xff\xd8" + bytes(190_000))  # not a JPEG; its copy would not fit
    worker.run(threading.Event(), until_idle_s=0.3)
    (dead,) = [decode(r.value, DeadLetter) for r in read_all(bus, bus.topics.dead)]
    assert "undecodable jpeg" in dead.reason and dead.payload == b"" and dead.origin.offset == 0
    with pytest.raises(RecordTooLarge):
        bus.producer().send(bus.topics.frames, bytes(200_000))


# ---- the archive sink ------------------------------------------------------------------------------------
def test_poison_scores_are_dead_lettered_and_the_archive_goes_on(tmp_path, monkeypatch):
    bus = MemoryBus(Topics("p"))
    producer = bus.producer()
    good = json.loads(encode(score_msg(0, 0.9)))
    huge = cv2.imencode(".jpg", np.zeros((120, 160, 3), np.uint8))[1].tobytes()
    poison = [
        b'{"kind":"score","v":1,"frame":' + nested(100_000) + b"}",  # was RecursionError
        json.dumps({**good, "frame": {**good["frame"], "seq": 2 ** 63}}).encode(),  # was OverflowError (SQLite)
        encode(score_msg(3, 0.9).model_copy(update={"frame_jpeg": huge})),  # above the pixel budget
        encode(score_msg(4, 0.9)),  # the archive itself fails on this one (below)
    ]
    for value in [encode(score_msg(1, 0.9)), *poison, encode(score_msg(2, 0.9))]:
        producer.send(bus.topics.scores, value, key=b"cam")
    archive = Archive(tmp_path, max_pixels=100 * 100)
    add = archive.add

    def fails_on_seq_4(score):
        if score.frame.seq == 4:
            raise KeyError("an unexpected bug")
        return add(score)

    monkeypatch.setattr(archive, "add", fails_on_seq_4)
    stop, result = threading.Event(), {}
    sink = threading.Thread(target=lambda: result.update(stats=run_archive_sink(bus, archive, stop=stop, poll_s=0.05)),
                            daemon=True)
    sink.start()
    try:
        wait_for(lambda: sum(bus.committed.get(bus.topics.group("archive"), {}).values()) == 6, what="every record committed")
    finally:
        stop.set()
        sink.join(10)
    dead = [decode(r.value, DeadLetter) for r in read_all(bus, bus.topics.dead)]
    assert (result["stats"].archived, result["stats"].dead) == (2, 4)
    assert all(d.stage == "sink-archive" for d in dead)
    reasons = " | ".join(d.reason for d in dead)
    for expected in ("nested deeper", "frame.seq", "above the pixel budget", "KeyError: 'an unexpected bug'"):
        assert expected in reasons, reasons
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        assert [seq for (seq,) in db.execute("SELECT seq FROM frames ORDER BY seq")] == [1, 2]


def test_a_deeply_nested_checkpoint_header_is_one_error(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "nested.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"linewatch": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_header(path)


def test_schema_bounds_do_not_refuse_real_values():
    meta = FrameMeta(stream="cam", seq=2 ** 63 - 1, ts=1.7e9, source="rtsp://cam/1", width=65535, height=1)
    assert decode(encode(meta), FrameMeta) == meta
