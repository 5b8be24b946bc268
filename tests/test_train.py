"""Block-diffusion training: blocks, a smoke run whose loss falls, LoRA with
adapters saved and loaded, resuming, and the command line."""

import json
import random

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_diffusiongemma import load, save_model
from mlx_diffusiongemma.demo import prompt_ids, write_tokenizer
from mlx_diffusiongemma.model import Model, ModelArgs
from mlx_diffusiongemma.train import Batches, TrainingArgs, evaluate, loss_fn, main, make_blocks, train

TINY = {
    "model_type": "diffusion_gemma",
    "canvas_length": 8,
    "text_config": {
        "vocab_size": 14, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"], "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "global_head_dim": 16, "num_global_key_value_heads": 1,
        "sliding_window": 32, "num_experts": 2, "top_k_experts": 1, "moe_intermediate_size": 16,
    },
}


def _reverse_task(n, seed):
    """Reverse 3 to 6 digits: every answer position depends on the whole prompt."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
        pairs.append((digits, digits[::-1]))
    return pairs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("setup")
    (path / "config.json").write_text(json.dumps(TINY))
    write_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "pad_token_id": 0}))
    from mlx_lm.utils import load_tokenizer

    return path, load_tokenizer(path)


def _blocks(tokenizer, pairs):
    return [b for p, r in pairs for b in make_blocks(prompt_ids(tokenizer, p), tokenizer.encode(r, add_special_tokens=False), 8, 1, 0)]


def _heldout_loss(model, blocks, args):
    """The same noised held-out batches every time."""
    mx.random.seed(123)
    return evaluate(model, Batches(blocks, args.batch_size, seed=7), args)


def test_make_blocks_pads_after_eos_and_conditions_on_earlier_blocks():
    blocks = make_blocks([2, 5], [7] * 10, canvas_length=4, eos=1, pad=0)
    assert blocks == [([2, 5], [7, 7, 7, 7]), ([2, 5, 7, 7, 7, 7], [7, 7, 7, 7]),
                      ([2, 5, 7, 7, 7, 7, 7, 7, 7, 7], [7, 7, 1, 0])]


def test_smoke_training_loss_falls(setup, tmp_path):
    path, tokenizer = setup
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(TINY))
    args = TrainingArgs(iters=150, batch_size=32, learning_rate=3e-3, warmup=10, eval_every=150, save_every=150,
                        eval_batches=8)
    valid = _blocks(tokenizer, _reverse_task(200, 1))
    before = _heldout_loss(model, valid, args)
    train(model, TINY, _blocks(tokenizer, _reverse_task(2000, 0)), valid, tmp_path / "out", args, source=path,
          log=lambda *_: None)
    after = _heldout_loss(model, valid, args)
    print(f"\nsmoke training: held-out loss {before:.3f} before, {after:.3f} after {args.iters} steps")
    assert after < 0.6 * before
    trained, _ = load(tmp_path / "out")  # our checkpoint layout, with the tokenizer copied
    ids = prompt_ids(tokenizer, "123")
    cache, expected = trained.make_cache(), model.make_cache()
    trained.encode(ids, cache)
    model.encode(ids, expected)
    np.testing.assert_array_equal(np.array(trained.decode([5] * 8, cache)), np.array(model.decode([5] * 8, expected)))


def test_lora_fine_tunes_and_adapters_load(setup, tmp_path):
    path, tokenizer = setup
    mx.random.seed(1)
    base = save_model(Model(ModelArgs.from_dict(TINY)), tmp_path / "base", TINY)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        (base / f).write_bytes((path / f).read_bytes())
    model, _ = load(base)
    before = dict(tree_flatten(model.parameters()))
    args = TrainingArgs(iters=60, batch_size=32, learning_rate=1e-2, warmup=5, eval_every=60, save_every=30,
                        lora_rank=4)
    history = train(model, TINY, _blocks(tokenizer, _reverse_task(2000, 0)), _blocks(tokenizer, _reverse_task(100, 1)),
                    tmp_path / "adapters", args, source=base, log=lambda *_: None)
    losses = [loss for _, loss in history]
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:10])
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert trainable and all("lora_" in k for k in trainable)  # only the adapters train
    after = dict(tree_flatten(model.parameters()))
    assert all(np.array_equal(np.array(before[k]), np.array(after[k])) for k in before if k in after)

    reloaded, _ = load(base, adapter_path=tmp_path / "adapters")
    ids = prompt_ids(tokenizer, "4321")
    c1, c2 = model.make_cache(), reloaded.make_cache()
    model.encode(ids, c1)
    reloaded.encode(ids, c2)
    np.testing.assert_allclose(np.array(reloaded.decode([3] * 8, c2)), np.array(model.decode([3] * 8, c1)), atol=1e-5)


def test_resume_continues_from_the_saved_step(setup, tmp_path):
    path, tokenizer = setup
    blocks = _blocks(tokenizer, _reverse_task(200, 0))
    args = TrainingArgs(iters=6, batch_size=8, warmup=2, eval_every=100, eval_batches=1, save_every=3)
    mx.random.seed(0)
    train(Model(ModelArgs.from_dict(TINY)), TINY, blocks, blocks, tmp_path / "run", args, source=path,
          log=lambda *_: None)
    state = json.loads((tmp_path / "run" / "training_state.json").read_text())
    assert state["step"] == 6
    longer = TrainingArgs(**{**state["args"], "iters": 9})
    history = train(Model(ModelArgs.from_dict(TINY)), TINY, blocks, blocks, tmp_path / "run", longer, source=path,
                    resume=True, log=lambda *_: None)
    assert [step for step, _ in history] == [7, 8, 9]
    assert json.loads((tmp_path / "run" / "training_state.json").read_text())["step"] == 9


def test_command_line_trains_from_scratch(setup, tmp_path, capsys):
    path, _ = setup
    data = tmp_path / "data"
    data.mkdir()
    for name, seed in (("train", 0), ("valid", 1)):
        lines = [json.dumps({"prompt": p, "response": r}) for p, r in _reverse_task(50, seed)]
        (data / f"{name}.jsonl").write_text("\n".join(lines))
    assert main(["--model", str(path), "--data", str(data), "--out", str(tmp_path / "out"), "--from-scratch",
                 "--iters", "4", "--batch-size", "4", "--eval-every", "4", "--eval-batches", "1"]) == 0
    assert "4/4 loss" in capsys.readouterr().out
    model, tokenizer = load(tmp_path / "out")
    assert model.args.hidden_size == 32 and tokenizer.eos_token_ids == {1}


def test_autoregressive_loss_reaches_the_encoder(setup):
    _, tokenizer = setup
    mx.random.seed(2)
    model = Model(ModelArgs.from_dict(TINY))
    batch = next(Batches(_blocks(tokenizer, _reverse_task(20, 0)), 4, seed=0))
    noisy = mx.random.randint(0, 14, batch.block.shape)
    plain = loss_fn(model, batch, noisy, None, 0.0)
    with_ar = loss_fn(model, batch, noisy, None, 1.0)
    assert with_ar.item() > plain.item()
    # the encoder's own layer scalars get a gradient only through the cache; the AR term adds to it
    grads = [dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model, batch, noisy, None, w)[1]))
             for w in (0.0, 1.0)]
    key = "model.encoder.language_model.layers.0.layer_scalar"
    assert not np.allclose(np.array(grads[0][key]), np.array(grads[1][key]))


def test_failed_checkpoint_save_keeps_the_previous_checkpoint(setup, tmp_path, monkeypatch):
    path, tokenizer = setup
    out = tmp_path / "run"
    blocks = _blocks(tokenizer, _reverse_task(50, 0))
    args = TrainingArgs(iters=2, batch_size=4, warmup=1, eval_every=100, eval_batches=1, save_every=1)
    save = mx.save_safetensors

    def fail_once_a_checkpoint_exists(file, *rest, **kwargs):
        if file.endswith("optimizer.safetensors") and out.exists():  # step 2: weights written, then this
            raise OSError("disk full")
        save(file, *rest, **kwargs)

    monkeypatch.setattr(mx, "save_safetensors", fail_once_a_checkpoint_exists)
    mx.random.seed(0)
    with pytest.raises(OSError, match="disk full"):
        train(Model(ModelArgs.from_dict(TINY)), TINY, blocks, blocks, out, args, source=path, log=lambda *_: None)
    assert json.loads((out / "training_state.json").read_text())["step"] == 1
    assert {"optimizer.safetensors", "model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    load(out)  # the step-1 checkpoint, whole
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging left behind
