"""Alert channels: one contract, a registry, one module per bundled channel.

- ``base``     — the contract (``AlertChannel``: name, ``Settings`` model, ``send``), the outcomes
  of an attempt (``OutputError``, ``OutputUnknown``, ``OutputRefused``), ``DeliveryPolicy``;
- ``registry`` — the channels by name: the bundled ones and those of installed packages
  (entry-point group ``linewatch.alert_channels``);
- ``jsonl``, ``webhook``, ``mqtt``, ``apprise`` — the bundled channels, each with its settings
  and flags; ``topic`` — the alerts topic's setting and flag (the sink writes it itself).

Adding a bundled channel is adding a module here (see ``jsonl``); a package's channel needs an
entry point (docs/alerts.md). ``delivery`` runs each channel as its own consumer of the alerts topic.
"""

from .base import AlertChannel, DeliveryPolicy, Flag, OutputError, OutputRefused, OutputUnknown

__all__ = ["AlertChannel", "DeliveryPolicy", "Flag", "OutputError", "OutputRefused", "OutputUnknown"]
