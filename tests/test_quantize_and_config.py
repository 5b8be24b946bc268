"""Quantization with the mlx-community recipe, save/reload round trips, and the
real 26B configuration built without materializing a single weight."""

import copy
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_diffusiongemma import Model, ModelArgs, load_model, quantize, save_model

from helpers.reference import REAL_CONFIG, build_reference, save_reference



@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_reference(build_reference(seed=3), tmp_path_factory.mktemp("hf"))


def _logits(model, prompt, canvas):
    cache = model.make_cache()
    model.encode(prompt, cache)
    first = model.decode(canvas, cache)
    return np.array(first), np.array(model.decode(canvas, cache, self_conditioning=first))


@pytest.mark.parametrize("bits,mode", [(4, "affine"), (8, "affine"), (4, "mxfp4"), (4, "nvfp4")])
def test_quantized_round_trip(checkpoint, tmp_path, bits, mode):
    model = load_model(checkpoint)
    entries = quantize(model, bits=bits, mode=mode)
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization"] = entries
    out = save_model(model, tmp_path / "quantized", config)

    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization"] == saved["quantization_config"] == entries
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(dict(tree_flatten(model.parameters())))

    reloaded = load_model(out)
    rng = np.random.default_rng(0)
    prompt, canvas = rng.integers(0, 320, 19).tolist(), rng.integers(0, 320, 12).tolist()
    for before, after in zip(_logits(model, prompt, canvas), _logits(reloaded, prompt, canvas)):
        np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("bits,mode", [(4, "affine"), (8, "affine"), (4, "mxfp4")])
def test_quantized_generation_never_dequantizes_a_weight(checkpoint, monkeypatch, bits, mode):
    # Every product (attention, experts, lm_head, the self-conditioning
    # product) runs on mlx's quantized kernels. The one dequantization allowed
    # is the embedding lookup's, of the looked-up rows alone.
    from mlx_diffusiongemma import diffusion_generate

    model = load_model(checkpoint)
    quantize(model, bits=bits, mode=mode)
    # (the compiled decoder's lookups are seen once, when it is traced)
    canvas = model.args.canvas_length
    shapes, dequantize = [], mx.dequantize
    monkeypatch.setattr(mx, "dequantize", lambda *a, **k: shapes.append((out := dequantize(*a, **k)).shape) or out)
    response = diffusion_generate(model, None, list(range(3, 22)), seed=0, max_tokens=2 * canvas, eos_token_id=[])
    assert response.canvases == 2
    # [1, tokens, hidden]: the prefill's 18 and 1 tokens, canvases; a weight would be [out, in] or [experts, out, in]
    assert set(shapes) == {(1, n, model.args.hidden_size) for n in (18, 1, canvas)}, shapes


def test_recipe_bits_per_module(checkpoint):
    model = load_model(checkpoint)
    entries = quantize(model, bits=4)
    modules = dict(model.named_modules())
    layer = "model.decoder.layers.1"
    for path in ("model.decoder.embed_tokens", f"{layer}.self_attn.q_proj", f"{layer}.mlp.down_proj", f"{layer}.router.proj"):
        assert modules[path].bits == 8 and modules[path].group_size == 64, path
        assert entries[path] == {"group_size": 64, "bits": 8}
    for path in (f"{layer}.experts.gate_up_proj", f"{layer}.experts.down_proj", "model.decoder.self_conditioning.up_proj"):
        assert modules[path].bits == 4 and path not in entries, path
    assert {"group_size": 64, "bits": 4, "mode": "affine"}.items() <= entries.items()
    # as mlx-lm writes them: the pinned modules always, the chosen-setting ones never, even when both agree
    eight = quantize(load_model(checkpoint), bits=8)
    assert {k: v for k, v in eight.items() if isinstance(v, dict)} == {k: v for k, v in entries.items() if isinstance(v, dict)}
    assert f"{layer}.experts.down_proj" not in eight and eight["bits"] == 8
    assert not isinstance(modules["model.decoder.norm"], nn.QuantizedLinear)
    params = dict(tree_flatten(model.parameters()))
    assert params[f"{layer}.layer_scalar"].dtype == mx.float32
    assert params[f"{layer}.router.scale"].dtype == mx.float32


