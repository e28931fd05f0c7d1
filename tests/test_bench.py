"""`linewatch bench` on the tiny model, mixed precision in the backbone and the worker, and the
worker's frame decoder. No timing is asserted anywhere: benchmarks are not tests; these check
that the report is built from what was measured and that each path does what it claims."""

from __future__ import annotations

import json
import math
import threading

import cv2
import numpy as np
import pytest
import torch

from linewatch.bench.batched import pick_settings, score_batches
from linewatch.bench.measure import PartResult, percentiles
from linewatch.bench.naive import naive_loop
from linewatch.bus import Topics
from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import ScoreMsg, decode
from linewatch.cli import main
from linewatch.pipeline.settings import load_settings
from linewatch.scoring.methods import create_method
from linewatch.scoring.pixels import bgr_to_tensor
from linewatch.scoring.precision import cpu_has_native_bf16
from linewatch.workers.anchors import AnchorCache
from linewatch.workers.frames import FrameDecoder
from linewatch.workers.profiles import ProfileTable, StreamProfile
from linewatch.workers.worker import ScoringWorker

from helpers import error_line, publish, read_all

TINY = ["--arch", "linewatch-tiny", "--image-size", "64"]
CLASS = "metal_nut"


def jpegs(n: int, size=(90, 160)) -> list[bytes]:
    rng = np.random.default_rng(7)
    return [cv2.imencode(".jpg", rng.integers(0, 255, (*size, 3), dtype=np.uint8))[1].tobytes() for _ in range(n)]


@pytest.fixture(scope="module")
def bench(tmp_path_factory, kafka_servers):
    """One small bench run, both pipelines included; (JSON report, printed output)."""
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", *TINY, "--methods", "aprilgan", "--frames", "6", "--naive-frames", "2", "--sweep-frames", "4",
            "--batch-sizes", "1,2", "--precisions", "fp32,bf16", "--bootstrap-servers", kafka_servers,
            "--sweep-seconds", "0", "--repeats", "2",
            "--ingest-seconds", "0.2", "--no-progress", "--work", str(out / "work"), "--json", str(out / "bench.json")]
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    return json.loads((out / "bench.json").read_text()), printed.getvalue()


