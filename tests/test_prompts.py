import pytest
import torch
import yaml

from linewatch.scoring.prompts import DEFAULT_PACK, PromptPack, TextAnchors, anchor_key

SMALL_PACK = """\
version: 1
states:
  normal: ["{}", "flawless {}"]
  abnormal: ["damaged {}"]
templates: ["a photo of a {}."]
classes:
  insulator: {names: ["insulator"], abnormal: ["cracked {}"]}
"""


@pytest.fixture(scope="module")
def raw_default() -> dict:
    """The default pack read as plain YAML, independently of the pydantic models."""
    return yaml.safe_load(DEFAULT_PACK.read_text())


def test_default_pack_loads(default_pack, raw_default):
    assert default_pack.states.normal == raw_default["states"]["normal"]
    assert default_pack.templates == raw_default["templates"]
    assert set(default_pack.classes) == set(raw_default["classes"])
    assert PromptPack.load(DEFAULT_PACK) == default_pack
    assert PromptPack.load(str(DEFAULT_PACK)) == default_pack


def test_small_pack_from_file(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL_PACK)
    normal, abnormal = PromptPack.load(path).prompts("insulator")
    assert normal == ["a photo of a insulator.", "a photo of a flawless insulator."]
    assert abnormal == ["a photo of a damaged insulator.", "a photo of a cracked insulator."]


def test_insulator_sentence_counts(default_pack, raw_default):
    shared, entry = raw_default["states"], raw_default["classes"]["insulator"]
    names = len(entry["names"])
    templates = len(raw_default["templates"]) + len(entry.get("templates", []))
    n_normal = names * (len(shared["normal"]) + len(entry.get("normal", []))) * templates
    n_abnormal = names * (len(shared["abnormal"]) + len(entry.get("abnormal", []))) * templates
    assert (n_normal, n_abnormal) == (4 * 7 * 24, 4 * 10 * 24)  # the pack as shipped

    normal, abnormal = default_pack.prompts("insulator")
    assert (len(normal), len(abnormal)) == (n_normal, n_abnormal)
    assert len(set(normal)) == n_normal and len(set(abnormal)) == n_abnormal
    assert not any("{" in s or "}" in s for s in normal + abnormal)
    # class names, class states and class templates are all combined with the shared ones
    assert "a drone photo of the cracked porcelain insulator on a power line." in abnormal
    assert "a photo of a damaged insulator string." in abnormal
    assert "an aerial photo of a flawless glass insulator." in normal
    assert "a close-up photo of the insulator without defect." in normal
    assert not set(normal) & set(abnormal)


def test_unknown_class_uses_id_and_shared_states(default_pack, raw_default):
    normal, abnormal = default_pack.prompts("metal_bracket")
    templates, states = raw_default["templates"], raw_default["states"]
    assert normal == [t.format(s.format("metal bracket")) for s in states["normal"] for t in templates]
    assert abnormal == [t.format(s.format("metal bracket")) for s in states["abnormal"] for t in templates]
    assert len(normal) == 7 * 22 and len(abnormal) == 5 * 22
    assert not any("cracked" in s or "aerial" in s for s in normal + abnormal)


BAD_PACKS = {
    "state without slot": SMALL_PACK.replace('"flawless {}"', '"flawless"'),
    "template without slot": SMALL_PACK.replace('"a photo of a {}."', '"a photo."'),
    "template with two slots": SMALL_PACK.replace('"a photo of a {}."', '"a photo of a {} {}."'),
    "class state without slot": SMALL_PACK.replace('"cracked {}"', '"cracked"'),
    "unknown top-level field": SMALL_PACK + "colour: red\n",
    "unknown class field": SMALL_PACK.replace("names:", "nmes:"),
    "missing states": SMALL_PACK.replace("states:", "stats:"),
    "not yaml": "states: [unclosed\n",
    "empty file": "",
}


@pytest.mark.parametrize("case", list(BAD_PACKS))
def test_invalid_pack_names_file(tmp_path, case):
    assert BAD_PACKS[case] != SMALL_PACK
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_PACKS[case])
    with pytest.raises(ValueError, match="invalid") as info:
        PromptPack.load(path)
    assert str(path) in str(info.value)


def test_extra_replacement_field_rejected_at_load(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SMALL_PACK.replace('"a photo of a {}."', '"a photo of a {} at {time}."'))
    with pytest.raises(ValueError, match="invalid"):
        PromptPack.load(path).prompts("insulator")


def test_missing_pack(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match="not found") as info:
        PromptPack.load(path)
    assert str(path) in str(info.value)


def test_anchor_key_stable_and_sensitive():
    normal, abnormal = ["a photo of a clamp.", "a photo of a good clamp."], ["a photo of a loose clamp."]
    key = anchor_key("tiny@random-seed0", normal, abnormal)
    assert key == anchor_key("tiny@random-seed0", list(normal), list(abnormal))
    assert key == anchor_key("tiny@random-seed0", normal, abnormal, "")
    assert key.startswith("anchors:")
    variants = [
        anchor_key("tiny@random-seed1", normal, abnormal),
        anchor_key("tiny@random-seed0", normal[:1], abnormal),
        anchor_key("tiny@random-seed0", normal[::-1], abnormal),
        anchor_key("tiny@random-seed0", [normal[0], normal[1] + " "], abnormal),
        anchor_key("tiny@random-seed0", normal, abnormal + ["a photo of a rusty clamp."]),
        anchor_key("tiny@random-seed0", normal, ["a photo of a loose clamp!"]),
        anchor_key("tiny@random-seed0", abnormal, normal),
        anchor_key("tiny@random-seed0", normal[:1], normal[1:] + abnormal),  # same sentences, other split
        anchor_key("tiny@random-seed0", normal, abnormal, "adapter-sha:1"),
    ]
    assert key not in variants
    assert len(set(variants)) == len(variants)


def test_text_anchors_bytes_round_trip():
    generator = torch.Generator().manual_seed(0)
    normal, abnormal = torch.randn(64, generator=generator), torch.randn(64, generator=generator)
    anchors = TextAnchors(normal, abnormal, "anchors:v1:" + "ab" * 16)
    blob = anchors.to_bytes()
    assert isinstance(blob, bytes)
    back = TextAnchors.from_bytes(blob)
    assert back.key == anchors.key
    assert torch.equal(back.normal, normal) and torch.equal(back.abnormal, abnormal)
    assert back.normal.dtype == torch.float32
    assert torch.equal(back.stacked(), torch.stack([normal, abnormal]))
    other = TextAnchors(normal, abnormal, "anchors:v1:" + "cd" * 16).to_bytes()
    assert TextAnchors.from_bytes(other).key != back.key
