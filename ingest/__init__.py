"""Ingest: video files, image folders, RTSP/HTTP streams and webcams -> frame records on the
bus. May import bus only.

- ``sources``: ``open_source(spec)`` and the adapters (target fps by timestamp, max resolution);
- ``srt``: DJI-style SRT telemetry sidecars;
- ``publisher``: ``Ingestor`` (one source -> the frames topic) and ``run_ingest`` (several at once).
The synthetic demo clip and context set are in ``synthetic``.
"""

from .publisher import Ingestor, IngestStats, default_stream_id, run_ingest
from .sources import Backoff, IngestError, Source, open_source

__all__ = ["Backoff", "IngestError", "IngestStats", "Ingestor", "Source", "default_stream_id", "open_source",
           "run_ingest"]
