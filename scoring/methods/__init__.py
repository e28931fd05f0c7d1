"""Anomaly-scoring methods, registered by name."""
