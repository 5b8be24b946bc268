"""`python -m mlx_diffusiongemma.convert`: round trips through `load_model` (logits
bit-identical to quantizing in memory), output layout, safety (refusal, --force,
interrupted runs) and the hub upload, with the hub client replaced."""

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_diffusiongemma import convert as convert_module
from mlx_diffusiongemma import load, load_model, quantize
from mlx_diffusiongemma.convert import convert, main
from mlx_diffusiongemma.model import VISION_PREFIXES

from helpers.reference import build_reference, save_reference
from helpers.tiny_tokenizer import write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
VISION_KEY = "model.encoder.vision_tower.patch_embedder.input_proj.weight"


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    """A tiny Hugging Face checkpoint with a tokenizer and chat template, as on the hub."""
    path = save_reference(build_reference(seed=7), tmp_path_factory.mktemp("hf"))
    write_tokenizer(path)
    return path


def logits(model) -> list:
    rng = np.random.default_rng(0)
    prompt, canvas = rng.integers(0, 320, 19).tolist(), rng.integers(0, 320, 12).tolist()
    cache = model.make_cache()
    model.encode(prompt, cache)
    first = model.decode(canvas, cache)
    return [np.array(first), np.array(model.decode(canvas, cache, self_conditioning=first))]


def assert_same_model(a, b):
    """Bit-identical parameters (names, dtypes, values) and logits."""
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and mx.array_equal(pa[k], pb[k]), k
    for x, y in zip(logits(a), logits(b)):
        np.testing.assert_array_equal(x, y)


def siblings(path: Path) -> list:
    """Everything next to `path` that a conversion into it may have left behind."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.lstrip(".").startswith(path.name))


def run_cli(capsys, *argv) -> tuple:
    """(exit code, stderr lines) of the CLI run in process."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
        sys.exit(0)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "bits,mode,shard_gb",
    [(4, "affine", 5.0), (8, "affine", 0.0004), (6, "affine", 5.0), (4, "mxfp4", 5.0), (8, "mxfp8", 5.0),
     (4, "nvfp4", 5.0)],
)
def test_quantized_round_trip(hf, tmp_path, bits, mode, shard_gb):
    out = convert(hf, tmp_path / "out", quantize=True, q_bits=bits, q_mode=mode, max_shard_size_gb=shard_gb)
    in_memory = load_model(hf)
    entries = quantize(in_memory, bits=bits, mode=mode)
    assert_same_model(load_model(out), in_memory)

    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == entries
    assert entries["group_size"] == {"affine": 64, "mxfp4": 32, "mxfp8": 32, "nvfp4": 16}[mode]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert (n > 1) == (shard_gb < 1)
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(v.nbytes for f in shards for v in mx.load(str(out / f)).values())

    weights = {k: v for f in shards for k, v in mx.load(str(out / f)).items()}
    layer = "model.decoder.layers.1"
    assert weights[f"{layer}.self_attn.q_proj.weight"].shape[-1] == 64 * 8 // 32  # 8-bit, as in the recipe
    assert weights[f"{layer}.experts.gate_up_proj.weight"].shape[-1] == 64 * bits // 32
    for name in (f"{layer}.input_layernorm.weight", f"{layer}.layer_scalar", f"{layer}.router.scale"):
        assert weights[name].dtype == mx.float32, name  # unquantized (packed weights are uint32)
    assert VISION_KEY in weights and weights[VISION_KEY].dtype == mx.float32
    assert not any(k.startswith("model.encoder.vision_tower.") and k.endswith(".scales") for k in weights)


