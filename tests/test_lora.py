"""Fine-tuning with mlx_lm.lora's interface (mlx_diffusiongemma.lora): data
formats and their prompt/answer split, the padded batch loss, adapters
through mlx-lm's loader, server-free generate and fuse, resuming, QLoRA /
DoRA / full, YAML config, errors."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_diffusiongemma import diffusion_generate, load, quantize
from mlx_diffusiongemma.lora import load_datasets, main, prepare_model, resolve_args, run, to_blocks
from mlx_diffusiongemma.mlx_lm_model import NoNextTokenLogits
from mlx_diffusiongemma.train import Batch, loss_fn

from helpers.tiny_tokenizer import token_id

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "mlx_diffusiongemma" / "demo_model"


def _write(directory: Path, **splits) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, records in splits.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def _descending(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        digits = "".join(map(str, rng.integers(0, 10, rng.integers(3, 9))))
        records.append({"messages": [{"role": "user", "content": digits},
                                     {"role": "assistant", "content": "".join(sorted(digits, reverse=True))}]})
    return records


def _args(tmp_path, data, *extra):
    return resolve_args(["--model", "demo", "--train", "--data", str(data), "--num-layers", "-1",
                         "--adapter-path", str(tmp_path / "adapters"), "--batch-size", "4",
                         "--steps-per-report", "1", "--steps-per-eval", "100", "--val-batches", "1", *extra])


@pytest.fixture(scope="module")
def sort_data(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("sort"), train=_descending(40, 0), valid=_descending(8, 1), test=_descending(8, 2))


def test_chat_completions_and_text_split_prompt_from_answer(chat_checkpoint, tmp_path):
    _, tokenizer = load(chat_checkpoint)
    chat = {"messages": [{"role": "system", "content": "sky"}, {"role": "user", "content": "why is the sky blue"},
                         {"role": "assistant", "content": "hello world"}],
            "tools": [{"type": "function", "function": {"name": "look", "parameters": {}}}]}
    completion = {"prompt": "why is the sky blue", "completion": "hello world"}
    text = {"text": "hello world sky"}
    C = 12
    model, _ = load(chat_checkpoint)
    conversations = {"chat": (chat, chat["messages"][:-1]), "completions": (completion, [{"role": "user", "content": completion["prompt"]}])}
    for record, prompt_messages in conversations.values():
        data = _write(tmp_path / "d", train=[record] * 2)
        args = resolve_args(["--model", str(chat_checkpoint), "--train", "--data", str(data)])
        train, _, _ = load_datasets(args, tokenizer)
        (context, block), _ = to_blocks(train, tokenizer, model.args, 2048, "train")
        # the context is the prompt as the template renders it for generation (system turn and all)
        expected = tokenizer.apply_chat_template(prompt_messages, tools=record.get("tools"), add_generation_prompt=True)
        assert context == expected and context[-2:] == [token_id("<|turn>"), token_id("model")]
        if record is chat:
            assert token_id("system") in context
        # the answer, then the template's end of turn (an eos id) and pads
        assert block == [token_id("hello"), token_id("world"), token_id("<turn|>")] + [0] * (C - 3)
    data = _write(tmp_path / "t", train=[text] * 2)
    train, _, _ = load_datasets(resolve_args(["--model", str(chat_checkpoint), "--train", "--data", str(data)]), tokenizer)
    (context, block), _ = to_blocks(train, tokenizer, model.args, 2048, "train")
    ids = tokenizer.encode("hello world sky")
    assert context == ids[:1] and block[: len(ids) - 1] == ids[1:] and block[len(ids) - 1] in tokenizer.eos_token_ids


def test_padded_batch_loss_and_gradients_are_each_rows(tmp_path):
    """Left-padded contexts in mlx-lm's batch caches: the batch's loss and
    gradients are the mean of each example's alone."""
    model, _ = load("demo")
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(2, 14, n).tolist(), rng.integers(0, 14, 12).tolist()) for n in (5, 9, 7)]
    noisy = mx.array(rng.integers(0, 14, (3, 12)))
    model.train()
    batch_loss, batch_grads = nn.value_and_grad(model, loss_fn)(model, Batch.of(pairs), noisy, None, 0.0)
    rows = [nn.value_and_grad(model, loss_fn)(model, Batch.of([p]), noisy[i : i + 1], None, 0.0) for i, p in enumerate(pairs)]
    assert batch_loss.item() == pytest.approx(np.mean([r[0].item() for r in rows]), rel=1e-5)
    flat = [dict(tree_flatten(g)) for _, g in rows]
    for key, value in tree_flatten(batch_grads):
        np.testing.assert_allclose(value, sum(f[key] for f in flat) / 3, atol=1e-5, err_msg=key)


