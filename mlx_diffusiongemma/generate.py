"""Block-diffusion generation: the reference sampler loop and its streaming
events (the `python -m mlx_diffusiongemma.generate` command is in cli.py).

The default is transformers' `DiffusionGemmaGenerationMixin.generate`, step for
step and draw for draw; faster paths must never change what it produces.
"""

import copy
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Iterator, Optional, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, KVCache

from .chat import render_prompt, split_thinking
from .config import check_range, token_ids
from .kernels import MAX_TOP_K
from .sampling import (
    ConfidenceAcceptance,
    EntropyBoundAcceptance,
    Randomness,
    StableAndConfidentStopping,
    fused_sampler_ready,
    linear_temperature,
    predict,
    renoise,
    top_k_indices,
)

PREFILL_STEP_SIZE = 2048  # mlx-lm's default
ACCEPTANCE = ("entropy_bound", "confidence")
SELF_CONDITIONING = ("exact", "top-k")


@dataclass(frozen=True)
class DiffusionOptions:
    """Sampler settings. Defaults are the reference's; a checkpoint's
    generation_config.json overrides them, and keyword arguments override both."""

    max_tokens: int = 256
    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    eos_token_id: tuple = ()  # empty: generate whole canvases until max_tokens
    pad_token_id: Optional[int] = None  # None: tokens_per_forward counts every generated token
    acceptance: str = "entropy_bound"  # or "confidence"
    min_confidence: float = 0.9  # for acceptance="confidence"
    self_conditioning: str = "exact"  # or "top-k": the k most probable tokens' embeddings only
    # 64: k >= 4 matched exact on all 400 study runs (V 260); 64 keeps a margin at 1/3 the dense cost (V 262144)
    self_conditioning_k: int = 64  # for self_conditioning="top-k"
    # on a GPU, the fused sampler kernel (checked against the MLX path first); False forces the MLX path
    fused_sampling: bool = True

    @classmethod
    def resolve(cls, model, tokenizer, overrides: dict) -> "DiffusionOptions":
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(unknown)}")
        values = _from_generation_config(getattr(model, "generation_config", {}))
        if "eos_token_id" not in values and tokenizer is not None:
            values["eos_token_id"] = sorted(tokenizer.eos_token_ids)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["eos_token_id"] = tuple(token_ids(values.get("eos_token_id", ())))  # check_token_ids names a bad one
        options = cls(**values)
        cls.check(asdict(options))
        options.check_token_ids(model.args.vocab_size)
        return options

    @staticmethod
    def check(values: dict) -> None:
        """The rules that need no model, for the options `values` holds (a
        partial dict too): the CLI applies them to its flags before loading."""

        def integer(name, low):
            if name in values:  # mlx counts steps and tokens in int32
                check_range(name, values[name], low, 2**31, integer=True, expected=f"an integer >= {low}",
                            beyond="an integer below 2**31")

        def number(name, positive):
            if name not in values:
                return
            value = values[name]
            check_range(name, value, 0, low_inclusive=not positive, expected=f"a number {'> 0' if positive else '>= 0'}")
            if not ((0 < _float32(value) if positive else True) and _float32(value) < math.inf):
                raise ValueError(f"{name} must be a number float32 holds (the sampler computes in float32), got {value!r}")

        integer("max_tokens", 1)
        integer("max_denoising_steps", 1)
        integer("stability_threshold", 0)
        number("t_min", positive=False)
        number("t_max", positive=False)
        if "t_min" in values and "t_max" in values and _float32(values["t_max"]) <= _float32(values["t_min"]):
            in_float32 = " in float32 (the sampler computes in float32)" if values["t_max"] > values["t_min"] else ""
            raise ValueError(
                f"t_max must be greater than t_min{in_float32}, got t_max={values['t_max']} and t_min={values['t_min']}"
            )
        number("entropy_bound", positive=True)
        number("confidence_threshold", positive=True)
        if values.get("acceptance", ACCEPTANCE[0]) not in ACCEPTANCE:
            raise ValueError(f"acceptance must be one of {sorted(ACCEPTANCE)}, got {values['acceptance']!r}")
        if "min_confidence" in values:
            in_range = dict(low_inclusive=False, high_inclusive=True, expected="in (0, 1]")
            check_range("min_confidence", values["min_confidence"], 0, 1, **in_range)
            check_range("min_confidence", _float32(values["min_confidence"]), 0, 1, **in_range)
        if values.get("self_conditioning", SELF_CONDITIONING[0]) not in SELF_CONDITIONING:
            raise ValueError(
                f"self_conditioning must be one of {sorted(SELF_CONDITIONING)}, got {values['self_conditioning']!r}"
            )
        integer("self_conditioning_k", 1)
        if not isinstance(values.get("fused_sampling", True), bool):
            raise ValueError(f"fused_sampling must be True or False, got {values['fused_sampling']!r}")

    def check_token_ids(self, vocab_size: int) -> None:
        """The rules that need the model's vocabulary."""
        pad = () if self.pad_token_id is None else (self.pad_token_id,)
        for name, ids in (("eos_token_id", self.eos_token_id), ("pad_token_id", pad)):
            for token in ids:
                if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < vocab_size:
                    raise ValueError(f"{name} must hold token ids in [0, {vocab_size}), got {getattr(self, name)!r}")

    def make_acceptance(self):
        if self.acceptance == "confidence":
            return ConfidenceAcceptance(self.min_confidence)
        return EntropyBoundAcceptance(self.entropy_bound)


