"""The sampler's pieces, each small and separate as in transformers'
generation_diffusion_gemma: randomness, temperature schedule, entropy,
acceptance, renoising, stable-and-confident stopping.

Each matches its reference counterpart on the same inputs; `generate.py`
strings them together in the reference's order. The per-position entropy is
computed once per step and shared by acceptance and stopping.
"""

from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

SEED_LIMIT = 2**64  # mx.random.key and mx.random.seed take an unsigned 64-bit seed


def check_seed(seed) -> int:
    """The seed as an int, or a ValueError naming it and the accepted range
    (mlx itself raises a TypeError listing overloads)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


class Randomness:
    """Every random draw of generation, in the reference's order.

    Per canvas `uniform_ids` gives the initial canvas; per step `categorical`
    draws the denoiser canvas, then `uniform_ids` the full canvas from which
    renoised positions take their ids. With a seed the draws come from a key
    of their own (reproducible); without one from mlx's global random state,
    so `mx.random.seed(n)` controls them as in mlx-lm. Tests substitute an
    object replaying the reference's recorded draws.
    """

    def __init__(self, seed: Optional[int] = None):
        self._key = None if seed is None else mx.random.key(check_seed(seed))

    def _next_key(self):
        if self._key is None:
            return None
        self._key, key = mx.random.split(self._key)
        return key

    def uniform_ids(self, shape: Sequence[int], vocab_size: int) -> mx.array:
        return mx.random.randint(0, vocab_size, shape, key=self._next_key())

    def categorical(self, logits: mx.array) -> mx.array:
        return mx.random.categorical(logits, key=self._next_key())


def linear_temperature(cur_step: int, max_denoising_steps: int, t_min: float, t_max: float) -> mx.array:
    """t_min + (t_max - t_min) * cur_step / N, in float32 as the reference computes it.

    `cur_step` counts down from N to 1 (steps remaining). A float64 temperature
    already changes logits visibly after a few self-conditioned steps.
    """
    fraction = mx.array(cur_step, dtype=mx.int32) / max_denoising_steps
    return mx.array(t_min, mx.float32) + mx.array(t_max - t_min, mx.float32) * fraction


def entropy(logits: mx.array) -> mx.array:
    """Per-position entropy of softmax(logits), over the last axis."""
    log_probs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return -(mx.exp(log_probs) * log_probs).sum(axis=-1)


class EntropyBoundAcceptance:
    """The reference sampler: accept the lowest-entropy positions while
    sum(entropy) - max(entropy) <= bound.

    The left side bounds the joint mutual information of the accepted tokens, so
    they are approximately independent (arXiv 2505.24857). Returns the canvas
    with accepted positions taken from `denoised`, and the mask of positions
    kept from renoising (those accepted in this step).
    """

    def __init__(self, entropy_bound: float):
        self.entropy_bound = entropy_bound

    def reset(self) -> None:
        pass

    def __call__(self, current, denoised, logits, token_entropy) -> tuple[mx.array, mx.array]:
        order = mx.argsort(token_entropy, axis=-1)
        sorted_entropy = mx.take_along_axis(token_entropy, order, axis=-1)
        # sorted ascending, so each prefix's maximum is its last element
        selected = (mx.cumsum(sorted_entropy, axis=-1) - sorted_entropy) <= self.entropy_bound
        accepted = mx.put_along_axis(mx.zeros_like(selected), order, selected, axis=-1)
        return mx.where(accepted, denoised, current), accepted


class ConfidenceAcceptance:
    """Confidence-threshold acceptance (an option, never the default).

    Accepts each not-yet-accepted position whose sampled token has probability
    >= `min_confidence`, and at least the most confident one per step; accepted
    positions stay frozen for the rest of the canvas, so the mask of positions
    kept from renoising is every position accepted so far.
    """

    def __init__(self, min_confidence: float):
        self.min_confidence = min_confidence
        self.frozen: Optional[mx.array] = None

    def reset(self) -> None:
        self.frozen = None

    def __call__(self, current, denoised, logits, token_entropy) -> tuple[mx.array, mx.array]:
        frozen = mx.zeros(current.shape, mx.bool_) if self.frozen is None else self.frozen
        log_norm = mx.logsumexp(logits, axis=-1)
        probability = mx.exp(mx.take_along_axis(logits, denoised[..., None], axis=-1)[..., 0] - log_norm)
        probability = mx.where(frozen, -1.0, probability)
        best = mx.arange(current.shape[-1]) == probability.argmax(axis=-1, keepdims=True)
        newly = ((probability >= self.min_confidence) | best) & ~frozen
        self.frozen = frozen | newly
        return mx.where(newly, denoised, current), self.frozen


def renoise(canvas: mx.array, kept: mx.array, random_canvas: mx.array) -> mx.array:
    """Every position not kept by the acceptance takes a fresh uniform random id."""
    return mx.where(kept, canvas, random_canvas)


class StableAndConfidentStopping:
    """Stop a canvas when its argmax has not changed for `stability_threshold`
    steps and the mean entropy of the temperature-scaled logits is below
    `confidence_threshold`. Stateful per canvas: call `reset()` between canvases."""

    def __init__(self, stability_threshold: int, confidence_threshold: float):
        self.stability_threshold = stability_threshold
        self.confidence_threshold = confidence_threshold
        self.history: Optional[mx.array] = None  # [threshold, B, C] previous argmax canvases

    def __call__(self, argmax_canvas: mx.array, token_entropy: mx.array) -> mx.array:
        if self.stability_threshold == 0:
            stable = mx.ones((argmax_canvas.shape[0],), dtype=mx.bool_)
        else:
            if self.history is None:  # -1 never equals a token, so the first steps are unstable
                self.history = mx.full((self.stability_threshold, *argmax_canvas.shape), -1, argmax_canvas.dtype)
            stable = (self.history == argmax_canvas[None]).all(axis=-1).all(axis=0)
            self.history = mx.concatenate([self.history[1:], argmax_canvas[None]], axis=0)
        confident = token_entropy.mean(axis=-1) < self.confidence_threshold
        return stable & confident

    def reset(self) -> None:
        self.history = None
