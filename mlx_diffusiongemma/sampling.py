"""The reference sampler's pieces, each small and separate as in transformers'
generation_diffusion_gemma: temperature schedule, entropy, entropy-bound
acceptance, renoising, stable-and-confident stopping.

Each matches its reference counterpart on the same inputs; `diffusion_generate`
(to come) strings them together in the reference's order.
"""

from typing import Optional

import mlx.core as mx


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


def entropy_bound_accept(
    current: mx.array, denoised: mx.array, logits: mx.array, entropy_bound: float
) -> tuple[mx.array, mx.array]:
    """Accept the lowest-entropy positions while sum(entropy) - max(entropy) <= bound.

    The left side bounds the joint mutual information of the accepted tokens, so
    they are approximately independent (arXiv 2505.24857). Returns the canvas
    with accepted positions taken from `denoised`, and the acceptance mask.
    """
    token_entropy = entropy(logits)
    order = mx.argsort(token_entropy, axis=-1)
    sorted_entropy = mx.take_along_axis(token_entropy, order, axis=-1)
    # sorted ascending, so each prefix's maximum is its last element
    selected = (mx.cumsum(sorted_entropy, axis=-1) - sorted_entropy) <= entropy_bound
    accepted = mx.put_along_axis(mx.zeros_like(selected), order, selected, axis=-1)
    return mx.where(accepted, denoised, current), accepted


def renoise(canvas: mx.array, accepted: mx.array, random_canvas: mx.array) -> mx.array:
    """Every position not accepted in this step takes a fresh uniform random id."""
    return mx.where(accepted, canvas, random_canvas)


class StableAndConfidentStopping:
    """Stop a canvas when its argmax has not changed for `stability_threshold`
    steps and the mean entropy of the temperature-scaled logits is below
    `confidence_threshold`. Stateful per canvas: call `reset()` between canvases."""

    def __init__(self, stability_threshold: int, confidence_threshold: float):
        self.stability_threshold = stability_threshold
        self.confidence_threshold = confidence_threshold
        self.history: Optional[mx.array] = None  # [threshold, B, C] previous argmax canvases

    def __call__(self, argmax_canvas: mx.array, logits: mx.array) -> mx.array:
        if self.stability_threshold == 0:
            stable = mx.ones((argmax_canvas.shape[0],), dtype=mx.bool_)
        else:
            if self.history is None:  # -1 never equals a token, so the first steps are unstable
                self.history = mx.full((self.stability_threshold, *argmax_canvas.shape), -1, argmax_canvas.dtype)
            stable = (self.history == argmax_canvas[None]).all(axis=-1).all(axis=0)
            self.history = mx.concatenate([self.history[1:], argmax_canvas[None]], axis=0)
        confident = entropy(logits).mean(axis=-1) < self.confidence_threshold
        return stable & confident

    def reset(self) -> None:
        self.history = None