def _float32(value) -> float:
    """A number as the sampler holds it: rounded to float32 (inf past its range)."""
    try:
        value = float(value)
    except OverflowError:  # an int past float64's range
        return math.inf if value > 0 else -math.inf
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def _from_generation_config(config) -> dict:
    """Options a generation_config.json sets (nulls mean unset)."""
    names = {f.name for f in fields(DiffusionOptions)} | {"max_new_tokens", "sampler_config"}
    values = {k: v for k, v in config.items() if k in names and v is not None}
    if "max_new_tokens" in values:
        values["max_tokens"] = values.pop("max_new_tokens")
    sampler = values.pop("sampler_config", None)
    if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
        values["entropy_bound"] = sampler["entropy_bound"]
    return values


@dataclass
class Draft:
    """One denoising step. Its values stay mlx arrays until read, so a caller
    that only counts steps costs the loop no host transfer."""

    canvas: int  # index of the canvas being denoised, from 0
    step: int  # denoising steps taken on this canvas, from 1
    argmax: mx.array = field(repr=False)  # [C] the argmax canvas so far
    kept: mx.array = field(repr=False)  # positions the acceptance kept in this step
    entropy: mx.array = field(repr=False)  # mean entropy of the step's prediction
    tokenizer: object = field(default=None, repr=False)
    row: int = 0  # the prompt's index in a batch

    @property
    def tokens(self) -> list:
        return self.argmax.tolist()

    @property
    def accepted(self) -> int:
        return self.kept.item()

    @property
    def mean_entropy(self) -> float:
        return self.entropy.item()

    @property
    def text(self) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(self.tokens)


@dataclass
class Commit:
    """A canvas committed to the sequence: its tokens up to eos / max_tokens."""

    canvas: int
    tokens: list
    text: str  # the new text segment (streaming detokenizer)
    row: int = 0  # the prompt's index in a batch


@dataclass
class DiffusionResponse:
    """The final event, and what `diffusion_generate` returns. Statistics are
    named like mlx-lm's GenerationResponse where they overlap."""

    text: str  # the answer, without the thought channel
    thinking: str
    tokens: list  # generated ids, without eos and padding
    finish_reason: str  # "stop" (eos) or "length"
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    canvases: int
    denoising_steps: int
    tokens_per_forward: float  # the reference's definition: non-pad tokens of whole canvases / decoder passes
    wall_time: float  # seconds, from the start of the call to this row's end
    row: int = 0  # the prompt's index in a batch


def _token_ids(ids, vocab_size: int, what: str) -> mx.array:
    array = np.asarray(ids.tolist() if isinstance(ids, mx.array) else ids)
    if array.size == 0:
        raise ValueError(f"{what} is empty")
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be a string or a 1-D sequence of token ids, got shape {array.shape}")
    if array.min() < 0 or array.max() >= vocab_size:
        raise ValueError(f"{what} holds ids outside [0, {vocab_size}): {array.min()}..{array.max()}")
    return mx.array(array, dtype=mx.int32)


