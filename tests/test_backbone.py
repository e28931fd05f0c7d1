import hashlib
import json
import pathlib

import pytest
import torch

from linewatch.scoring.backbone import (
    TINY_ARCH,
    Backbone,
    BackboneConfig,
    BackboneError,
    create_clip,
    default_layers,
    open_clip,
)


def _same_features(a, b):
    return (torch.equal(a.image_embed, b.image_embed)
            and all(torch.equal(x, y) for x, y in zip(a.patch_tokens, b.patch_tokens))
            and all(torch.equal(x, y) for x, y in zip(a.patch_embeds, b.patch_embeds)))


def _clip_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in backbone.clip.state_dict().items()}


class Payload:
    """A custom class: pickles of it must never be loaded as weights."""

    def __init__(self, note: str = "x"):
        self.note = note


class Exploit:
    """Unpickling this would create a file (stand-in for arbitrary code execution)."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


# ---- construction -------------------------------------------------------------------

def test_tiny_geometry(tiny):
    assert tiny.layers == (1, 2, 3, 4)
    assert (tiny.depth, tiny.patch_size, tiny.image_size) == (4, 8, 64)
    assert (tiny.embed_dim, tiny.width) == (64, 64)
    assert tiny.identity == "linewatch-tiny@random-seed0"


@pytest.mark.parametrize("depth,expected", [(4, (1, 2, 3, 4)), (12, (3, 6, 9, 12)), (24, (6, 12, 18, 24)),
                                            (32, (8, 16, 24, 32)), (6, (2, 3, 5, 6)), (3, (1, 2, 3)), (2, (1, 2))])
def test_default_layers(depth, expected):
    assert default_layers(depth) == expected


def test_default_layers_shallow_depth_valid():
    layers = default_layers(2)
    assert all(1 <= layer <= 2 for layer in layers)


def test_same_seed_identical_different_seed_differs(tiny, tiny_seed1, make_images):
    images = make_images(2, seed=3)
    again = Backbone.build(BackboneConfig(arch=TINY_ARCH, seed=0))
    with torch.no_grad():
        reference, repeat, other = tiny(images), again(images), tiny_seed1(images)
    assert _same_features(reference, repeat)
    assert torch.equal(tiny.encode_text(["a photo of a tower."]), again.encode_text(["a photo of a tower."]))
    assert not torch.allclose(reference.image_embed, other.image_embed, atol=1e-3)
    assert not torch.allclose(reference.patch_tokens[0], other.patch_tokens[0], atol=1e-3)
    assert tiny_seed1.identity == "linewatch-tiny@random-seed1"


def test_features_match_open_clip_at_native_size(tiny, make_images):
    """The hand-rolled forward reproduces open_clip's own image tower exactly."""
    images = make_images(2, seed=4)
    with torch.no_grad():
        features = tiny(images)
        normalised = (images - tiny.mean) / tiny.std
        reference = tiny.clip.encode_image(normalised)
        inter = tiny.clip.visual.forward_intermediates(normalised, indices=[0, 1, 2, 3], output_fmt="NLC",
                                                       intermediates_only=True)["image_intermediates"]
    assert features.grid == (8, 8)
    assert features.image_embed.shape == (2, 64)
    torch.testing.assert_close(features.image_embed, reference, rtol=0, atol=1e-5)
    assert len(features.patch_tokens) == len(features.patch_embeds) == 4
    for ours, theirs in zip(features.patch_tokens, inter):
        assert ours.shape == (2, 64, 64)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    for tokens, embeds in zip(features.patch_tokens, features.patch_embeds):
        assert embeds.shape == (2, 64, 64)
        torch.testing.assert_close(embeds, tiny.project(tokens), rtol=0, atol=1e-6)


