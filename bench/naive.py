"""The baseline: a per-image research loop of the kind the seed papers' evaluation runs.

Per image: PIL decode and resize (what torchvision's ``Resize`` + ``ToTensor`` do to a PIL
image), a batch of one, float32, autograd off with ``no_grad`` (not inference mode), and
the class's text prompt ensemble encoded again (``build_anchors``) before scoring. The
time spent on the prompts is timed separately, so the report can also say what the loop
would reach with the prompts encoded once (``naive_cached_prompts_fps``): how much of
linewatch's lead is caching and how much is batching and precision. The prompt encoding
uses linewatch's text tower, which cuts token sequences after the longest sentence
instead of padding to 77 tokens, so this baseline is, if anything, fast.
"""

from __future__ import annotations

import io
import time

import numpy as np
import torch
from PIL import Image

from ..scoring.methods import AnomalyMethod
from .measure import MemoryWatch, PartResult, percentiles, synchronize


def pil_to_tensor(jpeg: bytes, size: int) -> torch.Tensor:
    """What ``transforms.Compose([Resize((size, size), BICUBIC), ToTensor()])`` gives a PIL image: [1, 3, S, S]."""
    image = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def score_one(method: AnomalyMethod, class_name: str, jpeg: bytes) -> tuple[float, float]:
    """(image score, seconds spent encoding the prompts)."""
    backbone = method.backbone
    image = pil_to_tensor(jpeg, backbone.image_size).to(backbone.device)
    started = time.perf_counter()
    anchors = method.build_anchors(class_name)  # every frame
    synchronize(backbone.device)
    prompts_s = time.perf_counter() - started
    with torch.no_grad():
        method.prepare(class_name, anchors=anchors)
        result = method.score_batch(image)
        score = result.image_score.float().cpu()
        result.anomaly_map.float().cpu()  # the map comes back to the host, as in every other part
    return float(score[0]), prompts_s


def naive_loop(method: AnomalyMethod, class_name: str, jpegs: list[bytes], progress=None) -> PartResult:
    """Times each of ``jpegs`` through the baseline loop, after one untimed warm-up frame."""
    backbone = method.backbone
    with backbone.computing_in(None):  # float32, whatever the caller set
        score_one(method, class_name, jpegs[0])
        latencies, prompts_s = [], 0.0
        with MemoryWatch(backbone.device) as memory:
            for jpeg in jpegs:
                started = time.perf_counter()
                prompts_s += score_one(method, class_name, jpeg)[1]
                synchronize(backbone.device)
                latencies.append(time.perf_counter() - started)
                if progress is not None:
                    progress.update(1)
    return PartResult("naive", len(jpegs), sum(latencies), percentiles(latencies), "one frame, start to scores on the host",
                      memory.rss_mb, memory.gpu_mb, memory.other_cpu,
                      settings={"batch": 1, "precision": "fp32", "preprocess": "PIL", "anchors": "encoded every frame",
                                "autograd": "no_grad"},
                      extra={"prompt_s": prompts_s, "prompt_sentences": sum(map(len, method.prompt_pack.prompts(class_name))),
                             "naive_cached_prompts_fps": len(jpegs) / max(sum(latencies) - prompts_s, 1e-9)})
