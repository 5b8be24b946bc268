"""The generation loop: the reference's, step for step and draw for draw
(transformers' `DiffusionGemmaGenerationMixin.generate`), for one prompt or
a batch: the prompts' checks, prefill, canvas by canvas the denoising loop,
and each row's bookkeeping (commits, eos, statistics). Faster paths (the
fused kernel, sampling.py's policy) must never change what it produces.
"""

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from mlx_lm.generate import generation_stream, wired_limit

from ..cache_views import batch_caches
from ..chat import split_thinking
from ..model import Images, chunk_bounds
from ..sampling import Randomness, StableAndConfidentStopping, choose_prediction, linear_temperature, renoise
from .events import Commit, DiffusionResponse, Draft
from .options import DiffusionOptions
from .prompts import first_canvas, is_batch, prepare_prompts

PREFILL_STEP_SIZE = 2048  # mlx-lm's default


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
    images=None,
    max_soft_tokens: Optional[int] = None,
    **options,
) -> Iterator[Union[Draft, Commit, DiffusionResponse]]:
    """Generate canvas by canvas, yielding a `Draft` per denoising step, a
    `Commit` per canvas and finally the `DiffusionResponse`.

    `prompt` is a string (rendered with the chat template unless
    `use_chat_template=False`), chat messages (rendered with the chat
    template; image items may carry their image) or token ids, or a list
    of those: a batch,
    denoised together, one canvas per prompt; every event then names its
    prompt (`row`), and each prompt ends with its own `DiffusionResponse`
    when it stops (eos, `max_tokens`, the model's context). Each prompt
    generates what it generates alone with the same draws: with `seed`,
    prompt r draws as a prompt alone does with `seed + r`. `options` are
    `DiffusionOptions` fields. `decoder_input_ids` replaces the first
    canvas's random start ([C], or [B, C] for a batch).

    `images` (paths, PIL images or arrays) go with the prompt: a list for
    one prompt, for a batch a list of each prompt's list (or None). A text
    prompt's images come before its text; a raw prompt
    (`use_chat_template=False`) and chat messages place them where they
    hold the image token, and token ids hold each image's expanded soft
    tokens. `max_soft_tokens` (70, 140, 280, 560 or 1120; default the
    checkpoint's processor setting) bounds each image's soft tokens.
    """
    # 1. options: the checkpoint's generation config, then the caller's
    args = model.args
    opts = DiffusionOptions.resolve(model, tokenizer, options)

    # 2. prompts (and the first canvas, if given) as checked token ids, with their images' pixels
    prepared = prepare_prompts(
        prompt,
        images,
        tokenizer,
        model,
        max_soft_tokens,
        system_prompt=system_prompt,
        enable_thinking=enable_thinking,
        use_chat_template=use_chat_template,
    )
    prompts = [p.ids for p in prepared]
    B, C, V = len(prompts), args.canvas_length, args.vocab_size
    start_canvas = None if decoder_input_ids is None else first_canvas(decoder_input_ids, B, C, V)

    # 3. the sampler's pieces: draws, acceptance, stopping; each row's budget of canvases
    if randomness is not None and seed is not None:
        raise ValueError("pass either seed or randomness, not both")
    randomness = randomness or Randomness(seed, rows=B)
    acceptance = opts.make_acceptance()
    stopping = StableAndConfidentStopping(opts.stability_threshold, opts.confidence_threshold)
    canvases = [min(math.ceil(opts.max_tokens / C), (args.max_position_embeddings - p.size) // C) for p in prompts]
    rows = [_Row(p.size, n, None if tokenizer is None else tokenizer.detokenizer) for p, n in zip(prompts, canvases)]

    # as mlx-lm's generate: weights wired on Metal, compute on its generation stream
    with wired_limit(model, [generation_stream]):
        # 4. prefill: the images through the vision tower, the prompts into the cache
        start = time.perf_counter()
        with mx.stream(generation_stream):
            features = [model.embed_images(p.pixel_values, p.position_ids) if p.counts else None for p in prepared]
            cache = prefill(model, prompts, features)
        prompt_end = time.perf_counter()
        for row in rows:
            row.prompt_time = prompt_end - start

        going = list(range(B))  # rows still generating, in the batch's order
        for index in range(max(canvases)):
            # 5. a random canvas per row (drawn even when the caller gives one, as the reference does)
            canvas = randomness.select(going).uniform_ids((len(going), C), V)
            if index == 0 and start_canvas is not None:
                canvas = start_canvas

            # 6. denoise it, a Draft per row and step
            last = {}
            steps = denoise_canvas(model, cache, canvas, opts, randomness.select(going), acceptance, stopping)
            for step, (stepped, argmax, kept_count, mean_entropy) in enumerate(steps, start=1):
                for i, position in enumerate(stepped):
                    r = going[position]
                    rows[r].passes += 1
                    last[position] = argmax[i]
                    yield Draft(index, step, argmax[i], kept_count[i], mean_entropy[i], tokenizer, r)

            # 7. commit each row's last argmax canvas; a row ends at eos, max_tokens or the context
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

            # 8. the rows that go on encode their canvas: the next canvas attends to it
            if len(still) < len(going):
                keep = mx.array(still)
                cache = [filter_rows(c, keep) for c in cache[: len(model.layers)]]
                committed = committed[keep]
                going = [going[p] for p in still]
            with mx.stream(generation_stream):
                model.encode(committed, cache)


def diffusion_generate(model, tokenizer, prompt, **kwargs):
    """Generate and return the final `DiffusionResponse`, or for a list of
    prompts one per prompt, in their order (see `stream_diffusion_generate`
    for the arguments)."""
    responses = {}
    for event in stream_diffusion_generate(model, tokenizer, prompt, **kwargs):
        if isinstance(event, DiffusionResponse):
            responses[event.row] = event
    return [responses[r] for r in sorted(responses)] if is_batch(prompt) else responses[0]


def denoise_canvas(model, cache, canvas, opts: DiffusionOptions, randomness, acceptance, stopping):
    """The reference's denoising loop over a batch of canvases [B, C] (one
    per row of `cache` and `randomness`), steps N..1. After each step it
    yields the rows it took (indices into the batch), their argmax canvases
    [b, C], counts of kept positions [b] and mean entropies [b] (mlx arrays);
    a row's last argmax is its canvas to commit. A row whose canvas has
    stopped sits the remaining steps out, as the reference freezes it
    (`finished_denoising`), and is dropped from the batch rather than
    computed and thrown away. How a step reads the logits (the fused kernel
    or the MLX path) and what it feeds back is sampling.py's choice."""
    C, V, N = model.args.canvas_length, model.args.vocab_size, opts.max_denoising_steps
    predictor = choose_prediction(
        model.dtype,
        V,
        model.args.final_logit_softcapping,
        randomness,
        self_conditioning_k=opts.self_conditioning_k if opts.self_conditioning == "top-k" else None,
        acceptance=opts.acceptance,
        fused_sampling=opts.fused_sampling,
    )
    rows = list(range(canvas.shape[0]))
    self_conditioning = None  # the first step has no previous prediction
    acceptance.reset()
    stopping.reset()
    for cur_step in range(N, 0, -1):
        with mx.stream(generation_stream):
            draws = randomness.select(rows)
            # 1. predict: the decoder's logits (self-conditioned), read at this step's temperature
            logits = model.decode(canvas, cache, self_conditioning=self_conditioning, raw_logits=predictor.raw_logits)
            prediction = predictor(logits, linear_temperature(cur_step, N, opts.t_min, opts.t_max), draws)
            # 2. accept some drawn tokens
            accepted, kept = acceptance(canvas, prediction)
            # 3. renoise the positions not kept
            canvas = renoise(accepted, kept, draws.uniform_ids((len(rows), C), V))
            # 4. stop the canvases stable and confident enough
            done = stopping(prediction.argmax, prediction.entropy)
            # 5. self-conditioning: the next step's view of this prediction
            self_conditioning = predictor.self_conditioning(prediction)
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


def prefill(model, prompts: list, features: Optional[list] = None) -> list:
    """The layer caches holding the prompts ([L] id arrays), each prompt's
    image soft tokens (`features[r]`, [n_r, hidden], or None) in place of
    its image tokens. No chunk splits an image block (`chunk_bounds`).

    One prompt: chunks of 2048, then the last token alone, as mlx-lm's
    generate_step prefills; mlx_lm.generate driving our model then builds a
    bit-identical cache, and so (same seed) the same text. Several: left-padded
    into mlx-lm's batch caches (each row's tokens end at the same index, the
    padding masked) in one encoder pass per chunk. No chunk there is a single
    token: mlx-lm's BatchRotatingKVCache writes one token in place, and a
    multi-token write after that (the next canvas's commit) loses track of a
    short row's padding (mlx-lm 0.32)."""
    cache = model.make_cache()
    length = max(ids.size for ids in prompts)
    padding = [length - ids.size for ids in prompts]
    padded = mx.stack([mx.concatenate([mx.zeros((pad,), mx.int32), ids]) for pad, ids in zip(padding, prompts)])
    images = None
    if features is not None and any(f is not None for f in features):
        images = Images.place(np.array(padded), features, model.args.image_token_id)
    if len(prompts) == 1:
        ids, n = prompts[0], prompts[0].size
        if n > 1 and (images is None or not images.inside(n - 1)):
            model.encode(ids[:-1], cache, chunk_size=PREFILL_STEP_SIZE, images=images and images.span(0, n - 1))
            ids, images = ids[-1:], images and images.span(n - 1, n)
        model.encode(ids, cache, chunk_size=PREFILL_STEP_SIZE, images=images)
        return cache
    cache = batch_caches(cache[: len(model.layers)], padding)
    for begin, end in chunk_bounds(length, PREFILL_STEP_SIZE, images, shortest=2):
        model.encode(padded[:, begin:end], cache, chunk_size=end - begin, images=images and images.span(begin, end))
    return cache


def filter_rows(cache, index: mx.array):
    """A batch cache of these rows only (a copy: the batch's own keeps every row)."""
    kept = copy.copy(cache)
    kept.filter(index)
    return kept


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