def test_bfloat16_round_trip(hf, tmp_path, capsys):
    code, err = run_cli(capsys, "--hf-path", hf, "--mlx-path", tmp_path / "bf16", "--dtype", "bfloat16")
    assert (code, err) == (0, [])
    out = tmp_path / "bf16"
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["dtype"] == "bfloat16"
    weights = mx.load(str(out / "model-00001-of-00001.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.bfloat16}
    assert VISION_KEY in weights
    with pytest.warns(UserWarning, match="float32"):  # the CPU runs unquantized experts in float32
        converted = load_model(out)
    with pytest.warns(UserWarning, match="float32"):
        in_memory = load_model(hf, dtype="bfloat16")
    assert_same_model(converted, in_memory)


def test_output_files_and_model_card(hf, tmp_path):
    out = convert(hf, tmp_path / "diffusiongemma-4bit", quantize=True)
    for name in ["config.json", "generation_config.json", "model.safetensors.index.json", *TOKENIZER_FILES]:
        assert (out / name).is_file(), name
    for name in ["generation_config.json", *TOKENIZER_FILES]:
        assert (out / name).read_bytes() == (hf / name).read_bytes(), name
    (_, converted), (_, source) = load(out), load(hf)
    messages = [{"role": "user", "content": "w1 w2"}]
    rendered = converted.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == source.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|turn>user" in rendered and converted.eos_token_ids == source.eos_token_ids
    text = json.loads((out / "config.json").read_text())["text_config"]
    full = next(iter(text["per_layer_config"].values()))  # both forms: ours and mlx-vlm's
    assert (text["global_head_dim"], text["num_global_key_value_heads"]) == (full["head_dim"], full["num_key_value_heads"])

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: mlx" in card
    assert "# diffusiongemma-4bit" in card and str(hf) in card
    assert "mlx-community recipe: experts and self-conditioning 4-bit affine (group size 64)" in card
    assert "router 8-bit affine (group size 64)" in card and "vision tower unquantized (float32)" in card
    assert " GB in 1 safetensors shard" in card
    assert f'python -m mlx_diffusiongemma.generate --model {out} --prompt "' in card
    assert f'mlx_lm.generate --model {out} --prompt "' in card


@pytest.mark.parametrize("existing", [False, True], ids=["new", "force-over-old"])
def test_failure_mid_stream_leaves_nothing(hf, tmp_path, monkeypatch, existing):
    out, written = tmp_path / "out", []
    if existing:
        out.mkdir()
        (out / "old.txt").write_text("old")

    def save_then_fail(path, tensors, metadata):
        if written:
            raise OSError("disk full")
        written.append(path)
        mx.save_safetensors(path, tensors, metadata=metadata)

    monkeypatch.setattr(convert_module.mx, "save_safetensors", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        convert(hf, out, quantize=True, max_shard_size_gb=0.0004, force=existing)
    assert written
    assert siblings(out) == (["out"] if existing else [])
    if existing:  # --force replaces the old output only once the new one is complete
        assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_output_gets_the_umask(hf, tmp_path):
    previous = os.umask(0o027)
    try:
        out = convert(hf, tmp_path / "out")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()} == {0o640}


def test_killed_conversion_leaves_nothing(hf, tmp_path):
    """SIGTERM while shards are being written: the CLI removes its temporary directory."""
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, time
        from mlx_diffusiongemma import convert
        save = convert.mx.save_safetensors
        def save_and_stall(*args, **kwargs):
            save(*args, **kwargs)
            print("shard written", flush=True)
            time.sleep(60)
        convert.mx.save_safetensors = save_and_stall
        sys.argv = ["convert", "--hf-path", {str(hf)!r}, "--mlx-path", {str(out)!r}, "-q",
                    "--max-shard-size-gb", "0.0004"]
        convert.main()
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("shard written"):
            assert len([p for p in tmp_path.iterdir() if p.name.startswith(".out.")]) == 1
            proc.send_signal(signal.SIGTERM)
            break
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert siblings(out) == []


def test_refuses_non_empty_output_without_force(hf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(capsys, "--hf-path", hf, "--mlx-path", out, "-q")
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: ") and str(out) in err[0] and "--force" in err[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert siblings(out) == ["out"]


def test_force_replaces_output(hf, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_text("old")
    code, _ = run_cli(capsys, "--hf-path", hf, "--mlx-path", out, "-q", "--q-bits", "8", "--force")
    assert code == 0
    assert not (out / "stale.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert siblings(out) == ["out"]


def test_upload_calls_the_hub(hf, tmp_path, capsys, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, **kwargs):
            calls.append(("create_repo", kwargs))

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            assert (Path(kwargs["folder_path"]) / "config.json").is_file()  # the finished output

    monkeypatch.setattr(convert_module, "HfApi", FakeApi)
    out = tmp_path / "out"
    code, _ = run_cli(capsys, "--hf-path", hf, "--mlx-path", out, "-q", "--upload-repo", "me/dg-4bit")
    assert code == 0
    assert calls == [
        ("create_repo", {"repo_id": "me/dg-4bit", "repo_type": "model", "exist_ok": True}),
        ("upload_folder", {"folder_path": str(out), "repo_id": "me/dg-4bit", "repo_type": "model"}),
    ]
    assert "--model me/dg-4bit" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--bogus"], "unrecognized arguments"),
        (["--q-bits", "7"], "invalid choice: 7"),
        (["--q-bits", "8"], "need -q/--quantize"),
        (["--q-mode", "mxfp9", "-q"], "invalid choice: 'mxfp9'"),
        (["--max-shard-size-gb", "0"], "max_shard_size_gb must be a finite number > 0, got 0.0"),
        (["--max-shard-size-gb", "-1"], "max_shard_size_gb must be a finite number > 0, got -1.0"),
        (["--max-shard-size-gb", "big"], "max_shard_size_gb must be a finite number > 0, got 'big'"),
    ],
    ids=["unknown-flag", "bad-bits", "bits-without-q", "bad-mode", "zero-shard", "negative-shard", "word-shard"],
)
def test_usage_errors_exit_2_with_one_line(hf, tmp_path, capsys, argv, message):
    code, err = run_cli(capsys, "--hf-path", hf, "--mlx-path", tmp_path / "out", *argv)
    assert code == 2 and len(err) == 1 and "error:" in err[0] and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", [0, -1, float("inf"), "5"])
def test_shard_size_must_be_positive(hf, tmp_path, size):
    with pytest.raises(ValueError, match=rf"max_shard_size_gb must be a finite number > 0, got {size!r}"):
        convert(hf, tmp_path / "out", max_shard_size_gb=size)
    assert siblings(tmp_path / "out") == []


def _damage(hf, tmp_path, how) -> Path:
    path = tmp_path / "damaged"
    path.mkdir()
    for f in hf.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    if how == "config":
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "model_type": "gemma4"}))
    elif how == "truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "missing-weight":
        weights = mx.load(str(path / "model.safetensors"))
        del weights["model.decoder.layers.2.router.scale"]
        mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


