"""Methods from other packages, found through the entry-point group ``linewatch.methods``.

A package registers a method by naming its class in its metadata (``pyproject.toml``)::

    [project.entry-points."linewatch.methods"]
    my-method = "my_package.method:MyMethod"

The entry point's name is the method's name (the class's ``name`` must be the same). Listing the
names reads the installed packages' metadata only (no import, no torch); the class is imported
when the method is first used. A class may carry ``presets_dir``: a folder of ``<preset>.json``
files, read like a bundled method's ``scoring/methods/<folder>/presets/``. Its options are checked by its constructor (the
bundled methods' are also checked before torch loads, in ``scoring/options.py``).
``linewatch.testing.check_method`` runs the method contract on a plugin's method.
"""

from __future__ import annotations

import functools
from importlib import metadata

GROUP = "linewatch.methods"


@functools.cache
def installed(group: str) -> dict[str, metadata.EntryPoint]:
    """{name: entry point} of every installed package's entry points in ``group`` (the first of
    a name wins). Also what ``sinks.channel_plugins`` reads; ``installed.cache_clear()`` forgets."""
    found: dict[str, metadata.EntryPoint] = {}
    for point in metadata.entry_points(group=group):
        found.setdefault(point.name, point)
    return found


def origin_of(point: metadata.EntryPoint) -> str:
    """Where an entry point comes from: its distribution and version."""
    dist = getattr(point, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else point.value


def load_point(point: metadata.EntryPoint, what: str) -> object:
    """What ``point`` names, imported; a package whose import fails gets one line naming ``what``,
    the package and the error (also ``sinks.channel_plugins``'s)."""
    try:
        return point.load()
    except Exception as err:  # the package's own import failed: say which and why, in one line
        raise ValueError(f"{what} from {origin_of(point)} cannot be loaded ({point.value}): "
                         f"{err.__class__.__name__}: {err}") from None


def entry_points() -> dict[str, metadata.EntryPoint]:
    """{method name: entry point} of every installed package's methods."""
    return installed(GROUP)


def names() -> list[str]:
    return sorted(entry_points())


def origin(name: str) -> str:
    return origin_of(entry_points()[name])


def load(name: str) -> type:
    """The class the entry point ``name`` names, checked to call itself ``name``
    (``methods.method_class`` checks that it is a method)."""
    cls = load_point(entry_points()[name], f"method {name!r}")
    if getattr(cls, "name", None) != name:
        raise ValueError(f"method {name!r} from {origin(name)}: its class is named {getattr(cls, 'name', None)!r}; the entry "
                         "point's name and the class's name must be the same")
    return cls