def test_tapped_layers_subset(tiny, make_images):
    images = make_images(1, seed=5)
    with torch.no_grad():
        full, part = tiny(images), tiny(images, layers=(2, 4))
    assert len(part.patch_tokens) == 2
    assert torch.equal(part.patch_tokens[0], full.patch_tokens[1])
    assert torch.equal(part.patch_tokens[1], full.patch_tokens[3])


@pytest.mark.parametrize("layers", [(0,), (5,), (1, 9)])
def test_layers_out_of_range_rejected(layers):
    with pytest.raises(BackboneError, match="outside"):
        Backbone.build(BackboneConfig(arch=TINY_ARCH, layers=layers))


# ---- other image sizes ----------------------------------------------------------------

def test_other_image_size_interpolates_positions(make_images):
    backbone = Backbone.build(BackboneConfig(arch=TINY_ARCH, image_size=96))
    assert backbone.image_size == 96
    images = make_images(2, 96, seed=6)
    with torch.no_grad():
        features = backbone(images)
    assert features.grid == (12, 12)
    assert features.image_embed.shape == (2, 64)
    assert [t.shape for t in features.patch_tokens] == [(2, 144, 64)] * 4
    assert [t.shape for t in features.patch_embeds] == [(2, 144, 64)] * 4
    assert all(torch.isfinite(t).all() for t in [features.image_embed, *features.patch_tokens])


@pytest.mark.parametrize("size", [(96, 96), (64, 96)])
def test_interpolated_positions_agree_with_open_clip_resize(tiny, make_images, size):
    """Cross-check against open_clip's own model built at that size with its resized positions.

    The two differ only by the bicubic kernel (open_clip resizes with antialias=True), about
    1.5 % relative; a transposed or misplaced position grid gives about 25 %."""
    model = open_clip.create_model(TINY_ARCH, pretrained=None, force_image_size=size)
    state = _clip_state(tiny)
    open_clip.model.resize_pos_embed(state, model)
    model.load_state_dict(state)
    model.eval()
    images = make_images(2, *size, seed=7)
    with torch.no_grad():
        ours = tiny(images)
        theirs = model.visual.forward_intermediates((images - tiny.mean) / tiny.std, indices=[0, 1, 2, 3],
                                                    output_fmt="NLC", intermediates_only=True)["image_intermediates"]
    assert ours.grid == (size[0] // 8, size[1] // 8)
    for a, b in zip(ours.patch_tokens, theirs):
        assert a.shape == b.shape
        assert ((a - b).norm() / b.norm()).item() < 0.05


def test_image_size_not_multiple_of_patch(tiny, make_images):
    with pytest.raises(BackboneError, match="multiple of the patch size"):
        Backbone.build(BackboneConfig(arch=TINY_ARCH, image_size=60))
    with pytest.raises(BackboneError, match="multiple of the patch size"):
        tiny(make_images(1, 60, 64))


# ---- weights specs ------------------------------------------------------------------------

def test_unknown_arch():
    with pytest.raises(BackboneError, match="unknown open_clip architecture 'no-such-arch'"):
        Backbone.build(BackboneConfig(arch="no-such-arch"))


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nowhere" / "weights.safetensors"
    with pytest.raises(BackboneError, match="not found") as info:
        Backbone.build(BackboneConfig(arch=TINY_ARCH, weights=str(missing)))
    assert str(missing) in str(info.value)


def test_unknown_tag_on_arch_without_tags():
    with pytest.raises(BackboneError, match="no pretrained tag 'no-such-tag'; known tags: none"):
        create_clip(TINY_ARCH, "no-such-tag", 0)


def test_unknown_tag_lists_known_tags(monkeypatch):
    # The tag is checked before any model is created; offline mode guards against a regression.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    known = open_clip.list_pretrained_tags_by_model("ViT-B-16")
    assert "openai" in known
    with pytest.raises(BackboneError, match="no pretrained tag 'no-such-tag'") as info:
        create_clip("ViT-B-16", "no-such-tag", 0)
    assert all(tag in str(info.value) for tag in known)


def _check_loaded_like(path: pathlib.Path, source: Backbone, images: torch.Tensor):
    loaded = Backbone.build(BackboneConfig(arch=TINY_ARCH, weights=str(path), seed=0))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert loaded.identity == f"linewatch-tiny@file-sha256:{digest}"
    with torch.no_grad():
        assert _same_features(loaded(images), source(images))
    assert torch.equal(loaded.encode_text(["a cracked insulator"]), source.encode_text(["a cracked insulator"]))
    return loaded


def test_safetensors_round_trip(tiny, tiny_seed1, tmp_path, make_images):
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(_clip_state(tiny_seed1), str(path))
    images = make_images(2, seed=8)
    loaded = _check_loaded_like(path, tiny_seed1, images)
    with torch.no_grad():  # the file's weights won over seed=0
        assert not torch.allclose(loaded(images).image_embed, tiny(images).image_embed, atol=1e-3)


def test_a_weights_file_is_loaded_whole_without_a_random_init_first(tiny_seed1, tmp_path):
    """Every tensor comes from the file (none left as the skipped init's uninitialised memory),
    and torch's initialisers work again afterwards."""
    from safetensors.torch import save_file

    real_normal = torch.nn.init.normal_
    path = tmp_path / "tiny.safetensors"
    save_file(_clip_state(tiny_seed1), str(path))
    loaded = Backbone.build(BackboneConfig(arch=TINY_ARCH, weights=str(path), seed=0))
    state = _clip_state(loaded)
    assert state.keys() == _clip_state(tiny_seed1).keys()
    assert all(torch.equal(state[k], v) for k, v in _clip_state(tiny_seed1).items())
    assert torch.nn.init.normal_ is real_normal and torch.nn.init.normal_(torch.zeros(64)).abs().sum() > 0


def test_pt_round_trip(tiny_seed1, tmp_path, make_images):
    path = tmp_path / "tiny.pt"
    torch.save(_clip_state(tiny_seed1), path)
    _check_loaded_like(path, tiny_seed1, make_images(2, seed=9))


def test_pt_wrapped_state_dict_with_module_prefix(tiny_seed1, tmp_path, make_images):
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in _clip_state(tiny_seed1).items()}, "epoch": 3}, path)
    _check_loaded_like(path, tiny_seed1, make_images(1, seed=10))


