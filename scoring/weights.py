"""Whether an open_clip pretrained tag (``--weights openai``) can be had, asked before torch is
imported: offline, open_clip's download retries took ~50 s to fail; this says so in a second.

A tag whose files may already be in the local caches is left to open_clip (with the hub told
to stay offline when it cannot be reached, so it reads its cache instead of retrying). A tag
with nothing cached needs a download: refused at once when the hub cannot be reached (or
HF_HUB_OFFLINE is set), with what to do instead.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path

WEIGHT_FILE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
PROBE_S = 3.0  # a reachable hub answers a TCP connect well within this, even on a slow link


def is_tag(weights: str) -> bool:
    """Not 'none' (random) and not a file: an open_clip pretrained tag."""
    path = Path(weights)
    return weights != "none" and path.suffix not in WEIGHT_FILE_SUFFIXES and not path.exists()


def hub_cache() -> Path:
    """huggingface_hub's cache folder, found as it finds it."""
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expanduser(os.path.expandvars(hub)))


def _squashed(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def maybe_cached(tag: str) -> bool:
    """Could the caches hold this tag's files? (open_clip's table of tags needs torch to read,
    so this looks for the tag in the cached repositories' names, e.g. openai in
    models--timm--vit_base_patch16_clip_224.openai; a false yes only costs the slower path.)"""
    wanted = _squashed(tag)
    hub = hub_cache()
    repos = [p.name for p in hub.iterdir() if p.name.startswith("models--")] if hub.is_dir() else []
    clip_cache = Path(os.path.expanduser("~/.cache/clip"))  # open_clip's URL downloads
    files = [p.name for p in clip_cache.iterdir()] if clip_cache.is_dir() else []
    return any(wanted in _squashed(name) for name in [*repos, *files])


def _hub_address() -> tuple[str, int, str]:
    """(host, port, what) to connect to for a download: the https proxy if one is set for the hub."""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return parsed.hostname or "", parsed.port or 8080, f"the proxy {parsed.hostname}:{parsed.port or 8080}"
    return host, endpoint.port or (443 if endpoint.scheme == "https" else 80), host


def unreachable(timeout: float = PROBE_S) -> str | None:
    """Why the hub cannot be reached, or None when a connection opens. A thread bounds the
    name lookup too (getaddrinfo has no timeout of its own)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    host, port, what = _hub_address()
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{what} cannot be reached: {err.strerror or err}")

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"{what} did not answer within {timeout:g} s"


def check_weights(arch: str, weights: str) -> None:
    """Refuse at once a pretrained tag that needs a download that cannot happen."""
    if not is_tag(weights):
        return
    if maybe_cached(weights):
        if unreachable() is not None:
            os.environ["HF_HUB_OFFLINE"] = "1"  # read at the hub's import: its cache, no retries
        return
    reason = unreachable()
    if reason:
        raise ValueError(f"--weights {weights}: the pretrained weights {arch}/{weights} need a download from "
                         f"huggingface.co, and {reason}; download them once on a machine with internet (into "
                         f"{hub_cache()}, copied here), or pass --weights FILE with a local .safetensors/.pt "
                         f"state dict of {arch}")
