"""mlx-lm's own generic model checks, run on DiffusionGemma.

mlx-lm 0.32.2's source distribution tests every model with `model_test_runner`
(tests/test_models.py) and runs its prompt-cache tests (tests/test_prompt_cache.py)
on a real checkpoint. These are the checks of both that apply to a diffusion
model, written against our small reference checkpoint; the ones that do not
apply are asserted to fail with a clear error instead:
- `model(inputs)` without a cache (per-position autoregressive logits): a
  diffusion model denoises a canvas against a cache; it has no such logits.
- batch size > 1 through `model(...)` with a one-row cache: a batch goes
  through mlx-lm's batch caches (tests/test_mlx_lm_batch.py).
- a quantized KV cache (`QuantizedKVCache`, `to_quantized`, `--kv-bits`):
  the decoder reads the cached keys and values directly.
"""

import copy

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_map_with_path
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache, make_prompt_cache, save_prompt_cache, trim_prompt_cache

PROMPT = mx.array([2, 9, 16, 30, 41, 5, 77])


@pytest.fixture(scope="module")
def model(chat_checkpoint):
    return mlx_lm.load(str(chat_checkpoint))[0]


def _cast(model, dtype):
    """All floating weights to `dtype`, except unquantized experts: mlx's CPU
    backend multiplies those in float32 only (on a GPU they would be cast too)."""
    def cast(path, p):
        if not mx.issubdtype(p.dtype, mx.floating) or (mx.default_device() == mx.cpu and ".experts." in path):
            return p
        return p.astype(dtype)

    model.update(tree_map_with_path(cast, model.parameters()))


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_model_runner(chat_checkpoint, dtype):
    """test_models.py's model_test_runner: layers, type, logits shape and dtype
    through a prompt cache, and deep copies."""
    model = mlx_lm.load(str(chat_checkpoint))[0]
    assert len(model.layers) == 4 and model.model_type == "diffusion_gemma"
    _cast(model, dtype)
    cache = make_prompt_cache(model)
    inputs = mx.array([[0, 1]])
    outputs = model(inputs, cache=cache)
    assert outputs.shape == (1, 2, 320) and outputs.dtype == dtype
    outputs = model(mx.argmax(outputs[0, -1:, :], keepdims=True), cache=cache)
    assert outputs.shape == (1, 1, 320) and outputs.dtype == dtype
    copy.deepcopy(model)


def test_what_does_not_apply_fails_clearly(model):
    with pytest.raises(ValueError, match="no next-token logits.*mlx_diffusiongemma.lora"):
        model(mx.array([[0, 1]]))  # what mlx_lm.lora and mlx_lm.perplexity do
    with pytest.raises(ValueError, match="one row per row of the cache"):
        model(mx.array([[0, 1], [2, 3]]), cache=make_prompt_cache(model))
    cache = make_prompt_cache(model)
    model(mx.array([[0, 1]]), cache=cache)
    cache[1] = cache[1].to_quantized(group_size=32, bits=8)  # a full-attention layer
    assert isinstance(cache[1], QuantizedKVCache)
    with pytest.raises(ValueError, match="quantized KV cache"):
        model(mx.array([[2]]), cache=cache)


def test_cache_with_generate(model):
    """test_prompt_cache.py's test_cache_with_generate: two tokens with a cache,
    then one more by feeding the next token, equal a run without one."""
    mx.random.seed(0)
    tokens, logits = zip(*generate_step(PROMPT, model, max_tokens=4))
    mx.random.seed(0)
    cache = make_prompt_cache(model)
    steps = list(generate_step(PROMPT, model, prompt_cache=cache, max_tokens=2))
    steps += list(generate_step(mx.array([tokens[2]]), model, prompt_cache=cache, max_tokens=1))
    assert [t for t, _ in steps] == [tokens[0], tokens[1], tokens[3]]
    for (_, got), want in zip(steps, (logits[0], logits[1], logits[3])):
        np.testing.assert_array_equal(np.array(got), np.array(want))


def test_trim_cache_with_generate(wide_checkpoint):
    """test_prompt_cache.py's test_trim_cache_with_generate: trimmed back to
    just after the prompt, the same two tokens come again. A diffusion model
    draws at random when it denoises a new canvas, so both runs are seeded
    alike; the sliding window (64) holds the whole run, so mlx-lm can trim."""
    model = mlx_lm.load(str(wide_checkpoint))[0]
    cache = make_prompt_cache(model)
    last, _ = next(generate_step(PROMPT, model, prompt_cache=cache))
    last = mx.array([last])
    runs = []
    for _ in range(2):
        mx.random.seed(3)
        runs.append([step for _, step in zip(range(2), generate_step(last, model, prompt_cache=cache))])
        assert trim_prompt_cache(cache, 3) == 3
    for (token, logits), (token_again, logits_again) in zip(*runs):
        assert token == token_again
        np.testing.assert_array_equal(np.array(logits), np.array(logits_again))


def test_save_load(model, tmp_path):
    """test_prompt_cache.py's test_save_load on this model's own cache list."""
    cache = make_prompt_cache(model)
    list(generate_step(PROMPT, model, prompt_cache=cache, max_tokens=5))
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache, {"a": "b"})
    loaded, metadata = load_prompt_cache(str(tmp_path / "cache.safetensors"), return_metadata=True)
    assert metadata == {"a": "b"} and len(loaded) == len(cache)
    for c, lc in zip(cache, loaded):
        assert type(c) is type(lc) and c.offset == lc.offset
        for a, b in zip(c.state, lc.state):
            if isinstance(a, mx.array):
                np.testing.assert_array_equal(np.array(a), np.array(b))
            else:
                assert a == b
