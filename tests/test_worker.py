"""Scoring worker on the in-process bus with the tiny model: one score per frame, dead
letters for bad frames, per-stream profiles, anchors through Redis, thresholds, replay."""

from __future__ import annotations

import logging
import threading
import time

import cv2
import numpy as np
import pytest
import torch

from linewatch.bus import Topics
from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import (
    META_HEADER,
    DeadLetter,
    ScoreMsg,
    SessionEnd,
    decode,
    encode,
)
from linewatch.pipeline.replay import ReplayRange, first_offset_at, replay
from linewatch.pipeline.settings import load_settings
from linewatch.scoring.calibrate import leave_one_out_scores, reference_threshold
from linewatch.scoring.methods import create_method
from linewatch.scoring.pixels import load_image
from linewatch.scoring.prompts import PromptPack
from linewatch.workers.anchors import AnchorCache
from linewatch.workers.prepared import PreparedProfile
from linewatch.workers.profiles import ProfileTable, StreamProfile, reference_paths
from linewatch.workers.worker import ScoringWorker

from helpers import jpeg, publish, read_all


def make_worker(bus, tiny, profile=StreamProfile(method="aprilgan", threshold=0.5), streams=None, **kwargs):
    kwargs.setdefault("max_batch", 4)
    worker = ScoringWorker(bus, tiny, ProfileTable(profile, streams), AnchorCache(), **kwargs)
    worker.prepare_all()
    return worker


def test_every_frame_scored_once_and_committed(tiny):
    bus = MemoryBus(Topics("w"))
    worker = make_worker(bus, tiny, StreamProfile(threshold=0.0))  # everything anomalous: frames travel along
    for seq in range(10):
        publish(bus, "cam-a", seq)
    worker.run(threading.Event(), until_idle_s=0.5)
    scores = [decode(r.value, ScoreMsg) for r in read_all(bus, bus.topics.scores)]
    assert sorted(s.frame.seq for s in scores) == list(range(10))
    first = scores[0]
    assert first.anomalous and first.frame_jpeg == jpeg(first.frame.seq)
    assert first.model == tiny.identity and first.anchor_key.startswith("anchors:")
    assert first.map.png.startswith(b"\x89PNG") and first.latency.batch_size >= 1
    with bus.cond:
        assert bus.drained(bus.topics.frames)


def test_a_session_end_is_forwarded_after_the_scores_of_its_frames(tiny):
    """The end marker keeps its place: after every score of the frames before it on the
    partition, even when a batch mixes streams of two profiles (scored and published
    profile by profile) and when a batch holds nothing but an end."""
    bus = MemoryBus(Topics("w"))
    worker = make_worker(bus, tiny, streams={"drone-*": {"threshold": 0.25}}, max_batch=8)
    ends = {stream: SessionEnd(stream=stream, frames=frames, ts=1000.0 + frames) for stream, frames in
            (("drone-7", 3), ("cam-a", 6))}

    def end(stream):
        bus.producer().send(bus.topics.frames, b"", key=stream.encode(),
                            headers=((META_HEADER, encode(ends[stream])),))

    for seq in range(3):
        publish(bus, "cam-a", seq)
        publish(bus, "drone-7", seq)
    end("drone-7")  # in the first batch of 8, after drone-7's frames, before cam-a's last ones
    for seq in range(3, 6):
        publish(bus, "cam-a", seq)
    end("cam-a")
    worker.run(threading.Event(), until_idle_s=0.3)
    out = [decode(r.value, ScoreMsg, SessionEnd) for r in read_all(bus, bus.topics.scores)]
    for stream, marker in ends.items():
        mine = [m for m in out if getattr(m, "stream", None) == stream or
                (isinstance(m, ScoreMsg) and m.frame.stream == stream)]
        assert mine[-1] == marker and all(isinstance(m, ScoreMsg) for m in mine[:-1])
        assert sorted(m.frame.seq for m in mine[:-1]) == list(range(marker.frames))
    assert worker.stats.frames == 9 and worker.stats.dead == 0
    with bus.cond:
        assert bus.drained(bus.topics.frames)


