"""Each sampler piece against the reference's own function on random inputs."""

import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from mlx_diffusiongemma.sampling import (
    ConfidenceAcceptance,
    EntropyBoundAcceptance,
    Randomness,
    StableAndConfidentStopping,
    inverse_cdf,
    linear_temperature,
    predict,
    renoise,
)

RNG = np.random.default_rng(0)


def _logits(batch=2, canvas=16, vocab=50, scale=4.0):
    return (RNG.standard_normal((batch, canvas, vocab)) * scale).astype(np.float32)


@pytest.mark.parametrize("steps,t_min,t_max", [(48, 0.4, 0.8), (7, 0.1, 1.3), (1, 0.0, 0.5)])
def test_temperature_schedule_matches_reference(steps, t_min, t_max):
    processor = LinearTemperatureScheduleLogitsProcessor(t_min, t_max, steps)
    logits = _logits()
    for cur_step in range(steps, 0, -1):
        # the reference loop passes cur_step as an int32 tensor
        expected = processor(None, torch.tensor(logits), torch.tensor(cur_step, dtype=torch.int32)).numpy()
        ours = np.array(mx.array(logits) / linear_temperature(cur_step, steps, t_min, t_max))
        np.testing.assert_array_equal(ours, expected)


class Draws:
    """Randomness whose categorical draws are given."""

    def __init__(self, draws):
        self.draws = draws

    def categorical(self, weights):
        return mx.array(self.draws, dtype=mx.int32)


def _entropy(logits) -> mx.array:
    return predict(mx.array(logits), mx.array(1.0), Draws(np.zeros(logits.shape[:-1], int))).entropy


def test_prediction_matches_reference():
    """processed logits, argmax, softmax and entropy as the reference's step computes them."""
    logits = _logits(scale=8.0)
    temperature = linear_temperature(17, 48, 0.4, 0.8)
    draws = RNG.integers(0, 50, (2, 16))
    p = predict(mx.array(logits), temperature, Draws(draws))
    processed = torch.tensor(logits) / torch.tensor(np.array(temperature))
    np.testing.assert_array_equal(np.array(p.processed), processed.numpy())
    np.testing.assert_array_equal(np.array(p.argmax), torch.argmax(processed, dim=-1).numpy())
    probs = torch.softmax(processed, dim=-1, dtype=torch.float32).numpy()
    np.testing.assert_allclose(np.array(p.weights / p.total), probs, rtol=1e-5, atol=1e-9)
    # entropy against the exact (float64) value: logsumexp - E[x] from the shared
    # exponentials is 10x closer to it than the reference's own float32 entropy
    x = processed.numpy().astype(np.float64)
    log_probs = x - x.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    exact = -(np.exp(log_probs) * log_probs).sum(-1)
    reference_error = np.abs(torch.distributions.Categorical(logits=processed).entropy().numpy() - exact).max()
    assert np.abs(np.array(p.entropy) - exact).max() < min(5e-7, reference_error)
    np.testing.assert_array_equal(np.array(p.draw), draws)


def test_inverse_cdf_draws_follow_the_weights():
    """Frequencies over many positions match the weights; zero weights are never drawn."""
    V, positions = 320, 20_000
    weights = np.zeros(V, np.float32)
    weights[[3, 17, 18, 200, 319]] = [1.0, 2.0, 0.5, 4.0, 2.5]
    tiled = mx.broadcast_to(mx.array(weights), (positions, V))
    draws = np.array(Randomness(seed=0).categorical(tiled))
    counts = np.bincount(draws, minlength=V)
    assert counts[weights == 0].sum() == 0
    expected = weights / weights.sum() * positions
    assert np.all(np.abs(counts[weights > 0] - expected[weights > 0]) < 5 * np.sqrt(expected[weights > 0]))
    # the edges of the unit interval land on the first and last tokens with weight
    edges = np.array(inverse_cdf(mx.array(weights)[None], mx.array([[1e-9], [1.0]], mx.float32)))
    assert edges.tolist() == [3, 319]


@pytest.mark.parametrize("bound", [0.1, 1.0, 25.0])
def test_entropy_bound_acceptance_and_renoise_match_reference(bound):
    # sharp, well-separated entropies: no ties at the acceptance boundary
    logits = _logits(scale=12.0)
    current = RNG.integers(0, 50, (2, 16))
    denoised = RNG.integers(0, 50, (2, 16))
    fresh = RNG.integers(0, 50, (2, 16))

    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 16, 50, 48)
    expected = sampler.accept_canvas(torch.tensor(current), torch.tensor(denoised), torch.tensor(logits), 1)
    prediction = predict(mx.array(logits), mx.array(1.0), Draws(denoised))
    canvas, accepted = EntropyBoundAcceptance(bound)(mx.array(current), prediction)
    np.testing.assert_array_equal(np.array(canvas), expected.numpy())
    np.testing.assert_array_equal(np.array(accepted), sampler.accepted_token_mask.numpy())
    assert 0 < int(np.array(accepted).sum()) <= 32

    sampler.initialize_canvas = lambda batch_size, device: torch.tensor(fresh)
    expected_next = sampler.renoise_canvas(expected, 1)
    np.testing.assert_array_equal(np.array(renoise(canvas, accepted, mx.array(fresh))), expected_next.numpy())


