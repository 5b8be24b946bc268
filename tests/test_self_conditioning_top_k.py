"""Top-k self-conditioning (`self_conditioning="top-k"`): the sparse soft
embedding, its plumbing through the loop and `Model.decode`, and the option's
checks in the API and the CLI."""

import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_diffusiongemma import Randomness, diffusion_generate, load, load_model
from mlx_diffusiongemma.generate import command as cli
from mlx_diffusiongemma.generate import DiffusionOptions
from mlx_diffusiongemma.model import Probabilities, TopK, soft_embed_top_k
from mlx_diffusiongemma.sampling import next_self_conditioning, predict, top_k_indices


def _prediction(shape, seed=0, scale=3.0):
    logits = mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * scale)
    return predict(logits, mx.array(0.8, mx.float32), Randomness(seed))


def _numpy_top_k_soft(weights, total, table, k):
    """sum over the k largest weights of (weight / total) * table row, per position."""
    weights, total = np.array(weights, np.float64), np.array(total, np.float64)
    ids = np.argsort(-weights, axis=-1)[..., :k]
    probs = np.take_along_axis(weights, ids, axis=-1) / total
    return (probs[..., None] * np.asarray(table, np.float64)[ids]).sum(-2)


@pytest.mark.parametrize("V,k", [(14, 1), (14, 13), (97, 5), (1000, 64), (4096, 3), (4096, 4096)])
def test_top_k_indices_are_the_k_largest(V, k):
    values = mx.array(np.random.default_rng(V + k).standard_normal((2, 5, V)).astype(np.float32))
    got = np.sort(np.array(top_k_indices(values, k)), axis=-1)
    expected = np.sort(np.argsort(-np.array(values), axis=-1)[..., :k], axis=-1)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("quantized", [False, True])
def test_top_k_soft_embedding_matches_numpy(quantized):
    V, H, k = 300, 64, 7
    embedding = nn.Embedding(V, H)
    table = np.array(embedding.weight)
    if quantized:  # the numpy side reads the rows the quantized table really holds
        embedding = nn.QuantizedEmbedding.from_embedding(embedding, group_size=32, bits=4)
        original, table = table, np.array(
            mx.dequantize(embedding.weight, embedding.scales, embedding.biases, group_size=32, bits=4)
        )
        assert not np.allclose(table, original, atol=1e-4)
    prediction = _prediction((1, 6, V))
    sparse = next_self_conditioning(prediction, mx.float32, k)
    assert isinstance(sparse, TopK)
    ids, probs = sparse
    assert ids.shape == probs.shape == (1, 6, k)
    soft = np.array(soft_embed_top_k(embedding, ids, probs))
    expected = _numpy_top_k_soft(prediction.weights, prediction.total, table, k)
    np.testing.assert_allclose(soft, expected, rtol=1e-5, atol=1e-6)
    # not renormalised: the kept probabilities sum to less than one
    assert (np.array(probs).sum(-1) < 1 - 1e-3).all()


@pytest.fixture(scope="module")
def small_model(chat_checkpoint):
    return load_model(chat_checkpoint)


def test_decode_drops_only_the_tail(small_model):
    """Top-k in the decoder is the exact mode with the tail's weights zeroed and
    the total kept; with every token kept it is the exact mode."""
    model, V = small_model, small_model.args.vocab_size
    C = model.args.canvas_length
    cache = model.make_cache()
    model.encode([2, 5, 9, 11], cache)
    canvas = mx.array(np.random.default_rng(1).integers(3, V, (1, C)), dtype=mx.int32)
    prediction = _prediction((1, C, V), seed=2, scale=1.0)
    exact = model.decode(canvas, cache, self_conditioning=Probabilities(prediction.weights, prediction.total))

    sparse = next_self_conditioning(prediction, model.dtype, 16)
    assert isinstance(sparse, TopK)
    ids, probs = sparse
    head = mx.take_along_axis(prediction.weights, ids, axis=-1)
    kept = mx.put_along_axis(mx.zeros_like(prediction.weights), ids, head, axis=-1)
    tail_dropped = model.decode(canvas, cache, self_conditioning=Probabilities(kept, prediction.total))
    top_k = model.decode(canvas, cache, self_conditioning=TopK(ids, probs))
    np.testing.assert_allclose(np.array(top_k), np.array(tail_dropped), atol=1e-4)
    assert np.abs(np.array(top_k) - np.array(exact)).max() > 1e-3  # the tail mattered here

    everything = mx.broadcast_to(mx.arange(V), (1, C, V))
    probs = prediction.weights / prediction.total
    all_kept = model.decode(canvas, cache, self_conditioning=TopK(everything, probs))
    np.testing.assert_allclose(np.array(all_kept), np.array(exact), atol=1e-4)