@pytest.mark.parametrize(
    "how,named",
    [
        ("missing-dir", "does not exist"),
        ("config", "config.json"),
        ("truncated", "model.safetensors"),
        ("missing-weight", "model.decoder.layers.2.router.scale"),
    ],
)
def test_bad_input_exits_1_with_one_line(hf, tmp_path, capsys, how, named):
    src = tmp_path / "nowhere" if how == "missing-dir" else _damage(hf, tmp_path, how)
    code, err = run_cli(capsys, "--hf-path", src, "--mlx-path", tmp_path / "out", "-q")
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: ") and named in err[0]
    assert siblings(tmp_path / "out") == []


def test_group_size_that_does_not_fit_is_refused_up_front(tmp_path, capsys):
    src = save_reference(build_reference(seed=1, moe_intermediate_size=96), tmp_path / "hf")
    out = tmp_path / "out"
    capsys.readouterr()  # transformers' progress bar
    code, err = run_cli(capsys, "--hf-path", src, "--mlx-path", out, "-q", "--q-bits", "4")
    assert code == 1 and err == [
        "error: cannot quantize model.decoder.layers.0.experts.down_proj.weight (and 3 more weight(s)): its input "
        "dimension 96 is not a multiple of group size 64; affine group sizes that fit it: 32"
    ]
    assert siblings(out) == []
    assert run_cli(capsys, "--hf-path", src, "--mlx-path", out, "-q", "--q-group-size", "32") == (0, [])
    assert json.loads((out / "config.json").read_text())["quantization"]["group_size"] == 32


def test_refuses_to_replace_the_source(hf, tmp_path, capsys):
    for dst in (hf, hf.parent):
        code, err = run_cli(capsys, "--hf-path", hf, "--mlx-path", dst, "--force")
        assert code == 1 and "source checkpoint" in err[0]
    assert (hf / "model.safetensors").is_file()


def test_already_quantized_input_is_refused(hf, tmp_path, capsys):
    first = convert(hf, tmp_path / "q4", quantize=True)
    code, err = run_cli(capsys, "--hf-path", first, "--mlx-path", tmp_path / "again", "-q")
    assert code == 1 and "already quantized" in err[0]


@pytest.fixture(scope="module")
def hf_bf16(tmp_path_factory) -> Path:
    """The same kind of checkpoint in bfloat16, its config as transformers 5 writes it (a top-level `dtype`)."""
    import torch

    path = save_reference(build_reference(seed=7).to(torch.bfloat16), tmp_path_factory.mktemp("hf-bf16"))
    write_tokenizer(path)
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config and "dtype" not in config["text_config"]
    return path