@pytest.mark.parametrize("stability,confidence", [(0, 10.0), (1, 10.0), (2, 10.0), (1, 0.005)])
def test_stopping_matches_reference(stability, confidence):
    reference = StableAndConfidentStoppingCriteria(stability, confidence)
    ours = StableAndConfidentStopping(stability, confidence)
    logits = _logits(scale=6.0)
    argmaxes = [RNG.integers(0, 50, (2, 16)) for _ in range(2)]
    # a run: change, repeat, repeat, change, repeat (batch rows diverge at step 3)
    sequence = [argmaxes[0], argmaxes[0], argmaxes[0], np.stack([argmaxes[0][0], argmaxes[1][1]]), argmaxes[1]]
    decisions = []
    for argmax in sequence:
        expected = reference(torch.tensor(argmax), torch.tensor(logits)).numpy()
        got = np.array(ours(mx.array(argmax), _entropy(logits)))
        np.testing.assert_array_equal(got, expected)
        decisions.append(got.tolist())
    if confidence > 1 and stability:
        assert [True, True] in decisions and [False, False] in decisions  # both outcomes exercised
    ours.reset()
    assert ours.history is None


def test_confidence_acceptance_freezes_and_accepts_at_least_one():
    logits = _logits(batch=1, canvas=8, vocab=20, scale=3.0)
    logits[0, 2, 5] = 40.0  # position 2 is certain of token 5
    acceptance = ConfidenceAcceptance(min_confidence=0.99)
    current = mx.zeros((1, 8), mx.int32)
    denoised = mx.array(RNG.integers(0, 20, (1, 8)), dtype=mx.int32)
    denoised[0, 2] = 5
    canvas, kept = acceptance(current, predict(mx.array(logits), mx.array(1.0), Draws(np.array(denoised))))
    assert np.array(kept)[0].tolist() == [i == 2 for i in range(8)]
    assert int(canvas[0, 2]) == 5 and int(np.array(canvas).sum()) == 5

    # nothing is confident now: exactly one more position (the most probable draw) joins
    flat = _logits(batch=1, canvas=8, vocab=20, scale=0.1)
    probs = np.exp(flat) / np.exp(flat).sum(-1, keepdims=True)
    redraw = mx.array(RNG.integers(0, 20, (1, 8)), dtype=mx.int32)
    drawn = probs[0, np.arange(8), np.array(redraw)[0]]
    drawn[2] = -1.0
    canvas, kept = acceptance(canvas, predict(mx.array(flat), mx.array(1.0), Draws(np.array(redraw))))
    assert np.array(kept)[0].sum() == 2 and bool(kept[0, int(drawn.argmax())])
    assert int(canvas[0, 2]) == 5  # frozen: the new draw at position 2 is ignored
    acceptance.reset()
    assert acceptance.frozen is None


def test_randomness_seeded_and_global():
    a, b = Randomness(seed=3), Randomness(seed=3)
    logits = mx.exp(mx.array(_logits(batch=1, canvas=6, vocab=30)))
    for _ in range(2):
        assert np.array_equal(np.array(a.uniform_ids((1, 6), 30)), np.array(b.uniform_ids((1, 6), 30)))
        assert np.array_equal(np.array(a.categorical(logits)), np.array(b.categorical(logits)))
    ids = np.array(Randomness(seed=4).uniform_ids((1, 400), 30))
    assert ids.min() >= 0 and ids.max() < 30 and len(set(ids.ravel())) == 30

    draws = []
    for _ in range(2):
        mx.random.seed(11)
        r = Randomness()
        draws.append((np.array(r.uniform_ids((1, 6), 30)), np.array(r.categorical(logits))))
    assert all(np.array_equal(x, y) for x, y in zip(*draws))
    assert not np.array_equal(draws[0][0], np.array(Randomness().uniform_ids((1, 6), 30)))


@pytest.mark.parametrize("seed", [-1, "1", 1.5, 2**64, 2**70, True], ids=repr)
def test_bad_seed_is_named_with_the_range(seed):
    with pytest.raises(ValueError, match=rf"seed must be an integer in \[0, 2\*\*64\), got {re.escape(repr(seed))}$"):
        Randomness(seed)


def test_seed_range_ends_are_accepted():
    for seed in (0, np.int64(7), 2**64 - 1):
        Randomness(seed).uniform_ids((1, 2), 5)
