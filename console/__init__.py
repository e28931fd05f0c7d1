"""The operator's console (``linewatch console``, ``linewatch run --console``) and the shareable
HTML report (``linewatch report``). May import every folder below cli and bench (pipeline, sinks, workers, bus, ops).

- ``service``  — the console's parts and its web server (uvicorn on a thread);
- ``app``      — the FastAPI routes and the live stream (server-sent events); ``guard``: token and origin checks;
- ``live``     — the live view fed by ``readers`` (scores, frames and alerts topics, outside any group);
- ``store``    — events, reviews and flight tracks in SQLite (the archive's index); ``files``: archive files by id;
- ``feedback`` — a false alarm's frames into the profile's references or calibration folder;
- ``geo``      — GeoJSON and KML of a flight's alerts; ``compare``: events of two results topics;
- ``report``   — the self-contained HTML report of a run folder;
- ``static/``  — the page, its script and style, and vendored Leaflet (with its licence).
"""
