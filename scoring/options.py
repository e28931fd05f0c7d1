"""Every method's options and the values each accepts, importable without torch, so that
``linewatch`` refuses a bad ``--option`` before any model is loaded (a second, not the
10-20 s of importing torch and building the backbone).

``scoring.methods.create_method`` checks through here too, and the constructors keep their own
checks (a method built in code is checked as well); tests/test_cli_checks.py holds the table to
the constructors' signatures, so an option added there and not here fails a test.
"""

from __future__ import annotations

from collections.abc import Callable

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}  # of references and calibration
Check = Callable[[object], str | None]  # the problem with a value, or None when it is fine


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def at_least(low: float, whole: bool = False) -> Check:
    kind = "a whole number" if whole else "a number"
    return lambda v: None if (_whole(v) if whole else _number(v)) and v >= low else f"must be {kind} >= {low:g}"


def within(low: float, high: float, open_: bool = False, whole: bool = False) -> Check:
    inside = (lambda v: low < v < high) if open_ else (lambda v: low <= v <= high)
    span = f"({low:g}, {high:g})" if open_ else (f"{low:g}..{high:g}" if whole else f"[{low:g}, {high:g}]")
    return lambda v: None if (_whole(v) if whole else _number(v)) and inside(v) else f"must be within {span}"


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def optional(check: Check, meaning: str) -> Check:
    return lambda v: None if v is None else (None if check(v) is None else f"{check(v)} or null ({meaning})")


def one_of(*names: str) -> Check:
    return lambda v: None if v in names else f"must be one of {', '.join(names)}"


def anything(value) -> str | None:
    return None


def window_sizes(value) -> str | None:
    ok = isinstance(value, (list, tuple)) and value and all(_whole(s) and s >= 1 for s in value)
    return None if ok else "must be a list of positive patch counts"


def neighbours(value) -> str | None:
    ok = _whole(value) and value >= 2 or isinstance(value, float) and 0 < value < 1
    return None if ok else "must be a whole number >= 2 (K) or a share of the grid in (0, 1)"


CORECLIP_BRANCHES = ("subject", "context", "global")
CORECLIP_FUSIONS = ("crm", "mean")
CORECLIP_LOSSES = ("orthogonal", "consistency", "grounding", "entropy", "alpha_consistency", "view")


def branches(value) -> str | None:
    ok = (isinstance(value, (list, tuple)) and value and len(set(value)) == len(value)
          and set(value) <= set(CORECLIP_BRANCHES))
    return None if ok else f"must be a list of distinct names from {', '.join(CORECLIP_BRANCHES)}"


def loss_weights(value) -> str | None:
    ok = value is None or isinstance(value, dict) and set(value) <= set(CORECLIP_LOSSES) and all(
        _number(v) and v >= 0 for v in value.values())
    return None if ok else f"takes numbers >= 0 for {', '.join(CORECLIP_LOSSES)}"


def knowledge(value) -> str | None:
    return None if value is None or isinstance(value, (str, dict)) else "must be a knowledge pack file or mapping"


# The method of `run`, `worker`, `replay` and `eval` when none is named: training-free, and the
# fastest per frame of the methods that also keep a reference memory (README, Throughput).
DEFAULT_METHOD = "aprilgan"
SIGMA = at_least(0)
PROMPT_SAMPLE = optional(at_least(1, whole=True), "every sentence")
COMMON = {"text_weight": within(0, 1), "memory_bank": boolean}
OPTIONS: dict[str, dict[str, Check]] = {
    "winclip": {**COMMON, "window_sizes": window_sizes},
    "aprilgan": {**COMMON, "sigma": SIGMA},
    "aa-clip": {**COMMON, "sigma": SIGMA, "text_layers": at_least(1, whole=True), "adapt_weight": within(0, 1, True),
                "orthogonal_weight": at_least(0), "prompt_sample": PROMPT_SAMPLE},
    "bag-clip": {**COMMON, "sigma": SIGMA, "neighbours": neighbours, "gcn_layers": at_least(0, whole=True),
                 "graph_width": at_least(1, whole=True), "reduction": at_least(1, whole=True), "safr": boolean},
    "core-clip": {**COMMON, "sigma": SIGMA, "text_layers": at_least(1, whole=True), "adapt_weight": within(0, 1, True),
                  "branches": branches, "fusion": one_of(*CORECLIP_FUSIONS), "loss_weights": loss_weights,
                  "prompt_sample": PROMPT_SAMPLE},
    "kanoclip": {**COMMON, "sigma": SIGMA, "context_words": within(1, 32, whole=True), "knowledge": knowledge,
                 "knowledge_weight": at_least(0), "clip_vv": boolean, "bicmci": boolean, "conv_adapter": boolean},
    "madclip": {**COMMON, "sigma": SIGMA, "context_words": within(2, 32, whole=True)},
}


def check_options(name: str, options: dict) -> None:
    """The method exists, and it has each option, with a value it accepts."""
    if name not in OPTIONS:
        from .plugins import names

        if name in names():  # a package's method: its constructor checks its options
            return
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted({*OPTIONS, *names()}))}")
    accepted = OPTIONS[name]
    unknown = set(options) - set(accepted)
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(sorted(unknown))}; options: {', '.join(sorted(accepted))}")
    for option, value in options.items():
        problem = accepted[option](value)
        if problem:
            raise ValueError(f"{name}: {option} {problem}, got {value!r}")
