"""mlx-lm's batching drives DiffusionGemma: `BatchGenerator`, `batch_generate`
and the server's batches, with rows that join, leave and stop on their own.

The rows' draws come from mlx's global random state, as in mlx-lm's own loop,
so a row's tokens depend on what else was drawn before it. Three things pin
them down anyway:
- with every row in the batch from the start, mlx-lm's loop draws exactly as
  our own batched `diffusion_generate` does, whose rows are checked against
  the reference's (tests/test_batch.py): the tokens must be the same;
- wherever rows join and leave, each row's extracted cache must describe
  exactly its own tokens (the decoder's logits against it equal those
  against the same tokens encoded alone) and continue its canvas after a trim;
- the trained demo model answers its problems whatever the draws, so every
  answer of a batch must be the one the same prompt gets alone.
"""

import concurrent.futures
import copy
import json
from pathlib import Path

import mlx.core as mx
import mlx_lm
import mlx_diffusiongemma
import numpy as np
import pytest
import torch
from mlx_lm.generate import BatchGenerator, batch_generate, generate_step
from mlx_lm.models.cache import (
    BatchKVCache,
    can_trim_prompt_cache,
    ConcatenateKVCache,
    KVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from mlx_diffusiongemma import diffusion_generate
from mlx_diffusiongemma.demo import problems, prompt_ids
from mlx_diffusiongemma.mlx_lm_model import BatchHeld, _entry
from mlx_diffusiongemma.model import GenerationConfig

from helpers.reference import build_reference, save_reference
from helpers.server import post, serving
from helpers.tiny_tokenizer import write_tokenizer

C = 12  # canvas length of the test checkpoints; sliding window 8
RNG = np.random.default_rng(7)
PROMPTS = [RNG.integers(3, 320, n).tolist() for n in (21, 5, 13, 2, 9)]  # longer and shorter than the window
DEMO = Path(mlx_diffusiongemma.__file__).parent / "demo_model"


def _separated(path, window: int):
    """Logits spread 4x wider, self-conditioning at 1%: decisions far from
    ties, so padding's rounding (about 1e-6) never changes a token."""
    reference = build_reference(seed=1, sliding_window=window)
    with torch.no_grad():
        reference.model.decoder.norm.weight.mul_(4.0)
        reference.model.decoder.self_conditioning.down_proj.weight.mul_(0.01)
    save_reference(reference, path)
    write_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "pad_token_id": 0}))
    return mlx_lm.load(str(path))[0]


@pytest.fixture(scope="module", params=[8, 64], ids=["window 8", "window 64"])
def separated(request, tmp_path_factory):
    """Window 8: the sliding layers' rings wrap; 64: every cache can be trimmed."""
    return _separated(tmp_path_factory.mktemp("separated"), request.param)


def _run(generator, prompts, **insert) -> dict:
    """Each prompt's generated tokens and its finishing response."""
    uids = generator.insert(prompts, **insert)
    tokens, finished = {uid: [] for uid in uids}, {}
    while responses := generator.next_generated():
        for r in responses:
            if r.finish_reason != "stop":
                tokens[r.uid].append(r.token)
            if r.finish_reason is not None:
                finished[r.uid] = r
    return [tokens[uid] for uid in uids], [finished[uid] for uid in uids]


@pytest.mark.parametrize("separated", [8], indirect=True)  # the rings wrap
def test_rows_together_draw_as_our_batch(separated):
    model, lengths = separated, []
    for seed in (1, 3):  # seed 1: a row stops at eos after 5 tokens
        mx.random.seed(seed)
        got, _ = _run(BatchGenerator(model, stop_tokens=[[1]], max_tokens=3 * C), PROMPTS)
        mx.random.seed(seed)
        ours = diffusion_generate(model, None, [mx.array(p) for p in PROMPTS], max_tokens=3 * C, eos_token_id=[1])
        assert got == [r.tokens for r in ours]
        lengths += [len(t) for t in got]
    assert min(lengths) < 3 * C  # a row left the batch before the others


