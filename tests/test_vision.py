"""The Gemma 4 vision tower and embedder against transformers' reference
(`DiffusionGemmaModel.encoder.get_image_features`) on a tiny random config."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion, DiffusionGemmaTextConfig
from transformers.models.gemma4 import Gemma4VisionConfig

from mlx_diffusiongemma.vision import (
    VisionConfig,
    VisionModel,
    load_vision_weights,
    sanitize_vision,
    soft_token_counts,
)
from tests.helpers.reference import TINY_TEXT, TINY_VISION, build_reference, perturb_vision

VISION = dict(
    TINY_VISION,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    position_embedding_size=24,
    pooling_kernel_size=3,
    standardize=True,
    use_clipped_linears=True,
)
PATCH = VISION["patch_size"]
K = VISION["pooling_kernel_size"]
PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


def build_vision_reference(seed: int = 0) -> DiffusionGemmaForBlockDiffusion:
    torch.manual_seed(seed)
    config = DiffusionGemmaConfig(
        text_config=DiffusionGemmaTextConfig(**TINY_TEXT), vision_config=Gemma4VisionConfig(**VISION)
    )
    model = DiffusionGemmaForBlockDiffusion(config).eval().float()
    perturb_vision(model, seed + 1)
    set_clamps(model)
    return model


def set_clamps(model) -> None:
    """Sets each clipped linear's input bounds, then its output bounds, to the
    10th and 90th percentiles of what it sees with the bounds before it set,
    so every bound clips some values."""
    clippable = [
        (n, m) for n, m in model.named_modules() if n.startswith(PREFIXES) and hasattr(m, "input_min")
    ]
    assert clippable
    pixels, positions = images_to_inputs(*CASES["two_sizes_padded"], seed=99)
    for _, module in clippable:
        for lo, hi, pick in ((module.input_min, module.input_max, 0), (module.output_min, module.output_max, 1)):
            seen = []
            handle = module.register_forward_hook(
                lambda m, args, out: seen.append(
                    (args[0], m.linear(torch.clamp(args[0], m.input_min, m.input_max)))
                )
            )
            with torch.no_grad():
                model.model.encoder.get_image_features(torch.tensor(pixels), torch.tensor(positions))
                handle.remove()
                t = seen[0][pick].flatten()
                lo.copy_(torch.quantile(t, 0.1))
                hi.copy_(torch.quantile(t, 0.9))


def state(model) -> dict:
    sd = model.state_dict()
    return {k: v.detach().numpy() for k, v in sd.items() if k.startswith(PREFIXES)}


def mlx_model(ref) -> VisionModel:
    cfg = ref.config.to_dict()
    model = VisionModel(VisionConfig.from_checkpoint_config(cfg))
    load_vision_weights(model, sanitize_vision(state(ref)))
    return model


def convert_image_to_patches(image: np.ndarray, patch: int) -> np.ndarray:
    """Gemma4ImageProcessor's layout (its PIL module needs Pillow, not installed
    here): (C, H, W) -> [n_patches, patch * patch * C], patches row-major,
    each patch's pixels in (row, column, channel) order."""
    c, h, w = image.shape
    patches = image.reshape(c, h // patch, patch, w // patch, patch).transpose(1, 3, 2, 4, 0)
    return patches.reshape((h // patch) * (w // patch), -1)


def pad_along_first_dim(patches, positions, target):
    """Zero pixels and (-1, -1) positions up to `target` patches, as the processor pads."""
    n = target - patches.shape[0]
    return (
        np.pad(patches, [(0, n), (0, 0)], constant_values=0),
        np.pad(positions, [(0, n), (0, 0)], constant_values=-1),
    )


def images_to_inputs(sizes, max_patches, seed=0):
    """Random images (h, w pixels) laid out as Gemma4ImageProcessor does."""
    rng = np.random.default_rng(seed)
    pixels, positions = [], []
    for h, w in sizes:
        image = rng.random((3, h, w), dtype=np.float32)
        patches = convert_image_to_patches(image, PATCH)
        gx, gy = np.meshgrid(np.arange(w // PATCH), np.arange(h // PATCH), indexing="xy")
        pos = np.stack([gx, gy], axis=-1).reshape(patches.shape[0], 2)
        patches, pos = pad_along_first_dim(patches, pos, max_patches)
        pixels.append(patches)
        positions.append(pos)
    return np.stack(pixels).astype(np.float32), np.stack(positions).astype(np.int64)


CASES = {
    # 6 x 18 pixels: a 3 x 9 patch grid, 3 soft tokens, no padding
    "one_odd_aspect": ([(6, 18)], 27),
    # 18 x 6 (9 x 3 grid, 3 tokens) padded to 36 patches beside 12 x 12 (6 x 6, 4 tokens)
    "two_sizes_padded": ([(18, 6), (12, 12)], 36),
    # three images, the widest first, padding on two of them
    "three_sizes": ([(6, 30), (12, 6), (6, 6)], 45),
}


@pytest.fixture(scope="module")
def ref():
    return build_vision_reference(seed=3)


@pytest.fixture(scope="module")
def model(ref):
    return mlx_model(ref)


def reference_features(ref, pixels, positions) -> np.ndarray:
    with torch.no_grad():
        out = ref.model.encoder.get_image_features(torch.tensor(pixels), torch.tensor(positions))
    return out.pooler_output.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_soft_tokens_match_reference(ref, model, case):
    sizes, max_patches = CASES[case]
    pixels, positions = images_to_inputs(sizes, max_patches, seed=len(case))
    expected = reference_features(ref, pixels, positions)
    got = np.asarray(model(mx.array(pixels), positions))
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 0.1  # not trivially small
    counts = soft_token_counts(positions, K)
    assert counts == [(h // PATCH // K) * (w // PATCH // K) for h, w in sizes]
    per_image = model.image_features(mx.array(pixels), positions)
    assert [p.shape[0] for p in per_image] == counts
    np.testing.assert_array_equal(np.concatenate([np.asarray(p) for p in per_image]), got)


def test_padding_patch_pixels_do_not_matter(ref, model):
    pixels, positions = images_to_inputs(*CASES["two_sizes_padded"])
    before = np.asarray(model(mx.array(pixels), positions))
    padding = (positions == -1).all(-1)
    assert padding.any()
    pixels[padding] = 7.0
    np.testing.assert_allclose(np.asarray(model(mx.array(pixels), positions)), before, atol=1e-5, rtol=0)
    np.testing.assert_allclose(reference_features(ref, pixels, positions), before, atol=1e-4, rtol=0)


def test_every_parameter_matters(ref, model):
    """Resetting any one parameter or buffer to its initial value changes the
    soft tokens: the reference comparison sees every one of them."""
    pixels, positions = images_to_inputs(*CASES["two_sizes_padded"])
    base = np.asarray(model(mx.array(pixels), positions))
    loaded = dict(tree_flatten(model.parameters()))
    fresh = dict(tree_flatten(VisionModel(model.config).parameters()))
    assert set(loaded) == set(fresh)
    names = sorted(loaded)
    assert "vision_tower.std_bias" in names and "vision_tower.std_scale" in names
    assert "vision_tower.patch_embedder.position_embedding_table" in names
    assert any(n.endswith("input_min") for n in names)
    insensitive = []
    for name in names:
        model.load_weights([(name, fresh[name])], strict=False)
        out = np.asarray(model(mx.array(pixels), positions))
        model.load_weights([(name, loaded[name])], strict=False)
        if np.abs(out - base).max() < 1e-3:
            insensitive.append(name)
    assert not insensitive
    np.testing.assert_array_equal(np.asarray(model(mx.array(pixels), positions)), base)


def test_position_table_rows_by_axis(ref, model):
    """x reads row 0 and y row 1 of the table: swapping the rows changes the tokens."""
    pixels, positions = images_to_inputs(*CASES["one_odd_aspect"])
    base = np.asarray(model(mx.array(pixels), positions))
    name = "vision_tower.patch_embedder.position_embedding_table"
    table = dict(tree_flatten(model.parameters()))[name]
    model.load_weights([(name, table[::-1])], strict=False)
    swapped = np.asarray(model(mx.array(pixels), positions))
    model.load_weights([(name, table)], strict=False)
    assert np.abs(swapped - base).max() > 1e-3


def test_sanitize_names_and_strict_load(ref):
    sd = state(ref)
    full = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    sanitized = sanitize_vision(full)
    assert set(sanitized) == {k[len("model.encoder."):] for k in sd}
    model = VisionModel(VisionConfig.from_checkpoint_config(ref.config.to_dict()))
    assert set(sanitized) == set(dict(tree_flatten(model.parameters())))
    for name, value in sanitized.items():
        np.testing.assert_array_equal(np.asarray(value), full["model.encoder." + name])


@pytest.mark.parametrize(
    "name",
    [
        "vision_tower.std_scale",
        "vision_tower.encoder.layers.1.self_attn.k_norm.weight",
        "embed_vision.embedding_projection.weight",
        "vision_tower.encoder.layers.0.mlp.up_proj.output_max",
    ],
)
def test_missing_or_misshaped_weight_is_named(ref, name):
    cfg = VisionConfig.from_checkpoint_config(ref.config.to_dict())
    weights = sanitize_vision(state(ref))
    missing = dict(weights)
    del missing[name]
    with pytest.raises(ValueError, match="missing vision weight.*model.encoder." + name.replace(".", r"\.")):
        load_vision_weights(VisionModel(cfg), missing)
    misshaped = dict(weights)
    misshaped[name] = mx.zeros((3, 5))
    with pytest.raises(ValueError, match="model.encoder." + name.replace(".", r"\.") + r" has shape \(3, 5\)"):
        load_vision_weights(VisionModel(cfg), misshaped)
    extra = dict(weights)
    extra["vision_tower.encoder.layers.2.mlp.up_proj.linear.weight"] = mx.zeros((3,))
    with pytest.raises(ValueError, match="unexpected vision weight.*layers\\.2\\.mlp"):
        load_vision_weights(VisionModel(cfg), extra)


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 0),
        ("head_dim", 6),
        ("num_key_value_heads", 3),
        ("patch_size", "2"),
        ("standardize", 1),
        ("rms_norm_eps", -1.0),
        ("hidden_activation", "relu"),
    ],
)
def test_bad_vision_config_names_field(field, value):
    with pytest.raises(ValueError, match=f"vision_config.{field}"):
        VisionConfig.from_dict({**VISION, field: value}, text_hidden_size=64)


def test_config_from_reference_dict(ref):
    cfg = VisionConfig.from_checkpoint_config(ref.config.to_dict())
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.text_hidden_size) == (16, 2, 64)
    assert cfg.standardize and cfg.use_clipped_linears and cfg.rope_theta == 100.0
    with pytest.raises(ValueError, match="rope_type"):
        VisionConfig.from_dict({**VISION, "rope_parameters": {"rope_type": "default"}}, 64)
    with pytest.raises(ValueError, match="vision_config.intermediate_size is missing"):
        VisionConfig.from_dict({k: v for k, v in VISION.items() if k != "intermediate_size"}, 64)


def test_bad_inputs_are_errors(model):
    pixels, positions = images_to_inputs(*CASES["one_odd_aspect"])
    with pytest.raises(ValueError, match="pixel_values"):
        model(mx.array(pixels[:, :, :5]), positions)
    with pytest.raises(ValueError, match="multiple of pooling_kernel_size"):
        model(mx.array(pixels[:, :26]), positions[:, :26])


def test_plain_config_matches_reference():
    """The shared helper's tiny model: one layer, no standardisation, no clamps."""
    ref = build_reference(seed=5)
    assert not ref.config.vision_config.standardize and not ref.config.vision_config.use_clipped_linears
    model = mlx_model(ref)
    assert not any(n.endswith(("std_bias", "input_min")) for n, _ in tree_flatten(model.parameters()))
    pixels, positions = images_to_inputs(*CASES["two_sizes_padded"], seed=7)
    expected = reference_features(ref, pixels, positions)
    np.testing.assert_allclose(np.asarray(model(mx.array(pixels), positions)), expected, atol=1e-4, rtol=0)
