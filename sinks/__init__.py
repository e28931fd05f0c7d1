"""Sinks: what happens to scores after the workers.

- ``alerts``  — per-stream k-of-n debounced events (AlertTracker) and their outputs
  (JSONL file, the alerts topic, a webhook);
- ``archive`` — anomalous frames' images and an index, on a local folder or S3;
- ``maps``    — the anomaly map's wire encoding (8-bit PNG), shared with the workers;
- ``runner``  — the consume loops behind ``linewatch sink alerts|archive`` and the embedded run.
"""