def test_frames_below_threshold_carry_no_image(tiny):
    bus = MemoryBus(Topics("w"))
    worker = make_worker(bus, tiny, StreamProfile(threshold=2.0))  # probabilities never reach 2
    publish(bus, "cam-a", 0)
    worker.run(threading.Event(), until_idle_s=0.3)
    (score,) = [decode(r.value, ScoreMsg) for r in read_all(bus, bus.topics.scores)]
    assert not score.anomalous and score.frame_jpeg is None


def test_bad_frames_go_to_dead_letter_and_the_worker_goes_on(tiny):
    bus = MemoryBus(Topics("w"))
    worker = make_worker(bus, tiny)
    publish(bus, "cam-a", 0)
    publish(bus, "cam-a", 1, value=b"\xff\xd8 not really a jpeg")
    publish(bus, "cam-a", 2, meta=b'{"kind": "frame", "v": 99}')
    publish(bus, "cam-a", 3, meta=b"garbage")
    publish(bus, "cam-a", 4)
    worker.run(threading.Event(), until_idle_s=0.3)
    scored = sorted(decode(r.value, ScoreMsg).frame.seq for r in read_all(bus, bus.topics.scores))
    dead = [decode(r.value, DeadLetter) for r in read_all(bus, bus.topics.dead)]
    assert scored == [0, 4]
    reasons = [d.reason for d in dead]
    assert "undecodable jpeg" in next(d.reason for d in dead if d.seq == 1)
    assert any("schema version" in r for r in reasons)
    assert any("not JSON" in r for r in reasons)
    assert all(d.stage == "worker" and d.payload and d.origin is not None for d in dead)
    assert worker.stats.dead == 3


def test_streams_pick_their_profile(tiny):
    bus = MemoryBus(Topics("w"))
    worker = make_worker(bus, tiny, StreamProfile(threshold=0.5), streams={"drone-*": {"threshold": 0.25}})
    publish(bus, "cam-a", 0)
    publish(bus, "drone-7", 0)
    worker.run(threading.Event(), until_idle_s=0.3)
    thresholds = {s.frame.stream: s.threshold for s in (decode(r.value, ScoreMsg)
                                                         for r in read_all(bus, bus.topics.scores))}
    assert thresholds == {"cam-a": 0.5, "drone-7": 0.25}


def test_unknown_method_in_a_stream_override_is_named():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        ProfileTable(StreamProfile(), {"cam-*": {"method": "nope"}})
    with pytest.raises(ValueError, match="references folder not found"):
        ProfileTable(StreamProfile(references="/no/such/folder"))


def test_anchors_shared_through_redis(tiny, redis_url):
    method = create_method("aprilgan", tiny)
    key = method.anchor_key("insulator")
    first = AnchorCache(redis_url)
    built = first.get(key, lambda: method.build_anchors("insulator"))
    assert first.stats["computed"] == 1

    def must_not_build():
        raise AssertionError("a second worker must fetch the anchors, not encode them again")

    second = AnchorCache(redis_url)
    fetched = second.get(key, must_not_build)
    assert second.stats["redis_hits"] == 1 and fetched.key == key
    assert torch.equal(fetched.normal, built.normal) and torch.equal(fetched.abnormal, built.abnormal)
    assert second.get(key, must_not_build) is fetched  # now from the in-process cache


def test_scoring_goes_on_when_redis_is_down(tiny, caplog):
    from services import free_port

    method = create_method("aprilgan", tiny)
    cache = AnchorCache(f"redis://127.0.0.1:{free_port()}/0")
    with caplog.at_level(logging.WARNING, logger="linewatch.workers.anchors"):
        for class_name in ("insulator", "damper"):
            anchors = cache.get(method.anchor_key(class_name), lambda c=class_name: method.build_anchors(c))
            assert anchors.key == method.anchor_key(class_name)
    assert cache.stats["computed"] == 2
    assert sum("unavailable" in r.message for r in caplog.records) == 1  # said once, not per call


def test_leave_one_out_threshold_sits_above_normal_variation(tiny, make_images):
    method = create_method("aprilgan", tiny, text_weight=0)
    references = make_images(4, seed=3)
    method.prepare("insulator", reference_images=references)
    loo = leave_one_out_scores(method, references)
    threshold = reference_threshold(method, references)
    assert loo.shape == (4,) and threshold > loo.max().item()