def test_file_identity_changes_with_content(tiny, tiny_seed1, tmp_path):
    from safetensors.torch import save_file

    paths = []
    for name, source in [("a", tiny), ("b", tiny_seed1)]:
        paths.append(tmp_path / f"{name}.safetensors")
        save_file(_clip_state(source), str(paths[-1]))
    identities = [Backbone.build(BackboneConfig(arch=TINY_ARCH, weights=str(p))).identity for p in paths]
    assert identities[0] != identities[1]


def test_pickled_object_refused(tiny, tmp_path):
    path = tmp_path / "model.pt"
    torch.save({**_clip_state(tiny), "extra": Payload("hello")}, path)
    with pytest.raises(BackboneError, match="weights_only"):
        Backbone.build(BackboneConfig(arch=TINY_ARCH, weights=str(path)))


def test_pickle_payload_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    torch.save({"state_dict": {"x": Exploit(marker)}}, path)
    with pytest.raises(BackboneError):
        Backbone.build(BackboneConfig(arch=TINY_ARCH, weights=str(path)))
    assert not marker.exists()


def test_weights_that_do_not_fit(tiny, tmp_path):
    from safetensors.torch import save_file

    state = _clip_state(tiny)
    del state["logit_scale"]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(BackboneError, match="does not fit"):
        Backbone.build(BackboneConfig(arch=TINY_ARCH, weights=str(path)))


# ---- feature taps -----------------------------------------------------------------------

