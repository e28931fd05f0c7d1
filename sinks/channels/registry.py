"""The alert channels by name: the bundled ones (``bundled``: each module of this package that
registers one) and those of installed packages (``entry_points``, group ``linewatch.alert_channels``).

A package registers a channel by naming its class in its metadata (``pyproject.toml``)::

    [project.entry-points."linewatch.alert_channels"]
    pager = "my_package.pager:PagerChannel"

Both follow one contract (``base.AlertChannel``: a name, a ``Settings`` model, ``send``). They
differ in where their settings are: a bundled channel's fields are ``alerts``' own
(``alerts.webhook``, ``alerts.mqtt``, ..., read by ``settings_of``), a package's are the mapping
``alerts.plugins.<name>`` (``{}`` for none), validated by its model (``plugin``). Secret fields
(``SecretStr``) of a package's settings are registered for redaction like linewatch's own.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from importlib import metadata
from typing import Any

from pydantic import BaseModel, SecretStr, ValidationError

from ...bus.redact import register_secret
from ...scoring.plugins import installed, load_point, origin_of
from .base import BUNDLED, AlertChannel, DeliveryPolicy

GROUP = "linewatch.alert_channels"


@functools.cache
def bundled() -> dict[str, type[AlertChannel]]:
    """{name: class} of the bundled channels, by name (so their flags and channels come in that
    order): every module of this package is imported, and each registers its channel."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__package__}.{module.name}")
    return dict(sorted(BUNDLED.items()))


def settings_of(cls: type[AlertChannel], alerts: BaseModel) -> BaseModel | None:
    """A bundled channel's settings: its model's fields, read from the ``alerts`` settings (validated there)."""
    if cls.Settings is None:
        return None
    return cls.Settings.model_construct(**{name: getattr(alerts, name) for name in cls.Settings.model_fields})


def entry_points() -> dict[str, metadata.EntryPoint]:
    """{channel name: entry point} of every installed package's channels."""
    return installed(GROUP)


def origin(name: str) -> str:
    return origin_of(entry_points()[name])


def plugin(name: str, options: dict[str, Any], delivery: DeliveryPolicy) -> list[AlertChannel]:
    """The channel ``name`` of a package, set up from ``alerts.plugins.<name>``."""
    where = f"alerts.plugins.{name}"
    if name not in entry_points():
        known = ", ".join(sorted(entry_points())) or "none installed"
        raise ValueError(f"{where}: no package provides an alert channel {name!r} (entry point group {GROUP}: {known})")
    point = entry_points()[name]
    cls = load_point(point, f"{where}: the channel")
    if not (isinstance(cls, type) and issubclass(cls, AlertChannel)) or cls.name != name:
        raise ValueError(f"{where}: {point.value} (from {origin(name)}) is not an AlertChannel named {name!r}")
    model = getattr(cls, "Settings", None)
    if model is None:
        if options:
            raise ValueError(f"{where}: the channel takes no settings, got {sorted(options)}")
        return cls.from_settings(None, delivery)
    try:
        settings = model.model_validate(options or {})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or name}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{where}: {problems}") from None
    _register_secrets(settings)
    return cls.from_settings(settings, delivery)


def _register_secrets(settings: BaseModel) -> None:
    for value in settings.__dict__.values():
        if isinstance(value, SecretStr):
            register_secret(value.get_secret_value())
        elif isinstance(value, BaseModel):
            _register_secrets(value)
