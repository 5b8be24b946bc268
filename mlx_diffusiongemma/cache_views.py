"""Views over mlx-lm's layer caches, as the decoder and the encoder read them,
and the masks that go with them.

The reference denoises a canvas against the cache without appending to it,
and commits a canvas by appending; mlx-lm's caches only append. These
functions read a cache's context in temporal order (a sliding layer's last
window - 1 tokens), attend a canvas after it with the cache left as it was,
and compute an encoder chunk's keys and values without writing them
(`Lookahead`). A batch's caches hold rows left-padded; the masks here
exclude the padding. mlx-lm's private layouts are read through
`mlx_lm_internals` only.
"""

from typing import Optional

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, KVCache, RotatingKVCache

from .mlx_lm_internals import kv_cache_context, rotating_in_order


def batch_caches(caches: list, padding: list) -> list:
    """mlx-lm's batch versions of a model's layer caches (`make_cache()`,
    empty) for rows left-padded by `padding` tokens: BatchKVCache for a full
    layer, BatchRotatingKVCache (the same window) for a sliding one. The
    padding is masked out wherever the rows are read."""
    return [
        BatchKVCache(padding) if isinstance(c, KVCache) else BatchRotatingKVCache(c.max_size, padding)
        for c in caches
    ]


def context(cache) -> tuple:
    """The cached context's keys and values, in temporal order, as a chunk
    after it attends to them: a sliding layer's last `window - 1` tokens, as
    the reference's sliding cache keeps them; a full layer's all. In a
    batch's BatchRotatingKVCache each row's context ends at the same index
    (left padding)."""
    if isinstance(cache, (RotatingKVCache, BatchRotatingKVCache)):
        past_keys, past_values = (rotating_in_order(cache, v) for v in (cache.keys, cache.values))
    elif isinstance(cache, BatchKVCache):
        past_keys, past_values = cache.keys_and_values()
    else:
        past_keys, past_values = kv_cache_context(cache)
    if isinstance(cache, (RotatingKVCache, BatchRotatingKVCache)):
        first = past_keys.shape[2] - min(cache.max_size - 1, past_keys.shape[2])
        past_keys, past_values = past_keys[..., first:, :], past_values[..., first:, :]
    return past_keys, past_values


def with_context(cache, keys: mx.array, values: mx.array) -> tuple:
    """A chunk's keys and values after the cached context, the cache untouched."""
    return appended(None if cache.keys is None else context(cache), keys, values)


def appended(context: Optional[tuple], keys: mx.array, values: mx.array) -> tuple:
    """Keys and values after a context's (None: no context)."""
    if context is None:
        return keys, values
    return tuple(mx.concatenate([past, new], axis=2) for past, new in zip(context, (keys, values)))


def after_context(cache, keys: mx.array, values: mx.array) -> tuple:
    """A canvas's keys and values after the cached context, the cache holding
    the same tokens afterwards, and the mask of the context's padding (None
    for one sequence). A full layer's cache takes them into the slots after
    its tokens and gives them back (trim): attention reads the context where
    it lies, with no copy of it per step, and the next step or commit
    overwrites those slots. A sliding layer's context, at most a window, is
    copied in temporal order.

    A batch's caches (mlx-lm's BatchKVCache / BatchRotatingKVCache) hold the
    rows left-padded: row r's context is its last `offset[r]` entries, and
    the padding before them is masked out, as the reference masks a padded
    prompt (its decoder attention mask)."""
    canvas = keys.shape[2]
    if isinstance(cache, BatchKVCache):
        real = cache.offset
        keys, values = cache.update_and_fetch(keys, values)
        cache.trim(canvas)
        return keys, values, _padding_mask(real, keys.shape[2] - canvas, canvas)
    if isinstance(cache, BatchRotatingKVCache):
        keys, values = with_context(cache, keys, values)
        return keys, values, _padding_mask(cache.offset, keys.shape[2] - canvas, canvas)
    if isinstance(cache, KVCache):
        both = cache.update_and_fetch(keys, values)
        cache.trim(canvas)
        return (*both, None)
    return (*with_context(cache, keys, values), None)


def _padding_mask(real: mx.array, context: int, canvas: int) -> mx.array:
    """[B, 1, 1, context + canvas] True where a key is row b's: the last
    real[b] entries of the context (fewer than `context`: padding before
    them), and the whole canvas."""
    start = context - mx.minimum(real, context)
    return (mx.arange(context + canvas)[None] >= start[:, None])[:, None, None, :]


def _chunk_mask(real: mx.array, context: int, length: int, window: Optional[int]) -> mx.array:
    """[B, 1, L, context + L] for a causal chunk after a batch's context:
    query i (at context + i) sees the keys up to itself, within the sliding
    window if any, and none of the padding before a row's real tokens."""
    query = context + mx.arange(length)[:, None]
    key = mx.arange(context + length)[None]
    mask = key <= query
    if window is not None:
        mask = mask & (key > query - window)
    return mask[None, None] & _padding_mask(real, context, length)


class Lookahead:
    """A layer cache as the encoder sees it, with the encoder's write set
    aside instead of applied: the chunk attends to the same keys, under the
    same mask, as `update_and_fetch` would give it. A batch's mask is built
    here from each row's real token count: mlx-lm 0.32's BatchRotatingKVCache
    masks a multi-token chunk wrongly once one-token writes have wrapped its
    ring (mlx-lm's decode loop writes one token at a time)."""

    def __init__(self, cache):
        self.cache, self.offset = cache, cache.offset
        self.context = None if cache.keys is None else context(cache)
        self.keys = self.values = None

    def make_mask(self, N: int, window_size: Optional[int] = None, **kwargs):
        if not isinstance(self.cache, (BatchKVCache, BatchRotatingKVCache)):
            return self.cache.make_mask(N, window_size=window_size, **kwargs)
        context = 0 if self.context is None else self.context[0].shape[2]
        return _chunk_mask(self.cache.offset, context, N, window_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:
        self.keys, self.values = keys, values
        return appended(self.context, keys, values)