def test_real_configuration_shapes_and_size():
    model = Model(ModelArgs.from_dict(REAL_CONFIG))  # lazy: no weight is ever evaluated
    params = dict(tree_flatten(model.parameters()))
    total = sum(v.size for v in params.values())
    assert abs(total - 25.25e9) < 0.05e9, total
    assert "model.decoder.layers.5.self_attn.v_proj.weight" not in params  # full layers: values = keys
    assert params["model.decoder.layers.5.self_attn.k_proj.weight"].shape == (2 * 512, 2816)
    assert params["model.decoder.layers.4.self_attn.v_proj.weight"].shape == (8 * 256, 2816)
    assert [i for i, t in enumerate(model.args.layer_types) if t == "full_attention"] == [5, 11, 17, 23, 29]

    quantize(model, bits=4)
    params = dict(tree_flatten(model.parameters()))
    expected = {
        "model.decoder.layers.0.experts.gate_up_proj.weight": ((128, 1408, 352), mx.uint32),
        "model.decoder.layers.0.experts.gate_up_proj.scales": ((128, 1408, 44), mx.float32),
        "model.decoder.layers.0.experts.down_proj.weight": ((128, 2816, 88), mx.uint32),
        "model.decoder.embed_tokens.weight": ((262144, 704), mx.uint32),
        "model.decoder.layers.0.router.proj.weight": ((128, 704), mx.uint32),
        "model.decoder.layers.29.self_attn.q_proj.weight": ((16 * 512, 704), mx.uint32),
        "model.decoder.self_conditioning.gate_proj.weight": ((2112, 352), mx.uint32),
        "model.decoder.layers.0.router.per_expert_scale": ((128,), mx.float32),
        "model.encoder.language_model.layers.0.layer_scalar": ((1,), mx.float32),
    }
    for key, (shape, dtype) in expected.items():
        assert (params[key].shape, params[key].dtype) == (shape, dtype), key


def test_config_forms_and_defaults():
    text = dict(REAL_CONFIG["text_config"])
    overrides = text.pop("per_layer_config")["5"]
    legacy = ModelArgs.from_dict(
        {**REAL_CONFIG, "text_config": {**text, "global_head_dim": 512, "num_global_key_value_heads": 2}}
    )
    modern = ModelArgs.from_dict(REAL_CONFIG)
    for i in range(30):
        assert legacy.attention_shape(i) == modern.attention_shape(i)
    assert modern.attention_shape(5) == (overrides["head_dim"], overrides["num_key_value_heads"])
    assert modern.attention_shape(4) == (256, 8)
    assert modern.canvas_length == 256 and modern.sliding_window == 1024
    assert modern.rope_parameters["full_attention"]["rope_type"] == "proportional"

    halved = ModelArgs.from_dict({**REAL_CONFIG, "text_config": {**REAL_CONFIG["text_config"], "use_bidirectional_attention": "all"}})
    assert halved.sliding_window == 1024 // 2 + 1


@pytest.mark.parametrize("field", ["hidden_size", "num_experts", "vocab_size"])
def test_missing_required_field_is_named(field):
    text = {k: v for k, v in REAL_CONFIG["text_config"].items() if k != field}
    with pytest.raises(ValueError, match=field):
        ModelArgs.from_dict({**REAL_CONFIG, "text_config": text})
    with pytest.raises(ValueError, match=field):  # null means unset
        ModelArgs.from_dict({**REAL_CONFIG, "text_config": {**text, field: None}})


