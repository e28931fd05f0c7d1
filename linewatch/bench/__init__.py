"""``linewatch bench``: throughput of the scoring path against a per-image baseline loop, of
the pipelines against the scoring path, and of ingest against bare decoding.

- ``workload``: the clip and its frames as ingest publishes them;
- ``naive``: the baseline loop (batch 1, fp32, PIL, prompts encoded every frame);
- ``batched``: linewatch's scoring path, the sweep and how it picks the worker settings;
- ``pipelines``: the embedded and Kafka pipelines end to end; ``broker``: a local Tansu;
- ``ingest_speed``: ingest against ``cv2.VideoCapture`` alone;
- ``measure``: timings, percentiles, peak memory; ``report``: the table; ``run``: one run;
  ``command``: the CLI.

Nothing is imported here, so ``linewatch --help`` does not load torch.
"""
