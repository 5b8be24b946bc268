"""DiffusionGemma as mlx-lm loads it: the module `mlx_lm.models.diffusion_gemma`.

mlx-lm finds a model type by importing `mlx_lm.models.<model_type>`. The
`mlx_diffusiongemma.pth` file that this package installs registers a finder
(`_mlx_diffusiongemma_hook`) that answers for that one name with this module;
no file of mlx-lm is touched, and if mlx-lm ever ships its own
`diffusion_gemma` module, mlx-lm's own wins.

Two ways in:
- `model.diffusion_generate(prompt_ids, **kwargs)`: the hook a diffusion-aware
  `mlx_lm.generate` dispatches to; it streams our events (`Draft`, `Commit`,
  `DiffusionResponse`).
- `model(inputs, cache)`: mlx-lm's autoregressive loop, unchanged. Asked for a
  next token, the model denoises a whole canvas against the cache (the
  reference sampler, random draws from mlx's global state, so `--seed` works),
  then hands the canvas out one token per call with logits that make any
  sampler pick exactly that token.

The cache invariant mlx-lm relies on (its server's prompt cache, trimming,
saving, deep copies): once its loop has fed n tokens, the cache describes
exactly those n tokens. So the canvas being handed out is part of the cache:
`make_cache` adds, after the layer caches, one entry per layer holding the
keys and values of the canvas tokens (computed in one encoder pass when the
canvas is denoised, as the reference commits a canvas), and one entry holding
those tokens and their positions. Canvas tokens fed back at their positions
are written into the layer caches from there: no encoder pass, and the same
keys and values a whole-canvas commit writes. The last two canvases are
held, so trimming back into them (mlx-lm's server trims one token and feeds
it again) and feeding the same tokens continues the text. Anything else fed
(a prompt, the next chat turn) is encoded as context, the held canvases are
dropped, and the next canvas is denoised after it, as a fresh request would.

mlx-lm prefills a prompt in chunks whose logits it ignores and then feeds the
last prompt token alone to get the first generated token. So a call that
brings several new tokens is taken for prefill: it fills the cache and
returns zero logits without denoising. Only when a prompt of n tokens leaves
a one-token chunk ((n - 1) % prefill_step_size == 1) is one canvas wasted.
"""

import mlx.core as mx
from mlx_lm.models.cache import ConcatenateKVCache, KVCache, RotatingKVCache

from .generate import DiffusionOptions, denoise_canvas, stream_diffusion_generate
from .load import _cast_for_cpu_experts, mlx_community_recipe
from .model import Model as DiffusionGemma
from .model import ModelArgs
from .sampling import Randomness, StableAndConfidentStopping

__all__ = ["Model", "ModelArgs"]


def _entry(keys: mx.array, values: mx.array) -> ConcatenateKVCache:
    """mlx-lm's ConcatenateKVCache: trimmable, without `merge` (so mlx-lm's
    server serves this model one request at a time instead of batching it),
    and restored by `load_prompt_cache`, which looks classes up by name in
    mlx_lm.models.cache."""
    entry = ConcatenateKVCache()
    entry.state = (keys, values)
    return entry


def _canvas_entry(tokens: list, start: int) -> ConcatenateKVCache:
    """Canvas tokens the cache holds ([1, 1, n, 1]) and their positions."""
    tokens = mx.array(tokens, dtype=mx.int32).reshape(1, 1, -1, 1)
    return _entry(tokens, start + mx.arange(tokens.shape[2], dtype=mx.int32).reshape(tokens.shape))


def _canvas(entry: ConcatenateKVCache) -> tuple:
    """(tokens, position of the first) of the canvas tokens the cache holds."""
    tokens, positions = entry.state
    if tokens.shape[2] == 0:
        return [], 0
    return tokens.reshape(-1).tolist(), positions[0, 0, 0, 0].item()