def _logits(model, cache, canvas) -> np.ndarray:
    return np.array(model.decode(canvas, cache[: len(model.layers)]))


def _held_canvas(cache) -> tuple:
    held, start = cache[-1].state
    return held.reshape(-1).tolist(), start[0, 0, 0, 0].item()


def test_rows_joining_and_leaving_keep_their_own_cache(separated):
    """Two prompts prefilled at a time, three rows decoding at most, each its
    own max_tokens: rows join while others are mid-canvas and leave mid-canvas."""
    model, n = separated, len(separated.layers)
    max_tokens = [30, 7, 19, 12, 25]
    mx.random.seed(1)
    generator = BatchGenerator(model, stop_tokens=[], prefill_batch_size=2, completion_batch_size=3)
    tokens, finished = _run(generator, PROMPTS, max_tokens=max_tokens)
    assert [len(t) for t in tokens] == max_tokens
    canvas = mx.array(RNG.integers(0, 320, (1, C)))
    for prompt, generated, response in zip(PROMPTS, tokens, finished):
        cache = response.prompt_cache
        assert response.all_tokens == prompt + generated
        alone = model.make_cache()
        model.encode(mx.array(response.all_tokens), alone[:n])
        np.testing.assert_allclose(_logits(model, cache, canvas), _logits(model, alone, canvas), atol=1e-4)
        # the held canvas goes on where the row stopped
        held, start = _held_canvas(cache)
        fed = len(response.all_tokens)
        assert held[: fed - start] == response.all_tokens[start:]
        rest = held[fed - start :]  # the token handed out last, never returned (the row had finished), and after
        if can_trim_prompt_cache(cache):  # trimmed one back and fed again, as the server does
            assert trim_prompt_cache(cache, 1) == 1
            again = generate_step(mx.array(response.all_tokens[-1:]), model, prompt_cache=cache, max_tokens=len(rest))
            assert [t for t, _ in again] == rest
        else:
            again = generate_step(mx.array(rest[:1]), model, prompt_cache=cache, max_tokens=len(rest) - 1)
            assert [t for t, _ in again] == rest[1:]


def _next(logits) -> list:
    """Each row's token: the one the model's logits hand out."""
    return mx.argmax(logits[:, -1], axis=-1).tolist()


def _prefilled(model, prompt: list) -> list:
    """A cache holding the prompt but its last token, as mlx-lm's loop leaves it before that token's call."""
    cache = make_prompt_cache(model)
    model(mx.array([prompt[:-1]]), cache=cache)
    return cache


