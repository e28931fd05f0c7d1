"""The scoring worker's parts, each on its own: the batcher (on the in-process bus and on a
scripted consumer with its own clock), the profile reloader (on plain preparations and real
folders), the score-message builder, and the health and outage registries a worker is given."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from linewatch.bus import Record, Topics, record_size
from linewatch.bus.maps import decode_map
from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import FrameMeta, Latency, ScoreMsg, decode, encode, frame_meta
from linewatch.bus.outages import OUTAGES, Outages
from linewatch.ops.health import HEALTH, Health
from linewatch.workers.anchors import AnchorCache
from linewatch.workers.batcher import IDLE_POLL_S, Batcher
from linewatch.workers.device_work import DeviceClock, to_host
from linewatch.workers.prepared import folder_signature
from linewatch.workers.profiles import ProfileTable, StreamProfile
from linewatch.workers.reloader import ProfileReloader
from linewatch.workers.score_messages import encode_within, reduce_maps, score_message, wire_maps
from linewatch.workers.worker import ScoringWorker

from helpers import jpeg, publish, read_all


# ---- the batcher ---------------------------------------------------------------------------------------
def frames_consumer(bus: MemoryBus):
    return bus.consumer([bus.topics.frames], bus.topics.group("workers"))


def seqs(records) -> list[int]:
    return [frame_meta(r.headers).seq for r in records]


def test_the_first_batch_holds_one_frame_the_next_up_to_max_batch():
    bus = MemoryBus(Topics("b"))
    for seq in range(7):
        publish(bus, "cam-a", seq)
    consumer, batcher = frames_consumer(bus), Batcher(max_batch=4, max_wait_s=0.0)
    assert seqs(batcher.gather(consumer, first=True)) == [0]
    assert seqs(batcher.gather(consumer)) == [1, 2, 3, 4]
    assert seqs(batcher.gather(consumer)) == [5, 6]  # fewer waiting: no wait for more (max_wait 0)
    assert batcher.gather(consumer, busy=True) == []  # nothing left: an empty batch, at once


class ScriptedConsumer:
    """Answers each poll from a script and records (timeout, max_records); each poll moves the
    test's clock on by the time it 'waited'."""

    def __init__(self, answers, clock, waits=None):
        self.answers, self.clock, self.waits, self.polls = list(answers), clock, list(waits or []), []

    def poll(self, timeout_s, max_records=64):
        self.polls.append((timeout_s, max_records))
        if self.waits:
            self.clock[0] += self.waits.pop(0)
        return list(self.answers.pop(0)) if self.answers else []


def record(offset: int) -> Record:
    return Record("b.frames", b"x", offset=offset)


def test_a_batch_waits_for_company_at_most_max_wait_after_its_first_record():
    now = [100.0]
    batcher = Batcher(max_batch=8, max_wait_s=0.05, clock=lambda: now[0])
    consumer = ScriptedConsumer([[record(0)], [record(1), record(2)], [record(3)]], now, waits=[1.0, 0.02, 0.04])
    batch = batcher.gather(consumer)
    # the first poll waits for a record as long as it takes; the wait for company starts at the first
    # record (t=101): 0.05 s left, then 0.03 after the second poll; the third ends past the deadline
    assert [r.offset for r in batch] == [0, 1, 2, 3]
    assert [max_records for _, max_records in consumer.polls] == [8, 7, 5]
    assert consumer.polls[0][0] == IDLE_POLL_S
    assert consumer.polls[1][0] == pytest.approx(0.05) and consumer.polls[2][0] == pytest.approx(0.03)


def test_a_batch_stops_when_a_poll_brings_nothing_or_it_is_full():
    now = [0.0]
    batcher = Batcher(max_batch=3, max_wait_s=10.0, clock=lambda: now[0])
    empty = ScriptedConsumer([[record(0)], [], [record(1)]], now)
    assert [r.offset for r in batcher.gather(empty)] == [0] and len(empty.polls) == 2
    full = ScriptedConsumer([[record(0), record(1)], [record(2)], [record(3)]], now)
    assert [r.offset for r in batcher.gather(full)] == [0, 1, 2] and len(full.polls) == 2
    nothing = ScriptedConsumer([], now)
    assert batcher.gather(nothing) == [] and len(nothing.polls) == 1  # no first record: no wait for company