@pytest.mark.parametrize(
    "where,field,value,message",
    [
        ("top", "canvas_length", None, "config has no canvas_length"),
        ("top", "canvas_length", 0, "canvas_length must be an integer >= 1, got 0"),
        ("top", "canvas_length", -4, "canvas_length must be an integer >= 1, got -4"),
        ("text", "hidden_size", "128", "hidden_size must be an integer >= 1, got '128'"),
        ("text", "num_hidden_layers", True, "num_hidden_layers must be an integer >= 1, got True"),
        ("text", "moe_intermediate_size", 0, "moe_intermediate_size must be an integer >= 1, got 0"),
        ("text", "sliding_window", 2.5, "sliding_window must be an integer >= 1, got 2.5"),
        ("text", "max_position_embeddings", -1, "max_position_embeddings must be an integer >= 1, got -1"),
        ("text", "top_k_experts", 129, r"top_k_experts \(129\) must not exceed num_experts \(128\)"),
        ("text", "rms_norm_eps", "1e-6", "rms_norm_eps must be a finite number > 0, got '1e-6'"),
        ("text", "final_logit_softcapping", 0, "final_logit_softcapping must be a finite number > 0, got 0"),
    ],
)
def test_bad_config_values_are_named(where, field, value, message):
    config = {**REAL_CONFIG, "text_config": dict(REAL_CONFIG["text_config"])}
    section = config if where == "top" else config["text_config"]
    section[field] = value
    with pytest.raises(ValueError, match=message):
        ModelArgs.from_dict(config)
    del section[field]
    if field == "canvas_length":  # absent is as bad as null
        with pytest.raises(ValueError, match="config has no canvas_length"):
            ModelArgs.from_dict(config)


def test_from_dict_leaves_the_config_unchanged():
    text = {**REAL_CONFIG["text_config"], "layer_types": ["sliding_attention"] * 30,  # the last is forced to full
            "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5.0}}}
    config = {**REAL_CONFIG, "text_config": text}
    before = copy.deepcopy(config)
    args = ModelArgs.from_dict(config)
    assert args.layer_types[-1] == "full_attention"
    args.rope_parameters["full_attention"]["rope_theta"] = 7.0
    args.per_layer_config[5]["head_dim"] = 8
    assert config == before
    assert ModelArgs.from_dict(REAL_CONFIG).rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0


def _small(**text):
    """A lazily built model (no weight evaluated) with two layers, one of each kind."""
    base = {"num_hidden_layers": 2, "layer_types": ["sliding_attention", "full_attention"], "hidden_size": 128,
            "intermediate_size": 128, "moe_intermediate_size": 64, "vocab_size": 100, "num_experts": 4,
            "top_k_experts": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
            "per_layer_config": {"1": {"head_dim": 64, "num_key_value_heads": 1}}}
    return Model(ModelArgs.from_dict({**REAL_CONFIG, "text_config": {**REAL_CONFIG["text_config"], **base, **text}}))


@pytest.mark.parametrize(
    "model,options,message",
    [
        (lambda: Model(ModelArgs.from_dict(REAL_CONFIG)), {"group_size": 128},
         r"^cannot quantize model\.decoder\.layers\.0\.experts\.down_proj\.weight \(and 30 more weight\(s\)\): its "
         r"input dimension 704 is not a multiple of group size 128; affine group sizes that fit it: 32, 64$"),
        (lambda: _small(moe_intermediate_size=48), {},
         r"experts\.down_proj\.weight \(and 1 more weight\(s\)\): its input dimension 48 is not a multiple of group "
         r"size 64, and no affine group size \(32, 64, 128\) fits it$"),
        (lambda: _small(moe_intermediate_size=48), {"mode": "mxfp4"},
         r"dimension 48 is not a multiple of group size 32, and no mxfp4 group size \(32\) fits it$"),
        (lambda: _small(intermediate_size=96), {"group_size": 32},
         r"^cannot quantize model\.decoder\.layers\.0\.mlp\.down_proj\.weight \(and 1 more weight\(s\)\): its input "
         r"dimension 96 is not a multiple of group size 64; the mlx-community recipe pins it at 8 bits group size "
         r"64, and no option changes that$"),
        (lambda: _small(), {"group_size": 48}, r"^affine group size must be one of 32, 64, 128, got 48$"),
        (lambda: _small(), {"mode": "fp4"}, r"^unknown quantization mode 'fp4'; choose one of affine, mxfp4"),
    ],
    ids=["real-128", "none-fits", "mxfp4", "pinned", "bad-group", "bad-mode"],
)
def test_group_size_misfits_are_named_before_quantizing(model, options, message):
    model = model()
    with pytest.raises(ValueError, match=message):
        quantize(model, **options)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def test_a_fitting_group_size_quantizes():
    model = _small(moe_intermediate_size=96)
    with pytest.raises(ValueError, match="affine group sizes that fit it: 32$"):
        quantize(model)
    entries = quantize(model, group_size=32)
    assert entries["group_size"] == 32 and model.model.decoder.layers[0].experts.down_proj.group_size == 32
