"""mlx-lm's internals, behind one door: every private name of mlx-lm the
package uses and every assumption about the layout of its cache objects.

mlx-lm's caches are written for its own autoregressive loop: append a chunk,
attend, repeat. Denoising a canvas needs the context as it is (read, not
appended to), and the mlx-lm integration builds batch caches it never
appended to. Each function below says why no public way exists.
`check_layouts()` verifies every assumption on the installed mlx-lm; the
tests call it, so an upgrade fails there with a message naming the
assumption rather than deep inside a generation. pyproject.toml pins mlx-lm
below 0.33 for these.

Imports nothing of the package: model.py may use it.
"""

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, ConcatenateKVCache, KVCache, RotatingKVCache


def rotating_in_order(cache, v: mx.array) -> mx.array:
    """A RotatingKVCache's or BatchRotatingKVCache's keys or values (`v`),
    oldest first. Both keep a ring written at the private `_idx`; mlx-lm
    reorders it only inside `update_and_fetch`, which appends, and neither
    `state` (the raw ring for RotatingKVCache) nor `keys_and_values` exposes
    the order."""
    if isinstance(cache, BatchRotatingKVCache):
        if cache.rotated:
            return mx.concatenate([v[..., cache._idx :, :], v[..., : cache._idx, :]], axis=2)
        return v[..., : cache._idx, :]
    return cache._temporal_order(v)


def kv_cache_context(cache: KVCache) -> tuple:
    """A KVCache's keys and values so far. It grows its arrays in steps, so
    the first `offset` positions along axis 2 are the tokens (its `state`
    slices the same way, but only once full-step bookkeeping is done)."""
    return cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :]


def make_batch_cache(keys: mx.array, values: mx.array, offset: mx.array, left_padding: mx.array, idx: int) -> BatchKVCache:
    """A BatchKVCache holding these arrays: the constructor takes only the left
    padding of an empty cache, and the `state` setter takes mlx-lm 0.32's
    5-tuple (keys, values, per-row offset, per-row left padding, write index)."""
    cache = BatchKVCache([0] * keys.shape[0])
    cache.state = (keys, values, offset, left_padding, idx)
    return cache


def with_merge(entry: ConcatenateKVCache, merge) -> ConcatenateKVCache:
    """`entry` made batchable: mlx-lm batches a cache entry through its
    `merge` classmethod (`generate._merge_caches`, and its server's test
    `hasattr(c, "merge")`), which ConcatenateKVCache lacks; the entry keeps
    its class, so `load_prompt_cache` still restores it by name."""
    entry.merge = merge
    return entry


def check_layouts() -> None:
    """Each assumption above, on the installed mlx-lm: an AssertionError naming
    the one that no longer holds (whatever mlx-lm raised instead)."""
    for assumption, holds in _ASSUMPTIONS:
        try:
            ok = holds()
        except Exception as e:  # a changed layout fails in any way: the name of the assumption is what helps
            raise AssertionError(f"mlx-lm no longer matches mlx_lm_internals: {assumption} ({type(e).__name__}: {e})") from e
        if not ok:
            raise AssertionError(f"mlx-lm no longer matches mlx_lm_internals: {assumption}")


def _ramp(n: int) -> mx.array:
    """n positions [1, 1, n, 1] holding 0 .. n-1."""
    return mx.arange(n, dtype=mx.float32).reshape(1, 1, n, 1)


def _wrapped(cache) -> list:
    """The positions a rotating cache of 4 holds after 7 tokens fed one at a time, oldest first."""
    for t in range(7):
        cache.update_and_fetch(_ramp(7)[..., t : t + 1, :], _ramp(7)[..., t : t + 1, :])
    return rotating_in_order(cache, cache.keys)[0, 0, :, 0].tolist()


def _kv_cache_holds() -> bool:
    cache = KVCache()
    cache.update_and_fetch(_ramp(5), _ramp(5))
    return kv_cache_context(cache)[0][0, 0, :, 0].tolist() == [0, 1, 2, 3, 4]


def _batch_state_holds() -> bool:
    keys = mx.concatenate([_ramp(4), _ramp(4) + 10])
    cache = make_batch_cache(keys, keys, mx.array([4, 2]), mx.array([0, 2]), 4)
    mask = cache.make_mask(1, return_array=True)
    return (
        len(cache.state) == 5 and cache.offset.tolist() == [4, 2] and cache.left_padding.tolist() == [0, 2]
        and mask[1, 0, 0].tolist() == [False, False, True, True, True]
    )


def _merge_holds() -> bool:
    from mlx_lm.generate import _merge_caches

    seen = []
    entry = ConcatenateKVCache()
    entry.state = (_ramp(2), _ramp(2))
    with_merge(entry, lambda entries: seen.append(len(entries)) or "batched")
    return _merge_caches([[entry], [entry]]) == ["batched"] and seen == [2]


_ASSUMPTIONS = (
    ("RotatingKVCache._temporal_order(v) puts its ring in temporal order", lambda: _wrapped(RotatingKVCache(max_size=4)) == [3, 4, 5, 6]),
    ("BatchRotatingKVCache keeps a ring written at _idx, rotated once it wraps",
     lambda: _wrapped(BatchRotatingKVCache(4, [0])) == [3, 4, 5, 6]),
    ("KVCache holds its tokens in keys[..., :offset, :]", _kv_cache_holds),
    ("BatchKVCache.state is (keys, values, offset, left_padding, idx) and masks the left padding", _batch_state_holds),
    ("mlx-lm batches a cache entry through the entry's own merge attribute", _merge_holds),
)