def test_report_names_weights_device_and_every_part(bench):
    report, printed = bench
    assert report["model"] == "linewatch-tiny@random-seed0" and report["weights"] == "none"
    assert "random" in report["weights_note"] and report["device"] == "cpu" and report["name"]
    assert report["kafka"]["used"] and report["kafka"]["broker"] == "given"
    result = report["methods"]["aprilgan"]
    assert [(p["settings"]["batch"], p["settings"]["precision"]) for p in result["sweep"]] == [
        (1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")]
    parts = [result["naive"], *result["sweep"], result["scoring"], result["embedded"], result["kafka"],
             report["ingest"]["opencv_decode"], report["ingest"]["ingest"]]
    for part in parts:
        assert part["frames"] > 0 and part["seconds"] > 0
        assert part["fps"] == pytest.approx(part["frames"] / part["seconds"])
        assert 0 < part["latency_ms"]["p50"] <= part["latency_ms"]["p99"]
        assert part["peak_rss_mb"] > 0 and part["peak_gpu_mb"] is None  # no GPU here
    assert result["naive"]["frames"] == 2 and result["scoring"]["frames"] == 6
    for key in ("scoring", "embedded", "kafka"):  # the median (of two: the lower) of the interleaved runs
        assert len(result[key]["repeat_fps"]) == 2 and result[key]["fps"] == min(result[key]["repeat_fps"])
    assert result["embedded"]["frames"] == result["kafka"]["frames"] == report["clip"]["frames"] == 6
    # the table and the JSON are both printed
    table, _, printed_json = printed.partition("\nJSON:\n")
    assert "scoring / baseline" in table and "pipeline, Kafka" in table and "linewatch-tiny@random-seed0" in table
    assert json.loads(printed_json) == report


def test_ratios_are_the_quotients_of_the_measured_figures(bench):
    report, _ = bench
    result = report["methods"]["aprilgan"]
    fps = {key: result[key]["fps"] for key in ("naive", "scoring", "embedded", "kafka")}
    ratios = result["ratios"]
    assert ratios["scoring_vs_naive"] == pytest.approx(fps["scoring"] / fps["naive"], rel=1e-12)
    assert ratios["scoring_vs_naive_cached_prompts"] == pytest.approx(
        fps["scoring"] / result["naive"]["extra"]["naive_cached_prompts_fps"], rel=1e-12)
    for bus in ("embedded", "kafka"):
        assert ratios[f"{bus}_vs_scoring"] == pytest.approx(fps[bus] / fps["scoring"], rel=1e-12)
        assert ratios[f"{bus}_overhead"] == pytest.approx(fps["scoring"] / fps[bus] - 1, rel=1e-12)
    ingest = report["ingest"]
    assert ingest["ratios"]["ingest_vs_opencv"] == pytest.approx(
        ingest["ingest"]["fps"] / ingest["opencv_decode"]["fps"], rel=1e-12)
    # the cached-prompt figure is the baseline's time without its prompt encoding
    naive = result["naive"]
    assert naive["extra"]["naive_cached_prompts_fps"] == pytest.approx(
        naive["frames"] / (naive["seconds"] - naive["extra"]["prompt_s"]))


def test_pipelines_ran_with_the_picked_settings(bench):
    report, _ = bench
    result = report["methods"]["aprilgan"]
    picked = result["picked"]
    assert (picked["max_batch"], picked["precision"]) in [
        (p["settings"]["batch"], p["settings"]["precision"]) for p in result["sweep"]]
    assert (result["scoring"]["settings"]["batch"], result["scoring"]["settings"]["precision"]) == (
        picked["max_batch"], picked["precision"])
    for bus in ("embedded", "kafka"):
        settings = result[bus]["settings"]
        assert (settings["batch"], settings["precision"], settings["max_wait_ms"]) == (
            picked["max_batch"], picked["precision"], picked["max_wait_ms"])
        # the alert threshold is calibrated on the synthetic clip's normal views, not fixed
        assert settings["threshold"] == "auto" and settings["calibration"].endswith("calibration")


def test_baseline_encodes_the_prompts_every_frame_and_scoring_never(tiny):
    """Counted on the text tower itself: its token embedding runs once per chunk of sentences."""
    method = create_method("aprilgan", tiny)
    normal, abnormal = method.prompt_pack.prompts(CLASS)
    per_build = math.ceil(len(normal) / 256) + math.ceil(len(abnormal) / 256)  # encode_text's chunks
    calls = []
    hook = tiny.clip.token_embedding.register_forward_hook(lambda *_: calls.append(1))
    try:
        frames = jpegs(3)
        naive_loop(method, CLASS, frames)
        assert len(calls) == (len(frames) + 1) * per_build  # + the warm-up frame
        anchors = method.build_anchors(CLASS)
        calls.clear()
        part = score_batches(method, CLASS, anchors, jpegs(5), batch=2, precision="fp32")
        assert calls == [] and part.frames == 5
    finally:
        hook.remove()


@pytest.mark.parametrize("overlap", [False, True])
def test_scoring_pass_counts_every_frame_once(tiny, overlap):
    """With one batch in flight (the GPU loop, run here on the CPU) as without: each frame of an
    uneven last batch scored and counted once per pass, its latency its batch's."""
    method = create_method("aprilgan", tiny)
    anchors = method.build_anchors(CLASS)
    scored = []
    hook = tiny.register_forward_hook(lambda _m, args, _out: scored.append(args[0].shape[0]))
    try:
        part = score_batches(method, CLASS, anchors, jpegs(7), batch=3, precision="fp32", overlap=overlap)
    finally:
        hook.remove()
    assert scored == [3, 3, 3, 1]  # the warm-up batch, then 3 + 3 + 1
    assert part.frames == 7 and part.seconds > 0 and part.settings["one_batch_in_flight"] is overlap
    assert part.latency_ms["p50"] <= part.latency_ms["p99"]


def _block_dtypes(backbone) -> tuple[list, object]:
    """The output dtypes of the image tower's first MLP layer, as they run."""
    seen = []
    hook = backbone.clip.visual.transformer.resblocks[0].mlp.c_fc.register_forward_hook(
        lambda _m, _i, out: seen.append(out.dtype))
    return seen, hook


@pytest.mark.parametrize("name", ["aprilgan", "winclip"])
def test_bf16_scores_are_close_to_fp32(tiny, make_images, name):
    method = create_method(name, tiny).prepare(CLASS)
    images = make_images(3, seed=5)
    full = method.score(images)
    seen, hook = _block_dtypes(tiny)
    try:
        with tiny.computing_in(torch.bfloat16):
            half = method.score(images)
    finally:
        hook.remove()
    assert set(seen) == {torch.bfloat16}  # the blocks really ran in bf16 ...
    assert half.image_score.dtype == torch.float32 and not torch.equal(half.anomaly_map, full.anomaly_map)
    assert torch.allclose(half.image_score, full.image_score, atol=0.01)  # ... and the scores barely moved
    assert torch.allclose(half.anomaly_map, full.anomaly_map, atol=0.02)
    assert tiny.compute_dtype is None  # restored on leaving the block


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_worker_scores_in_its_precision(tiny, precision, dtype):
    bus = MemoryBus(Topics("p"))
    worker = ScoringWorker(bus, tiny, ProfileTable(StreamProfile(threshold=0.5)), AnchorCache(), max_batch=4,
                           precision=precision)
    worker.prepare_all()
    for seq in range(4):
        publish(bus, "cam-a", seq)
    seen, hook = _block_dtypes(tiny)
    try:
        worker.run(threading.Event(), until_idle_s=0.3)
    finally:
        hook.remove()
    assert worker.precision == precision and seen and set(seen) == {dtype}
    scores = [decode(r.value, ScoreMsg) for r in read_all(bus, bus.topics.scores)]
    assert len(scores) == 4 and all(0.0 <= s.image_score <= 1.0 for s in scores)
    assert len(worker.stats.service_s) == len(worker.stats.end_to_end_s) == 4


def test_precision_setting_reaches_the_worker(tiny, monkeypatch):
    from linewatch.pipeline.wiring import build_worker

    monkeypatch.setenv("LINEWATCH_WORKER__PRECISION", "bf16")
    settings = load_settings(None, {"backbone": {"arch": "linewatch-tiny"}, "profile": {"threshold": 0.5}})
    assert build_worker(MemoryBus(Topics("s")), settings, tiny).precision == "bf16"
    monkeypatch.delenv("LINEWATCH_WORKER__PRECISION")
    auto = load_settings(None, {"backbone": {"arch": "linewatch-tiny"}, "profile": {"threshold": 0.5}})
    assert auto.worker.precision == "auto"
    expected = "bf16" if cpu_has_native_bf16() else "fp32"  # auto on CPU: bf16 only with native instructions
    assert build_worker(MemoryBus(Topics("s")), auto, tiny).precision == expected
    monkeypatch.setenv("LINEWATCH_WORKER__PRECISION", "fp8")
    with pytest.raises(ValueError, match="worker.precision"):
        load_settings(None)


@pytest.mark.parametrize("args, message", [
    (["bench", "--methods", "nope"], "unknown method 'nope'"),
    (["bench", "--methods", "kanoclip", "--no-kafka"], "kanoclip needs the backbone's V-V attention path"),
    (["bench", "--frames", "4", "--naive-frames", "8"], "--naive-frames 8 exceeds --frames 4"),
    (["bench", "--precisions", "fp16"], "fp16 needs a CUDA device"),
    (["bench", "--precisions", "auto"], "the sweep is what picks one"),
    (["bench", "--device", "cuda"], "sees no CUDA GPU"),
    (["bench", "--no-kafka", "--bootstrap-servers", "h:1"], "contradict"),
    (["run", "clip.mp4", "--precision", "fp16"], "fp16 needs a CUDA device"),
])
def test_mistakes_get_one_line(args, message, capsys, tmp_path):
    if args[0] == "run":
        from linewatch.synthetic.demo import write_demo_clip

        clip = write_demo_clip(tmp_path, seconds=1, fps=2, size=(64, 48), references=1)
        args = ["run", str(clip.video), *args[2:], "--out", str(tmp_path / "out")]
    assert main([*args, *TINY]) == 2
    assert message in error_line(capsys)


def test_cpu_decoder_gives_the_eval_pixels_and_names_bad_frames():
    good = jpegs(3)
    decoder = FrameDecoder(64, "cpu")
    batch, kept, failed = decoder.decode([good[0], b"\xff\xd8 not a jpeg", good[1], good[2]])
    assert kept == [0, 2, 3] and list(failed) == [1] and "undecodable jpeg" in failed[1]
    expected = torch.stack([bgr_to_tensor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), 64)
                            for b in good])
    assert batch.is_contiguous() and torch.equal(batch, expected)
    empty, kept, failed = decoder.decode([b"nope"])
    assert empty.shape == (0, 3, 64, 64) and kept == [] and list(failed) == [0]


