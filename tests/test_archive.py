"""Map encoding, the anomaly archive (local and S3) and its consume loop."""

from __future__ import annotations

import json
import re
import sqlite3
import threading

import cv2
import numpy as np
import pytest

from linewatch.bus.maps import MapError, decode_map, encode_map
from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import DeadLetter, EncodedMap, SessionEnd, Telemetry, decode, encode
from linewatch.sinks.archive import Archive, ArchiveError, safe_component
from linewatch.sinks.archive_sink import run_archive_sink

from helpers import FRAME_H, FRAME_W, read_all, score_msg, wait_for


# ---- maps ----------------------------------------------------------------------------------------------
def test_map_round_trip_at_reduced_resolution():
    yy, xx = np.mgrid[0:128, 0:96].astype(np.float32)
    original = 0.2 + 0.5 * (xx + yy) / (127 + 95)
    encoded = encode_map(original, max_side=64)
    decoded = decode_map(encoded)
    assert decoded.dtype == np.float32 and decoded.shape == (64, 48)
    reference = cv2.resize(original, (48, 64), interpolation=cv2.INTER_AREA)
    assert np.abs(decoded - reference).max() <= (encoded.hi - encoded.lo) / 255 / 2 + 1e-6
    assert (encoded.lo, encoded.hi) == (float(reference.min()), float(reference.max()))
    small = np.full((10, 20), 0.7, np.float32)  # no upscaling; a flat map survives
    assert np.allclose(decode_map(encode_map(small)), small) and decode_map(encode_map(small)).shape == (10, 20)