def test_a_busy_poll_does_not_wait_for_a_first_record():
    now = [0.0]
    consumer = ScriptedConsumer([[record(0)]], now)
    Batcher(max_batch=2, max_wait_s=0.0, clock=lambda: now[0]).gather(consumer, busy=True)
    assert consumer.polls == [(0.0, 2)]


# ---- the profile reloader ------------------------------------------------------------------------------
class Preparation:
    """What the reloader needs of a PreparedProfile: its profile, the folders' signature, stale()."""

    def __init__(self, profile: StreamProfile, number: int):
        self.profile, self.number, self.signature = profile, number, folder_signature(profile)

    def stale(self) -> bool:
        return folder_signature(self.profile) != self.signature


def image(path, seed: int = 0) -> None:
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8))


@pytest.fixture
def references(tmp_path):
    folder = tmp_path / "refs"
    folder.mkdir()
    image(folder / "0.png")
    return folder


def reloader_on(profile: StreamProfile, reload_s: float, now: list[float], fail: list[BaseException] | None = None):
    built: list[Preparation] = []

    def build(p: StreamProfile) -> Preparation:
        if fail:
            raise fail.pop(0)
        built.append(Preparation(p, len(built)))
        return built[-1]

    return ProfileReloader(build, reload_s, clock=lambda: now[0]), built


def test_a_profile_is_prepared_once_while_its_folders_stay(references):
    profile, now = StreamProfile(references=str(references)), [1000.0]
    reloader, built = reloader_on(profile, 5.0, now)
    first = reloader.get(profile)
    for _ in range(3):
        now[0] += 10
        assert reloader.get(profile) is first
    assert len(built) == 1 and reloader.prepared == {profile.key(): first}
    other = StreamProfile(references=str(references), threshold=0.3)  # another profile: its own preparation
    assert reloader.get(other) is not first and len(reloader.prepared) == 2


def test_a_changed_folder_is_prepared_again_at_most_every_reload_s(references, caplog):
    profile, now = StreamProfile(references=str(references)), [1000.0]
    reloader, built = reloader_on(profile, 5.0, now)
    reloader.get(profile)
    now[0] += 6
    assert reloader.get(profile).number == 0  # looked at (nothing changed): the next look is 5 s away
    image(references / "1.png", seed=1)  # the console adds a false alarm's frame
    now[0] += 2
    assert reloader.get(profile).number == 0  # not due yet
    now[0] += 4
    with caplog.at_level(logging.INFO, logger="linewatch.workers.worker"):
        assert reloader.get(profile).number == 1
    assert "re-prepared" in caplog.text
    assert reloader.get(profile).number == 1 and len(built) == 2


def test_reload_s_zero_looks_at_the_folders_every_time(references):
    profile, now = StreamProfile(references=str(references)), [0.0]
    reloader, built = reloader_on(profile, 0.0, now)
    reloader.get(profile)
    image(references / "1.png", seed=1)
    assert reloader.get(profile).number == 1


def test_a_folder_that_cannot_be_read_keeps_the_previous_preparation(references, caplog):
    """The rebuild fails: scoring goes on with what was there, said once, and the profile is
    tried again only at the folder's next change. The first preparation's error passes through."""
    profile, now = StreamProfile(references=str(references)), [0.0]
    fail: list[BaseException] = []
    reloader, built = reloader_on(profile, 0.0, now, fail)
    first = reloader.get(profile)
    image(references / "1.png", seed=1)
    fail.append(ValueError("references folder holds a broken image"))
    with caplog.at_level(logging.WARNING, logger="linewatch.workers.worker"):
        assert reloader.get(profile) is first
        assert reloader.get(profile) is first  # the same change is not tried again
    assert caplog.text.count("cannot be read") == 1 and len(built) == 1
    image(references / "2.png", seed=2)
    assert reloader.get(profile).number == 1  # the next change is
    fresh, _ = reloader_on(profile, 0.0, now, [OSError("gone")])
    with pytest.raises(OSError, match="gone"):
        fresh.get(profile)
    broken, _ = reloader_on(profile, 0.0, now, [RuntimeError("a bug")])
    with pytest.raises(RuntimeError):
        broken.get(profile)