@pytest.mark.parametrize("source,mode", [("float32", "affine"), ("float32", "mxfp4"), ("bfloat16", "affine")])
def test_mlx_lm_convert_uses_the_same_recipe(hf, hf_bf16, tmp_path, capsys, source, mode):
    """`mlx_lm.convert -q` (which takes the recipe from `Model.quant_predicate`) and
    our convert write the same config entries and, but for one case, the same weights.

    The case: mlx-lm casts weights to the dtype it finds in `torch_dtype` or
    `text_config.dtype`, not in transformers 5's top-level `dtype`. So for a
    bfloat16 checkpoint with such a config it keeps what it loaded, and on the
    CPU our loader loaded the unquantized experts as float32 (`_cast_for_cpu_experts`):
    mlx-lm's affine expert scales and biases come out float32, ours bfloat16,
    equal once rounded to bfloat16 (the packed weights are identical). With
    `torch_dtype` set, on a GPU, in float32, or with mxfp4's uint8 scales,
    everything is identical."""
    src = hf if source == "float32" else hf_bf16
    theirs, ours = tmp_path / "mlx-lm", tmp_path / "ours"  # mlx-lm refuses an existing --mlx-path
    result = subprocess.run(
        [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(src), "--mlx-path", str(theirs), "-q",
         "--q-mode", mode],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert run_cli(capsys, "--hf-path", src, "--mlx-path", ours, "-q", "--q-mode", mode) == (0, [])

    config_theirs, config_ours = (json.loads((p / "config.json").read_text()) for p in (theirs, ours))
    for key in ("quantization", "quantization_config"):
        assert config_theirs[key] == config_ours[key]
    pinned = {k for k, v in config_ours["quantization"].items() if isinstance(v, dict)}
    # embeddings; per layer q/k/o (and v on the 2 sliding layers), the 3 dense MLP projections, the router
    assert len(pinned) == 1 + 4 * 7 + 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CPU's float32 expert cast, for the unquantized copies only
        a, b = (dict(tree_flatten(load_model(p).parameters())) for p in (theirs, ours))
    # mlx-lm's convert writes a text-only repo; ours keeps the vision tower, unquantized
    tower = {k for k in b if k.startswith(VISION_PREFIXES)}
    assert tower and not any(k.endswith(".scales") for k in tower)
    b = {k: v for k, v in b.items() if k not in tower}
    assert a.keys() == b.keys()
    differ = {k for k in a if a[k].dtype != b[k].dtype or not mx.array_equal(a[k], b[k])}
    cast_experts = source == "bfloat16" and mode == "affine" and mx.default_device() == mx.cpu
    expected = {k for k in a if ".experts." in k and k.endswith((".scales", ".biases"))} if cast_experts else set()
    assert differ == expected and (not cast_experts or len(expected) == 16)
    for k in expected:
        assert (a[k].dtype, b[k].dtype) == (mx.float32, mx.bfloat16) and mx.array_equal(a[k].astype(mx.bfloat16), b[k])


def stalled_convert(hf, out, *flags, until: Path) -> subprocess.Popen:
    """The CLI in a child process that, once it has written its first shard,
    prints "shard written" and waits for `until` to exist (SIGINT wakes it)."""
    script = textwrap.dedent(f"""
        import signal, sys, time
        from pathlib import Path
        from mlx_diffusiongemma import convert
        # as in a terminal, whatever the test runner's own handling of SIGINT
        signal.signal(signal.SIGINT, signal.default_int_handler)
        save = convert.mx.save_safetensors
        def save_and_stall(*args, **kwargs):
            save(*args, **kwargs)
            print("shard written", flush=True)
            while not Path({str(until)!r}).exists():
                time.sleep(0.05)
        convert.mx.save_safetensors = save_and_stall
        sys.argv = ["convert", "--hf-path", {str(hf)!r}, "--mlx-path", {str(out)!r}, "-q",
                    "--max-shard-size-gb", "0.0004", *{[str(f) for f in flags]!r}]
        convert.main()
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    for line in proc.stdout:
        if line.startswith("shard written"):
            return proc
    proc.wait(timeout=30)
    raise AssertionError(f"the child ended before its first shard: {proc.stderr.read()}")


def test_second_run_into_the_same_destination_is_refused(hf, tmp_path):
    """Two processes, one destination: the second is refused while the first
    runs (naming it), and the first's output is the one that lands."""
    out, go = tmp_path / "out", tmp_path / "go"
    first = stalled_convert(hf, out, until=go)
    try:
        second = subprocess.run(
            [sys.executable, "-m", "mlx_diffusiongemma.convert", "--hf-path", str(hf), "--mlx-path", str(out)],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120,
        )
        err = second.stderr.strip().splitlines()
        assert second.returncode == 1 and len(err) == 1, second.stderr
        assert err[0].startswith("error: ") and str(out) in err[0] and f"pid {first.pid} " in err[0]
        assert "Wrote" not in second.stdout
    finally:
        go.touch()
    assert first.wait(timeout=120) == 0
    assert "[INFO] Wrote" in first.stdout.read()
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4  # the first run's (-q)
    assert siblings(out) == ["out"]


@pytest.mark.parametrize("what", ["new-directory", "file", "into-empty", "force"])
def test_output_that_appears_during_the_run_is_kept(hf, tmp_path, capsys, monkeypatch, what):
    """Without --force, the swap takes the place of nothing or of an empty
    directory only: what someone else wrote there meanwhile stays, the run fails."""
    out, save = tmp_path / "out", convert_module.mx.save_safetensors
    if what in ("into-empty", "force"):
        out.mkdir()

    def save_while_someone_writes(path, tensors, metadata):
        save(path, tensors, metadata=metadata)
        if what == "file":
            out.write_text("theirs")
        else:
            out.mkdir(exist_ok=True)
            (out / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(convert_module.mx, "save_safetensors", save_while_someone_writes)
    code, err = run_cli(capsys, "--hf-path", hf, "--mlx-path", out, "-q", *(["--force"] if what == "force" else []))
    assert siblings(out) == ["out"]
    if what == "force":  # replacing is what --force asks for
        assert code == 0 and (out / "config.json").is_file() and not (out / "theirs.txt").exists()
        return
    assert code == 1 and len(err) == 1 and err[0].startswith("error: ") and str(out) in err[0], err
    assert (out if what == "file" else out / "theirs.txt").read_text() == "theirs"
    assert what == "file" or [p.name for p in out.iterdir()] == ["theirs.txt"]


@pytest.mark.parametrize("cwd,mlx_path", [("out", "."), ("out/sub", "..")])
def test_destination_holding_the_working_directory_is_refused_up_front(hf, tmp_path, capsys, monkeypatch, cwd,
                                                                       mlx_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "old.txt").write_text("old")
    monkeypatch.chdir(tmp_path / cwd)
    code, err = run_cli(capsys, "--hf-path", hf, "--mlx-path", mlx_path, "-q", "--force")
    assert code == 1 and len(err) == 1 and str(out) in err[0] and "current directory" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["old.txt", "sub"] and not list((out / "sub").iterdir())
    assert siblings(out) == ["out"]


def test_interrupt_exits_130_with_one_line_and_loses_nothing(hf, tmp_path):
    """Ctrl-C mid-conversion, over an old output with --force: one line, exit 130,
    the old output as it was, nothing staged left."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    proc = stalled_convert(hf, out, "--force", until=tmp_path / "never")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert proc.stderr.read().splitlines() == [
        f"python -m mlx_diffusiongemma.convert: interrupted; {out} left as it was"
    ]
    assert [p.name for p in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "old"
    assert siblings(out) == ["out"]


def test_bad_generation_config_is_refused_before_writing(hf, tmp_path, capsys):
    src = _damage(hf, tmp_path, "none")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 320]}))  # vocab_size is 320
    code, err = run_cli(capsys, "--hf-path", src, "--mlx-path", tmp_path / "out", "-q")
    assert code == 1 and len(err) == 1 and "generation_config.json" in err[0] and "eos_token_id" in err[0], err
    assert siblings(tmp_path / "out") == []


def test_interrupted_upload_says_the_output_is_written(hf, tmp_path, capsys, monkeypatch):
    class InterruptedApi:
        def create_repo(self, **kwargs):
            raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "HfApi", InterruptedApi)
    out = tmp_path / "out"
    code, err = run_cli(capsys, "--hf-path", hf, "--mlx-path", out, "--upload-repo", "me/dg")
    assert code == 130 and err == [
        f"python -m mlx_diffusiongemma.convert: interrupted; {out} written, its upload to me/dg not finished"
    ]
    assert (out / "config.json").is_file() and siblings(out) == ["out"]
