"""`python -m mlx_diffusiongemma.generate` end to end on a small checkpoint
with the test tokenizer and chat template."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_diffusiongemma import diffusion_generate, load
from mlx_diffusiongemma.generate.command import _LiveCanvas, main
from mlx_diffusiongemma.generate import Commit, Draft

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-tokens", "12", "--max-denoising-steps", "3", "--seed", "1"]


def test_prints_answer_and_statistics(chat_checkpoint, capsys):
    assert main(["--model", str(chat_checkpoint), "--prompt", "why is the sky blue", "--system-prompt", "hello", *FAST]) == 0
    lines = capsys.readouterr().out.splitlines()
    mx.random.seed(1)  # --seed seeds mlx's global state before loading, as mlx_lm.generate does
    model, tokenizer = load(chat_checkpoint)
    expected = diffusion_generate(model, tokenizer, "why is the sky blue", system_prompt="hello",
                                  max_tokens=12, max_denoising_steps=3)
    assert lines[0] == expected.text
    stats = lines[-1]
    assert stats.startswith(f"Prompt: {expected.prompt_tokens} tokens, ")
    assert f"Generation: {expected.generation_tokens} tokens, 1 canvases, " in stats
    assert "tokens/forward" in stats and "Peak memory:" in stats


@pytest.mark.parametrize("as_file", [False, True], ids=["flags", "file"])
def test_several_prompts_are_one_batch(chat_checkpoint, capsys, tmp_path, as_file):
    """--prompt given twice, or a file of prompts: one batch, answers in order,
    each what the API's batch gives, a statistics line per prompt and one for the batch."""
    prompts = ["why is the sky blue", "hello there"]
    if as_file:
        (tmp_path / "prompts.txt").write_text(f"{prompts[0]}\n\n{prompts[1]}\n")
        source = ["--prompts-file", str(tmp_path / "prompts.txt")]
    else:
        source = ["--prompt", prompts[0], "--prompt", prompts[1]]
    assert main(["--model", str(chat_checkpoint), *source, *FAST]) == 0
    lines = capsys.readouterr().out.splitlines()
    mx.random.seed(1)
    model, tokenizer = load(chat_checkpoint)
    expected = diffusion_generate(model, tokenizer, prompts, max_tokens=12, max_denoising_steps=3)
    assert lines[0] == "[0]" and lines[1] == expected[0].text and lines[2].startswith("Prompt: ")
    assert lines[3] == "[1]" and lines[4] == expected[1].text and lines[5].startswith("Prompt: ")
    assert lines[6].startswith("Batch: 2 prompts, ") and len(lines) == 7