@pytest.mark.parametrize("name", ["aprilgan", "winclip"])
def test_leave_one_out_from_the_memory_equals_re_encoding_the_others(name, tiny, make_images):
    """Taking one reference's rows out of the memory scores as a memory built from the other
    k-1 images does (the k² encoding it replaces), and leaves the full memory in place."""
    method = create_method(name, tiny, text_weight=0)
    references = make_images(3, seed=5)
    anchors = method.build_anchors("insulator")
    expected = []
    for i in range(3):
        method.prepare("insulator", reference_images=torch.cat([references[:i], references[i + 1:]]), anchors=anchors)
        expected.append(method.score(references[i:i + 1]).image_score.item())
    method.prepare("insulator", reference_images=references, anchors=anchors)
    full = {k: v.clone() for k, v in method.memory_state().items()}
    assert leave_one_out_scores(method, references).tolist() == pytest.approx(expected, abs=1e-5)
    assert all(torch.equal(full[k], v) for k, v in method.memory_state().items())


def test_settings_precedence(tmp_path, monkeypatch):
    config = tmp_path / "lw.yaml"
    config.write_text("worker: {max_batch: 3, max_wait_ms: 7}\nprofile: {method: winclip}\n"
                      "streams: {'drone-*': {threshold: 0.3}}\n")
    monkeypatch.setenv("LINEWATCH_WORKER__MAX_BATCH", "5")
    settings = load_settings(str(config), {"profile": {"class_name": "damper"}})
    assert settings.worker.max_batch == 5 and settings.worker.max_wait_ms == 7  # env over file
    assert settings.profile.method == "winclip" and settings.profile.class_name == "damper"
    assert settings.streams == {"drone-*": {"threshold": 0.3}}
    monkeypatch.setenv("LINEWATCH_WORKER__MAX_BATCH", "0")
    with pytest.raises(ValueError, match="worker.max_batch"):
        load_settings(str(config))
    with pytest.raises(ValueError, match="config file not found"):
        load_settings(str(tmp_path / "missing.yaml"))


def test_replay_by_time_finds_the_range_by_seeking(tiny):
    bus = MemoryBus(Topics("r"))
    for seq in range(40):
        publish(bus, "cam-a", seq, ts=1000.0)  # capture times 1000..1039
    reader = bus.consumer([], None)
    reader.assign(bus.topics.frames, [0])
    assert first_offset_at(reader, bus.topics.frames, 0, 1_017_000) == 17
    assert first_offset_at(reader, bus.topics.frames, 0, 999_000) == 0
    assert first_offset_at(reader, bus.topics.frames, 0, 5_000_000) is None
    bus.ensure_topics(["r.replay.test"])
    worker = make_worker(bus, tiny, results_topic="r.replay.test")
    counts = replay(bus, worker, ReplayRange(since=1010, until=1020), progress=False)
    *scores, end = read_all(bus, "r.replay.test")
    assert sorted(decode(r.value, ScoreMsg).frame.seq for r in scores) == list(range(10, 20)) and counts["scored"] == 10
    # the range cut the session short: it ends there, so an alert sink on the results closes its events
    end = decode(end.value, SessionEnd)
    assert (end.stream, end.frames, end.ts, end.reason) == ("cam-a", 20, 1019.0, "replay")
    assert not read_all(bus, bus.topics.scores)  # the live scores topic is untouched


def test_calibration_images_set_the_threshold_above_their_scores(tiny, make_images, tmp_path):
    for folder, seed in (("refs", 1), ("cal", 2)):
        (tmp_path / folder).mkdir()
        for i, image in enumerate(make_images(3, seed=seed)):
            array = (image.permute(1, 2, 0).numpy()[:, :, ::-1] * 255).astype(np.uint8)
            cv2.imwrite(str(tmp_path / folder / f"{i}.png"), array)
    profile = StreamProfile(references=str(tmp_path / "refs"), calibration=str(tmp_path / "cal"),
                            options={"text_weight": 0})
    prepared = PreparedProfile(profile, tiny, PromptPack.load(), AnchorCache())
    calibration = torch.stack([load_image(p, tiny.image_size) for p in reference_paths(str(tmp_path / "cal"), None)])
    assert prepared.threshold > prepared.method.score(calibration).image_score.max().item()
    references = torch.stack([load_image(p, tiny.image_size) for p in reference_paths(str(tmp_path / "refs"), None)])
    assert prepared.method.score(references).image_score.max().item() < 1e-3  # memory holds the references only