def test_the_worker_prepares_through_its_reloader(tiny, references):
    """The worker's profiles, prepared in the precision its frames use, live in the reloader."""
    profiles = ProfileTable(StreamProfile(threshold=0.5))
    worker = ScoringWorker(MemoryBus(Topics("r")), tiny, profiles, AnchorCache(), reload_s=7.0,
                           health=Health(), outages=Outages())
    worker.prepare_all()
    (prepared,) = worker.reloader.prepared.values()
    assert worker.prepared is worker.reloader.prepared and worker.reload_s == 7.0
    assert worker._prepared(profiles.default) is prepared and prepared.threshold == 0.5


# ---- the score-message builder -------------------------------------------------------------------------
PREPARED = SimpleNamespace(threshold=0.5, profile=StreamProfile(method="winclip", class_name="damper"),
                           anchor_key="anchors:k", model="tiny")
LATENCY = Latency(queue_ms=1, decode_ms=2, model_ms=3, batch_size=4)


def frame_record(value: bytes, offset: int = 7) -> tuple[Record, FrameMeta]:
    meta = FrameMeta(stream="cam-a", seq=3, ts=1000.0, source="test", width=64, height=48)
    return Record("s.frames", value, key=b"cam-a", partition=2, offset=offset), meta


def test_a_score_message_says_what_scored_it_and_carries_an_anomalous_frame():
    record_, meta = frame_record(jpeg(0))
    anomaly_map = np.linspace(0, 1, 12 * 16, dtype=np.float32).reshape(12, 16)
    at = score_message(record_, meta, 0.5, anomaly_map, PREPARED, "w1", LATENCY)  # at the threshold: anomalous
    assert at.anomalous and at.frame_jpeg == record_.value and at.image_score == 0.5 and at.threshold == 0.5
    assert (at.frame_ref.topic, at.frame_ref.partition, at.frame_ref.offset) == ("s.frames", 2, 7)
    assert (at.method, at.class_name, at.anchor_key, at.model, at.worker) == ("winclip", "damper", "anchors:k",
                                                                               "tiny", "w1")
    assert at.latency == LATENCY and at.frame == meta
    assert decode_map(at.map).shape == (12, 16)
    below = score_message(record_, meta, 0.49, anomaly_map, PREPARED, "w1", LATENCY)
    assert not below.anomalous and below.frame_jpeg is None


def test_a_score_that_fits_the_bus_is_sent_whole():
    record_, meta = frame_record(jpeg(0))
    message = score_message(record_, meta, 0.9, np.zeros((6, 8), np.float32), PREPARED, "w1", LATENCY)
    assert encode_within(message, 1_000_000) == encode(message)
    bare = score_message(record_, meta, 0.1, np.zeros((6, 8), np.float32), PREPARED, "w1", LATENCY)
    assert encode_within(bare, 10) == encode(bare)  # nothing to shrink: the bus refuses it, not the builder


def test_a_score_too_large_for_the_bus_carries_its_frame_reduced_or_none(caplog):
    noise = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    big = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    record_, meta = frame_record(big)
    message = score_message(record_, meta, 0.9, np.zeros((6, 8), np.float32), PREPARED, "w1", LATENCY)
    whole = len(encode(message))
    limit = whole // 2
    with caplog.at_level(logging.WARNING, logger="linewatch.workers.worker"):
        data = encode_within(message, limit)
    reduced = decode(data, ScoreMsg)
    assert record_size(data, b"cam-a") <= limit and reduced.frame_jpeg_note == "reduced"
    assert len(reduced.frame_jpeg) < len(big)
    assert cv2.imdecode(np.frombuffer(reduced.frame_jpeg, np.uint8), cv2.IMREAD_COLOR) is not None
    assert "re-encoded smaller" in caplog.text
    bare_size = len(encode(message.model_copy(update={"frame_jpeg": None, "frame_jpeg_note": "dropped"})))
    dropped = decode(encode_within(message, bare_size + 100), ScoreMsg)  # no room for any frame
    assert dropped.frame_jpeg is None and dropped.frame_jpeg_note == "dropped" and dropped.image_score == 0.9


