"""Offline work on datasets: the MVTec-layout reader, ``linewatch eval`` and the ``linewatch
train`` job (few-shot sampling, checkpoint). May import scoring (and bus, ingest, workers,
sinks, though it needs none of them); never the pipeline, bench or cli.
"""
