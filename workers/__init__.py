"""Scoring workers: the consume-score-publish loop, per-stream profiles, frame decoding, the
text-anchor cache. May import bus and scoring only.

- ``worker``: ``ScoringWorker``, a member of the workers' consumer group on the frames topic;
- ``profiles``: ``StreamProfile`` and the glob table of them (no torch: settings read them);
- ``prepared``: a profile made ready on a backbone (method, anchors, references, threshold);
- ``frames``: JPEG frames -> the model's input batch on its device;
- ``anchors``: text anchors cached by key in memory, Redis and a folder.
"""
