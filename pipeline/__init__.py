"""The pipeline assembled: settings (flags > env > YAML, importable without torch), the wiring
that turns settings into running parts, the embedded one-process run, replay. May import
ingest, workers, sinks, bus and scoring; never offline, bench or cli.
"""