def test_canvases_denoised_ahead_see_the_committed_context(separated):
    """A row handing out its canvas when another needs one gets its next
    canvas denoised with it, against its context and the rest of its canvas
    (their held keys and values): the caches that denoising reads must be
    the ones encoding those tokens would give, and the rows go on as if
    each had committed alone."""
    model, n = separated, len(separated.layers)
    mx.random.seed(2)
    a = _prefilled(model, PROMPTS[0])
    tokens = [PROMPTS[0]]
    for _ in range(4):  # row a alone: four tokens of its canvas handed out, three fed
        tokens[0] = tokens[0] + _next(model(mx.array([tokens[0][-1:]]), cache=a))
    held, start = _held_canvas(a)
    fed = len(tokens[0]) - 1
    rest = held[fed - start :]
    assert rest[0] == tokens[0][-1] and 0 < len(rest) < C

    batch = [x.merge([x, y]) for x, y in zip(a, _prefilled(model, PROMPTS[1]))]
    tokens.append(PROMPTS[1])
    layers, pending, _ = model._parts(batch)
    ahead = model._denoising_caches(layers, pending, [0, 1], [fed - start, 0], [len(rest), 0], [fed + len(rest), len(PROMPTS[1]) - 1])
    canvas = mx.array(RNG.integers(0, 320, (2, C)))
    for row, context in enumerate([tokens[0][:fed] + rest, PROMPTS[1][:-1]]):
        alone = model.make_cache()
        model.encode(mx.array(context), alone[:n])
        np.testing.assert_allclose(_logits(model, ahead, canvas)[row], _logits(model, alone, canvas[row : row + 1])[0], atol=1e-4)
        for (k, v), (k1, v1) in zip(model.lookahead(canvas, ahead), model.lookahead(canvas[row : row + 1], alone)):
            np.testing.assert_allclose(np.array(k[row]), np.array(k1[0]), atol=1e-4)
            np.testing.assert_allclose(np.array(v[row]), np.array(v1[0]), atol=1e-4)

    def step(cache):
        for row, token in enumerate(_next(model(mx.array([t[-1:] for t in tokens]), cache=cache))):
            tokens[row] = tokens[row] + [token]

    step(batch)  # b needs a canvas: a's next one is denoised with it
    held, start = _held_canvas([batch[-1].extract(0)])
    assert held[fed - start :] == rest + held[fed - start + len(rest) :] and len(held) - (fed - start) == len(rest) + C
    for _ in range(len(rest) - 2):
        step(batch)
    # a third row joins just as a reaches the canvas denoised ahead: a's next is
    # denoised ahead again, keeping the canvas whose last token a feeds now
    batch = [x.merge([x.extract(0), x.extract(1), y]) for x, y in zip(batch, _prefilled(model, PROMPTS[2]))]
    tokens.append(PROMPTS[2])
    step(batch)
    assert tokens[0][fed:] == rest + held[fed - start + len(rest) :][:1]
    assert batch[-1].lengths == [3 * C, 2 * C, C]  # a: the canvas fed, the one handed out, the one ahead
    for _ in range(3):
        step(batch)
    for row in range(3):
        extracted = [c.extract(row) for c in batch]
        alone = model.make_cache()
        model.encode(mx.array(tokens[row][:-1]), alone[:n])
        np.testing.assert_allclose(_logits(model, extracted, canvas[:1]), _logits(model, alone, canvas[:1]), atol=1e-4)
        if row == 0 and can_trim_prompt_cache(extracted):  # trimmed back to a's boundary and fed again, as the server does
            trim_prompt_cache(extracted, 4)
            assert _next(model(mx.array([tokens[0][-5:-4]]), cache=extracted)) == tokens[0][-4:-3]


def test_no_canvas_ahead_past_an_eos(separated, monkeypatch):
    """mlx-lm stops a row at its eos, so a row whose canvas holds one gets
    no canvas ahead: it would never be handed out."""
    model = separated
    mx.random.seed(2)
    a = _prefilled(model, PROMPTS[0])
    last = _next(model(mx.array([PROMPTS[0][-1:]]), cache=a))
    held, _ = _held_canvas(a)
    batch = [x.merge([x, y]) for x, y in zip(a, _prefilled(model, PROMPTS[1]))]
    monkeypatch.setattr(model, "generation_config", GenerationConfig({"eos_token_id": [held[-1]]}))
    model(mx.array([last, PROMPTS[1][-1:]]), cache=batch)
    assert batch[-1].lengths == [C, C]
    monkeypatch.setattr(model, "generation_config", GenerationConfig({"eos_token_id": [held[-1] + 1]}))
    model(mx.array([held[1:2], [0]]), cache=batch)  # b's token is not its canvas's: b is encoded and needs one
    assert batch[-1].lengths == [2 * C, C]


