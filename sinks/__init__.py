"""Sinks: what happens to scores after the workers. May import bus and scoring only.

- ``alerts``      — per-stream k-of-n debounced events (AlertTracker) and their state;
- ``outputs``     — where alerts go (JSONL file, the alerts topic, a webhook), each behind its
  own bounded queue and thread with retries (``Delivery``);
- ``alert_state`` — the alert sink's state on a compacted changelog topic;
- ``alert_sink``  — the consume loop behind ``linewatch sink alerts`` and the embedded run;
- ``archive``     — anomalous frames' images and an index, on a local folder or S3;
- ``runner``      — the archive sink's consume loop and the dead-letter helpers.
"""