def test_maps_are_cut_to_their_frames_aspect_and_cleaned():
    maps = torch.rand(3, 16, 16)
    maps[1, 0, 0] = float("nan")
    maps[1, 0, 1] = float("inf")
    rows, reduced = reduce_maps(maps, [(64, 48), (48, 64), (64, 48)], max_side=8)
    assert rows == [[0, 2], [1]]
    assert [tuple(r.shape) for r in reduced] == [(2, 6, 8), (1, 8, 6)]
    assert torch.isfinite(reduced[1]).all()
    out = wire_maps(maps, [(64, 48), (48, 64), (64, 48)], max_side=8)
    assert [a.shape for a in out] == [(6, 8), (8, 6), (6, 8)]
    assert np.allclose(out[2], reduced[0][1].numpy())
    square = maps[:1].clone()
    assert torch.allclose(reduce_maps(square, [(32, 32)], max_side=16)[1][0], square)  # already the wire size


def test_device_work_on_a_cpu_is_read_at_once():
    clock = DeviceClock(torch.device("cpu"))
    clock.stop()
    assert clock.seconds() >= 0.0
    tensors = [torch.arange(3.0), torch.ones(2, 2)]
    host, ready = to_host(tensors)
    assert ready is None and all(torch.equal(a, b) for a, b in zip(host, tensors))


# ---- the registries a worker is given ------------------------------------------------------------------
def spied(monkeypatch, calls: list, registry, *names) -> list:
    """Calls on the process-wide ``registry`` by method name, recorded in ``calls`` and passed through."""
    for name in names:
        real = getattr(registry, name)

        def spy(*args, _name=name, _real=real, **kwargs):
            calls.append((_name, args))
            return _real(*args, **kwargs)

        monkeypatch.setattr(registry, name, spy)
    return calls


def run_one_frame(worker: ScoringWorker, bus: MemoryBus, health: Health) -> list[set[str]]:
    """Score one frame; returns the loops ``health`` saw beating at each turn of the loop."""
    publish(bus, "cam-a", 0)
    beating: list[set[str]] = []
    worker.run(threading.Event(), until_idle_s=0.2,
               until=lambda: beating.append(set(health.liveness()[1]["loops"])) and False)
    assert len(read_all(bus, bus.topics.scores)) == 1
    return beating


def test_a_worker_given_its_registries_reports_there_and_not_to_the_process(tiny, monkeypatch):
    process: list = []
    spied(monkeypatch, process, HEALTH, "beat", "set", "stop_beating")
    spied(monkeypatch, process, OUTAGES, "register")
    health, outages, bus = Health(), Outages(), MemoryBus(Topics("h"))
    worker = ScoringWorker(bus, tiny, ProfileTable(StreamProfile(threshold=0.5)), AnchorCache(),
                           health=health, outages=outages)
    worker.prepare_all()
    beating = run_one_frame(worker, bus, health)
    assert any("worker" in loops for loops in beating)
    assert "worker" not in health.liveness()[1]["loops"]  # it stopped beating as the loop ended
    assert health.readiness()[1]["conditions"]["assignment"]["ok"] is True
    assert "worker" in outages.snapshot()["parts"]
    assert process == []


def test_a_worker_given_nothing_reports_to_the_process(tiny, monkeypatch):
    """The process default stays, as the CLI runs a worker (and shows the test above can fail)."""
    process: list = []
    spied(monkeypatch, process, HEALTH, "beat")
    spied(monkeypatch, process, OUTAGES, "register")
    bus = MemoryBus(Topics("h"))
    worker = ScoringWorker(bus, tiny, ProfileTable(StreamProfile(threshold=0.5)), AnchorCache())
    worker.prepare_all()
    run_one_frame(worker, bus, HEALTH)
    assert ("register", ("worker",)) in process
    assert any(name == "beat" and args[0] == "worker" for name, args in process)


def test_a_redis_outage_goes_to_the_anchor_caches_registry(tiny, monkeypatch):
    from linewatch.scoring.methods import create_method
    from services import free_port

    process = spied(monkeypatch, [], OUTAGES, "down", "up")
    outages = Outages(recovery_s=0)
    cache = AnchorCache(f"redis://127.0.0.1:{free_port()}/0", outages=outages)
    method = create_method("aprilgan", tiny)
    cache.get(method.anchor_key("insulator"), lambda: method.build_anchors("insulator"))
    assert cache.stats["computed"] == 1
    down = outages.snapshot()["parts"]["worker"]["down"]
    assert list(down) == [cache.dependency] and down[cache.dependency]["critical"] is False
    assert process == []