class Model(DiffusionGemma):
    def make_cache(self) -> list:
        """The layer caches, the canvas's keys and values per layer, then the
        canvas tokens and their positions (see the module docstring)."""
        layers = super().make_cache()
        pending = []
        for layer in self.layers:
            attention = layer.self_attn
            empty = mx.zeros((1, attention.n_kv_heads, 0, attention.head_dim), self.dtype)
            pending.append(_entry(empty, empty))
        return layers + pending + [_canvas_entry([], 0)]

    def load_weights(self, weights, strict: bool = True):
        super().load_weights(weights, strict=strict)
        _cast_for_cpu_experts(self)  # as our own loader does
        return self

    @property
    def quant_predicate(self):
        """The mlx-community recipe, which `mlx_lm.convert -q` applies when it is
        given no other (the same plan as `python -m mlx_diffusiongemma.convert`)."""
        return mlx_community_recipe

    def diffusion_generate(self, prompt_ids, tokenizer=None, **kwargs):
        return stream_diffusion_generate(self, tokenizer, prompt_ids, **kwargs)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None, **kwargs) -> mx.array:
        layers, pending, canvas = self._parts(cache)
        if input_embeddings is not None:
            raise ValueError("DiffusionGemma through mlx-lm takes token ids only (no input_embeddings)")
        if inputs.ndim != 2 or inputs.shape[0] != 1:
            raise ValueError(
                f"DiffusionGemma through mlx-lm's loop generates one sequence at a time: inputs must have "
                f"shape [1, L], got {tuple(inputs.shape)} (batched generation is not supported yet)"
            )
        ids = inputs[0].tolist()
        tokens, start = _canvas(canvas)
        index = layers[0].offset - start
        if tokens and index >= 0 and tokens[index : index + len(ids)] == ids:
            # canvas tokens fed back (again, after a trim): write their keys and values
            for layer, entry in zip(layers, pending):
                keys, values = entry.state
                layer.update_and_fetch(keys[..., index : index + len(ids), :], values[..., index : index + len(ids), :])
            mx.eval([c.state for c in layers])
        else:
            self.encode(ids, layers)
            tokens, start = self._hold(pending, canvas, [], 0)
        if len(ids) > 1:  # prefill: nobody reads these logits (a broadcast: nothing V-sized per token)
            return mx.broadcast_to(mx.zeros((1, 1, self.args.vocab_size), self.dtype), (1, len(ids), self.args.vocab_size))
        if not tokens or layers[0].offset == start + len(tokens):
            tokens, start = self._next_canvas(layers, pending, canvas)
        logits = mx.full((1, 1, self.args.vocab_size), -mx.inf, self.dtype)
        logits[..., tokens[layers[0].offset - start]] = 0.0
        return logits

    def _parts(self, cache) -> tuple:
        """(layer caches, pending keys and values per layer, pending canvas)."""
        n = len(self.layers)
        if cache is None or len(cache) != 2 * n + 1:
            raise ValueError(
                "DiffusionGemma generates against its own cache: pass cache=mlx_lm.models.cache."
                "make_prompt_cache(model) (or model.make_cache())"
            )
        layers = cache[:n]
        for i, c in enumerate(layers):
            if not isinstance(c, (KVCache, RotatingKVCache)):
                raise ValueError(
                    f"cache entry {i} is a {type(c).__name__}; DiffusionGemma needs the KVCache / RotatingKVCache "
                    "of make_prompt_cache (a quantized KV cache, --kv-bits, is not supported)"
                )
        return layers, cache[n : 2 * n], cache[2 * n]

    def _next_canvas(self, layers, pending, canvas) -> tuple:
        """Denoise the next canvas against the cache, with the keys and values a
        commit of the whole canvas would write, and hold it after the canvas
        just fed (so that trimming back one token at a canvas boundary, as
        mlx-lm's server does, and feeding it again still continues the text)."""
        C = self.args.canvas_length
        new = self._denoise(layers)
        new_rows = self.lookahead(new, layers)
        previous, start = _canvas(canvas)
        kept = previous[-C:]
        rows = [
            tuple(mx.concatenate([old[..., len(previous) - len(kept) :, :], added], axis=2)
                  for old, added in zip(entry.state, added_rows))
            for entry, added_rows in zip(pending, new_rows)
        ]
        return self._hold(pending, canvas, kept + new, layers[0].offset - len(kept), rows)

    def _hold(self, pending, canvas, tokens: list, start: int, rows=None) -> tuple:
        """Make `tokens` (from position `start`, with their keys and values per
        layer) the canvas tokens the cache holds; no rows: none held."""
        if rows is None:
            rows = [tuple(a[..., :0, :] for a in entry.state) for entry in pending]
        for entry, keys_and_values in zip(pending, rows):
            entry.state = keys_and_values
        canvas.state = _canvas_entry(tokens, start).state
        mx.eval([entry.state for entry in pending], canvas.state)
        return tokens, start

    def _denoise(self, cache) -> list:
        options = DiffusionOptions.resolve(self, None, {})
        stopping = StableAndConfidentStopping(options.stability_threshold, options.confidence_threshold)
        randomness = Randomness()
        canvas = randomness.uniform_ids((1, self.args.canvas_length), self.args.vocab_size)
        for _, argmax, _, _ in denoise_canvas(self, cache, canvas, options, randomness, options.make_acceptance(), stopping):
            pass
        return argmax[0].tolist()
