"""Batched generation: a list of prompts denoised together, each row giving
what its prompt gives alone (the reference's draws replayed, and seeded)."""

import numpy as np
import pytest
import torch
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache
from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

import mlx.core as mx

from mlx_diffusiongemma import diffusion_generate, load_model
from mlx_diffusiongemma.generate import Commit, DiffusionResponse, Draft, loop, prefill, stream_diffusion_generate
from mlx_diffusiongemma.model import Probabilities

from helpers.reference import build_reference, save_reference
from helpers.replay import ReplayedBatch, ReplayedRandomness, ReplayedRows, record_reference, record_reference_batch

C = 12  # canvas length of the test checkpoints; sliding window 8
RNG = np.random.default_rng(7)
PROMPTS = [RNG.integers(3, 320, n).tolist() for n in (21, 5, 13)]  # longer and shorter than the window
# canvases stop at different steps (3 to 27 here) when the mean entropy falls below 1
SPREAD = dict(entropy_bound=20.0, stability_threshold=0, confidence_threshold=1.0)


@pytest.fixture(scope="module")
def separated(tmp_path_factory):
    """Logits spread 4x wider, self-conditioning at 1%: decisions far from
    ties, so free-running output is the reference's (test_generate_replay.py)."""
    reference = build_reference(seed=1)
    with torch.no_grad():
        reference.model.decoder.norm.weight.mul_(4.0)
        reference.model.decoder.self_conditioning.down_proj.weight.mul_(0.01)
    return reference, load_model(save_reference(reference, tmp_path_factory.mktemp("separated")))


def _record(reference, prompt, eos, seed):
    return record_reference(
        reference, prompt, seed=seed, max_new_tokens=3 * C, eos_token_id=eos, pad_token_id=0,
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=SPREAD["entropy_bound"]),
        stability_threshold=SPREAD["stability_threshold"], confidence_threshold=SPREAD["confidence_threshold"],
    )


def _steps_per_canvas(recording) -> list:
    starts = [i for i, sc in enumerate(recording.self_conditioning) if sc is None]
    return np.diff(starts + [len(recording.logits)]).tolist()


class CountingModel:
    """The model, recording how many rows each decoder call computes."""

    def __init__(self, model):
        self.model, self.rows = model, []
        self.args, self.dtype, self.layers, self.generation_config = model.args, model.dtype, model.layers, model.generation_config

    def make_cache(self):
        return self.model.make_cache()

    def encode(self, ids, cache, **kwargs):
        self.model.encode(ids, cache, **kwargs)

    def decode(self, canvas, cache, **kwargs):
        self.rows.append(canvas.shape[0])
        return self.model.decode(canvas, cache, **kwargs)


def test_each_row_generates_what_it_generates_alone(separated):
    """Three prompts with the reference's own draws for each (recorded
    alone): each row's tokens, steps and tokens per forward are the
    reference's, rows stop at different steps and canvases, and a row that
    has stopped is never computed again (decoder rows = the rows' steps)."""
    reference, model = separated
    free = _record(reference, PROMPTS[0], [], seed=0).sequence
    eos = [int(next(t for t in free[C : 2 * C] if t not in free[:C]))]  # prompt 0 stops in its second canvas
    recordings = [_record(reference, prompt, eos, seed=r) for r, prompt in enumerate(PROMPTS)]
    replays = [ReplayedRandomness(recording) for recording in recordings]
    counting = CountingModel(model)
    events = list(stream_diffusion_generate(
        counting, None, PROMPTS, randomness=ReplayedRows(replays), max_tokens=3 * C, eos_token_id=eos, pad_token_id=0, **SPREAD
    ))
    responses = {e.row: e for e in events if isinstance(e, DiffusionResponse)}
    assert sorted(responses) == [0, 1, 2]
    for r, recording in enumerate(recordings):
        response, expected = responses[r], recording.sequence
        n = len(response.tokens)
        np.testing.assert_array_equal(response.tokens, expected[:n], err_msg=f"row {r}")
        assert response.canvases * C == len(expected) and response.denoising_steps == len(recording.logits)
        assert response.tokens_per_forward == pytest.approx(recording.tokens_per_forward, rel=1e-6)
        assert replays[r].draws == [], f"row {r} drew less than the reference"
        drafts = [e for e in events if isinstance(e, Draft) and e.row == r]
        assert len(drafts) == response.denoising_steps
        mine = [i for i, e in enumerate(events) if e.row == r]
        assert events[mine[-1]] is response  # nothing of a row follows its response
        assert sum((e.tokens for e in events if isinstance(e, Commit) and e.row == r), []) == response.tokens
    assert len({responses[r].canvases for r in responses}) > 1  # one row finished before the others
    assert len({tuple(_steps_per_canvas(recording)) for recording in recordings}) == 3  # each stops on its own
    assert sum(counting.rows) == sum(r.denoising_steps for r in responses.values())  # stopped rows cost nothing


