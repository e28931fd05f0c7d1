"""Synthetic data for demos, tests and studies (not the runtime ingest path): the demo drone clip
with its references, calibration views and ground truth (``demo``), and the context-anomaly set
in MVTec layout (``context_set``)."""
