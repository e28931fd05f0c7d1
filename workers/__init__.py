"""Scoring workers: the consume-score-publish loop, per-stream profiles, frame decoding, the
text-anchor cache. May import bus, ops and scoring only.

- ``worker``: ``ScoringWorker``, a member of the workers' consumer group on the frames topic
  (the poll/commit loop), composed of ``batcher`` (micro-batches), ``reloader`` (profile hot
  reload), ``score_messages`` (ScoreMsg within the bus's size), ``device_work`` (the model's
  queued work read without blocking) and ``telemetry`` (heartbeat, readiness, lag, summary);
- ``profiles``: ``StreamProfile`` and the glob table of them (no torch: settings read them);
- ``prepared``: a profile made ready on a backbone (method, anchors, references, threshold);
- ``frames``: JPEG frames -> the model's input batch on its device;
- ``anchors``: text anchors cached by key in memory, Redis and a folder.
"""
