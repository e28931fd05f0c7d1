"""Per-stream scoring profiles: which method, asset class, threshold and references a stream uses.

A worker holds one backbone and one prepared method per distinct profile; streams match
profiles by glob pattern (first match wins, then the default). Importable without torch:
the settings loader and ``--help`` read these schemas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..bus.streams import StreamTable
from ..scoring.options import DEFAULT_METHOD, canonical_method


class StreamProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    method: str = DEFAULT_METHOD
    class_name: str = "insulator"  # a class of the prompt pack (power-line parts, or any object name)
    # "auto": from the calibration images when given, else from the references by
    # leave-one-out (scoring/calibrate.py), else 0.5; a number fixes it.
    threshold: float | Literal["auto"] = "auto"
    references: str | None = None  # folder of normal images of this asset: few-shot
    calibration: str | None = None  # folder of other normal images, for threshold "auto"
    shots: int | None = Field(default=None, ge=1)  # use the first N references (sorted); None: all
    options: dict[str, Any] = {}  # method options, e.g. {text_weight: 0}
    checkpoint: str | None = None  # a trained method from `linewatch train`; it names the method

    @model_validator(mode="before")
    @classmethod
    def _method_from_checkpoint(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("checkpoint") and "method" not in data:
            from ..scoring.checkpoint import read_header

            data = {**data, "method": read_header(data["checkpoint"])["method"]}
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            data = {**data, "method": canonical_method(data["method"])}
        return data

    def check(self) -> None:
        """Cheap checks that need no model, so a wrong config fails at start-up with its name."""
        from ..scoring.options import check_options  # without torch: a bad option fails in a second

        check_options(self.method, dict(self.options))
        options = dict(self.options)
        if self.checkpoint is not None:
            from ..scoring.checkpoint import read_header

            header = read_header(self.checkpoint)
            options = header["options"]
            if header["method"] != self.method:
                raise ValueError(f"checkpoint {self.checkpoint} holds a {header['method']} model but the profile "
                                 f"says method {self.method}; leave --method out to use the checkpoint's")
            if self.options:
                raise ValueError(f"checkpoint {self.checkpoint}: method options are fixed at training; drop {dict(self.options)}")
        if self.references is not None:
            if options.get("memory_bank") is False:
                raise ValueError(f"references {self.references}: {self.checkpoint or self.method} has no memory bank "
                                 "(memory_bank=false, as its paper), so it takes no references; drop them "
                                 "(and give --calibration normal frames for --threshold auto)")
            reference_paths(self.references, self.shots)
        if self.calibration is not None:
            reference_paths(self.calibration, None)

    def key(self) -> str:
        return self.model_dump_json()


def reference_paths(folder: str, shots: int | None) -> list[Path]:
    from ..scoring.options import IMAGE_SUFFIXES

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"references folder not found: {folder}")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"references folder {folder} holds no images")
    return paths[:shots] if shots else paths


class ProfileTable(StreamTable[StreamProfile]):
    """The default profile and the streams' glob overrides (each inherits the default's fields)."""

    def __init__(self, default: StreamProfile, streams: dict[str, dict] | None = None, check: bool = True):
        """``check=False``: only the table (the console reads the folders it names, without a model)."""
        super().__init__(default, {pattern: StreamProfile.model_validate({**_inherited(default, overrides),
                                                                          **dict(overrides)})
                                   for pattern, overrides in (streams or {}).items()})
        for profile in self.values() if check else ():
            profile.check()

    def profiles(self) -> list[StreamProfile]:
        return self.values()


def _inherited(default: StreamProfile, overrides: dict) -> dict:
    """What a stream inherits from the default profile: not the method and its options when
    the stream brings its own checkpoint (the checkpoint names them)."""
    base = default.model_dump()
    if overrides.get("checkpoint") and "method" not in overrides:
        base.pop("method")
        base.pop("options")
    return base
