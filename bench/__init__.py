"""The benchmark behind ``linewatch bench``: the scoring path against a per-image baseline loop,
the pipelines against the scoring path, ingest against bare decoding. May import pipeline and
everything below it; its flags live in ``cli/bench.py``.

- ``workload``: the clip and its frames as ingest publishes them;
- ``naive``: the baseline loop (batch 1, fp32, PIL, prompts encoded every frame);
- ``batched``: linewatch's scoring path, the sweep and how it picks the worker settings;
- ``pipelines``: the embedded and Kafka pipelines end to end;
- ``broker``: a throwaway local Tansu broker (the tests start theirs with it too);
- ``ingest_speed``: ingest against ``cv2.VideoCapture`` alone;
- ``measure``: timings, percentiles, peak memory; ``report``: the table; ``run``: one run.

Nothing is imported here, so ``linewatch --help`` does not load torch.
"""

DEFAULT_CLASS = "metal_nut"  # outside the power-line classes: the shared ensemble, 264 sentences (see README)