def test_the_reference_batch_replayed(separated):
    """The reference's own batched generate (left padding, an attention mask,
    frozen rows computed and drawn for), its draws replayed for the rows we
    compute: every row's tokens, eos and padding, and tokens per forward."""
    reference, model = separated
    settings = dict(
        max_new_tokens=3 * C, pad_token_id=0, sampler_config=EntropyBoundSamplerConfig(entropy_bound=SPREAD["entropy_bound"]),
        stability_threshold=SPREAD["stability_threshold"], confidence_threshold=SPREAD["confidence_threshold"],
    )
    free = record_reference_batch(reference, PROMPTS, seed=0, eos_token_id=[], **settings).sequence
    # eos: a token of row 0's second canvas found nowhere before it, nor in the other rows
    eos = [int(next(t for t in free[0, C : 2 * C] if t not in free[0, :C] and t not in free[1:]))]
    recording = record_reference_batch(reference, PROMPTS, seed=0, eos_token_id=eos, **settings)
    responses = diffusion_generate(
        model, None, PROMPTS, randomness=ReplayedBatch(recording), max_tokens=3 * C, eos_token_id=eos, pad_token_id=0, **SPREAD
    )
    for r, response in enumerate(responses):
        expected, n = recording.sequence[r], len(response.tokens)
        np.testing.assert_array_equal(response.tokens, expected[:n], err_msg=f"row {r}")
        if response.finish_reason == "stop":
            assert expected[n] in eos and (expected[n + 1 :] == 0).all()  # eos, then the reference's padding
        else:
            assert n == len(expected)
        assert response.tokens_per_forward == pytest.approx(float(recording.tokens_per_forward[r]), rel=1e-6)
    assert {r.finish_reason for r in responses} == {"stop", "length"}


def test_seeded_rows_draw_as_prompts_alone(separated):
    """With a seed, row r generates what its prompt generates alone with seed + r."""
    _, model = separated
    batch = diffusion_generate(model, None, PROMPTS, seed=5, max_tokens=3 * C, eos_token_id=[], **SPREAD)
    assert [b.row for b in batch] == [0, 1, 2]
    for r, prompt in enumerate(PROMPTS):
        alone = diffusion_generate(model, None, prompt, seed=5 + r, max_tokens=3 * C, eos_token_id=[], **SPREAD)
        assert batch[r].tokens == alone.tokens and batch[r].denoising_steps == alone.denoising_steps, r
    assert len({tuple(b.tokens) for b in batch}) == 3


def test_padding_never_changes_a_row(separated, monkeypatch):
    """Decoder logits of a left-padded batch (prefilled in chunks) against
    each prompt alone, after prefill and after commits, with self-conditioning, and after a
    row leaves the batch: within 1e-4 (the same arithmetic per row; the
    padding is masked, as the reference masks a padded prompt)."""
    _, model = separated
    V = model.args.vocab_size
    monkeypatch.setattr(loop, "PREFILL_STEP_SIZE", 10)  # 21 tokens: chunks of 10, 9 and 2, never 1
    alone = [prefill(model, [mx.array(p)]) for p in PROMPTS]
    batch = prefill(model, [mx.array(p) for p in PROMPTS])
    assert isinstance(batch[0], BatchRotatingKVCache) and isinstance(batch[1], BatchKVCache)
    rows = [0, 1, 2]
    for commit in range(4):
        canvas = mx.array(RNG.integers(0, V, (len(rows), C)), dtype=mx.int32)
        probs = mx.softmax(mx.array(RNG.standard_normal((len(rows), C, V)), dtype=mx.float32), axis=-1)
        conditioning = (probs, mx.ones((len(rows), C, 1)))
        together = model.decode(canvas, batch, self_conditioning=Probabilities(*conditioning))
        for i, r in enumerate(rows):
            single = model.decode(canvas[i : i + 1], alone[r], self_conditioning=Probabilities(*(x[i : i + 1] for x in conditioning)))
            assert mx.abs(together[i] - single[0]).max().item() < 1e-4, (commit, r)
        if commit == 2:  # prompt 1 leaves the batch
            rows = [0, 2]
            for c in batch:
                c.filter(mx.array([0, 2]))
            canvas = canvas[mx.array([0, 2])]
        model.encode(canvas, batch)
        for i, r in enumerate(rows):
            model.encode(canvas[i : i + 1], alone[r])