def test_k_at_least_vocabulary_generates_as_exact(chat_checkpoint, monkeypatch):
    model, tokenizer = load(chat_checkpoint)
    V = model.args.vocab_size
    inputs = []
    decode = model.decode
    def recorded(*a, **kw):
        inputs.append(type(kw.get("self_conditioning")))  # the kind of input: none, Probabilities, TopK, logits
        return decode(*a, **kw)

    monkeypatch.setattr(model, "decode", recorded)

    def run(**options):
        inputs.clear()
        r = diffusion_generate(model, tokenizer, "why is the sky blue", seed=3, max_tokens=24,
                               max_denoising_steps=5, eos_token_id=[], **options)
        return r.tokens, list(inputs)

    exact, exact_inputs = run()
    for k in (V, V + 1000):
        assert run(self_conditioning="top-k", self_conditioning_k=k) == (exact, exact_inputs)
    tokens, sparse_inputs = run(self_conditioning="top-k", self_conditioning_k=5)
    assert exact_inputs[1] is Probabilities and sparse_inputs[1] is TopK
    assert sparse_inputs[0] is type(None) and len(tokens) == len(exact) == 24


def test_options_default_to_exact():
    options = DiffusionOptions()
    assert (options.self_conditioning, options.self_conditioning_k) == ("exact", 64)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"self_conditioning": "topk"}, "self_conditioning must be one of ['exact', 'top-k'], got 'topk'"),
        ({"self_conditioning": None}, "self_conditioning must be one of ['exact', 'top-k'], got None"),
        ({"self_conditioning_k": 0}, "self_conditioning_k must be an integer >= 1, got 0"),
        ({"self_conditioning_k": 2.5}, "self_conditioning_k must be an integer >= 1, got 2.5"),
        ({"self_conditioning_k": True}, "self_conditioning_k must be an integer >= 1, got True"),
        ({"self_conditioning_k": "64"}, "self_conditioning_k must be an integer >= 1, got '64'"),
    ],
)
def test_invalid_options_are_named(values, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        DiffusionOptions.check(values)


def test_invalid_option_refused_before_generating(chat_checkpoint):
    model, tokenizer = load(chat_checkpoint)
    with pytest.raises(ValueError, match="self_conditioning_k must be an integer >= 1, got -3"):
        diffusion_generate(model, tokenizer, "hello", self_conditioning="top-k", self_conditioning_k=-3)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--self-conditioning", "top"], "argument --self-conditioning: invalid choice: 'top'"),
        (["--self-conditioning-k", "0"], "self_conditioning_k must be an integer >= 1, got 0"),
        (["--self-conditioning-k", "many"], "argument --self-conditioning-k: invalid int value: 'many'"),
        (["--self-conditioning", "top-k", "--self-conditioning-k", "-2"],
         "self_conditioning_k must be an integer >= 1, got -2"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--model", "x", "--prompt", "p", *argv])  # fails at parsing, before loading "x"
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_flags_reach_the_generation(monkeypatch, capsys):
    seen = {}
    stream = cli.stream_diffusion_generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return stream(*args, **kwargs)

    monkeypatch.setattr(cli, "stream_diffusion_generate", spy)
    argv = ["--model", "demo", "--prompt", "8150273", "--seed", "0", "--verbose", "False",
            "--self-conditioning", "top-k", "--self-conditioning-k", "2"]
    assert cli.main(argv) == 0
    assert (seen["self_conditioning"], seen["self_conditioning_k"]) == ("top-k", 2)
    assert capsys.readouterr().out.strip() == "0123578"