def test_training_reads_the_context_as_generation_does():
    """A context longer than the sliding window: training's decoder sees a
    sliding layer's last window - 1 tokens, as generation's does."""
    from mlx_diffusiongemma.generate import prefill

    model, _ = load("demo")
    window = model.args.sliding_window
    rng = np.random.default_rng(1)
    context = rng.integers(2, 14, window + 20).tolist()
    canvas = mx.array(rng.integers(0, 14, (1, 12)))
    from mlx_diffusiongemma.train import encoded

    cache, _ = encoded(model, Batch.of([(context, canvas[0].tolist())]))
    trained = np.array(model.decode(canvas, cache))
    generated = np.array(model.decode(canvas, prefill(model, [mx.array(context)])))
    np.testing.assert_allclose(trained, generated, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model, _ = load("demo")
    rng = np.random.default_rng(2)
    batch = Batch.of([(rng.integers(2, 14, n).tolist(), rng.integers(0, 14, 12).tolist()) for n in (4, 6)])
    noisy = mx.array(rng.integers(0, 14, (2, 12)))
    model.train()
    grads = []
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        grads.append(dict(tree_flatten(nn.value_and_grad(model, loss_fn)(model, batch, noisy, None, 0.0)[1])))
    for key in grads[0]:
        np.testing.assert_allclose(grads[0][key], grads[1][key], atol=1e-6, err_msg=key)


def test_adapters_load_in_mlx_lm_and_fuse(sort_data, tmp_path):
    """Our adapters through mlx-lm's loader (generate, server), fused by
    mlx_lm.fuse, and through our load: one model, the same tokens."""
    import mlx_lm

    args = _args(tmp_path, sort_data, "--iters", "3")
    run(args, log=lambda *_: None)
    adapters = tmp_path / "adapters"
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 4 and config["lora_parameters"]["rank"] == 8
    ours, tokenizer = load("demo", adapter_path=adapters)
    theirs, _ = mlx_lm.load(str(DEMO), adapter_path=str(adapters))
    canvas = mx.array([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 3, 4]])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "81502"}], add_generation_prompt=True)
    logits = []
    for model in (ours, theirs):
        cache = model.make_cache()
        model.encode(ids, cache)
        logits.append(np.array(model.decode(canvas, cache)))
    np.testing.assert_array_equal(logits[0], logits[1])
    fused = tmp_path / "fused"
    result = subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(DEMO), "--adapter-path", str(adapters),
                             "--save-path", str(fused)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    fused_model, fused_tokenizer = load(fused)
    for digits in ("81502", "3947", "12345678"):
        a = diffusion_generate(ours, tokenizer, digits, max_tokens=12, seed=0).tokens
        assert diffusion_generate(fused_model, fused_tokenizer, digits, max_tokens=12, seed=0).tokens == a


