"""Sinks: what happens to scores after the workers. May import bus and scoring only.

- ``events``      — per-stream k-of-n debounced events (AlertTracker) and their state;
- ``channels/``   — the alert channels: their contract and registry, and one module per bundled
  channel (JSONL file, alerts topic, webhook, MQTT, Apprise);
- ``delivery``    — each channel as its own consumer of the alerts topic: retries, backoff,
  maximum age, dead letters, lag;
- ``alert_state`` — the alert sink's state on a compacted changelog topic;
- ``alert_sink``  — the consume loop behind ``linewatch sink alerts`` and the embedded run;
- ``archive``     — anomalous frames' images and an index, on a local folder or S3;
- ``archive_sink`` — the archive sink's consume loop (``linewatch sink archive``, the embedded run);
- ``plumbing``    — what both loops use: the loop turn's health beat and readiness, dead letters.
"""
