"""`load` with a tokenizer, and our caches through mlx-lm's prompt-cache helpers."""

import json

import numpy as np
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_diffusiongemma import load, load_model

from helpers.reference import build_reference, save_reference
from helpers.tiny_tokenizer import token_id, write_tokenizer


def test_load_returns_model_and_tokenizer(tmp_path):
    path = save_reference(build_reference(seed=5), tmp_path)
    write_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7], "max_denoising_steps": None}))
    model, tokenizer = load(path)
    assert isinstance(tokenizer, TokenizerWrapper)
    assert set(tokenizer.eos_token_ids) == {1, 7}
    ids = tokenizer.encode("hello w5 sky", add_special_tokens=False)
    assert ids == [token_id("hello"), token_id("w5"), token_id("sky")]
    assert model.decode(ids, model.make_cache()).shape == (1, 3, 320)


def test_prompt_cache_helpers_round_trip(tmp_path):
    path = save_reference(build_reference(seed=6), tmp_path / "model")
    model = load_model(path)
    cache = make_prompt_cache(model)  # mlx-lm finds model.make_cache
    assert [type(c).__name__ for c in cache] == ["RotatingKVCache", "KVCache", "RotatingKVCache", "KVCache"]
    prompt = np.random.default_rng(0).integers(0, 320, 23).tolist()
    model.encode(prompt, cache, chunk_size=10)
    model.encode([5], cache)  # a one-token commit rotates the sliding caches in place
    canvas = list(range(12))
    expected = np.array(model.decode(canvas, cache))

    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache)
    restored = load_prompt_cache(str(tmp_path / "cache.safetensors"))
    np.testing.assert_array_equal(np.array(model.decode(canvas, restored)), expected)
