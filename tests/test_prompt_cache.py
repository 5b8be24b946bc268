"""The prompt-cache invariant mlx-lm relies on: once its loop has fed n tokens
(prompt plus tokens handed out), the cache describes exactly those n tokens,
and whatever holds it (the live cache, a deep copy, a trimmed one, one saved
and loaded, mlx-lm's LRUPromptCache) continues the same text.

Generation here is mlx-lm's own `generate_step` driving the model, compared
with an uninterrupted run of the same seed; the model is a random reference
checkpoint, so any context lost or misplaced changes the tokens."""

import copy

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import (
    LRUPromptCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_diffusiongemma import load_model

PROMPT = [2, 9, 16, 30, 41, 5, 77]
TOTAL = 36  # three canvases of 12


@pytest.fixture(scope="module")
def wide_window(wide_checkpoint):
    """Sliding window 64: the whole run fits in it, so every cache can be trimmed."""
    return mlx_lm.load(str(wide_checkpoint))[0]


@pytest.fixture(scope="module")
def narrow_window(chat_checkpoint):
    """Sliding window 8: the sliding layers rotate, and mlx-lm refuses to trim them."""
    return mlx_lm.load(str(chat_checkpoint))[0]


def _run(model, prompt, cache, max_tokens) -> list:
    return [token for token, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, prompt_cache=cache)]


_UNINTERRUPTED = {}


def _uninterrupted(model) -> list:
    """The tokens of a whole run with seed 0 (computed once per model)."""
    if id(model) not in _UNINTERRUPTED:
        mx.random.seed(0)
        _UNINTERRUPTED[id(model)] = _run(model, PROMPT, make_prompt_cache(model), TOTAL)
    return _UNINTERRUPTED[id(model)]


def _interrupted(model, stop: int):
    mx.random.seed(0)
    cache = make_prompt_cache(model)
    return _run(model, PROMPT, cache, stop), cache


def _states(cache) -> list:
    return [np.array(a) for c in cache for a in c.state if isinstance(a, mx.array)]


def _saved_and_loaded(cache, tmp_path):
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache)
    return load_prompt_cache(str(tmp_path / "cache.safetensors"))


HOLDERS = {
    "live": lambda cache, tmp_path: cache,
    "deepcopy": lambda cache, tmp_path: copy.deepcopy(cache),
    "saved": _saved_and_loaded,
}


@pytest.mark.parametrize("holder", HOLDERS)
@pytest.mark.parametrize("stop", [5, 12, 17])  # inside the first canvas, at a boundary, inside the second
def test_trim_one_and_feed_it_again_continues(wide_window, tmp_path, holder, stop):
    """What mlx-lm's server does with a cached prefix: trim the last token and feed it again."""
    model = wide_window
    expected = _uninterrupted(model)
    first, cache = _interrupted(model, stop)
    assert first == expected[:stop]
    assert cache[0].offset == len(PROMPT) + stop  # every token handed out was fed, and is in the cache
    before = _states(cache)
    held = HOLDERS[holder](cache, tmp_path)
    assert can_trim_prompt_cache(held) and trim_prompt_cache(held, 1) == 1
    assert _run(model, [expected[stop - 1]], held, TOTAL - stop) == expected[stop:]
    if holder != "live":  # continuing the copy left the original alone
        for a, b in zip(before, _states(cache)):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("holder", HOLDERS)
def test_rotating_cache_continues_from_the_next_token(narrow_window, tmp_path, holder):
    """Past the window mlx-lm cannot trim the sliding layers (can_trim is false);
    feeding the token the model handed out continues the text."""
    model = narrow_window
    expected = _uninterrupted(model)
    first, cache = _interrupted(model, 17)
    assert first == expected[:17]
    held = HOLDERS[holder](cache, tmp_path)
    assert not can_trim_prompt_cache(held) and trim_prompt_cache(held, 1) == 0
    assert _run(model, [expected[17]], held, TOTAL - 18) == expected[18:]


@pytest.mark.parametrize("trim", [4, 7])  # back into the canvas being handed out, or the one before
def test_trim_back_and_feed_again_continues(wide_window, trim):
    model = wide_window
    expected = _uninterrupted(model)
    _, cache = _interrupted(model, 17)
    assert trim_prompt_cache(cache, trim) == trim
    assert _run(model, expected[17 - trim : 17], cache, TOTAL - 17) == expected[17:]