def test_an_empty_prompts_file_is_named(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("\n  \n")
    assert main(["--model", "demo", "--prompts-file", str(tmp_path / "prompts.txt")]) == 1
    assert "prompts.txt holds no prompt (one per line)" in capsys.readouterr().err


def test_quiet_prints_only_the_answer(chat_checkpoint, capsys):
    assert main(["--model", str(chat_checkpoint), "--prompt", "hello", "--verbose", "False", "--ignore-chat-template", *FAST]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_module_entry_point_reads_stdin(chat_checkpoint):
    result = subprocess.run(
        [sys.executable, "-m", "mlx_diffusiongemma.generate", "--model", str(chat_checkpoint), "--prompt", "-", *FAST],
        input="hello world", capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("Prompt: ")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--seed", "one"], "seed must be an integer in [0, 2**64), got 'one'"),
        (["--seed", "-1"], "seed must be an integer in [0, 2**64), got -1"),
        (["--seed", str(2**64)], f"seed must be an integer in [0, 2**64), got {2**64}"),
        (["--t-min", "0.9", "--t-max", "0.5"], "t_max must be greater than t_min, got t_max=0.5 and t_min=0.9"),
        (["--max-denoising-steps", "0"], "max_denoising_steps must be an integer >= 1, got 0"),
        (["--max-tokens", "0"], "max_tokens must be an integer >= 1, got 0"),
        (["--entropy-bound", "-1"], "entropy_bound must be a number > 0, got -1.0"),
        (["--t-min", "nan"], "t_min must be a number >= 0, got nan"),
        (["--min-confidence", "2"], "min_confidence must be in (0, 1], got 2.0"),
        (["--acceptance", "foo"], "argument --acceptance: invalid choice: 'foo'"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    # the model "x" does not exist: these fail at parsing, before any loading
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "x", "--prompt", "p", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err and message in err, err


def test_missing_required_flag_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--prompt", "p"])
    assert exit_info.value.code == 2 and "--model" in capsys.readouterr().err


def test_bad_inputs_exit_1_with_one_line(chat_checkpoint, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cases = [
        (["--model", str(tmp_path), "--prompt", "hi"], "llama"),
        (["--model", str(tmp_path / "missing"), "--prompt", "hi"], "missing"),
        (["--model", str(chat_checkpoint), "--prompt", ""], "prompt is empty"),
        (["--model", str(chat_checkpoint), "--prompt", "hi", "--t-max", "0.1"], "t_max must be greater than t_min"),
        (["--model", "demo", "--prompt", "abc"], "does not know: 'a', 'b', 'c' (the single characters it knows: 0123456789=)"),
        (["--model", "demo", "--prompt", "321", "--decoder-input-ids", "3", "4"],
         "decoder_input_ids must hold exactly canvas_length=12 ids (one whole canvas), got shape [2]"),
        (["--model", "demo", "--prompt", "321", "--eos-token-id", "14"], "eos_token_id must hold token ids in [0, 14), got (14,)"),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err


def test_live_canvas_redraws_one_line():
    stream = io.StringIO()
    live = _LiveCanvas(stream)
    live.show(Draft(0, 1, mx.array([5, 6]), mx.array(1), mx.array(2.5), None))
    live.show(Commit(0, [5, 6], "sky blue"))
    live.clear()
    out = stream.getvalue()
    assert out.count("\r\033[K") == 3 and "step 1, 1 accepted, entropy 2.50" in out and "sky blue" in out
    assert "\n" not in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--t-max", "1e39"], "t_max must be a number float32 holds (the sampler computes in float32), got 1e+39"),
        (["--t-min", "0", "--t-max", "1e-300"],
         "t_max must be greater than t_min in float32 (the sampler computes in float32), got t_max=1e-300 and t_min=0.0"),
        (["--entropy-bound", "1e-300"], "entropy_bound must be a number float32 holds"),
        (["--max-denoising-steps", str(2**31)], f"max_denoising_steps must be an integer below 2**31, got {2**31}"),
        (["--prompt", "12\udcff"], "argument --prompt/-p: the prompt is not valid UTF-8 text (at character 2)"),
        (["--system-prompt", "\udcff"], "argument --system-prompt: the system prompt is not valid UTF-8 text"),
    ],
)
def test_values_the_sampler_cannot_hold_exit_2(argv, message, capsys):
    """Values past float32's range (the sampler's) or int32's, and text that is
    not UTF-8 (argv bytes reach Python as lone surrogates): usage errors."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "x", "--prompt", "p", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def _stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


@pytest.mark.parametrize(
    "data,message",
    [
        (b"12\xff34", r"standard input is not UTF-8 text (byte 2: b'\xff')"),
        (b"7" * 10_000_000, "standard input holds more than 81920 bytes: more than a prompt that fits the model's context"),
    ],
    ids=["not UTF-8", "10 MB"],
)
def test_bad_stdin_exits_1_with_one_line(monkeypatch, capsys, data, message):
    _stdin(monkeypatch, data)
    assert main(["--model", "demo", "--prompt", "-"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_a_system_prompt_does_not_open_the_door_to_unknown_characters(capsys):
    assert main(["--model", "demo", "--prompt", "abc", "--system-prompt", "<pad>"]) == 1
    assert "does not know: 'a', 'b', 'c'" in capsys.readouterr().err


def _command(args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_diffusiongemma.generate", *args], cwd=ROOT, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, **kwargs,
    )


def _wait_until_reading_stdin(pid: int, timeout: float = 120) -> None:
    """Until the process blocks in read(0, ...) (Linux: /proc/PID/syscall
    starts "0 0x0"), however long its imports take on a loaded machine."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/syscall").read_text().split()[:2] == ["0", "0x0"]:
                time.sleep(0.2)  # inside the read, past the handler's setup
                return
        except (OSError, IndexError):
            pass
        time.sleep(0.1)
    raise AssertionError("the command never read its standard input")


def test_interrupt_is_one_line_and_exit_130():
    import signal
    import time

    process = _command(["--model", "demo", "--prompt", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    _wait_until_reading_stdin(process.pid)  # loaded, reading the prompt from stdin
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.decode().strip().splitlines() == ["python -m mlx_diffusiongemma.generate: interrupted"]


def test_a_reader_that_stops_ends_it_quietly(tmp_path):
    (tmp_path / "prompts.txt").write_text("81502739\n" * 400)  # its output overflows the pipe's buffer
    process = _command(["--model", "demo", "--prompts-file", str(tmp_path / "prompts.txt")], stdout=subprocess.PIPE)
    assert process.stdout.read(20)
    process.stdout.close()  # as `| head -c 20` does
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141 and err.decode() == ""


def test_a_usage_error_is_one_line_whatever_the_arguments_hold(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "demo", "--prompt", "x", "a\nb"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and r"unrecognized arguments: a\nb" in err, err


# Images: --image / --images (mlx_vlm.generate's flag) and --max-soft-tokens.


def _png(path: Path, seed: int = 0, size=(12, 18)) -> Path:
    """A small noise PNG (the tiny tower's images are multiples of 6 pixels once resized)."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def text_only_checkpoint(chat_checkpoint, tmp_path_factory):
    """chat_checkpoint without its vision tower's tensors (its config still names a vision_config)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from mlx_diffusiongemma.model import VISION_PREFIXES

    path = tmp_path_factory.mktemp("text_only") / "model"
    shutil.copytree(chat_checkpoint, path)
    weights = load_file(path / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.startswith(VISION_PREFIXES)}
    assert len(kept) < len(weights)
    save_file(kept, path / "model.safetensors", metadata={"format": "pt"})
    return path


def test_an_image_goes_with_the_prompt(chat_checkpoint, tmp_path, capsys):
    """The command's answer is the API's with the same image and budget, its
    prompt the text's plus the image's soft tokens."""
    image = _png(tmp_path / "a.png")
    argv = ["--model", str(chat_checkpoint), "--prompt", "why is the sky blue", *FAST]
    assert main([*argv, "--image", str(image), "--max-soft-tokens", "70"]) == 0
    lines = capsys.readouterr().out.splitlines()
    mx.random.seed(1)
    model, tokenizer = load(chat_checkpoint)
    expected = diffusion_generate(model, tokenizer, "why is the sky blue", images=[str(image)], max_soft_tokens=70,
                                  max_tokens=12, max_denoising_steps=3)
    text_only = diffusion_generate(model, tokenizer, "why is the sky blue", max_tokens=12, max_denoising_steps=3)
    assert lines[0] == expected.text
    assert lines[-1].startswith(f"Prompt: {expected.prompt_tokens} tokens, ")
    # 12x18 pixels at 70 soft tokens: resized to 36x60, 18x30 patches, 60 soft tokens, plus boi and eoi
    assert expected.prompt_tokens == text_only.prompt_tokens + 62


@pytest.mark.parametrize(
    "flags,images,budget",
    [
        ([], None, None),
        (["--image", "a.png"], ["a.png"], None),
        (["--image", "a.png", "--image", "b.png", "--max-soft-tokens", "140"], ["a.png", "b.png"], 140),
        (["--images", "a.png", "b.png", "--max-soft-tokens", "1120"], ["a.png", "b.png"], 1120),
        (["--max-soft-tokens", "70"], None, 70),
    ],
    ids=["none", "one", "repeated", "listed", "budget alone"],
)
def test_images_and_budget_reach_the_generator(chat_checkpoint, tmp_path, monkeypatch, capsys, flags, images, budget):
    """The paths, in order and as given, and the budget are what stream_diffusion_generate gets."""
    from mlx_diffusiongemma.generate import command

    for seed, name in enumerate(("a.png", "b.png")):
        _png(tmp_path / name, seed)
    monkeypatch.chdir(tmp_path)
    calls = []

    def stub(model, tokenizer, prompt, **kwargs):
        calls.append((prompt, kwargs))
        raise ValueError("stub: no generation")

    monkeypatch.setattr(command, "stream_diffusion_generate", stub)
    assert main(["--model", str(chat_checkpoint), "--prompt", "why", *flags]) == 1
    assert "stub: no generation" in capsys.readouterr().err
    [(prompt, kwargs)] = calls
    assert prompt == "why" and kwargs["images"] == images and kwargs["max_soft_tokens"] == budget


def test_a_bad_image_is_one_line_before_the_model_loads(tmp_path, capsys):
    """A missing, corrupt or truncated file: one line naming it, exit 1; the
    model ("missing-model" does not exist) is never loaded."""
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png at all")
    truncated = _png(tmp_path / "truncated.png", size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:300])
    good = _png(tmp_path / "good.png")
    for bad, message in [
        (tmp_path / "missing.png", "image file not found: "),
        (corrupt, "cannot read image "),
        (truncated, "cannot read image "),
        (tmp_path, "image file not found: "),
    ]:
        assert main(["--model", str(tmp_path / "missing-model"), "--prompt", "hi", "--image", str(good), str(bad)]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"{message}{bad}" in err and "Traceback" not in err, err


def test_without_pillow_the_image_names_the_extra(tmp_path, monkeypatch, capsys):
    image = _png(tmp_path / "a.png")
    for name in [name for name in sys.modules if name == "PIL" or name.startswith("PIL.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert main(["--model", str(tmp_path / "missing-model"), "--prompt", "hi", "--image", str(image)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install 'mlx-diffusiongemma[vision]'" in err, err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max-soft-tokens", "100"], "argument --max-soft-tokens: invalid choice: 100 (choose from 70, 140, 280, 560, 1120)"),
        (["--max-soft-tokens", "many"], "argument --max-soft-tokens: invalid int value: 'many'"),
        (["--image"], "argument --image/--images: expected at least one argument"),
        (["--image", "a.png", "--prompt", "q"], "--image goes with a single --prompt, not a batch"),
        (["--prompt", "q", "--images", "a.png"], "--image goes with a single --prompt, not a batch"),
    ],
)
def test_bad_image_flags_exit_2_with_one_line(argv, message, capsys):
    # the model "x" and the image "a.png" do not exist: these fail at parsing
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "x", "--prompt", "p", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error:" in err and message in err, err


def test_a_batch_file_refuses_images(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("hi\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", "x", "--prompts-file", str(tmp_path / "prompts.txt"), "--image", "a.png"])
    assert exit_info.value.code == 2 and "--image goes with a single --prompt" in capsys.readouterr().err


def test_a_text_only_model_refuses_an_image(text_only_checkpoint, tmp_path, capsys):
    """No vision tower: text generates, an image is one line and exit 1."""
    image = _png(tmp_path / "a.png")
    assert main(["--model", str(text_only_checkpoint), "--prompt", "why is the sky blue", *FAST]) == 0
    capsys.readouterr()
    assert main(["--model", str(text_only_checkpoint), "--prompt", "why", "--image", str(image), *FAST]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "this model has no vision tower" in err, err


def test_a_raw_prompt_marks_where_the_image_goes(chat_checkpoint, tmp_path, capsys):
    """--ignore-chat-template: the prompt holds the image token where the image goes;
    without it, the count mismatch is one line."""
    image = _png(tmp_path / "a.png")
    argv = ["--model", str(chat_checkpoint), "--ignore-chat-template", "--image", str(image), "--max-soft-tokens", "70", *FAST]
    assert main([*argv, "--prompt", "why <|image|> blue"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("Prompt: 64 tokens, ")  # why, boi, 60, eoi, blue
    assert main([*argv, "--prompt", "why blue"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "0 image placeholder(s) (<|image|>) but 1 image(s)" in err, err