def test_token_subsets_all_patches_equal_image_embed(tiny, make_images):
    images = make_images(2, seed=11)
    with torch.no_grad():
        embedded, grid = tiny.embed(images)
        index = torch.arange(grid[0] * grid[1])[None]
        subsets = tiny.encode_token_subsets(embedded, index)
        full = tiny(images).image_embed
    assert subsets.shape == (2, 1, 64)
    torch.testing.assert_close(subsets[:, 0], full, rtol=0, atol=1e-5)


def test_token_subsets_match_short_sequences(tiny, make_images):
    """Each window's embedding is the ViT run on [CLS] + exactly those patches, in order."""
    images = make_images(2, seed=12)
    index = torch.tensor([[0, 1, 8, 9], [54, 55, 62, 63], [3, 4, 11, 12]])
    with torch.no_grad():
        embedded, grid = tiny.embed(images)
        subsets = tiny.encode_token_subsets(embedded, index, chunk=4)  # chunking across windows too
        for s, patches in enumerate(index):
            seq = embedded[:, torch.cat([torch.tensor([0]), patches + 1])]
            expected = tiny.forward_embedded(seq, grid).image_embed
            torch.testing.assert_close(subsets[:, s], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(subsets[:, 0], subsets[:, 1], atol=1e-3)


def test_vv_attention_changes_only_patch_embeds(tiny, make_images):
    vv = Backbone.build(BackboneConfig(arch=TINY_ARCH, vv_attention=True))
    images = make_images(2, seed=13)
    with torch.no_grad():
        plain, local = tiny(images), vv(images)
    torch.testing.assert_close(local.image_embed, plain.image_embed, rtol=0, atol=1e-6)
    for a, b in zip(local.patch_tokens, plain.patch_tokens):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    for a, b in zip(local.patch_embeds, plain.patch_embeds):
        assert a.shape == b.shape
        assert not torch.allclose(a, b, atol=1e-3)


def test_vv_levels_are_each_their_own(make_images):
    """With V-V attention on, every tapped level has its own V-V tokens and embeddings (a known
    bug in a public CLIP anomaly code base returned the same features at every level), and each
    level's V-V tokens are that level's: running the blocks only up to it gives the same."""
    vv = Backbone.build(BackboneConfig(arch=TINY_ARCH, vv_attention=True, layers=(2, 3, 4)))
    images = make_images(2, seed=5)
    with torch.no_grad():
        features = vv(images)
        embedded, grid = vv.embed(images)
        shorter = vv.forward_embedded(embedded, grid, layers=(2, 3))
    for i in range(len(vv.layers)):
        for j in range(i + 1, len(vv.layers)):
            for kind in ("local_tokens", "patch_embeds"):
                a, b = getattr(features, kind)[i], getattr(features, kind)[j]
                assert not torch.allclose(a, b, atol=1e-3), (kind, vv.layers[i], vv.layers[j])
    for level in range(2):
        torch.testing.assert_close(shorter.local_tokens[level], features.local_tokens[level], rtol=0, atol=1e-6)


def test_encode_text_unit_norm(tiny):
    texts = ["a photo of a insulator.", "a photo of a broken insulator.", "x", ""]
    embeds = tiny.encode_text(texts, chunk=3)
    assert embeds.shape == (4, 64)
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(4), rtol=0, atol=1e-5)
    assert not torch.allclose(embeds[0], embeds[1], atol=1e-3)
    torch.testing.assert_close(embeds[:2], tiny.encode_text(texts[:2]), rtol=0, atol=1e-6)


def test_average_pooled_towers_are_refused(tmp_path):
    """Class-token taps would silently read an untrained token on avg-pooled ViTs (CLIPA)."""
    from linewatch.scoring.backbone import open_clip

    config = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 16,
                                              "patch_size": 8, "pool_type": "avg"},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 1}}
    (tmp_path / "lw-test-avgpool.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "lw-test-avgpool.json")
    with pytest.raises(BackboneError, match="class-token ViT"):
        Backbone.build(BackboneConfig(arch="lw-test-avgpool"))