def test_map_errors():
    with pytest.raises(MapError, match="NaN"):
        encode_map(np.array([[0.0, np.nan]], np.float32))
    with pytest.raises(MapError, match="2-D"):
        encode_map(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(MapError, match="does not decode"):
        decode_map(EncodedMap(png=b"not a png", lo=0, hi=1))


# ---- safe stream directories ---------------------------------------------------------------------------
HOSTILE = ["", "../../etc", "/abs", "a/b", "a\\b", "..", ".", "...", ".hidden", "///", "ünïcødé/カメラ", "\x00"]


@pytest.mark.parametrize("stream", HOSTILE)
def test_safe_component_is_one_harmless_component(stream, tmp_path):
    name = safe_component(stream)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", name) and not name.startswith(".")
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_safe_component_keeps_plain_ids_and_separates_changed_ones():
    assert safe_component("cam-01_north.v2") == "cam-01_north.v2"
    names = [safe_component(s) for s in ["a/b", "a_b", "a?b", "a b", "a\\b"]]
    assert len(set(names)) == len(names)
    assert safe_component("").startswith("stream-")  # nothing left after sanitising


# ---- archive -------------------------------------------------------------------------------------------
def anomalous(seq: int = 7, stream: str = "cam", **kwargs):
    anomaly_map = np.zeros((24, 32), np.float32)
    anomaly_map[6:12, 10:20] = 0.9
    return score_msg(seq, 0.9, stream=stream, anomaly_map=anomaly_map,
                     telemetry=Telemetry(latitude=47.0, longitude=8.0, altitude=512.0), **kwargs)


def rows(root) -> list[tuple]:
    with sqlite3.connect(root / "index.sqlite") as db:
        return db.execute("SELECT stream, seq, score, mask_path FROM frames").fetchall()


PATHS = ("frame_path", "mask_path", "overlay_path")


def stored_files(root) -> dict:
    """Every stored file (name -> bytes); the JSON rows only by name, they carry archived_at."""
    return {p.relative_to(root): p.suffix != ".json" and p.read_bytes()
            for p in root.rglob("*") if p.is_file() and p.name != "index.sqlite"}


def test_archive_writes_images_and_one_index_row_idempotently(tmp_path):
    root = tmp_path / "archive"
    archive = Archive(root)
    row = archive.add(anomalous())
    files = stored_files(root)
    again = archive.add(anomalous())  # a re-scored or replayed frame: same names, same images
    assert stored_files(root) == files
    assert [again[k] for k in PATHS] == [row[k] for k in PATHS]
    assert rows(root) == [("cam", 7, 0.9, "cam/0000000007.mask.png")]
    assert sorted(p.name for p in files) == ["0000000007.frame.jpg", "0000000007.json", "0000000007.mask.png",
                                            "0000000007.overlay.jpg"]

    mask = cv2.imread(str(root / row["mask_path"]), cv2.IMREAD_UNCHANGED)
    overlay = cv2.imread(str(root / row["overlay_path"]), cv2.IMREAD_COLOR)
    assert mask.shape == (FRAME_H, FRAME_W) and mask.dtype == np.uint8 and overlay.shape == (FRAME_H, FRAME_W, 3)
    assert mask[15, 30] > 200 and mask[40, 5] < 20  # the hot block, scaled x2 to the frame
    stored = archive.get("cam", 7)
    assert stored["telemetry"]["latitude"] == 47.0 and stored["anchor_key"] == "a1" and stored["mask_kind"] == "heat"
    assert json.loads((root / "cam" / "0000000007.json").read_text())["overlay_path"] == row["overlay_path"]
    archive.close()
    assert rows(root) == [("cam", 7, 0.9, "cam/0000000007.mask.png")]  # upsert, not append, across restarts too
    Archive(root).add(anomalous())
    assert len(rows(root)) == 1


def test_binarized_mask(tmp_path):
    row = Archive(tmp_path, binarize=True).add(anomalous())
    mask = cv2.imread(str(tmp_path / row["mask_path"]), cv2.IMREAD_UNCHANGED)
    assert set(np.unique(mask)) == {0, 255} and row["mask_kind"] == "binary"


def test_normal_frames_are_not_archived(tmp_path):
    archive = Archive(tmp_path / "a")
    assert archive.add(score_msg(3, 0.1)) is None
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["index.sqlite"]


def test_undecodable_frame_or_map_is_an_archive_error(tmp_path):
    archive = Archive(tmp_path)
    with pytest.raises(ArchiveError, match="frame JPEG does not decode"):
        archive.add(anomalous().model_copy(update={"frame_jpeg": b"\xff\xd8 broken"}))
    with pytest.raises(ArchiveError, match="map PNG does not decode"):
        archive.add(anomalous().model_copy(update={"map": EncodedMap(png=b"x", lo=0, hi=1)}))


def test_stream_ids_never_escape_the_root(tmp_path):
    """The schema refuses these ids (tests/test_stream_ids.py); the archive's own guard stays,
    checked here on messages built without validation."""
    root = tmp_path / "root"
    archive = Archive(root)
    for seq, stream in enumerate(["../../etc", "/abs", "a/b", "..", "ünïcødé"]):
        score = anomalous(seq)
        score = score.model_copy(update={"frame": score.frame.model_copy(update={"stream": stream})})
        row = archive.add(score)
        assert (root / row["frame_path"]).resolve().is_relative_to(root.resolve())
    assert [p.name for p in tmp_path.iterdir()] == ["root"]
    assert all(p.resolve().is_relative_to(root.resolve()) for p in root.rglob("*"))
    assert len(rows(root)) == 5 and archive.get("../../etc", 0)["stream"] == "../../etc"


# ---- archive consume loop ------------------------------------------------------------------------------
def test_archive_sink_end_to_end(tmp_path):
    bus = MemoryBus()
    producer = bus.producer()
    good = [score_msg(0, 0.1), anomalous(1), anomalous(2), anomalous(1)]  # seq 1 delivered twice
    broken = anomalous(3).model_copy(update={"frame_jpeg": b"broken"})
    for s in good + [broken]:
        producer.send(bus.topics.scores, encode(s), key=b"cam")
    producer.send(bus.topics.scores, b'{"kind": "frame", "v": 1}', key=b"cam")  # the wrong kind
    producer.send(bus.topics.scores, encode(SessionEnd(stream="cam", frames=4, ts=1001.0)), key=b"cam")  # skipped
    stop, result = threading.Event(), {}
    sink = threading.Thread(target=lambda: result.update(stats=run_archive_sink(
        bus, Archive(tmp_path), stop=stop, poll_s=0.05)))
    sink.start()
    wait_for(lambda: sum(bus.committed.get(bus.topics.group("archive"), {}).values()) == 7)
    stop.set()
    sink.join(10)
    stats = result["stats"]
    assert (stats.scores, stats.archived, stats.dead) == (5, 3, 2)
    assert sorted(r[1] for r in rows(tmp_path)) == [1, 2]
    dead = [decode(r.value, DeadLetter) for r in read_all(bus, bus.topics.dead)]
    assert [(d.stage, d.origin.offset, d.seq) for d in dead] == [("sink-archive", 4, 3), ("sink-archive", 5, None)]
    assert "frame JPEG" in dead[0].reason and "expected a score or end message" in dead[1].reason
    assert decode(dead[0].payload, type(broken)).frame.seq == 3


# ---- S3 ------------------------------------------------------------------------------------------------
def test_archive_on_s3(s3_server, tmp_path, monkeypatch):
    server = s3_server
    archive = Archive(f"s3://{server.bucket}/runs/1", endpoint_url=server.endpoint_url,
                      access_key_id=server.access_key, secret_access_key=server.secret_key, region="us-east-1",
                      index_path=tmp_path / "index.sqlite")
    escaping = anomalous()  # an id the schema refuses (built without validation): the key still stays inside
    escaping = escaping.model_copy(update={"frame": escaping.frame.model_copy(update={"stream": "../../etc"})})
    row = archive.add(escaping)
    archive.add(escaping)  # idempotent: same keys, one row
    listed = server.client.list_objects_v2(Bucket=server.bucket, Prefix="runs/1/")["Contents"]
    keys = sorted(o["Key"] for o in listed)
    stream_dir = safe_component("../../etc")
    assert keys == [f"runs/1/{stream_dir}/0000000007.{suffix}" for suffix in ("frame.jpg", "json", "mask.png",
                                                                            "overlay.jpg")]
    stored = json.loads(server.client.get_object(Bucket=server.bucket, Key=keys[1])["Body"].read())
    assert stored["seq"] == 7 and stored["mask_path"] == row["mask_path"]
    overlay = server.client.get_object(Bucket=server.bucket, Key=f"runs/1/{row['overlay_path']}")["Body"].read()
    assert cv2.imdecode(np.frombuffer(overlay, np.uint8), cv2.IMREAD_COLOR).shape == (FRAME_H, FRAME_W, 3)
    assert archive.get("../../etc", 7)["score"] == 0.9
    assert archive.url(row["frame_path"]) == f"s3://{server.bucket}/runs/1/{row['frame_path']}"

    # the standard AWS variables are enough; no local index then, the JSON objects are the index
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    from_env = Archive(f"s3://{server.bucket}")
    assert from_env.add(anomalous(8))["frame_path"] == "cam/0000000008.frame.jpg"
    assert server.client.head_object(Bucket=server.bucket, Key="cam/0000000008.json")["ContentLength"] > 0
    assert from_env.get("cam", 8) is None