def denoise_canvas(model, cache, canvas, opts: DiffusionOptions, randomness, acceptance, stopping):
    """The reference's denoising loop over a batch of canvases [B, C] (one
    per row of `cache` and `randomness`), steps N..1. After each step it
    yields the rows it took (indices into the batch), their argmax canvases
    [b, C], counts of kept positions [b] and mean entropies [b] (mlx arrays);
    a row's last argmax is its canvas to commit. A row whose canvas has
    stopped sits the remaining steps out, as the reference freezes it
    (`finished_denoising`), and is dropped from the batch rather than
    computed and thrown away."""
    C, V, N = model.args.canvas_length, model.args.vocab_size, opts.max_denoising_steps
    top_k = opts.self_conditioning_k if opts.self_conditioning == "top-k" else None
    # the fused kernel reads the raw lm_head output (softcapped inside) and
    # writes the self-conditioning weights in bfloat16 for a bfloat16 model,
    # else in float32 (float16 would underflow against the kernel's bound);
    # for top-k self-conditioning it picks the k ids itself (k <= 64), and
    # then writes weights only for confidence acceptance
    softcap = model.args.final_logit_softcapping
    kernel_top_k = top_k if top_k is not None and top_k <= min(MAX_TOP_K, V - 1) else None
    weights_dtype = mx.bfloat16 if model.dtype == mx.bfloat16 else mx.float32
    if kernel_top_k is not None and opts.acceptance != "confidence":
        weights_dtype = None
    fused = (
        opts.fused_sampling
        and isinstance(randomness, Randomness)
        and fused_sampler_ready(model.dtype, weights_dtype, softcap, V, kernel_top_k)
    )
    rows = list(range(canvas.shape[0]))
    self_conditioning = {}
    acceptance.reset()
    stopping.reset()
    for cur_step in range(N, 0, -1):
        with mx.stream(generation_stream):
            logits = model.decode(canvas, cache, raw_logits=fused, **self_conditioning)
            temperature = linear_temperature(cur_step, N, opts.t_min, opts.t_max)
            draws = randomness.select(rows)
            if fused:
                prediction = predict(logits, temperature, draws, softcap, weights_dtype, True, kernel_top_k)
            else:
                prediction = predict(logits, temperature, draws)
            accepted, kept = acceptance(canvas, prediction)
            canvas = renoise(accepted, kept, draws.uniform_ids((len(rows), C), V))
            done = stopping(prediction.argmax, prediction.entropy)
            self_conditioning = _self_conditioning(prediction, model.dtype, top_k)
            argmax, kept_count, mean_entropy = prediction.argmax, kept.sum(-1), prediction.entropy.mean(-1)
            del logits, prediction  # vocabulary-sized: keep only what the next step reads
            mx.async_eval(canvas, argmax, self_conditioning, kept_count, mean_entropy, done)
        yield rows, argmax, kept_count, mean_entropy
        done = done.tolist()  # the step's one host synchronisation
        if all(done):
            return
        if any(done):
            going = [i for i, stopped in enumerate(done) if not stopped]
            rows = [rows[i] for i in going]
            index = mx.array(going)
            canvas = canvas[index]
            self_conditioning = tree_map(lambda x: x[index], self_conditioning)
            acceptance.keep(index)
            stopping.keep(index)
            cache = [filter_rows(c, index) for c in cache[: len(model.layers)]]


def filter_rows(cache, index: mx.array):
    """A batch cache of these rows only (a copy: the batch's own keeps every row)."""
    kept = copy.copy(cache)
    kept.filter(index)
    return kept


def _self_conditioning(prediction, dtype: mx.Dtype, top_k: Optional[int] = None) -> dict:
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
        return {"self_conditioning_top_k": prediction.top_k}
    if top_k is not None and top_k < prediction.weights.shape[-1]:
        ids = top_k_indices(prediction.weights, top_k)
        probs = mx.take_along_axis(prediction.weights, ids, axis=-1) / prediction.total
        return {"self_conditioning_top_k": (ids, probs)}
    if dtype == mx.float32 or prediction.processed is None:  # None: the fused kernel's weights, in dtype
        return {"self_conditioning_probs": (prediction.weights, prediction.total)}
    return {"self_conditioning_logits": prediction.processed.astype(dtype)}


