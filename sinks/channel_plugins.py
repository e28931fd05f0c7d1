"""Alert channels from other packages, found through the entry-point group ``linewatch.alert_channels``.

A package registers a channel by naming its class in its metadata (``pyproject.toml``)::

    [project.entry-points."linewatch.alert_channels"]
    pager = "my_package.pager:PagerChannel"

The class is an ``AlertOutput`` (``send`` one alert per call; raise ``OutputError`` to have it
retried, ``OutputRefused`` to dead-letter it at once) whose ``name`` is the entry point's: the
channel's consumer group is named after it. It is switched on by its settings,
``alerts.plugins.<name>`` (a mapping; ``{}`` for none), validated by the class's ``Settings``
pydantic model when it has one and passed to the constructor (``cls(settings)``; ``cls()``
without a model). Secret fields (``SecretStr``) are registered for redaction like linewatch's
own. Delivery (attempts, backoff, maximum age) is ``alerts.delivery``'s.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

from ..bus.redact import register_secret
from ..scoring.plugins import installed, load_point, origin_of
from .outputs import AlertOutput

GROUP = "linewatch.alert_channels"


def entry_points() -> dict[str, metadata.EntryPoint]:
    """{channel name: entry point} of every installed package's channels."""
    return installed(GROUP)


def origin(name: str) -> str:
    return origin_of(entry_points()[name])


def build(name: str, options: dict[str, Any]) -> AlertOutput:
    """The channel ``name`` of a package, set up from ``alerts.plugins.<name>``."""
    where = f"alerts.plugins.{name}"
    if name not in entry_points():
        known = ", ".join(sorted(entry_points())) or "none installed"
        raise ValueError(f"{where}: no package provides an alert channel {name!r} (entry point group {GROUP}: {known})")
    point = entry_points()[name]
    cls = load_point(point, f"{where}: the channel")
    if not (isinstance(cls, type) and issubclass(cls, AlertOutput)) or cls.name != name:
        raise ValueError(f"{where}: {point.value} (from {origin(name)}) is not an AlertOutput named {name!r}")
    model = getattr(cls, "Settings", None)
    if model is None:
        if options:
            raise ValueError(f"{where}: the channel takes no settings, got {sorted(options)}")
        return cls()
    try:
        settings = model.model_validate(options or {})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or name}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{where}: {problems}") from None
    _register_secrets(settings)
    return cls(settings)


def _register_secrets(settings: BaseModel) -> None:
    for value in settings.__dict__.values():
        if isinstance(value, SecretStr):
            register_secret(value.get_secret_value())
        elif isinstance(value, BaseModel):
            _register_secrets(value)
