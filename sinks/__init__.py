"""Sinks: what happens to scores after the workers. May import bus and scoring only.

- ``alerts``  — per-stream k-of-n debounced events (AlertTracker) and their outputs
  (JSONL file, the alerts topic, a webhook);
- ``archive`` — anomalous frames' images and an index, on a local folder or S3;
- ``runner``  — the consume loops behind ``linewatch sink alerts|archive`` and the embedded run.
"""