def test_saturated_calibration_scores_are_refused(tiny, make_images, monkeypatch):
    """Every calibration score 1.0 put the threshold at 1.01, which no frame reaches: silently
    never alerting. Now refused with the reason."""
    from linewatch.scoring.calibrate import CalibrationError, calibration_threshold

    method = create_method("aprilgan", tiny)
    method.prepare("insulator")
    images = make_images(4, seed=5)
    assert calibration_threshold(method, images) > method.score(images).image_score.max().item()
    monkeypatch.setattr(method, "score", lambda batch: type("R", (), {"image_score": torch.ones(len(batch))})())
    with pytest.raises(CalibrationError, match="the 4 scores of the calibration images are all 1"):
        calibration_threshold(method, images)


def test_random_weights_zero_shot_warns_once(tiny, caplog, monkeypatch):
    """`run` zero-shot on random weights flags nearly every frame: say so, once per process,
    and not when references give the method a real signal."""
    from linewatch.workers import prepared as prepared_module

    monkeypatch.setattr(prepared_module, "_warned_random_zero_shot", False)
    with caplog.at_level(logging.WARNING, logger="linewatch.workers.prepared"):
        for class_name in ("insulator", "damper"):
            PreparedProfile(StreamProfile(class_name=class_name, threshold=0.5), tiny, PromptPack.load(),
                            AnchorCache())
    warnings = [r.getMessage() for r in caplog.records if "RANDOM weights" in r.getMessage()]
    assert len(warnings) == 1 and "--references" in warnings[0]


def test_anchor_folder_keeps_anchors_across_runs(tiny, tmp_path):
    method = create_method("aprilgan", tiny)
    key = method.anchor_key("insulator")
    AnchorCache(folder=tmp_path).get(key, lambda: method.build_anchors("insulator"))

    def must_not_build():
        raise AssertionError("the second run must read the anchors from the folder")

    later = AnchorCache(folder=tmp_path)
    assert later.get(key, must_not_build).key == key and later.stats["file_hits"] == 1
    (next(tmp_path.iterdir())).write_bytes(b"truncated")  # a damaged file is rebuilt, not trusted
    rebuilt = AnchorCache(folder=tmp_path)
    assert rebuilt.get(key, lambda: method.build_anchors("insulator")).key == key
    assert rebuilt.stats["computed"] == 1


@pytest.fixture(scope="module")
def madclip_checkpoint(tiny, tmp_path_factory, make_images):
    """A madclip checkpoint trained for two epochs on the tiny backbone (learnable prompts:
    its anchors depend on the trained tensors)."""
    from linewatch.scoring.checkpoint import save_checkpoint
    from linewatch.scoring.training import TrainConfig, TrainingSet, fit

    images = make_images(4, seed=3)
    masks = torch.zeros(4, 64, 64, dtype=torch.bool)
    masks[2:, 16:32, 16:32] = True
    torch.manual_seed(0)
    method = create_method("madclip", tiny)
    fit(method, TrainingSet(images, masks, torch.tensor([0, 0, 1, 1]), ["insulator"] * 4), TrainConfig(epochs=2, views=1))
    path = tmp_path_factory.mktemp("ckpt") / "madclip.safetensors"
    save_checkpoint(path, method, {}, {"shots": 2})
    return path


