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
  then hands out the canvas one token per call with logits that make any
  sampler pick exactly that token. The canvas is committed to the cache in one
  piece once used up, as the reference commits it; if the caller feeds
  something else (the next chat turn), the part handed out so far is
  committed first and the new tokens are encoded as context.

  mlx-lm prefills a prompt in chunks whose logits it ignores and then feeds
  the last prompt token alone to get the first generated token. So a call
  that brings several new tokens is taken for prefill: it fills the cache and
  returns zero logits without denoising (denoising there would waste a canvas
  and its random draws). Only when a prompt of n tokens leaves a one-token
  chunk ((n - 1) % prefill_step_size == 1) is one canvas wasted.
"""

import weakref
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models.cache import ConcatenateKVCache

from .generate import DiffusionOptions, denoise_canvas, stream_diffusion_generate
from .load import _cast_for_cpu_experts
from .model import Model as DiffusionGemma
from .model import ModelArgs
from .sampling import Randomness, StableAndConfidentStopping

__all__ = ["Model", "ModelArgs"]


@dataclass
class _Canvas:
    tokens: list  # the committed argmax canvas being handed out
    used: int  # tokens handed out and fed back so far
    offset: int  # cache offset when it was denoised: a different one means the cache was changed


class Model(DiffusionGemma):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self._canvases = weakref.WeakKeyDictionary()  # first layer cache -> _Canvas

    def make_cache(self) -> list:
        """The layer caches, plus an empty last entry without `merge`: mlx-lm's
        server batches only models whose caches all merge, and a diffusion
        model must be served one request at a time."""
        marker = ConcatenateKVCache()
        marker.state = (mx.zeros((1, 1, 0, 1)), mx.zeros((1, 1, 0, 1)))
        return super().make_cache() + [marker]

    def load_weights(self, weights, strict: bool = True):
        super().load_weights(weights, strict=strict)
        _cast_for_cpu_experts(self)  # as our own loader does
        return self

    @property
    def quant_predicate(self):
        """The mlx-community recipe, which `mlx_lm.convert -q` applies when it is
        given no other (the same plan as `python -m mlx_diffusiongemma.convert`)."""
        from .load import mlx_community_recipe

        return mlx_community_recipe

    def diffusion_generate(self, prompt_ids, tokenizer=None, **kwargs):
        return stream_diffusion_generate(self, tokenizer, prompt_ids, **kwargs)

    def __call__(self, inputs: mx.array, cache=None, **kwargs) -> mx.array:
        if cache is None:
            raise ValueError("DiffusionGemma generates against a cache: pass cache=model.make_cache()")
        first = cache[0]
        ids = inputs.reshape(-1).tolist()
        canvas = self._canvases.pop(first, None)
        if canvas is not None and canvas.offset != first.offset:
            canvas = None  # the cache was trimmed or refilled elsewhere
        if canvas is not None and ids == canvas.tokens[canvas.used : canvas.used + len(ids)]:
            canvas.used += len(ids)  # our own tokens, fed back
            if canvas.used == len(canvas.tokens):
                self.encode(canvas.tokens, cache)
                canvas = None
        else:
            if canvas is not None and canvas.used:
                self.encode(canvas.tokens[: canvas.used], cache)
            self.encode(ids, cache)
            if len(ids) > 1:  # prefill: nobody reads these logits
                return mx.zeros((1, 1, self.args.vocab_size))
            canvas = None
        if canvas is None:
            canvas = _Canvas(self._denoise(cache), 0, first.offset)
        self._canvases[first] = canvas
        logits = mx.full((1, 1, self.args.vocab_size), -mx.inf)
        logits[..., canvas.tokens[canvas.used]] = 0.0
        return logits

    def _denoise(self, cache) -> list:
        options = DiffusionOptions.resolve(self, None, {})
        stopping = StableAndConfidentStopping(options.stability_threshold, options.confidence_threshold)
        randomness = Randomness()
        canvas = randomness.uniform_ids((1, self.args.canvas_length), self.args.vocab_size)
        for argmax, _, _ in denoise_canvas(self, cache, canvas, options, randomness, options.make_acceptance(), stopping):
            pass
        return argmax[0].tolist()
