"""Every method's options as a pydantic model (what each accepts, its default, what it does),
importable without torch, so that ``linewatch`` refuses a bad ``--option`` before any model is
loaded (a second, not the 10-20 s of importing torch and building the backbone), and
``linewatch methods NAME`` prints them.

A method class names its model (``Options``); ``scoring.methods.create_method`` validates
through it, and a package's method declares its own the same way (a subclass of
``MethodOptions``). Each field's check is a small function whose message says what the field
accepts: the same words serve the error and the listing. tests/test_cli_checks.py holds each
model to its constructor's signature and defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model

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


def accepts(check: Check) -> str:
    """What ``check`` accepts, in its own words ("within [0, 1]")."""
    problem = check(object())  # no check accepts a bare object: its message is its rule
    return "anything" if problem is None else problem.removeprefix("must be ")


def option(check: Check, default: Any, doc: str) -> tuple[Any, Any]:
    """(annotation, field) of an option run through ``check`` before any type coercion (a bool
    is not a number here), for ``pydantic.create_model``."""
    def run(value):
        problem = check(value)
        if problem:
            raise ValueError(problem)
        return value
    return (Annotated[Any, BeforeValidator(run)],
            Field(default, description=doc, json_schema_extra={"accepts": accepts(check)}))


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _model(name: str, base: type[BaseModel], doc: str, **fields) -> type[BaseModel]:
    return create_model(name, __base__=base, __doc__=doc, **{k: option(*v) for k, v in fields.items()})


# What every method takes; a package's method subclasses it (plain pydantic fields are fine).
MethodOptions = _model(
    "MethodOptions", _Options, "The few-shot blend's weight and the memory switch.",
    text_weight=(within(0, 1), 0.5, "share of the text (or trained head) evidence in the few-shot blend, each "
                 "term on its scale on the references; 0: from the references alone, 1: from the text alone"),
    memory_bank=(boolean, True, "keep a memory of the reference images (false: references are refused)"))

SIGMA = (at_least(0), 4.0, "Gaussian smoothing of the map, in pixels")
PROMPT_SAMPLE = (optional(at_least(1, whole=True), "every sentence"), 16,
                 "prompt sentences per state per training step")
TEXT_LAYERS = (at_least(1, whole=True), 3, "text-encoder blocks with a trained residual adapter")
ADAPT_WEIGHT = (within(0, 1, True), 0.1, "residual share of each adapter's output")

OPTIONS: dict[str, type[BaseModel]] = {
    "winclip": _model("WinCLIPOptions", MethodOptions, "WinCLIP",
                      window_sizes=(window_sizes, (2, 3), "window sizes in patches of the zero-shot scales")),
    "aprilgan": _model("AprilGanOptions", MethodOptions, "APRIL-GAN", sigma=SIGMA),
    "aa-clip": _model("AAClipOptions", MethodOptions, "AA-CLIP", sigma=SIGMA, text_layers=TEXT_LAYERS,
                      adapt_weight=ADAPT_WEIGHT,
                      orthogonal_weight=(at_least(0), 0.1, "weight of the disentangle (orthogonality) loss"),
                      prompt_sample=PROMPT_SAMPLE),
    "bag-clip": _model("BagClipOptions", MethodOptions, "BAG-CLIP", sigma=SIGMA,
                       neighbours=(neighbours, 15, "graph neighbours per patch: a count, or a share of the grid"),
                       gcn_layers=(at_least(0, whole=True), 5, "graph-convolution layers (0: no graph)"),
                       graph_width=(at_least(1, whole=True), 464, "channels the patches are reduced to for the graph"),
                       reduction=(at_least(1, whole=True), 16, "channel reduction of the attention gates"),
                       safr=(boolean, True, "the scale-aware feature refinement")),
    "core-clip": _model("CoReClipOptions", MethodOptions, "CoRe-CLIP", sigma=SIGMA, text_layers=TEXT_LAYERS,
                        adapt_weight=ADAPT_WEIGHT,
                        branches=(branches, CORECLIP_BRANCHES, "residual branches fused"),
                        fusion=(one_of(*CORECLIP_FUSIONS), "crm", "crm: text-conditioned attention; mean: averaging"),
                        loss_weights=(loss_weights, None, "weights of the losses by name (null: the paper's)"),
                        prompt_sample=PROMPT_SAMPLE),
    "kanoclip": _model("KAnoClipOptions", MethodOptions, "KAnoCLIP", sigma=SIGMA,
                       context_words=(within(1, 32, whole=True), 12, "learnable context words of the prompts"),
                       knowledge=(knowledge, None, "knowledge pack: a YAML file or a mapping (null: the bundled)"),
                       knowledge_weight=(at_least(0), 1.0, "weight of the knowledge loss L_KD (0: without)"),
                       clip_vv=(boolean, True, "local features from the V-V attention path (false: the original)"),
                       bicmci=(boolean, True, "bidirectional cross-modal interaction of the maps"),
                       conv_adapter=(boolean, True, "the convolutional adapter on the global feature")),
    "madclip": _model("MadClipOptions", MethodOptions, "MadCLIP", sigma=SIGMA,
                      context_words=(within(2, 32, whole=True), 8, "learnable context words of the prompts")),
}


def canonical_method(name: str) -> str:
    """A bundled method's registered name from any spelling of it: case, hyphens and
    underscores aside (``coreclip``, ``CoRe-CLIP``, ``kano-clip``, ``april_gan``). The names
    follow the papers' own spellings (AA-CLIP, KAnoCLIP), so they are not one pattern; any
    spelling finds them. Other names pass through unchanged (a package's method, or a typo the
    registry names with the list)."""
    if name in OPTIONS:
        return name
    key = name.lower().replace("-", "").replace("_", "")
    return next((known for known in OPTIONS if known.replace("-", "") == key), name)


def validate(model: type[BaseModel], name: str, options: dict) -> BaseModel:
    """``options`` through ``model``, or ValueError naming the method, option, rule and value."""
    try:
        return model.model_validate(options)
    except ValidationError as err:
        first = err.errors()[0]
        option_name = ".".join(map(str, first["loc"]))
        if first["type"] == "extra_forbidden":
            unknown = sorted(set(options) - set(model.model_fields))
            raise ValueError(f"{name} has no option {', '.join(unknown)}; "
                             f"options: {', '.join(sorted(model.model_fields))}") from None
        problem = str(first.get("ctx", {}).get("error", ""))  # a check's own words
        if not problem:  # pydantic's ("Input should be ...") for a package's plain fields
            problem = first["msg"][:1].lower() + first["msg"][1:]
        raise ValueError(f"{name}: {option_name} {problem}, got {options.get(option_name)!r}") from None


def check_options(name: str, options: dict) -> None:
    """The method exists, and it has each option, with a value it accepts."""
    name = canonical_method(name)
    if name not in OPTIONS:
        from .plugins import names

        if name in names():  # a package's method: checked through its own model when it is loaded
            return
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted({*OPTIONS, *names()}))}")
    validate(OPTIONS[name], name, options)
