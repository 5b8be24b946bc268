"""The sampler's pieces, each small and separate as in transformers'
generation_diffusion_gemma: randomness, temperature schedule, the step's
prediction (draw, argmax, entropy, probabilities), acceptance, renoising,
stable-and-confident stopping.

Each matches its reference counterpart on the same inputs; the generation
loop (generate/loop.py) strings them together in the reference's order.
`predict` reads the logits with one exponential pass, shared by the draw,
the entropy (for acceptance and stopping) and the next step's
self-conditioning: transcendental passes over [canvas, vocab] logits are what
a step costs once the decoder has run. On a GPU one fused kernel (kernels.py)
does the same in one read of the logits, once it has agreed with this path
(`fused_sampler_ready`). `choose_prediction` decides, once per canvas, which
of the two a step takes and what it feeds back to the decoder.
"""

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.gemma4_text import logit_softcap

from . import kernels
from .config import check_range
from .model import Probabilities, SelfConditioningInput, TopK

SEED_LIMIT = 2**64  # mx.random.key and mx.random.seed take an unsigned 64-bit seed


def check_seed(seed) -> int:
    """The seed as an int, or a ValueError naming it and the accepted range
    (mlx itself raises a TypeError listing overloads)."""
    return int(check_range("seed", seed, 0, SEED_LIMIT, integer=True, expected="an integer in [0, 2**64)"))