def _part(batch: int, precision: str, fps: float, batch_ms: float) -> PartResult:
    frames = 16
    return PartResult("sweep", frames, frames / fps, {"p50": batch_ms, "p99": batch_ms}, "", 1.0, None,
                      settings={"batch": batch, "precision": precision, "compiled": False})


def test_pick_prefers_the_smaller_batch_and_exact_precision_when_nearly_as_fast():
    # batch 8's p50 spans two batches (one in flight ahead of it, as on a GPU); the wait is 10 %
    # of one batch's time at its throughput: 8 / 9.8 frames/s = 816 ms
    sweep = [_part(1, "fp32", 5.0, 200), _part(8, "fp32", 9.8, 1630), _part(8, "bf16", 10.0, 1600),
             _part(16, "bf16", 9.9, 3200)]
    pick = pick_settings(sweep)
    assert (pick.max_batch, pick.precision, pick.max_wait_ms) == (8, "fp32", 82.0)  # 9.8 is within 5 % of 10
    sweep[1] = _part(8, "fp32", 9.0, 900)
    assert (pick_settings(sweep).max_batch, pick_settings(sweep).precision) == (8, "bf16")


def test_percentiles_are_nearest_rank():
    samples = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentiles(samples) == {"p50": pytest.approx(50.0), "p99": pytest.approx(99.0)}
    assert percentiles([0.004]) == {"p50": pytest.approx(4.0), "p99": pytest.approx(4.0)}
