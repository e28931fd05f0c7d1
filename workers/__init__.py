"""Placeholder package: built by the streaming-pipeline issue."""