def test_a_stream_scores_with_its_checkpoint(tiny, madclip_checkpoint):
    bus = MemoryBus(Topics("w"))
    worker = make_worker(bus, tiny, StreamProfile(threshold=0.5),
                         streams={"drone-*": {"checkpoint": str(madclip_checkpoint), "threshold": 0.5}})
    publish(bus, "cam-a", 0)
    publish(bus, "drone-7", 0)
    worker.run(threading.Event(), until_idle_s=0.3)
    scores = {s.frame.stream: s for s in (decode(r.value, ScoreMsg) for r in read_all(bus, bus.topics.scores))}
    assert scores["cam-a"].method == "aprilgan" and scores["cam-a"].model == tiny.identity
    trained = scores["drone-7"]
    assert trained.method == "madclip" and trained.model.startswith(tiny.identity + "+checkpoint:")
    assert trained.anchor_key != scores["cam-a"].anchor_key


def test_checkpoint_anchors_are_keyed_by_the_trained_prompts(tiny, madclip_checkpoint, redis_url):
    from linewatch.scoring.checkpoint import load_checkpoint

    trained = load_checkpoint(madclip_checkpoint, tiny)
    torch.manual_seed(0)
    untrained = create_method("madclip", tiny)
    assert trained.anchor_key("insulator") != untrained.anchor_key("insulator")
    cache = AnchorCache(redis_url)
    built = cache.get(trained.anchor_key("insulator"), lambda: trained.build_anchors("insulator"))
    again = AnchorCache(redis_url).get(trained.anchor_key("insulator"), lambda: pytest.fail("must come from Redis"))
    assert torch.equal(again.normal, built.normal)
    trained.prepare("insulator", anchors=again)  # accepted: the key matches this checkpoint


def test_checkpoint_profile_mistakes_are_named(tiny, madclip_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="holds a madclip model but the profile says method aprilgan"):
        ProfileTable(StreamProfile(method="aprilgan", checkpoint=str(madclip_checkpoint)))
    with pytest.raises(ValueError, match="options are fixed at training"):
        ProfileTable(StreamProfile(checkpoint=str(madclip_checkpoint), options={"sigma": 2}))
    with pytest.raises(ValueError, match="checkpoint not found"):
        StreamProfile(checkpoint=str(tmp_path / "missing.safetensors"))
    assert StreamProfile(checkpoint=str(madclip_checkpoint)).method == "madclip"
    with pytest.raises(ValueError, match="has no memory bank .* takes no references"):
        ProfileTable(StreamProfile(method="madclip", options={"memory_bank": False}, references=str(tmp_path)))


def _scores(bus) -> list[ScoreMsg]:
    return [decode(r.value, ScoreMsg) for r in read_all(bus, bus.topics.scores)]


def test_one_batch_in_flight_scores_like_one_at_a_time(tiny):
    """The GPU loop (batch k queued before batch k-1 is published), run here on the CPU: the same
    scores and maps, every frame once, all committed."""
    results = {}
    for overlap in (False, True):
        bus = MemoryBus(Topics("w"))
        worker = make_worker(bus, tiny, StreamProfile(threshold=0.0))
        worker.overlap = overlap
        for seq in range(11):
            publish(bus, "cam-a" if seq % 3 else "cam-b", seq)
        worker.run(threading.Event(), until_idle_s=0.5)
        with bus.cond:
            assert bus.drained(bus.topics.frames)
        scores = _scores(bus)
        assert len(scores) == 11  # each frame once
        results[overlap] = {(s.frame.stream, s.frame.seq): (s.image_score, s.map.png) for s in scores}
    assert results[True].keys() == results[False].keys()
    for key, (score, png) in results[False].items():
        assert results[True][key][0] == pytest.approx(score, abs=1e-6) and results[True][key][1] == png


def test_a_pending_batch_is_published_when_no_frame_follows(tiny):
    """A scarce feed: each frame's score comes out without waiting for a next frame."""
    bus = MemoryBus(Topics("w"))
    worker = make_worker(bus, tiny)
    worker.overlap = True
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        for seq in range(3):
            publish(bus, "cam-a", seq)
            deadline = time.monotonic() + 60  # liveness, not timing: a score held for a next frame never comes
            while worker.stats.frames < seq + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert worker.stats.frames == seq + 1
    finally:
        stop.set()
        thread.join(timeout=30)
    assert sorted(s.frame.seq for s in _scores(bus)) == [0, 1, 2]


