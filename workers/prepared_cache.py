"""Reference memories and thresholds kept on disk across starts, so a second ``linewatch run``
with the same inputs skips the encoding and the calibration.

An entry's key hashes everything its result depends on: the backbone (architecture, weights
identity, image size, layers), the method, its options (or checkpoint), the precision and
device the references went through the tower in, and the content digest (sha256 of every
image's bytes, with its name) of the reference and calibration folders; the threshold's
key adds the text anchors' key and the threshold setting. Any change is a new key, so a stale
entry is never read (old ones stay until the folder is cleared). A memory is one
``memory-<key>.safetensors`` (tensors, and the method's memory facts as its metadata); a
threshold one ``threshold-<key>.json``. Never a pickle. An unreadable entry is recomputed.

The folder: ``prepared_dir`` (env LINEWATCH_PREPARED_DIR; ``off``: no cache), by default
``$XDG_CACHE_HOME/linewatch/prepared``, else ``~/.cache/linewatch/prepared``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FORMAT = 2  # bump when what an entry means changes (e.g. the calibration's margin rule)


def default_folder() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "linewatch" / "prepared"


def cache_folder(setting: str | None) -> Path | None:
    """The folder a ``prepared_dir`` setting names: None/"" -> the default; "off" -> none."""
    if setting == "off":
        return None
    return Path(setting).expanduser() if setting else default_folder()


def folder_digest(paths: list[Path]) -> str:
    """sha256 over the names and bytes of ``paths`` (in order)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:32]


class PreparedCache:
    def __init__(self, folder: Path | None):
        self.folder = folder

    def load_memory(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        path = self._path(f"memory-{key}.safetensors")
        if path is None or not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("linewatch", "{}"))
                return {name: f.get_tensor(name) for name in f.keys()}, meta
        except Exception as err:  # noqa: BLE001 - a torn or foreign file: compute it again
            log.warning("cached reference memory %s unreadable (%s): building it again", path, err)
            return None

    def save_memory(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from safetensors.torch import save

        data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                    metadata={"linewatch": json.dumps(meta)})
        self._write(f"memory-{key}.safetensors", data)

    def load_threshold(self, key: str) -> tuple[float, str] | None:
        path = self._path(f"threshold-{key}.json")
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            return float(entry["threshold"]), str(entry["how"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("cached threshold %s unreadable (%s): calibrating again", path, err)
            return None

    def save_threshold(self, key: str, value: float, how: str) -> None:
        self._write(f"threshold-{key}.json", json.dumps({"threshold": value, "how": how}).encode())

    def _path(self, name: str) -> Path | None:
        return None if self.folder is None else self.folder / name

    def _write(self, name: str, data: bytes) -> None:
        """Atomically (a reader never sees half a file); a folder that cannot be written only costs the cache."""
        if self.folder is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.folder / name)
        except OSError as err:
            log.warning("cannot write the start-up cache in %s (%s): the next start computes it again",
                        self.folder, err)
