"""Our model against the transformers reference, stage by stage, on the same inputs.

The prompt is longer than the sliding window (8), so sliding layers see only the
last window - 1 cached tokens while full layers see everything.
"""

import numpy as np
import mlx.core as mx
import pytest

from mlx_diffusiongemma import load_model
from mlx_diffusiongemma import model as model_module

from helpers.reference import ReferenceRunner, build_reference, save_reference

TOLERANCE = 1e-4
VOCAB = 320
CANVAS = 12


@pytest.fixture(scope="module")
def reference():
    return build_reference(seed=0)


@pytest.fixture(scope="module", params=["per_layer_config", "global_head_dim"])
def pair(request, reference, tmp_path_factory):
    """(reference runner, our model) from one checkpoint, in each config form."""
    path = save_reference(
        reference, tmp_path_factory.mktemp(request.param), global_head_dim_form=request.param == "global_head_dim"
    )
    return reference, load_model(path)


def _close(ref_logits, our_logits, stage):
    ours = np.array(our_logits)
    diff = float(np.abs(ref_logits - ours).max())
    print(f"{stage}: max |logit difference| = {diff:.3g}")
    assert ours.dtype == np.float32 and ours.shape == ref_logits.shape
    assert diff <= TOLERANCE, f"{stage}: {diff}"
    assert (ref_logits.argmax(-1) == ours.argmax(-1)).all(), stage


def _prefilled(reference, model, prompt, chunk_size):
    """The reference runner and our cache, both holding the prompt."""
    ref = ReferenceRunner(reference)
    ref.encode(prompt)
    cache = model.make_cache()
    model.encode(prompt, cache, chunk_size=chunk_size)
    return ref, cache


def test_every_stage_matches_reference(pair):
    _every_stage(*pair)


def test_attention_biases_match_reference(tmp_path):
    """Biases on every projection (the encoder's tied to the decoder's, as this port has them)."""
    reference = build_reference(seed=5, attention_bias=True)
    _every_stage(reference, load_model(save_reference(reference, tmp_path)))


def _every_stage(reference, model):
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, VOCAB, 21).tolist()
    canvas = rng.integers(0, VOCAB, CANVAS).tolist()
    ref, cache = _prefilled(reference, model, prompt, chunk_size=5)  # chunks, and a final chunk of one token

    # 1. prefill, then decode without self-conditioning
    ref_logits = ref.decode(canvas)
    _close(ref_logits, model.decode(canvas, cache), "decode")

    # 2. self-conditioned decode, both fed the same logits (teacher-forced)
    sc = ref_logits
    ref_sc = ref.decode(canvas, self_conditioning_logits=sc)
    _close(ref_sc, model.decode(canvas, cache, self_conditioning=mx.array(sc)), "self-conditioned decode")

    # 3. commit the canvas, then decode the next one
    ref.encode(canvas)
    model.encode(canvas, cache)
    next_canvas = rng.integers(0, VOCAB, CANVAS).tolist()
    _close(ref.decode(next_canvas), model.decode(next_canvas, cache), "decode after commit")


@pytest.mark.parametrize("grouping", ["sorted rows", "tiles"])
def test_long_chunks_match_reference(pair, grouping, monkeypatch):
    # 40 tokens x 2 experts: rows grouped by expert (64 rows and up), which the
    # short chunks above never take, in each grouping (tiles: the CPU's)
    monkeypatch.setattr(model_module, "_tiles_pay_off", lambda rows, experts: grouping == "tiles")
    reference, model = pair
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, VOCAB, 40).tolist()
    canvas = rng.integers(0, VOCAB, CANVAS).tolist()
    ref, cache = _prefilled(reference, model, prompt, chunk_size=40)
    _close(ref.decode(canvas), model.decode(canvas, cache), "decode after a 40-token chunk")


def test_tiles_hold_each_row_once_with_its_expert():
    # experts with no rows, with exactly a tile, with a tile and one row
    T = model_module.ROWS_PER_TILE
    experts = mx.array(sorted([1] * T + [2] * (T + 1) + [4] * 3 + [7]))
    rows = mx.random.normal((experts.size, 5))
    tiles, tile_experts, back = model_module._tiles(rows, experts, 8)
    assert tiles.shape == (-(-experts.size // T) + 8, T, 5)
    flat = tiles.reshape(-1, 5)
    np.testing.assert_array_equal(np.array(flat[back]), np.array(rows))
    np.testing.assert_array_equal(np.array(tile_experts[back // T]), np.array(experts))
    padding = np.ones(flat.shape[0], bool)
    padding[np.array(back)] = False
    assert not np.array(flat)[padding].any()
    assert np.array(tile_experts)[:5].tolist() == [1, 2, 2, 4, 7]


def test_decode_leaves_what_the_cache_holds_untouched(pair):
    # a full layer's slots after its tokens are the decoder's scratch space
    _, model = pair
    cache = model.make_cache()
    model.encode(list(range(3, 23)), cache)
    held = lambda c: np.array(c.keys[..., : c.offset, :])  # noqa: E731
    before = [(c.offset, held(c).copy()) for c in cache]
    first = np.array(model.decode(list(range(CANVAS)), cache))
    second = np.array(model.decode(list(range(CANVAS)), cache))
    assert [c.offset for c in cache] == [offset for offset, _ in before]
    for c, (_, keys) in zip(cache, before):
        np.testing.assert_array_equal(held(c), keys)
    np.testing.assert_array_equal(first, second)


def test_chunking_does_not_change_the_cache(pair):
    _, model = pair
    prompt = list(np.random.default_rng(2).integers(0, VOCAB, 30))
    logits = []
    for chunk in (4, 7, 512):
        cache = model.make_cache()
        model.encode(prompt, cache, chunk_size=chunk)
        logits.append(np.array(model.decode(list(range(CANVAS)), cache)))
    np.testing.assert_allclose(logits[0], logits[2], atol=1e-5)
    np.testing.assert_allclose(logits[1], logits[2], atol=1e-5)


def test_layer_scalars_are_separate_and_weights_shared(pair):
    _, model = pair
    decoder = model.model.decoder.layers
    encoder = model.model.encoder.language_model.layers
    assert all(float(d.layer_scalar[0]) != float(e.layer_scalar[0]) for d, e in zip(decoder, encoder))
    # the encoder owns nothing but its scalars: no second copy of any weight
    assert all(set(e.parameters()) == {"layer_scalar"} for e in encoder)


def test_fixture_perturbs_every_parameter_and_buffer(reference):
    import torch

    fresh = build_reference(seed=0, perturb=False)
    fresh_state = fresh.state_dict()
    for name, value in reference.state_dict().items():
        assert not torch.equal(value, fresh_state[name]), f"{name} was left at its initial value"
