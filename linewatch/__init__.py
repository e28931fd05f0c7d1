"""linewatch: streaming anomaly inspection for power-line video.

The package root holds only the version; the code lives in the top-level folders, installed
as its subpackages (cli, bench, pipeline, offline, ingest, workers, sinks, bus, ops, scoring).
"""

__version__ = "0.1.0"