def test_resume_continues_the_same_loss_curve(sort_data, tmp_path):
    whole = run(_args(tmp_path / "a", sort_data, "--iters", "6", "--save-every", "3"), log=lambda *_: None)["train"]
    run(_args(tmp_path / "b", sort_data, "--iters", "3", "--save-every", "3"), log=lambda *_: None)
    resumed = run(_args(tmp_path / "b", sort_data, "--iters", "6", "--save-every", "3", "--resume-adapter-file",
                        str(tmp_path / "b" / "adapters" / "adapters.safetensors")), log=lambda *_: None)["train"]
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == pytest.approx([whole[s] for s in (4, 5, 6)], rel=1e-6)


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_quantized_base_trains_without_dequantizing(sort_data, tmp_path, kind):
    """(full: on the float demo; a quantized base is refused by name)"""
    """QLoRA: the 4-bit base keeps its packed weights (LoRA sits beside them);
    the loss falls."""
    from mlx_diffusiongemma.load import save_model

    model, _ = load("demo")
    config = json.loads((DEMO / "config.json").read_text())
    config["quantization"] = quantize(model, bits=4, group_size=32)
    base = save_model(model, tmp_path / "q4", config)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        (base / name).write_bytes((DEMO / name).read_bytes())
    argv = ["--train", "--data", str(sort_data), "--num-layers", "-1", "--fine-tune-type", kind,
            "--adapter-path", str(tmp_path / "adapters"), "--batch-size", "8", "--iters", "12",
            "--learning-rate", "3e-3" if kind != "full" else "3e-4", "--steps-per-eval", "100"]
    if kind == "full":
        with pytest.raises(ValueError, match="full fine-tuning needs an unquantized model"):
            run(resolve_args(["--model", str(base), *argv]), log=lambda *_: None)
        base = DEMO
    losses = run(resolve_args(["--model", str(base), *argv]), log=lambda *_: None)["train"]
    assert np.mean([losses[s] for s in (10, 11, 12)]) < np.mean([losses[s] for s in (1, 2, 3)])
    trained, _ = load(base, adapter_path=tmp_path / "adapters")
    kinds = {type(m).__name__ for _, m in trained.named_modules()}
    if kind != "full":
        assert "QuantizedSwitchLinear" in kinds and "SwitchLinear" not in kinds  # never dequantized
    if kind == "lora":
        assert {"LoRALinear", "LoRASwitchLinear"} <= kinds
    elif kind == "dora":  # mlx-lm has no DoRA for experts: the dense projections take it
        assert "DoRALinear" in kinds and "LoRASwitchLinear" not in kinds


def test_yaml_config_and_lora_keys(sort_data, tmp_path):
    config = tmp_path / "lora.yaml"
    config.write_text("lora_parameters:\n  keys: [self_attn.q_proj, self_attn.v_proj]\n  rank: 4\n  scale: 10.0\n"
                      "  dropout: 0.0\niters: 2\nlearning_rate: 1e-3\n")
    args = _args(tmp_path, sort_data, "-c", str(config))
    assert args.iters == 2 and args.learning_rate == 1e-3 and args.lora_parameters["rank"] == 4
    model, _ = load("demo")
    prepare_model(model, args)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable and all(".self_attn.q_proj." in k or ".self_attn.v_proj." in k for k in trainable)


def test_bad_data_lines_are_named(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "12"}, {"role": "assistant", "content": "21"}]}\n'
                                      '{"messages": [{"role": "user", "content": "12"}\n')
    argv = ["--model", "demo", "--train", "--data", str(data), "--num-layers", "-1", "--adapter-path", str(tmp_path / "a")]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data / 'train.jsonl'}:2: not JSON" in err[0]
    (data / "train.jsonl").write_text('{"prompt": "12", "completion": 3}\n')
    assert main(argv) == 1 and "train.jsonl:1: completions data needs string fields" in capsys.readouterr().err
    (data / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "12"}]}\n')
    assert main(argv) == 1 and "train.jsonl:1: the last message must be the assistant's" in capsys.readouterr().err


def test_mlx_lm_autoregressive_tools_refuse_in_one_line(tmp_path, sort_data):
    model, _ = load("demo")
    import mlx_lm

    theirs, _ = mlx_lm.load(str(DEMO))
    with pytest.raises(NoNextTokenLogits, match="no next-token logits"):
        theirs(mx.array([[2, 3, 4]]))
    result = subprocess.run([sys.executable, "-m", "mlx_lm", "lora", "--model", str(DEMO), "--train", "--data",
                             str(sort_data), "--num-layers", "4", "--iters", "2", "--adapter-path", str(tmp_path / "a")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: DiffusionGemma is a diffusion model")
    assert "Traceback" not in result.stderr
