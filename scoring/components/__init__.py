"""Layers and helpers that two or more bundled methods use (pure torch, no method glue).

A part with one user lives in that method's folder (``scoring/methods/<name>/model.py``);
``tests/test_layout.py`` checks that every module here is imported by at least two method
folders and that no method folder imports another.
"""
