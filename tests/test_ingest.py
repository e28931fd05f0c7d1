"""Ingest: sources, SRT telemetry, publishing to the in-process bus, the demo clip."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import FrameMeta, SessionEnd, frame_header, frame_meta
from linewatch.synthetic.demo import DemoScene, find_backgrounds, write_demo_clip
from linewatch.ingest.publisher import Ingestor, default_stream_id, run_ingest
from linewatch.ingest.sources import (
    Backoff,
    FrameRateSelector,
    IngestError,
    LiveCapture,
    Source,
    limit_size,
    open_source,
)
from linewatch.ingest.srt import TelemetryTrack, load_track, parse_srt


def write_clip(path: Path, frames: int = 30, fps: float = 30, size=(64, 48)) -> Path:
    """A clip whose frame i is solid grey level 8*i, so decoded frames tell their index."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), 8 * i, np.uint8))
    writer.release()
    return path


def frame_index(image: np.ndarray) -> int:
    return round(float(image.mean()) / 8)


@pytest.fixture(scope="module")
def clip30(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "clip30.mp4")


def drain(bus: MemoryBus, ends: list | None = None) -> list:
    """The frame records on the frames topic; the sessions' end markers go to ``ends``."""
    consumer = bus.consumer([bus.topics.frames], group=None)
    consumer.assign(bus.topics.frames, consumer.partitions(bus.topics.frames))
    records = []
    while batch := consumer.poll(0.05, 256):
        records += batch
    markers = [r for r in records if isinstance(frame_header(r.headers), SessionEnd)]
    if ends is not None:
        ends += [frame_header(r.headers) for r in markers]
    return [r for r in records if r not in markers]


# ---- sources ---------------------------------------------------------------------------

def test_target_fps_keeps_every_third_frame_of_a_30fps_clip(clip30):
    kept = list(open_source(str(clip30), fps=10))
    assert [frame_index(image) for image, _ in kept] == list(range(0, 30, 3))
    assert [round(pts, 3) for _, pts in kept] == [round(i / 10, 3) for i in range(10)]
    assert len(list(open_source(str(clip30)))) == 30  # fps=None keeps all


def test_target_fps_follows_variable_timestamps_and_resynchronises_after_a_gap():
    selector = FrameRateSelector(10)
    stamps = [0.0, 0.04, 0.09, 0.1, 0.13, 0.21, 0.25, 0.3, 1.5, 1.53, 1.6, 1.64, 1.7]
    assert [t for t in stamps if selector.keep(t)] == [0.0, 0.1, 0.21, 0.3, 1.5, 1.6, 1.7]
    jittery = np.cumsum(np.random.default_rng(0).uniform(0.02, 0.047, 3000))  # ~29 fps, uneven
    selector = FrameRateSelector(10)
    kept = [t for t in jittery if selector.keep(t)]
    assert abs(len(kept) / (jittery[-1] - jittery[0]) - 10) < 0.3
    with pytest.raises(ValueError):
        FrameRateSelector(0)


def test_max_size_downscales_the_long_side_and_never_upscales(clip30):
    image, _ = next(iter(open_source(str(clip30), max_size=32)))
    assert image.shape[:2] == (24, 32)
    image, _ = next(iter(open_source(str(clip30), max_size=500)))
    assert image.shape[:2] == (48, 64)
    assert limit_size(np.zeros((300, 100, 3), np.uint8), 150).shape[:2] == (150, 50)


def test_frames_are_scaled_down_to_the_pixel_budget_before_publishing(tmp_path, monkeypatch):
    """A frame above ``max_pixels`` is scaled down (never refused) at ingest, and a large JPEG
    in a folder is decoded at a reduced scale by libjpeg, never whole."""
    assert limit_size(np.zeros((300, 400, 3), np.uint8), None, max_pixels=30_000).shape[:2] == (150, 200)
    for shape in [(301, 401), (1000, 7), (777, 555)]:
        height, width = limit_size(np.zeros((*shape, 3), np.uint8), None, max_pixels=10_007).shape[:2]
        assert height * width <= 10_007
    gradient = np.tile(np.arange(2000, dtype=np.uint16)[None, :, None] % 256, (1600, 1, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "big.jpg"), gradient)
    decoded = []
    real_imdecode = cv2.imdecode

    def watched(data, flags):
        decoded.append(flags)
        return real_imdecode(data, flags)

    monkeypatch.setattr(cv2, "imdecode", watched)
    (image, _), = list(open_source(str(tmp_path), max_size=None, max_pixels=200_000))
    assert image.shape[:2] == (400, 500)
    assert decoded == [cv2.IMREAD_REDUCED_COLOR_4]  # the 500x400 kept, decoded at 1/4: never 2000x1600 whole