def test_trim_into_the_prompt_leaves_exactly_the_prefix(wide_window):
    """Trimmed past the canvases it holds, the cache is exactly the prefix: it
    then behaves as a fresh cache holding the same prefix does (the canvases
    are context like any prompt, and the next canvas is denoised after them)."""
    model = wide_window
    expected = _uninterrupted(model)
    _, cache = _interrupted(model, 17)
    assert trim_prompt_cache(cache, 17 + 3) == 20
    fresh = make_prompt_cache(model)
    model(mx.array([PROMPT[:-1]]), cache=fresh)  # the prefill chunk generate_step ran
    trim_prompt_cache(fresh, 2)
    for trimmed, whole in zip(cache[: len(model.layers)], fresh):
        assert trimmed.offset == whole.offset == len(PROMPT) - 3
        for a, b in zip(trimmed.keys_and_values(), whole.keys_and_values()):
            np.testing.assert_array_equal(np.array(a), np.array(b))
    fed_again = PROMPT[-3:] + expected[:17]
    mx.random.seed(1)
    continued = _run(model, fed_again, cache, 12)
    mx.random.seed(1)
    assert continued == _run(model, fed_again, fresh, 12)


def test_lru_prompt_cache_repeats_and_shared_prefixes(wide_window):
    """mlx-lm's server cache: a repeated request and one sharing a prefix get
    what a fresh request gets."""
    model = wide_window
    lru = LRUPromptCache()
    mx.random.seed(5)
    cache = make_prompt_cache(model)
    first = _run(model, PROMPT, cache, 20)
    lru.insert_cache("model", PROMPT + first, cache)

    again, rest = lru.fetch_nearest_cache("model", PROMPT)
    assert rest == PROMPT[-1:]
    mx.random.seed(5)
    assert _run(model, rest, again, 20) == first

    other = PROMPT[:-1] + [100]
    shared, rest = lru.fetch_nearest_cache("model", other)
    assert rest == [100]
    mx.random.seed(6)
    reused = _run(model, rest, shared, 20)
    mx.random.seed(6)
    assert reused == _run(model, other, make_prompt_cache(model), 20)


def test_lookahead_gives_the_keys_and_values_encode_writes(chat_checkpoint):
    model = load_model(chat_checkpoint)
    cache = model.make_cache()
    model.encode(list(range(5, 24)), cache)  # past the sliding window of 8
    canvas = list(range(30, 42))
    rows = model.lookahead(canvas, cache)
    offset = cache[0].offset
    model.encode(canvas, cache)
    for (keys, values), layer in zip(rows, cache):
        assert layer.offset == offset + len(canvas)
        written_keys, written_values = (v[..., -len(canvas) :, :] for v in layer.keys_and_values())
        np.testing.assert_array_equal(np.array(keys), np.array(written_keys))
        np.testing.assert_array_equal(np.array(values), np.array(written_values))


def test_bad_calls_get_clear_errors(narrow_window):
    model = narrow_window
    cache = make_prompt_cache(model)
    with pytest.raises(ValueError, match=r"shape \[1, L\], one row per row of the cache.*\(2, 2\)"):
        model(mx.array([[0, 1], [2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="make_prompt_cache"):
        model(mx.array([[0, 1]]), cache=model.make_cache()[:4])
    with pytest.raises(ValueError, match="no next-token logits"):
        model(mx.array([[0, 1]]))
    with pytest.raises(ValueError, match="input_embeddings"):
        model(mx.array([[0, 1]]), cache=cache, input_embeddings=mx.zeros((1, 2, 64)))
    assert cache[0].offset == 0  # nothing was written


def test_model_deep_copies(narrow_window):
    model = narrow_window
    clone = copy.deepcopy(model)
    assert dict(clone.generation_config) == dict(model.generation_config)
    cache, clone_cache = model.make_cache(), clone.make_cache()
    model.encode(PROMPT, cache)
    clone.encode(PROMPT, clone_cache)
    np.testing.assert_array_equal(np.array(model.decode(list(range(12)), cache)),
                                  np.array(clone.decode(list(range(12)), clone_cache)))
