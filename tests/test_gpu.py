"""Checks that need a CUDA device (skipped elsewhere, CI included): the GPU memory metric, nvJPEG decoding against
OpenCV's, and the worker's one-batch-in-flight loop against publishing each batch at once.

The second is the check that caught torchvision's nvJPEG writing, from its own stream, into
memory the queued model work of the previous batch still used (``workers/frames.py``). It
needs real GPU work in flight to mean anything, so it runs a ViT-B-16 at 448 px."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest
import torch

from linewatch.bus import Topics
from linewatch.bus.maps import decode_map
from linewatch.bus.memory import MemoryBus
from linewatch.bus.messages import ScoreMsg, decode
from linewatch.scoring.backbone import Backbone, BackboneConfig
from linewatch.workers.anchors import AnchorCache
from linewatch.workers.frames import FrameDecoder
from linewatch.workers.profiles import ProfileTable, StreamProfile
from linewatch.workers.worker import ScoringWorker

from helpers import publish, read_all

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def frame_jpegs(count: int, size=(360, 640)) -> list[bytes]:
    """Smooth, distinct frames (blurred noise, so JPEG keeps them apart) at a drone clip's size."""
    rng = np.random.default_rng(3)
    out = []
    for _ in range(count):
        image = cv2.GaussianBlur(rng.integers(0, 255, (*size, 3), dtype=np.uint8), (0, 0), 3)
        out.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


def test_nvjpeg_batches_match_opencv():
    blobs = frame_jpegs(8)
    gpu = FrameDecoder(448, "cuda")
    assert gpu.where == "nvjpeg"
    images, kept, failed = gpu.decode(blobs)
    reference, _, _ = FrameDecoder(448, "cuda", gpu_decode=False).decode(blobs)
    assert kept == list(range(8)) and not failed
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert (images - reference).abs().mean().item() < 0.02  # different resampling filters, same pictures


def test_one_batch_in_flight_scores_like_one_at_a_time_on_gpu():
    backbone = Backbone.build(BackboneConfig(arch="ViT-B-16", image_size=448), "cuda")
    blobs = frame_jpegs(192)
    results = {}
    for overlap in (False, True):
        bus = MemoryBus(Topics(f"gpu{int(overlap)}"))
        worker = ScoringWorker(bus, backbone, ProfileTable(StreamProfile(method="aprilgan", threshold=0.5)),
                               AnchorCache(), max_batch=32, precision="bf16")
        worker.prepare_all()
        worker.overlap = overlap
        for seq, blob in enumerate(blobs):
            publish(bus, "cam-a", seq, value=blob)
        worker.run(threading.Event(), until_idle_s=1.0)
        scores = [decode(r.value, ScoreMsg) for r in read_all(bus, bus.topics.scores)]
        assert len(scores) == len(blobs)  # each frame once
        results[overlap] = {s.frame.seq: (s.image_score, decode_map(s.map)) for s in scores}
    assert sorted(results[True]) == list(range(len(blobs))) == sorted(results[False])
    for seq, (score, anomaly_map) in results[False].items():
        other_score, other_map = results[True][seq]
        assert np.isfinite(other_score) and other_score == pytest.approx(score, abs=1e-3), seq
        assert np.abs(other_map - anomaly_map).max() < 1e-2, seq


def test_gpu_memory_is_exported():
    from prometheus_client import REGISTRY

    from linewatch.ops.metrics import watch_gpu

    device = torch.device("cuda", 0)
    watch_gpu(device)
    watch_gpu(device)  # once per device: a second worker in the process must not register it again
    held = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device=device)
    allocated = REGISTRY.get_sample_value("linewatch_gpu_memory_bytes", {"device": "cuda:0", "kind": "allocated"})
    assert allocated >= held.numel()
    assert REGISTRY.get_sample_value("linewatch_gpu_memory_bytes", {"device": "cuda:0", "kind": "reserved"}) >= allocated