def test_a_frame_too_large_for_a_message_is_scaled_down(clip30):
    noisy = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)

    class Noise(Source):
        def _frames(self):
            self.counts.read += 1
            yield noisy, 0.0

    bus = MemoryBus(max_message_bytes=100_000)
    stats = Ingestor(Noise("noise", "noise"), bus, stream="n", jpeg_quality=100).run()
    (record,) = drain(bus)
    meta = frame_meta(record.headers)
    assert stats.published == 1 and len(record.value) < 100_000 and meta.width < 640
    assert cv2.imdecode(np.frombuffer(record.value, np.uint8), cv2.IMREAD_COLOR).shape[:2] == (meta.height, meta.width)


def test_image_folder_in_natural_order_skips_a_corrupt_image(tmp_path, caplog):
    for name, level in [("img_10.png", 100), ("img_2.png", 20), ("img_1.jpg", 10)]:
        cv2.imwrite(str(tmp_path / name), np.full((20, 30, 3), level, np.uint8))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "notes.txt").write_text("not an image")
    source = open_source(str(tmp_path), image_fps=2)
    assert not source.live and source.total == 4
    with caplog.at_level(logging.WARNING):
        frames = list(source)
    assert [round(float(image.mean()) / 10) for image, _ in frames] == [1, 2, 10]
    assert [pts for _, pts in frames] == [0.5, 1.0, 1.5]  # bad.jpg sorted first and left a gap
    assert source.counts.skipped == 1 and source.counts.read == 3
    assert "bad.jpg" in caplog.text