class Randomness:
    """Every random draw of generation, one stream per row of a batch (a
    prompt), in the reference's order.

    Per canvas `uniform_ids` gives the initial canvas; per step `categorical`
    draws the denoiser canvas, then `uniform_ids` the full canvas from which
    renoised positions take their ids. Each draw takes one key per row. With
    a seed, row r's keys derive from `seed + r` and how many draws the row
    has taken, so a row draws the same whatever else is in the batch, and a
    row that sits a step out (its canvas has stopped) or has finished moves
    no other row's draws: a prompt in a batch draws exactly as it does alone
    with its seed. Without one, each draw's keys come from mlx's global
    random state, so `mx.random.seed(n)` controls them as in mlx-lm (whose
    loop, driving our model, draws the same keys in the same order).
    `select(rows)` gives the draws of some rows only (the rows still
    denoising). Tests substitute an object replaying the reference's
    recorded draws (torch.multinomial's).
    """

    def __init__(self, seed: Optional[int] = None, rows: int = 1):
        self._keys = None
        if seed is not None:
            seed = check_seed(seed)
            self._keys = mx.stack([mx.random.key(check_seed(seed + r)) for r in range(rows)])
        self._draws = [0] * rows  # draws taken, per row (shared with selections)
        self._rows = list(range(rows))

    def select(self, rows: Sequence[int]) -> "Randomness":
        """The draws of these rows (indices into this object's rows)."""
        view = copy.copy(self)
        view._rows = [self._rows[r] for r in rows]
        return view

    def step_key(self) -> mx.array:
        """The next draw's keys ([rows, 2] uint32), one per row."""
        if self._keys is None:
            return mx.random.randint(0, 2**24, (len(self._rows), 2)).astype(mx.uint32)  # 48 random bits, no host sync
        counts = mx.array([self._draws[r] for r in self._rows], mx.uint32)
        for r in self._rows:
            self._draws[r] += 1
        keys = self._keys if len(self._rows) == self._keys.shape[0] else self._keys[mx.array(self._rows)]
        first = _hash32(_hash32(counts ^ keys[:, 0]) + keys[:, 1])
        return mx.stack([first, _hash32(first ^ (keys[:, 0] + 0x7F4A7C15))], axis=-1)

    def uniform_ids(self, shape: Sequence[int], vocab_size: int) -> mx.array:
        """Uniform ids in [0, vocab_size), shape[0] rows (one per selected
        row), from 32 bits each (Lemire's multiply-shift: bias below V / 2^32)."""
        keys = self.step_key()
        bits = _counter_bits(keys, math.prod(shape) // keys.shape[0])
        return ((bits.astype(mx.uint64) * vocab_size) >> 32).astype(mx.int32).reshape(shape)

    def categorical(self, weights: mx.array) -> mx.array:
        """One draw per position from the distribution proportional to
        `weights` ([rows, ..., V], unnormalised probabilities over the last
        axis), by inverting its cumulative sum with one uniform per position
        (`row_uniforms`, which the fused kernel draws too), where a Gumbel-max
        draw would take a logarithm of a logarithm of V uniforms."""
        lead = weights.shape[:-1]
        keys = self.step_key()
        u = row_uniforms(keys, math.prod(lead) // keys.shape[0]).reshape(*lead, 1)
        return inverse_cdf(weights, u)


def _hash32(x: mx.array) -> mx.array:
    """Wellons' lowbias32 on uint32 (metal/row_sampler.h's hash32)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


def _counter_bits(keys: mx.array, count: int) -> mx.array:
    """32 random bits for positions 0..count-1 under each key ([n, 2] -> [n, count])."""
    keys = keys.astype(mx.uint32).reshape(-1, 2)
    position = mx.arange(count, dtype=mx.uint32)
    return _hash32(_hash32(position ^ keys[:, :1]) + keys[:, 1:])


def row_uniforms(keys: mx.array, count: int) -> mx.array:
    """One uniform in (0, 1] per position under each key ([n, 2] or [2] ->
    [n, count]), counter-based: position p's is a hash of (key, p), 24 bits,
    as the fused kernel computes it, so kernel and MLX path draw the same
    tokens from the same keys, but for rounding at the boundaries of the
    cumulative sum."""
    return ((_counter_bits(keys, count) >> 8) + 1).astype(mx.float32) * 2.0**-24


def _block_size(vocab_size: int) -> int:
    """The largest divisor of V not above sqrt(V) (512 for 262144)."""
    return next(d for d in range(math.isqrt(vocab_size), 0, -1) if vocab_size % d == 0)


def inverse_cdf(weights: mx.array, u: mx.array) -> mx.array:
    """The first index whose cumulative weight reaches u times the total, per
    position ([..., V] weights, [..., 1] u in (0, 1]). Two levels (blocks of
    about sqrt(V), then within the chosen block), so the weights are read once
    and no V-sized cumulative sum is written."""
    *lead, V = weights.shape
    B = _block_size(V)
    blocked = weights.reshape(*lead, V // B, B)
    block_sums = blocked.sum(-1)
    block_cdf = mx.cumsum(block_sums, axis=-1)
    target = u * block_cdf[..., -1:]
    block = mx.minimum((block_cdf < target).sum(-1, keepdims=True), V // B - 1)
    before = mx.take_along_axis(block_cdf - block_sums, block, axis=-1)
    inside = mx.take_along_axis(blocked, block[..., None], axis=-2).squeeze(-2)
    offset = mx.minimum((before + mx.cumsum(inside, axis=-1) < target).sum(-1, keepdims=True), B - 1)
    return (block * B + offset).squeeze(-1).astype(mx.int32)


def linear_temperature(cur_step: int, max_denoising_steps: int, t_min: float, t_max: float) -> mx.array:
    """t_min + (t_max - t_min) * cur_step / N, in float32 as the reference computes it.

    `cur_step` counts down from N to 1 (steps remaining). A float64 temperature
    already changes logits visibly after a few self-conditioned steps.
    """
    fraction = mx.array(cur_step, dtype=mx.int32) / max_denoising_steps
    return mx.array(t_min, mx.float32) + mx.array(t_max - t_min, mx.float32) * fraction


@dataclass
class Prediction:
    """What one denoising step reads from the decoder's logits."""

    processed: Optional[mx.array]  # logits / temperature [B, C, V] (lazy); None from the fused kernel
    weights: Optional[mx.array]  # exp(processed - shift) [B, C, V]: unnormalised probabilities
    total: mx.array  # their sum [B, C, 1]
    argmax: mx.array  # [B, C] int32
    entropy: mx.array  # [B, C] float32, of softmax(processed)
    draw: mx.array  # [B, C] int32, one categorical draw per position (the denoiser canvas)
    top_k: Optional[tuple] = None  # from the fused kernel if asked: (ids, probabilities) [B, C, k]


def predict(
    logits: mx.array,
    temperature: mx.array,
    randomness,
    softcap: Optional[float] = None,
    weights_dtype: Optional[mx.Dtype] = mx.float32,
    fused: bool = False,
    top_k: Optional[int] = None,
) -> Prediction:
    """The step's prediction. With `softcap` the logits are the raw lm_head
    output, softcapped here first. With `fused` (for a caller that found
    `fused_sampler_ready`, and randomness that is a `Randomness`), one
    kernel reads the logits once and writes the weights in `weights_dtype`
    (None: no weights), and with `top_k` the k most probable ids too.
    Otherwise the MLX path: softmax as the reference computes it
    (exp(x - max) / sum), entropy as logsumexp - E[x] from the same
    exponentials, the draw from their cumulative sums. Both draw with
    `row_uniforms` from the same key, so they draw the same tokens but for
    rounding where a uniform meets a boundary of the cumulative sum."""
    if fused:
        out = kernels.row_sample(logits, temperature, randomness.step_key(), softcap, weights_dtype, top_k)
        return Prediction(None, out.weights, out.total[..., None], out.argmax, out.entropy, out.draw, out.top_k)
    if softcap is not None:
        logits = logit_softcap(softcap, logits.astype(mx.float32))
    weights, total, argmax, entropy = _distribution(logits, temperature)
    draw = randomness.categorical(weights).astype(mx.int32)
    # lazy: computed (once more, the same values) only if the caller reads it
    processed = logits / temperature
    return Prediction(processed, weights, total, argmax, entropy, draw)


@mx.compile
def _distribution(logits: mx.array, temperature: mx.array) -> tuple:
    """Compiled, so the elementwise passes fuse and nothing V-sized but the
    weights is written: the division, the shift and the exponential are one
    pass over the logits, as are the products the entropy sums."""
    processed = logits / temperature
    argmax = processed.argmax(axis=-1).astype(mx.int32)
    top = mx.take_along_axis(processed, argmax[..., None], axis=-1)
    shifted = processed - top
    weights = mx.exp(shifted)
    total = weights.sum(axis=-1, keepdims=True)
    # a -inf logit adds 0 * (lowest float), not 0 * -inf; finite rows are unchanged, and
    # a maximum costs no more than the multiply it fuses with (where a select cost 2%)
    surprise = weights * mx.maximum(shifted, mx.finfo(shifted.dtype).min)
    entropy = (mx.log(total) - surprise.sum(axis=-1, keepdims=True) / total).squeeze(-1)
    return weights, total, argmax, entropy


_fused_checked: dict = {}  # (backend, logits dtype, weights dtype, softcapped, vocab size, top k) -> passed


def fused_sampler_ready(
    dtype: mx.Dtype,
    weights_dtype: Optional[mx.Dtype],
    softcap: Optional[float],
    vocab_size: int,
    top_k: Optional[int] = None,
) -> bool:
    """Whether the fused kernel runs here and, the first time in this process
    for these dtypes and row length, agreed with the MLX path on rows of that
    length (-inf entries, one-hot and flat rows, a maximum far below the
    bound), launched as generation launches it. A kernel that fails to
    compile or launch, or disagrees, is reported once and never used: it
    must not emit wrong tokens."""
    backend = kernels.backend()
    if backend is None:
        return False
    signature = (backend, dtype, weights_dtype, softcap is not None, vocab_size, top_k)
    if signature not in _fused_checked:
        try:
            problems = fused_disagreements(*kernel_check_rows(dtype, softcap, vocab_size), softcap, weights_dtype, top_k)
        except Exception as error:  # a compile error, a launch failure
            problems = [f"{type(error).__name__}: {error}"]
        if problems:
            warnings.warn(
                f"the fused sampler kernel ({backend}, {dtype} logits, {weights_dtype} weights) is not used, "
                f"the MLX path is: it disagreed with the MLX path: {'; '.join(problems)}",
                RuntimeWarning,
                stacklevel=2,
            )
        _fused_checked[signature] = not problems
    return _fused_checked[signature]


def kernel_check_rows(dtype: mx.Dtype, softcap: Optional[float], vocab_size: int) -> tuple:
    """(logits [8, vocab_size], temperature, key) with the rows a kernel gets
    wrong first: random, with -inf entries, one-hot, flat (every index ties:
    the argmax is the first), a maximum far below the bound (cap /
    temperature; infinite without a softcap)."""
    rows, V = 8, vocab_size
    logits = mx.random.normal((rows, V), key=mx.random.key(0)) * (8.0 if softcap else 3.0)
    column = mx.arange(V)
    logits = mx.where((column % 7 == 3) & (mx.arange(rows)[:, None] == 1), -mx.inf, logits)
    logits[2] = mx.where(column == V - 1, 20.0, -20.0)
    logits[3] = 0.0
    logits[4] = logits[4] - (40.0 if softcap else 400.0)
    return logits.astype(dtype), mx.array(0.6, mx.float32), mx.random.key(1)


def fused_disagreements(logits, temperature, key, softcap, weights_dtype, top_k=None) -> list:
    """How the fused kernel's outputs on `logits` [R, V] differ from the MLX
    path's beyond rounding (empty if they do not): argmax exactly; entropy,
    logsumexp and probabilities closely; each draw must lie where the MLX
    path's cumulative weights cross its uniform, give or take rounding; the
    top k must be k distinct ids holding the k largest values (any of tied
    ones), with their probabilities."""
    got = kernels.row_sample(logits, temperature, key, softcap, weights_dtype, top_k)
    capped = logits.astype(mx.float32) if softcap is None else logit_softcap(softcap, logits.astype(mx.float32))
    weights, total, argmax, entropy = _distribution(capped, temperature)
    top = (capped / temperature).max(axis=-1)
    problems = []
    if not mx.array_equal(got.argmax, argmax).item():
        problems.append(f"argmax {got.argmax.tolist()} != {argmax.tolist()}")
    if not mx.allclose(got.entropy, entropy, rtol=1e-3, atol=1e-4).item():
        problems.append(f"entropy {got.entropy.tolist()} != {entropy.tolist()}")
    if not mx.allclose(got.logsumexp, top + mx.log(total[..., 0]), rtol=1e-5, atol=1e-4).item():
        problems.append("logsumexp")
    probs = weights / total
    if got.weights is not None:
        rtol = 1e-4 if weights_dtype == mx.float32 else 1e-2  # float32: summation order over V terms
        got_probs = got.weights.astype(mx.float32) / got.total[..., None]
        if not mx.allclose(got_probs, probs, rtol=rtol, atol=1e-7).item():
            problems.append(f"probabilities (max error {mx.abs(got_probs - probs).max().item():.3g})")
    if top_k is not None:  # a row with m < k finite entries: those m, then any ids at probability 0
        ids, top_probs = (np.array(a) for a in got.top_k)
        z, p = np.array(capped / temperature), np.array(probs)
        for row in range(z.shape[0]):
            m = min(top_k, int(np.isfinite(z[row]).sum()))
            order = np.argsort(-top_probs[row], kind="stable")
            real, rest = ids[row][order[:m]], order[m:]
            want = np.sort(z[row])[::-1][:m]
            if len(set(real.tolist())) != m or not np.allclose(np.sort(z[row, real])[::-1], want, rtol=1e-5):
                problems.append(f"row {row}'s top {top_k} ids")
            elif not np.allclose(top_probs[row][order[:m]], p[row, real], rtol=1e-4, atol=1e-9) or top_probs[row][rest].any():
                problems.append(f"row {row}'s top {top_k} probabilities")
    # in float64: the MLX path's float32 total is itself off by ~1e-5 over 40000 terms
    cdf = np.cumsum(np.array(weights, np.float64), axis=-1)
    cdf /= cdf[:, -1:]
    u = np.array(row_uniforms(key, cdf.shape[0]), np.float64).reshape(-1)
    for row, (d, c) in enumerate(zip(got.draw.tolist(), cdf)):
        before = c[d - 1] if d > 0 else 0.0
        if not (0 <= d < c.size and c[d] > before and before <= u[row] + 1e-5 and c[d] >= u[row] - 1e-5):
            problems.append(f"row {row} drew {d}, where the cumulative probabilities do not cross {u[row]:.6f}")
    return problems


@dataclass(frozen=True)
class Predictor:
    """How each step of a canvas reads the decoder's logits, as
    `choose_prediction` chose: `predictor(logits, temperature, draws)` is the
    step's `Prediction`, `predictor.self_conditioning(prediction)` the next
    decoder call's input, and `raw_logits` what the decoder must return."""

    dtype: mx.Dtype  # the model's
    top_k: Optional[int] = None  # top-k self-conditioning's k; None: exact
    fused: bool = False  # the fused kernel (else the MLX path)
    softcap: Optional[float] = None  # the kernel softcaps the raw lm_head output as it reads
    weights_dtype: Optional[mx.Dtype] = None  # the kernel's weights (None: not written)
    kernel_top_k: Optional[int] = None  # the kernel picks the k ids itself

    @property
    def raw_logits(self) -> bool:
        return self.fused

    def __call__(self, logits: mx.array, temperature: mx.array, randomness) -> Prediction:
        if self.fused:
            return predict(logits, temperature, randomness, self.softcap, self.weights_dtype, True, self.kernel_top_k)
        return predict(logits, temperature, randomness)

    def self_conditioning(self, prediction: Prediction) -> SelfConditioningInput:
        return next_self_conditioning(prediction, self.dtype, self.top_k)


def choose_prediction(
    dtype: mx.Dtype,
    vocab_size: int,
    softcap: Optional[float],
    randomness,
    *,
    self_conditioning_k: Optional[int] = None,
    acceptance: str = "entropy_bound",
    fused_sampling: bool = True,
) -> Predictor:
    """The kernel policy, decided once per canvas for a model of `dtype`
    whose head softcaps at `softcap`. `self_conditioning_k`: top-k
    self-conditioning's k (None: exact); `acceptance`: the acceptance's name
    ("confidence" reads the step's probabilities).

    The fused kernel runs with `fused_sampling`, for `Randomness` draws (a
    replay of recorded draws takes the MLX path), once `fused_sampler_ready`
    agrees. It reads the raw lm_head output (softcapped inside) and writes
    the self-conditioning weights in bfloat16 for a bfloat16 model, else in
    float32 (float16 would underflow against the kernel's bound); for top-k
    self-conditioning it picks the k ids itself (k <= 64), and then writes
    weights only for confidence acceptance."""
    top_k = self_conditioning_k
    kernel_top_k = top_k if top_k is not None and top_k <= min(kernels.MAX_TOP_K, vocab_size - 1) else None
    weights_dtype = mx.bfloat16 if dtype == mx.bfloat16 else mx.float32
    if kernel_top_k is not None and acceptance != "confidence":
        weights_dtype = None
    fused = (
        fused_sampling
        and isinstance(randomness, Randomness)
        and fused_sampler_ready(dtype, weights_dtype, softcap, vocab_size, kernel_top_k)
    )
    if not fused:
        return Predictor(dtype, top_k)
    return Predictor(dtype, top_k, True, softcap, weights_dtype, kernel_top_k)


def next_self_conditioning(
    prediction: Prediction, dtype: mx.Dtype, top_k: Optional[int] = None
) -> SelfConditioningInput:
    """The next decoder call's self-conditioning input. The reference passes
    the processed logits cast to the embedding dtype and softmaxes them in
    float32; in a float32 model that cast changes nothing, so the step's own
    probabilities are the same and save a softmax over the logits.

    With `top_k` below the vocabulary size, only the k most probable tokens
    and their exact probabilities (weights / total, in float32 whatever the
    dtype), not renormalised over the k: each kept term of the embedding sum
    is the exact mode's term, only the tail is dropped. This skips the
    [C, V] @ [V, H] product. k >= V keeps every term: that is the exact mode,
    so it takes the exact path (the same sum in another order rounds
    differently, and the feedback amplifies that into other tokens)."""
    if prediction.top_k is not None:  # the fused kernel's
        return TopK(*prediction.top_k)
    if top_k is not None and top_k < prediction.weights.shape[-1]:
        ids = top_k_indices(prediction.weights, top_k)
        probs = mx.take_along_axis(prediction.weights, ids, axis=-1) / prediction.total
        return TopK(ids, probs)
    if dtype == mx.float32 or prediction.processed is None:  # None: the fused kernel's weights, in dtype
        return Probabilities(prediction.weights, prediction.total)
    return prediction.processed.astype(dtype)


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

    def keep(self, rows: mx.array) -> None:
        pass

    def __call__(self, current: mx.array, prediction: Prediction) -> tuple[mx.array, mx.array]:
        order = mx.argsort(prediction.entropy, axis=-1)
        sorted_entropy = mx.take_along_axis(prediction.entropy, order, axis=-1)
        # sorted ascending, so each prefix's maximum is its last element
        selected = (mx.cumsum(sorted_entropy, axis=-1) - sorted_entropy) <= self.entropy_bound
        accepted = mx.put_along_axis(mx.zeros_like(selected), order, selected, axis=-1)
        return mx.where(accepted, prediction.draw, current), accepted


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

    def keep(self, rows: mx.array) -> None:
        """Keep only these rows of a batch (the others' canvases stopped)."""
        if self.frozen is not None:
            self.frozen = self.frozen[rows]

    def __call__(self, current: mx.array, prediction: Prediction) -> tuple[mx.array, mx.array]:
        frozen = mx.zeros(current.shape, mx.bool_) if self.frozen is None else self.frozen
        denoised = prediction.draw
        probability = mx.take_along_axis(prediction.weights, denoised[..., None], axis=-1) / prediction.total
        probability = mx.where(frozen, -1.0, probability.squeeze(-1))
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

    def keep(self, rows: mx.array) -> None:
        """Keep only these rows of a batch (the others' canvases stopped)."""
        if self.history is not None:
            self.history = self.history[:, rows]


def top_k_indices(values: mx.array, k: int) -> mx.array:
    """The indices of the k largest values over the last axis ([..., V] ->
    [..., k], in no particular order; 1 <= k <= V).

    Two levels, as `inverse_cdf`: the k blocks with the largest maxima hold
    the top k (a block left out has k larger values elsewhere), so only those
    k * B candidates are partitioned, B about sqrt(V / k). On a 2-core CPU,
    over [1, 256, 262144] float32: 71 ms for k = 64, where one argpartition
    over V takes 860 ms, four times the dense product top-k replaces."""
    *lead, V = values.shape
    size = next(d for d in range(max(math.isqrt(V // k), 1), 0, -1) if V % d == 0)  # ~sqrt(V / k), divides V
    n = V // size
    blocks = values.reshape(*lead, n, size)
    best = mx.argpartition(blocks.max(axis=-1), kth=n - k, axis=-1)[..., n - k :]
    candidates = mx.take_along_axis(blocks, best[..., None], axis=-2).reshape(*lead, k * size)
    inside = mx.argpartition(candidates, kth=k * size - k, axis=-1)[..., k * size - k :]
    return mx.take_along_axis(best, inside // size, axis=-1) * size + inside % size