def test_batch_generate_answers_the_demo_as_alone():
    """mlx_lm.batch_generate on the demo's problems, prompts joining as others
    decode: every answer is the one the prompt gets alone (and mostly right)."""
    model, tokenizer = mlx_lm.load(str(DEMO))
    cases = problems(8, seed=11)
    prompts = [prompt_ids(tokenizer, digits) for digits, _ in cases]
    alone = [mlx_lm.generate(model, tokenizer, p, max_tokens=16) for p in prompts]
    batch = batch_generate(model, tokenizer, prompts, max_tokens=16, prefill_batch_size=3, completion_batch_size=5)
    assert batch.texts == alone
    assert sum(text == answer for text, (_, answer) in zip(alone, cases)) >= 6


def test_server_batches_concurrent_requests():
    """Unseeded requests are the ones mlx_lm.server batches: 8 at once, each
    answered as it is alone."""
    model, tokenizer = mlx_lm.load(str(DEMO))
    assert all(hasattr(c, "merge") for c in make_prompt_cache(model))  # what the server checks
    cases = problems(8, seed=12)
    alone = [mlx_lm.generate(model, tokenizer, prompt_ids(tokenizer, digits), max_tokens=16) for digits, _ in cases]
    bodies = [{"messages": [{"role": "user", "content": digits}], "max_tokens": 16} for digits, _ in cases]
    with serving(DEMO) as url:
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            replies = list(pool.map(lambda body: post(f"{url}/v1/chat/completions", body), bodies))
    assert [json.loads(r)["choices"][0]["message"]["content"] for r in replies] == alone


def _held(length: int, fill: float) -> ConcatenateKVCache:
    return _entry(mx.full((1, 2, length, 3), fill), mx.full((1, 2, length, 3), -fill))


def test_held_entries_batch_as_mlx_lm_caches_do(tmp_path):
    entries = [_held(n, n + 1.0) for n in (3, 0, 5)]
    batch = entries[0].merge(entries)
    assert isinstance(batch, BatchHeld) and batch.keys.shape == (3, 2, 5, 3) and batch.lengths == [3, 0, 5]
    for entry, r in zip(entries, range(3)):
        out = batch.extract(r)
        np.testing.assert_array_equal(np.array(out.state[0]), np.array(entry.state[0]))
        np.testing.assert_array_equal(np.array(out.state[1]), np.array(entry.state[1]))
        assert out.merge == BatchHeld.merge  # an extracted row batches again
    copied = copy.deepcopy(batch)
    copied.filter([2, 0])
    assert copied.lengths == [5, 3] and batch.lengths == [3, 0, 5]  # a copy filters alone
    copied.extend(BatchHeld.merge([_held(7, 9.0)]))
    assert copied.keys.shape == (3, 2, 7, 3) and copied.lengths == [5, 3, 7]
    np.testing.assert_array_equal(np.array(copied.extract(1).keys), np.array(entries[0].keys))
    assert trim_prompt_cache([copied], 2) == 0 and copied.lengths == [5, 3, 7]  # trimming leaves held canvases

    # a saved cache loads as plain ConcatenateKVCache entries: they continue one sequence, and mlx-lm will not batch them
    save_prompt_cache(str(tmp_path / "held.safetensors"), entries)
    loaded = load_prompt_cache(str(tmp_path / "held.safetensors"))
    assert type(loaded[0]) is ConcatenateKVCache and not hasattr(loaded[0], "merge")


def test_batch_caches_reach_the_model_unchanged(separated):
    """The model takes mlx-lm's batch caches as BatchGenerator merges them,
    and says which entry is wrong otherwise."""
    model = separated
    merged = [c.merge([c, copy.deepcopy(c)]) for c in make_prompt_cache(model)]
    assert isinstance(merged[1], BatchKVCache) and isinstance(merged[-1], BatchHeld)
    logits = model(mx.array([[5, 6, 7], [8, 9, 10]]), cache=merged)
    assert logits.shape == (2, 3, 320)
    with pytest.raises(ValueError, match="cache entry 8 is a KVCache; expected the held canvas entries"):
        model(mx.array([[5], [8]]), cache=merged[:-1] + [KVCache()])