def stream_diffusion_generate(
    model,
    tokenizer,
    prompt,
    *,
    system_prompt: Optional[str] = None,
    enable_thinking: bool = False,
    use_chat_template: bool = True,
    seed: Optional[int] = None,
    randomness=None,
    decoder_input_ids=None,
    **options,
) -> Iterator[Union[Draft, Commit, DiffusionResponse]]:
    """Generate canvas by canvas, yielding a `Draft` per denoising step, a
    `Commit` per canvas and finally the `DiffusionResponse`.

    `prompt` is a string (rendered with the chat template unless
    `use_chat_template=False`) or token ids, or a list of those: a batch,
    denoised together, one canvas per prompt; every event then names its
    prompt (`row`), and each prompt ends with its own `DiffusionResponse`
    when it stops (eos, `max_tokens`, the model's context). Each prompt
    generates what it generates alone with the same draws: with `seed`,
    prompt r draws as a prompt alone does with `seed + r`. `options` are
    `DiffusionOptions` fields. `decoder_input_ids` replaces the first
    canvas's random start ([C], or [B, C] for a batch).
    """
    args = model.args
    opts = DiffusionOptions.resolve(model, tokenizer, options)
    batch = _is_batch(prompt)
    prompts = [
        _prompt_ids(p, tokenizer, args, f"prompt {i}" if batch else "prompt", system_prompt, enable_thinking, use_chat_template)
        for i, p in enumerate(prompt if batch else [prompt])
    ]
    B, C, V = len(prompts), args.canvas_length, args.vocab_size
    first_canvas = None if decoder_input_ids is None else _first_canvas(decoder_input_ids, B, C, V)
    if randomness is not None and seed is not None:
        raise ValueError("pass either seed or randomness, not both")
    randomness = randomness or Randomness(seed, rows=B)
    acceptance = opts.make_acceptance()
    stopping = StableAndConfidentStopping(opts.stability_threshold, opts.confidence_threshold)
    canvases = [min(math.ceil(opts.max_tokens / C), (args.max_position_embeddings - p.size) // C) for p in prompts]
    rows = [_Row(p.size, n, None if tokenizer is None else tokenizer.detokenizer) for p, n in zip(prompts, canvases)]

    # as mlx-lm's generate: weights wired on Metal, compute on its generation stream
    with wired_limit(model, [generation_stream]):
        start = time.perf_counter()
        with mx.stream(generation_stream):
            cache = prefill(model, prompts)
        prompt_end = time.perf_counter()
        for row in rows:
            row.prompt_time = prompt_end - start

        going = list(range(B))  # rows still generating, in the batch's order
        for index in range(max(canvases)):
            # drawn even when the caller gives a canvas, as the reference does
            canvas = randomness.select(going).uniform_ids((len(going), C), V)
            if index == 0 and first_canvas is not None:
                canvas = first_canvas
            last = {}
            steps = denoise_canvas(model, cache, canvas, opts, randomness.select(going), acceptance, stopping)
            for step, (stepped, argmax, kept_count, mean_entropy) in enumerate(steps, start=1):
                for i, position in enumerate(stepped):
                    r = going[position]
                    rows[r].passes += 1
                    last[position] = argmax[i]
                    yield Draft(index, step, argmax[i], kept_count[i], mean_entropy[i], tokenizer, r)

            committed = mx.stack([last[position] for position in range(len(going))])
            still = []
            for position, tokens in enumerate(committed.tolist()):
                r = going[position]
                new, finished = rows[r].commit(tokens, index, opts)
                yield Commit(index, new, rows[r].segment(new, finished), r)
                if finished:
                    yield rows[r].response(r, tokenizer, opts, C, start, prompt_end)
                else:
                    still.append(position)
            if not still:
                break
            if len(still) < len(going):
                keep = mx.array(still)
                cache = [filter_rows(c, keep) for c in cache[: len(model.layers)]]
                committed = committed[keep]
                going = [going[p] for p in still]
            with mx.stream(generation_stream):
                model.encode(committed, cache)  # the next canvas attends to this one


@dataclass
class _Row:
    """One prompt's progress through a generation, and its statistics."""

    prompt_tokens: int
    canvases: int  # the most it may commit (max_tokens, the model's context)
    detokenizer: object
    prompt_time: float = 0.0
    passes: int = 0
    sequence: list = field(default_factory=list)  # committed canvases, the reference's padding included
    tokens: list = field(default_factory=list)  # generated ids, without eos and padding
    finish_reason: str = "length"

    def commit(self, committed: list, index: int, opts: DiffusionOptions) -> tuple:
        """Take canvas `index`: (its new tokens, whether the row has finished)."""
        C = len(committed)
        eos = next((i for i, t in enumerate(committed) if t in opts.eos_token_id), None)
        room_left = opts.max_tokens - len(self.tokens)
        new = committed[: min(room_left, C if eos is None else eos)]
        if eos is not None:
            self.finish_reason = "stop" if eos < room_left else "length"
            if opts.pad_token_id is not None:  # the reference pads what follows the first eos
                committed = committed[: eos + 1] + [opts.pad_token_id] * (C - eos - 1)
        self.sequence.extend(committed)
        self.tokens.extend(new)
        return new, eos is not None or index + 1 == self.canvases

    def segment(self, new: list, finished: bool) -> str:
        if self.detokenizer is None:
            return ""
        for t in new:
            self.detokenizer.add_token(t)
        if finished:
            self.detokenizer.finalize()
        return self.detokenizer.last_segment

    def response(self, row: int, tokenizer, opts: DiffusionOptions, C: int, start: float, prompt_end: float):
        end = time.perf_counter()
        thinking, text = split_thinking(tokenizer, self.tokens) if tokenizer is not None else ("", "")
        valid = len(self.sequence) if opts.pad_token_id is None else sum(t != opts.pad_token_id for t in self.sequence)
        return DiffusionResponse(
            text=text,
            thinking=thinking,
            tokens=self.tokens,
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            prompt_tps=self.prompt_tokens / max(self.prompt_time, 1e-9),
            generation_tokens=len(self.tokens),
            generation_tps=len(self.tokens) / max(end - prompt_end, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            canvases=len(self.sequence) // C,
            denoising_steps=self.passes,
            tokens_per_forward=valid / self.passes,
            wall_time=end - start,
            row=row,
        )


def _is_batch(prompt) -> bool:
    """A list (or tuple) of prompts, each a string or a sequence of ids; a
    list of ids is one prompt."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], (int, np.integer))


def _prompt_ids(prompt, tokenizer, args, what: str, system_prompt, enable_thinking, use_chat_template) -> mx.array:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{what} is empty")
        prompt = render_prompt(
            tokenizer, prompt, system_prompt, enable_thinking, use_chat_template, args.max_position_embeddings
        )
    ids = _token_ids(prompt, args.vocab_size, what)
    if (args.max_position_embeddings - ids.size) // args.canvas_length < 1:
        raise ValueError(
            f"{what} has {ids.size} tokens; with a canvas of {args.canvas_length} it does not fit the model's "
            f"context of {args.max_position_embeddings} tokens"
        )
    return ids


def _first_canvas(decoder_input_ids, rows: int, C: int, V: int) -> mx.array:
    """The caller's first canvas as [rows, C]: [C] (or [1, C]) for one prompt, [B, C] for a batch."""
    ids = np.asarray(decoder_input_ids.tolist() if isinstance(decoder_input_ids, mx.array) else decoder_input_ids)
    if rows == 1 and ids.size == C:
        ids = ids.reshape(1, C)
    if ids.shape != (rows, C):
        expected = f"exactly canvas_length={C} ids (one whole canvas)" if rows == 1 else f"shape [{rows}, {C}] (a canvas per prompt)"
        raise ValueError(f"decoder_input_ids must hold {expected}, got shape {list(ids.shape)}")
    return mx.stack([_token_ids(row, V, "decoder_input_ids") for row in ids])


def prefill(model, prompts: list) -> list:
    """The layer caches holding the prompts ([L] id arrays).

    One prompt: chunks of 2048, then the last token alone, as mlx-lm's
    generate_step prefills; mlx_lm.generate driving our model then builds a
    bit-identical cache, and so (same seed) the same text. Several: left-padded
    into mlx-lm's batch caches (each row's tokens end at the same index, the
    padding masked) in one encoder pass per chunk. No chunk there is a single
    token: mlx-lm's BatchRotatingKVCache writes one token in place, and a
    multi-token write after that (the next canvas's commit) loses track of a
    short row's padding (mlx-lm 0.32)."""
    cache = model.make_cache()
    if len(prompts) == 1:
        ids = prompts[0]
        if ids.size > 1:
            model.encode(ids[:-1], cache, chunk_size=PREFILL_STEP_SIZE)
        model.encode(ids[-1:], cache)
        return cache
    length = max(ids.size for ids in prompts)
    padding = [length - ids.size for ids in prompts]
    cache = [
        BatchKVCache(padding) if isinstance(c, KVCache) else BatchRotatingKVCache(c.max_size, padding)
        for c in cache[: len(model.layers)]
    ]
    padded = mx.stack([mx.concatenate([mx.zeros((pad,), mx.int32), ids]) for pad, ids in zip(padding, prompts)])
    begin = 0
    while begin < length:
        size = min(PREFILL_STEP_SIZE, length - begin)
        size -= length - begin - size == 1  # never leave a last chunk of one token
        model.encode(padded[:, begin : begin + size], cache, chunk_size=size)
        begin += size
    return cache


def diffusion_generate(model, tokenizer, prompt, **kwargs):
    """Generate and return the final `DiffusionResponse`, or for a list of
    prompts one per prompt, in their order (see `stream_diffusion_generate`
    for the arguments)."""
    responses = {}
    for event in stream_diffusion_generate(model, tokenizer, prompt, **kwargs):
        if isinstance(event, DiffusionResponse):
            responses[event.row] = event
    return [responses[r] for r in sorted(responses)] if _is_batch(prompt) else responses[0]


if __name__ == "__main__":  # the command lives in cli.py, beside the package's other command pieces
    from .cli import main

    sys.exit(main())
