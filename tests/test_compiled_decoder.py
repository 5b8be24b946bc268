"""The decoder runs compiled between its attentions: traced once per model and
input signature (never per step or per canvas), reading the current weights at
every call, and differentiable as training needs it. Exactness against the
reference is test_parity's; here the compiled decoder is checked against the
same layers run uncompiled."""

import copy

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_diffusiongemma import diffusion_generate, load_model, quantize
from mlx_diffusiongemma.cache_views import with_context
from mlx_diffusiongemma.model import Model, attend

PROMPT = list(range(3, 20))
CANVAS = mx.array([list(range(5, 17))])


@pytest.fixture
def model(chat_checkpoint):
    return load_model(chat_checkpoint)


def uncompiled(model, canvas, cache):
    h = model._conditioned_embedding(canvas, None, None, None)
    for layer, c in zip(model.layers, cache):  # the context copied, not read in place
        q, k, v = layer.project(h, c.offset)
        h = layer.finish(h, attend(q, *with_context(c, k, v)), layer.layer_scalar)
    return model.head(h)


def prefilled(model):
    cache = model.make_cache()
    model.encode(PROMPT, cache)
    return cache


def test_compiled_decoder_equals_its_layers_run_plainly(model):
    cache = prefilled(model)
    np.testing.assert_array_equal(np.array(model.decode(CANVAS, cache)), np.array(uncompiled(model, CANVAS, cache)))


def test_traced_once_per_signature_across_steps_and_canvases(model, monkeypatch):
    traces = []
    segment = Model._segment
    monkeypatch.setattr(Model, "_segment", lambda self, i, *a, **k: traces.append(i) or segment(self, i, *a, **k))
    response = diffusion_generate(model, None, PROMPT, seed=0, max_tokens=36, eos_token_id=[], max_denoising_steps=4)
    assert response.canvases == 3 and response.denoising_steps >= 6
    # segment 0 twice: without self-conditioning (each canvas's first step), then with it
    assert sorted(traces) == [0, 0, *range(1, len(model.layers) + 1)]


def test_updated_and_quantized_weights_are_read_not_stale(model, chat_checkpoint):
    cache = prefilled(model)
    mx.eval(model.decode(CANVAS, cache))  # compiled with the loaded weights
    model.update(tree_map(lambda w: w * 1.5 if w.ndim == 2 else w, model.parameters()))
    fresh = load_model(chat_checkpoint)
    fresh.update(tree_map(lambda w: w * 1.5 if w.ndim == 2 else w, fresh.parameters()))
    np.testing.assert_array_equal(np.array(model.decode(CANVAS, cache)), np.array(uncompiled(fresh, CANVAS, cache)))

    quantize(model, bits=8, group_size=32)
    quantize(fresh, bits=8, group_size=32)
    np.testing.assert_array_equal(np.array(model.decode(CANVAS, cache)), np.array(uncompiled(fresh, CANVAS, cache)))


def test_a_deep_copy_decodes_with_its_own_weights(model):
    cache = prefilled(model)
    before = np.array(model.decode(CANVAS, cache))
    clone = copy.deepcopy(model)
    clone.update(tree_map(lambda w: w * 0.5 if w.ndim == 2 else w, clone.parameters()))
    assert not np.array_equal(np.array(clone.decode(CANVAS, cache)), before)
    np.testing.assert_array_equal(np.array(model.decode(CANVAS, cache)), before)


def test_gradients_through_the_compiled_decoder_equal_uncompiled(model):
    cache = prefilled(model)
    loss, grads = nn.value_and_grad(model, lambda m: (m.decode(CANVAS, cache) ** 2).mean())(model)
    plain_loss, plain_grads = nn.value_and_grad(model, lambda m: (uncompiled(m, CANVAS, cache) ** 2).mean())(model)
    assert loss.item() == plain_loss.item()
    flat, plain_flat = tree_flatten(grads), tree_flatten(plain_grads)
    assert [k for k, _ in flat] == [k for k, _ in plain_flat]
    for (key, g), (_, p) in zip(flat, plain_flat):
        np.testing.assert_array_equal(np.array(g), np.array(p), err_msg=key)
    assert sum(bool(mx.any(g != 0).item()) for _, g in flat) > len(flat) // 2