def test_a_batch_in_flight_at_stop_is_published_and_committed(tiny):
    """Stopped with batch 3 (frames 2 and 3; the first batch holds one frame) queued: its scores
    are computed, so they go out and it is committed."""
    bus = MemoryBus(Topics("w"))
    worker = make_worker(bus, tiny, max_batch=2, max_wait_ms=0)
    worker.overlap = True
    for seq in range(4):
        publish(bus, "cam-a", seq)
    worker.run(threading.Event(), until=lambda: worker.stats.batches >= 2)
    assert worker.stats.batches == 3 and [s.frame.seq for s in _scores(bus)] == [0, 1, 2, 3]
    with bus.cond:
        assert bus.drained(bus.topics.frames)


def test_a_failure_with_a_batch_in_flight_loses_nothing(tiny):
    """The model fails from batch 2 on (a lost device: a blank frame fails too) while batch 1
    is in flight: neither is committed, so the group's next member scores both (at-least-once)."""
    bus = MemoryBus(Topics("w"))
    first = make_worker(bus, tiny, max_batch=2, max_wait_ms=0)
    first.overlap = True
    method = next(iter(first.prepared.values())).method
    score_batch, calls = method.score_batch, []

    def fail_the_second(images):
        calls.append(1)
        if len(calls) >= 2:
            raise RuntimeError("device lost")
        return score_batch(images)

    method.score_batch = fail_the_second
    for seq in range(4):
        publish(bus, "cam-a", seq)
    with pytest.raises(RuntimeError, match="device lost"):
        first.run(threading.Event(), until_idle_s=0.5)
    assert first.stats.frames == 0
    method.score_batch = score_batch
    second = make_worker(bus, tiny)
    second.run(threading.Event(), until_idle_s=0.5)
    assert [s.frame.seq for s in _scores(bus)] == [0, 1, 2, 3]
    with bus.cond:
        assert bus.drained(bus.topics.frames)


def test_a_non_finite_score_goes_to_dead_letter(tiny):
    """A score no sink could read (NaN) is dead-lettered with the reason; the batch's other frames go on."""
    bus = MemoryBus(Topics("w"))
    worker = make_worker(bus, tiny)
    method = next(iter(worker.prepared.values())).method
    score_batch = method.score_batch

    def nan_for_the_first(images):  # of a batch of several (the worker's first batch is one frame, 0)
        result = score_batch(images)
        if len(images) > 1:
            result.image_score[0] = float("nan")
        return result

    method.score_batch = nan_for_the_first
    for seq in range(4):
        publish(bus, "cam-a", seq)
    worker.run(threading.Event(), until_idle_s=0.5)
    scored = sorted(decode(r.value, ScoreMsg).frame.seq for r in read_all(bus, bus.topics.scores))
    (dead,) = [decode(r.value, DeadLetter) for r in read_all(bus, bus.topics.dead)]
    assert scored == [0, 2, 3] and dead.seq == 1 and "non-finite score" in dead.reason
    with bus.cond:
        assert bus.drained(bus.topics.frames)


def test_busy_time_counts_overlapping_batches_once(tiny, monkeypatch):
    """With a batch in flight, batch k's model run overlaps batch k-1's publishing: busy time
    is the union of the batches' spans. A clock that moves only while the model runs (one
    second per batch) makes the spans exact: 4 batches are 4 s busy; summed per batch, 7 s."""
    import types

    from linewatch.workers import worker as worker_module

    clock = [0.0]
    monkeypatch.setattr(worker_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    bus = MemoryBus(Topics("w"))
    worker = make_worker(bus, tiny, max_batch=2, max_wait_ms=0)
    worker.overlap = True
    method = next(iter(worker.prepared.values())).method
    score_batch = method.score_batch

    def one_second(images):
        clock[0] += 1.0
        return score_batch(images)

    method.score_batch = one_second
    for seq in range(8):
        publish(bus, "cam-a", seq)
    worker.run(threading.Event(), until=lambda: worker.stats.frames == 8)
    assert worker.stats.batches == 5 and worker.stats.busy_s == 5.0  # 1 + 2 + 2 + 2 + 1 frames