def test_open_errors_are_one_clear_line(tmp_path):
    with pytest.raises(IngestError, match="no such file or folder: .*missing.mp4"):
        open_source(str(tmp_path / "missing.mp4"))
    (tmp_path / "notes.mp4").write_text("this is text")
    with pytest.raises(IngestError, match="cannot read video .*notes.mp4: not a video OpenCV can decode"):
        open_source(str(tmp_path / "notes.mp4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="no images in folder"):
        open_source(str(tmp_path / "empty"))


def test_unreachable_stream_gives_up_after_its_retries():
    with pytest.raises(IngestError, match=r"rtsp://127.0.0.1:9/x: gave up after 3 attempt\(s\)"):
        open_source("rtsp://127.0.0.1:9/x", backoff=Backoff(initial=0.01, cap=0.02, max_retries=2))
    backoff = Backoff(initial=0.5, cap=30)
    assert 0.4 <= backoff.delay(0) <= 0.6 and 0.8 <= backoff.delay(1) <= 1.2
    assert 24 <= backoff.delay(12) <= 36  # capped, jittered


class FakeCapture:
    """Stands in for cv2.VideoCapture: ``frames`` good reads, then the connection drops."""

    def __init__(self, frames: int):
        self.left = frames

    def read(self):
        self.left -= 1
        return (True, np.zeros((8, 8, 3), np.uint8)) if self.left >= 0 else (False, None)

    def release(self):
        pass


class FlakyStream(LiveCapture):
    """A camera reached through a scripted sequence of connection attempts (None = refused)."""

    def __init__(self, script, **options):
        self.script = list(script)
        super().__init__("rtsp://cam.example/live", "rtsp://cam.example/live", "cam", **options)

    def _open_once(self):
        return self.script.pop(0) if self.script else None


def test_live_stream_reconnects_with_backoff_then_gives_up(caplog):
    backoff = Backoff(initial=0.001, cap=0.002, max_retries=3)
    script = [FakeCapture(3), None, None, FakeCapture(2)]  # 3 frames, outage, 2 frames, lost for good
    with caplog.at_level(logging.WARNING):
        source = FlakyStream(script, backoff=backoff)
        frames = []
        with pytest.raises(IngestError, match="gave up after 4 attempt"):
            for frame in source:
                frames.append(frame)
    assert len(frames) == 5 and source.counts.reconnects == 1
    assert all(b[1] >= a[1] for a, b in zip(frames, frames[1:]))  # wall-clock pts
    assert caplog.text.count("stream lost") == 2  # once per outage, not once per attempt


def test_live_stream_that_gives_up_ends_the_ingest_with_an_error_in_stats():
    bus = MemoryBus()
    source = FlakyStream([FakeCapture(4)], backoff=Backoff(initial=0.001, cap=0.001, max_retries=1))
    stats = Ingestor(source, bus, stream="cam").run()
    assert stats.published == 4 and "gave up" in stats.error
    ends = []
    assert [frame_meta(r.headers).seq for r in drain(bus, ends)] == [0, 1, 2, 3]
    assert [(e.stream, e.frames, e.reason) for e in ends] == [("cam", 4, "failed")]  # the session ended


# ---- SRT telemetry ---------------------------------------------------------------------

SRT_VARIANTS = """\ufeff1
00:00:00,000 --> 00:00:00,033
<font size="28">FrameCnt: 1, DiffTime: 33ms
2023-06-01 10:21:33.123
[iso : 100] [shutter : 1/1000.0] [fnum : 280] [ev : 0] [ct : 5500] [focal_len : 240] [latitude: 22.543210] [longitude: 113.945678] [rel_alt: 1.300 abs_alt: 93.500] </font>

2
00:00:00,033 --> 00:00:00,066
2023-06-01 10:21:33.156
[latitude : 22.5] [longtitude : 113.9] [altitude: 88.2]

3
00:00:01,000 --> 00:00:02,000
HOME(113.9000,22.5000) 2017.08.05 14:11:51
GPS(113.9012,22.5034,19) BAROMETER:12.5
ISO:100 Shutter:60 EV:0 Fnum:2.2

4
garbage without a time range
GPS(1,2,3)

5
00:00:02,000 --> 00:00:03,000
F/2.8, SS 320, ISO 100, EV 0, GPS (-122.4194, 37.7749, 19), D 24.64m, H 12.0m, HS 0.00m/s, VS 0.00m/s

6
00:00:03,000 --> 00:00:04,000
GPS(0.0000,0.0000,0) BAROMETER:0.1

7
00:00:04,000 --> 00:00:05,000
nothing useful here
"""


def test_srt_parses_each_dji_variant_and_skips_broken_cues():
    cues = parse_srt(SRT_VARIANTS.replace("\n", "\r\n"))
    assert [(c.start, c.end) for c in cues] == [(0.0, 0.033), (0.033, 0.066), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0)]
    new, spaced, old, phantom, no_fix = (c.telemetry for c in cues)
    assert (new.time, new.latitude, new.longitude, new.altitude, new.relative_altitude) == (
        "2023-06-01 10:21:33.123", 22.54321, 113.945678, 93.5, 1.3)
    assert (spaced.latitude, spaced.longitude, spaced.altitude) == (22.5, 113.9, 88.2)
    assert (old.time, old.latitude, old.longitude, old.altitude, old.relative_altitude) == (
        "2017.08.05 14:11:51", 22.5034, 113.9012, 19.0, 12.5)
    assert (phantom.latitude, phantom.longitude, phantom.relative_altitude) == (37.7749, -122.4194, 12.0)
    assert no_fix.latitude is None and no_fix.longitude is None and no_fix.relative_altitude == 0.1


def test_srt_lookup_by_pts():
    track = TelemetryTrack(parse_srt(SRT_VARIANTS), tolerance_s=0.5)
    assert track.at(0.0).latitude == 22.54321
    assert track.at(0.05).altitude == 88.2
    assert track.at(0.3).altitude == 88.2  # a gap shorter than the tolerance keeps the last cue
    assert track.at(0.7) is None  # too far past the cue's end
    assert track.at(1.5).relative_altitude == 12.5
    assert track.at(4.4) is not None and track.at(9.0) is None and track.at(-1.0) is None


def test_srt_sidecar_telemetry_lands_in_frame_meta(tmp_path, clip30):
    video = tmp_path / "DJI_0001.mp4"
    video.write_bytes(clip30.read_bytes())
    cues = "\n".join(f"{i + 1}\n00:00:{i:02d},000 --> 00:00:{i + 1:02d},000\n"
                     f"[latitude: {22 + i / 10:.1f}] [longitude: 114.0] [rel_alt: 60.0 abs_alt: 95.0]\n" for i in range(2))
    (tmp_path / "DJI_0001.SRT").write_text(cues)
    assert len(load_track(tmp_path / "DJI_0001.SRT")) == 2
    bus = MemoryBus()
    Ingestor(open_source(str(video), fps=2), bus).run()
    metas = [frame_meta(r.headers) for r in drain(bus)]
    assert [m.pts for m in metas] == [0.0, 0.5]
    assert [m.telemetry.latitude for m in metas] == [22.0, 22.0]
    assert metas[0].telemetry.relative_altitude == 60.0 and metas[0].stream == "DJI_0001"


# ---- publishing ------------------------------------------------------------------------

def test_ingestor_publishes_decodable_frames_with_contiguous_seq(clip30):
    bus = MemoryBus()
    stats = Ingestor(open_source(str(clip30), fps=15), bus, stream="line-7", jpeg_quality=80).run()
    ends = []
    records = drain(bus, ends)
    metas = [frame_meta(r.headers) for r in records]
    # last on the topic, the session's end: the alert sink closes its events on it
    assert [(e.stream, e.session, e.frames, e.ts, e.reason) for e in ends] == [
        ("line-7", metas[0].session, 15, metas[-1].ts, "end")]
    assert stats.published == len(records) == 15 and stats.read == 30 and stats.thinned == 15
    assert [m.seq for m in metas] == list(range(15))
    assert all(r.key == b"line-7" and r.topic == bus.topics.frames for r in records)
    stamps = [r.timestamp_ms for r in records]
    assert stamps == sorted(stamps)  # record time = publish time: only grows (replay seeks on it)
    assert len({m.session for m in metas}) == 1 and metas[0].session  # one run, one session
    assert metas[5].ts - metas[0].ts == pytest.approx(metas[5].pts - metas[0].pts)  # file ts = start + pts
    image = cv2.imdecode(np.frombuffer(records[2].value, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (metas[2].height, metas[2].width, 3) == (48, 64, 3) and frame_index(image) == 4
    assert metas[0].source == str(clip30) and metas[0].telemetry is None


def test_file_source_never_drops_when_the_consumer_is_slow(clip30):
    bus = MemoryBus(capacity=2)
    consumer = bus.consumer([bus.topics.frames], group="slow")
    seen: list[int] = []

    def consume():
        while len(seen) < 30:
            for record in consumer.poll(0.5, max_records=1):
                time.sleep(0.005)
                seen.append(frame_meta(record.headers).seq)
                consumer.commit([record])

    reader = threading.Thread(target=consume)
    reader.start()
    stats = Ingestor(open_source(str(clip30)), bus).run()
    reader.join(timeout=10)
    assert seen == list(range(30)) and stats.dropped == 0 and stats.published == 30


class FakeCamera(Source):
    """A live source that produces frames as fast as it can (pts = frame number / 1000)."""

    live = True

    def __init__(self, frames: int | None, delay: float = 0.0):
        super().__init__("fake://camera", "camera")
        self.frames, self.delay = frames, delay

    def _frames(self):
        i = 0
        while self.frames is None or i < self.frames:
            time.sleep(self.delay)
            self.counts.read += 1
            yield np.full((16, 16, 3), 128, np.uint8), i / 1000
            i += 1


def test_live_source_drops_the_oldest_frames_when_publishing_lags():
    bus = MemoryBus(capacity=1)
    consumer = bus.consumer([bus.topics.frames], group="slow")
    done, pts = threading.Event(), []

    def consume():
        while not done.is_set():
            records = consumer.poll(0.05, max_records=1)
            time.sleep(0.01)
            pts.extend(m.pts for m in map(frame_header, (r.headers for r in records)) if isinstance(m, FrameMeta))
            consumer.commit(records)

    reader = threading.Thread(target=consume)
    reader.start()
    deadline = time.monotonic() + 5
    try:
        stats = Ingestor(FakeCamera(200), bus, stream="cam", buffer=8).run()
        while len(pts) < stats.published and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        done.set()
        reader.join()
    assert stats.dropped > 0 and stats.published + stats.dropped == stats.read == 200
    assert len(pts) == stats.published
    assert pts[-1] == 0.199  # the newest frame survives, the oldest were dropped
    assert pts == sorted(pts)


def test_stop_event_ends_a_live_ingest():
    """A camera that never ends: the stop event, set once a frame is on the bus, ends the run."""
    bus, stop, result = MemoryBus(), threading.Event(), {}
    consumer = bus.consumer([bus.topics.frames], group="watch")
    run = threading.Thread(target=lambda: result.update(stats=Ingestor(FakeCamera(None, delay=0.002), bus,
                                                                       stop=stop).run()))
    run.start()
    while not consumer.poll(1.0, 1):
        assert run.is_alive(), "ingest ended before the stop"
    stop.set()
    run.join(timeout=60)  # a liveness bound: without the stop the camera never ends
    assert not run.is_alive() and result["stats"].published > 0
    ends = []
    drain(bus, ends)
    assert [(e.frames, e.reason) for e in ends] == [(result["stats"].published, "stopped")]


def test_run_ingest_opens_every_source_before_publishing(tmp_path, clip30):
    bus = MemoryBus()
    with pytest.raises(IngestError, match="no such file or folder"):
        run_ingest(bus, [str(clip30), str(tmp_path / "nope.mp4")], progress=False)
    assert drain(bus) == []
    other = tmp_path / "b" / "clip30.mp4"
    other.parent.mkdir()
    other.write_bytes(clip30.read_bytes())
    stats = run_ingest(bus, [str(clip30), str(other)], fps=10, max_size=32, progress=False)
    assert [(s.stream, s.published) for s in stats] == [("clip30", 10), ("clip30-2", 10)]
    with pytest.raises(IngestError, match="stream id"):
        run_ingest(bus, [str(clip30)], stream_ids=["bad id!"], progress=False)


def test_default_stream_ids(tmp_path):
    assert default_stream_id("/data/flights/DJI 0042.MP4") == "DJI_0042"
    assert default_stream_id(str(tmp_path)) == tmp_path.name
    assert default_stream_id("rtsp://admin:secret@10.0.0.5:554/Streaming/Channels/101") == (
        "10.0.0.5-554_Streaming_Channels_101")
    assert default_stream_id("0") == "webcam0" and default_stream_id("/dev/video3") == "webcam3"
    assert len(default_stream_id("x" * 300 + ".mp4")) == 128


def test_stream_passwords_never_reach_messages_or_logs():
    with pytest.raises(IngestError) as caught:
        open_source("rtsp://admin:secret@127.0.0.1:9/live", backoff=Backoff(initial=0.001, max_retries=0))
    assert "secret" not in str(caught.value) and "admin:***@127.0.0.1:9" in str(caught.value)


# ---- demo clip -------------------------------------------------------------------------

def test_demo_clip_is_a_readable_video_with_truth_sidecar_and_references(tmp_path):
    clip = write_demo_clip(tmp_path, seconds=2.0, fps=10, size=(320, 180), references=4)
    capture = cv2.VideoCapture(str(clip.video))
    frames = 0
    while capture.read()[0]:
        frames += 1
    assert frames == clip.frame_count == 20
    assert clip.defect_frames == (9, 13)  # frames 9..13 lie in [0.45, 0.7) of 20
    truth = json.loads(clip.truth.read_text())
    assert truth["defect_frames"] == [9, 13] and truth["fps"] == 10 and set(truth["defect_boxes"]) == {
        "9", "10", "11", "12", "13"}
    assert [cv2.imread(str(p)).shape for p in clip.references] == [(180, 320, 3)] * 4
    track = load_track(clip.srt)
    assert len(track) == 20 and 55 < track.at(1.0).relative_altitude < 65 and track.at(1.0).time.startswith("2024")


def test_demo_defect_changes_the_frame_only_around_the_defect(tmp_path):
    scene = DemoScene((320, 180), seed=3, duration=2.0)
    for t in (0.9, 1.3):
        clean, broken = scene.frame(t), scene.frame(t, defect=True)
        changed = (np.abs(clean.astype(int) - broken).max(axis=2) > 0)
        x0, y0, x1, y1 = scene.defect_box(t)
        outside = changed.copy()
        outside[max(y0 - 2, 0):y1 + 2, max(x0 - 2, 0):x1 + 2] = False
        assert not outside.any()
        strong = (np.abs(clean.astype(int) - broken).max(axis=2) > 40).sum()
        assert strong > 0.02 * clean.shape[0] * clean.shape[1]  # a clearly visible change
    assert np.array_equal(scene.frame(0.5), DemoScene((320, 180), seed=3, duration=2.0).frame(0.5))


def test_find_backgrounds_honours_linewatch_shared(tmp_path, monkeypatch):
    monkeypatch.setenv("LINEWATCH_SHARED", str(tmp_path))
    assert find_backgrounds() is None
    (tmp_path / "datasets" / "pld_uav_frames").mkdir(parents=True)
    assert find_backgrounds() == tmp_path / "datasets" / "pld_uav_frames"


def test_demo_uses_a_background_found_recursively(tmp_path):
    nested = tmp_path / "bg" / "site"
    nested.mkdir(parents=True)
    cv2.imwrite(str(nested / "aerial.jpg"), np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8))
    scene = DemoScene((160, 90), seed=0, backgrounds=tmp_path / "bg")
    assert scene.background_path == nested / "aerial.jpg" and scene.frame(1.0).shape == (90, 160, 3)
