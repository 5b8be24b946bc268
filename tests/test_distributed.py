"""Tensor parallelism on two processes: `mlx.launch -n 2 --backend ring` on
loopback runs tests/helpers/distributed_worker.py, which loads each checkpoint whole and
sharded (our `load_model(..., tensor_group=)` and mlx-lm's `sharded_load`) on
every rank; these tests compare what the ranks report.

The float checkpoint has 3 kv heads on its sliding layers (two ranks cannot
split them: that attention stays whole) and 2 on its full layers (split, K = V),
plus attention biases (o_proj's must be added once, after the sum). The
quantized one (the mlx-community recipe, 4-bit experts in groups of 64) has 2 kv
heads on sliding layers (split, with v_proj) and 1 on full layers (each rank's
query heads read it), and experts 192 = 3 groups wide, split 2 : 1.
The two launches take about 30 s on 2 cores.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchLinear

from mlx_diffusiongemma import Model, ModelArgs, load, load_model, quantize, save_model
from mlx_diffusiongemma.generate.command import main as cli_main
from mlx_diffusiongemma.tp import keep_inputs, keep_outputs

from helpers.reference import build_reference, save_reference
from helpers.tiny_tokenizer import write_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "mlx_diffusiongemma" / "demo_model"
TOLERANCE = 1e-4
TIMEOUT = 240  # seconds for one launch; a hung ring is killed, never waited on
CLI_ARGS = ["--model", "demo", "--prompt", "81502739", "--seed", "3", "--max-tokens", "24", "--eos-token-id",
            "--max-denoising-steps", "8", "--verbose", "False"]  # two canvases, no eos

# Parameters each rank holds a share of; every other parameter is whole on every rank.
_FEED_FORWARD = r"(mlp|experts|self_conditioning)\.(gate|up|gate_up|down)_proj\."
SPLIT = {
    "float": _FEED_FORWARD + r"|layers\.[13]\.self_attn\.([qko]_proj\.weight|[qk]_proj\.bias)",
    "quantized": _FEED_FORWARD + r"|layers\.[02]\.self_attn\.[qkvo]_proj\.|layers\.[13]\.self_attn\.[qo]_proj\.",
}


def _launcher() -> str:
    """mlx.launch, installed with mlx next to this Python."""
    found = Path(sys.executable).with_name("mlx.launch")
    path = str(found) if found.is_file() else shutil.which("mlx.launch")
    if path is None:
        pytest.fail("mlx.launch not found next to the Python running the tests nor on PATH (it is installed with mlx)")
    return path


def _free_port_pair() -> int:
    """A port p with p + 1 free too: two ranks on loopback listen on both."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    pytest.fail("no two consecutive free ports on 127.0.0.1")


def launch(*command: str) -> str:
    """Run `python *command` on two ranks; their stdout. The launcher and its
    ranks get a session of their own, killed whole on timeout."""
    args = [_launcher(), "-n", "2", "--backend", "ring", "--starting-port", str(_free_port_pair()),
            "--python", sys.executable, "--", *command]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"mlx.launch did not finish in {TIMEOUT} s:\n{err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    float_path = save_reference(
        build_reference(seed=7, num_attention_heads=6, num_key_value_heads=3, num_global_key_value_heads=2,
                        attention_bias=True, moe_intermediate_size=192),
        root / "float",
    )
    source = save_reference(
        build_reference(seed=8, num_attention_heads=4, num_key_value_heads=2, head_dim=32, global_head_dim=64,
                        num_global_key_value_heads=1, moe_intermediate_size=192),
        root / "source",
    )
    model = load_model(source)
    config = json.loads((source / "config.json").read_text())
    config["quantization"] = quantize(model, bits=4, group_size=64)
    quantized_path = save_model(model, root / "quantized", config)
    for path in (float_path, quantized_path):
        write_tokenizer(path)  # mlx-lm's sharded_load loads one
    return {"float": float_path, "quantized": quantized_path}


@pytest.fixture(scope="module")
def ranks(checkpoints, tmp_path_factory):
    """What each rank of the worker reported, rank 0 first."""
    out = tmp_path_factory.mktemp("ranks")
    launch(str(ROOT / "tests" / "helpers" / "distributed_worker.py"), str(out), str(checkpoints["float"]),
           str(checkpoints["quantized"]), str(DEMO))
    reports = [json.loads((out / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    return reports


@pytest.mark.parametrize("checkpoint", ["float", "quantized"])
@pytest.mark.parametrize("loader", ["ours", "mlx_lm"])
def test_sharded_logits_match_one_process(ranks, checkpoint, loader):
    for report in ranks:
        stages = report[checkpoint][loader]
        assert set(stages) == {"encode", "decode", "self-conditioned", "after commit"}
        for stage, result in stages.items():
            assert result["max_diff"] <= TOLERANCE, (report["rank"], stage, result["max_diff"])


@pytest.mark.parametrize("checkpoint", ["float", "quantized"])
def test_ranks_compute_the_same_bits(ranks, checkpoint):
    # the ring all-reduce sums each segment on one rank and copies it to the
    # others, so every rank holds the same logits and draws the same tokens
    first, second = (report[checkpoint] for report in ranks)
    for loader in ("ours", "mlx_lm"):
        assert {s: r["digest"] for s, r in first[loader].items()} == {s: r["digest"] for s, r in second[loader].items()}
    assert first["ours"]["decode"]["digest"] == first["mlx_lm"]["decode"]["digest"]
    assert len(first["tokens"]) == 24 and first["tokens"] == second["tokens"]


def test_seeded_generation_matches_one_process(ranks):
    # the trained demo model (its draws are not at the mercy of rounding): two
    # canvases per prompt through our loop, and mlx-lm's loop seeded globally
    for report in ranks:
        demo = report["demo"]
        assert demo["ours"] == demo["whole"] and all(len(tokens) == 24 for tokens in demo["ours"])
        assert demo["mlx_lm"] == demo["mlx_lm_whole"]
    assert ranks[0]["demo"] == ranks[1]["demo"]
    assert ranks[0]["demo"]["ours"][0][:9] == [3, 4, 5, 6, 8, 10, 11, 12, 1]  # "01235789" and eos


@pytest.mark.parametrize("checkpoint", ["float", "quantized"])
def test_each_rank_holds_its_share(ranks, checkpoint):
    whole = ranks[0][checkpoint]["sizes"]["whole"]
    held = [report[checkpoint]["sizes"]["sharded"] for report in ranks]
    assert set(held[0]) == set(held[1]) == set(whole)
    # the vision tower is not cut: each rank holds it whole (and reads it only for an image)
    split = {key for key in whole if re.search(SPLIT[checkpoint], key) and ".vision_tower." not in key}
    assert any(".experts." in key for key in split) and any(".self_attn." in key for key in split)
    for key in whole:
        if key in split:
            assert held[0][key] + held[1][key] == whole[key], key
            # even halves, but the quantized experts: 3 groups of 64, split 2 : 1
            shares = sorted(h[key] / whole[key] for h in held)
            assert shares == ([1 / 3, 2 / 3] if checkpoint == "quantized" and ".experts." in key else [0.5, 0.5]), key
        else:
            assert held[0][key] == held[1][key] == whole[key], key
    total = sum(whole.values())
    print(checkpoint, [f"{sum(h.values()) / total:.2f}" for h in held], "of the whole model's parameters per rank")
    if checkpoint == "quantized":
        kinds = set(ranks[0][checkpoint]["kinds"])
        assert {"QuantizedLinear", "QuantizedSwitchLinear", "QuantizedEmbedding"} <= kinds and "Linear" not in kinds


def test_cli_under_mlx_launch_prints_what_one_process_prints(capsys):
    assert cli_main(CLI_ARGS) == 0
    alone = capsys.readouterr().out
    assert alone.strip()
    # rank 0 prints, rank 1 generates silently
    assert launch("-m", "mlx_diffusiongemma.generate", *CLI_ARGS) == alone


def _nbytes(model) -> int:
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


class _Group:
    """A stand-in for mx.distributed.Group: size and rank, nothing sent."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def test_shard_refuses_a_group_wider_than_a_block_and_changes_nothing(checkpoints):
    model = load_model(checkpoints["quantized"])
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    with pytest.raises(ValueError, match=r"cannot split model\.decoder\.self_conditioning across 4 ranks: "
                                         r"its intermediate size is 128 = 2 quantization group\(s\) of 64"):
        model.shard(_Group(4))
    after = dict(tree_flatten(model.parameters()))
    assert set(after) == set(before)
    for key, value in before.items():
        np.testing.assert_array_equal(np.array(after[key]), value, err_msg=key)


def test_a_sharded_model_is_not_sharded_again(checkpoints):
    model = load_model(checkpoints["float"])
    model.shard(_Group(2, 1))  # slices only: nothing is sent until it runs
    assert model.layers[0].mlp.gate_proj.weight.shape == (64, 64)
    with pytest.raises(ValueError, match="the model is sharded already"):
        model.shard(_Group(2, 1))


def test_a_group_of_one_loads_the_whole_model(checkpoints):
    group = mx.distributed.init()
    assert group.size() == 1  # not under mlx.launch
    whole = dict(tree_flatten(load_model(checkpoints["float"]).parameters()))
    alone = dict(tree_flatten(load_model(checkpoints["float"], tensor_group=group).parameters()))
    assert {k: v.shape for k, v in alone.items()} == {k: v.shape for k, v in whole.items()}


def test_adapters_cannot_join_a_sharded_model(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="LoRA adapters cannot be applied to a sharded model"):
        load(checkpoints["float"], adapter_path=tmp_path, tensor_group=mx.distributed.init())


@pytest.mark.parametrize("mode,bits,group_size", [("affine", 3, 32), ("affine", 4, 64), ("affine", 6, 64),
                                                  ("affine", 8, 128), ("mxfp4", 4, 32), ("mxfp8", 8, 32),
                                                  ("nvfp4", 4, 16)])
def test_quantized_shares_dequantize_to_the_whole_weights_slices(mode, bits, group_size):
    # a share of packed words, scales and biases is the same share of the weights
    layer = SwitchLinear(256, 48, 3, bias=False).to_quantized(group_size=group_size, bits=bits, mode=mode)

    def weights():
        return np.array(mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=group_size,
                                      bits=bits, mode=mode).astype(mx.float32))

    whole = weights()
    keep_inputs(layer, 2 * group_size, 4 * group_size, 256)
    np.testing.assert_array_equal(weights(), whole[..., 2 * group_size : 4 * group_size])
    keep_outputs(layer, [(4, 10), (30, 36)])
    expected = whole[..., 2 * group_size : 4 * group_size]
    np.testing.assert_array_equal(weights(), np.concatenate([expected[:, 4:10], expected[:, 30:36]], axis=1))


def test_a_sharded_load_never_holds_the_whole_model(tmp_path):
    config = {"model_type": "diffusion_gemma", "canvas_length": 16, "text_config": {
        "hidden_size": 256, "num_hidden_layers": 6, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1024, "num_experts": 16, "top_k_experts": 2,
        "moe_intermediate_size": 256}}
    model = Model(ModelArgs.from_dict(config))
    whole = _nbytes(model)
    path = save_model(model, tmp_path / "model", config)
    del model
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    share = _nbytes(load_model(path, tensor_group=_Group(2, 0)))
    peak = mx.get_peak_memory() - before
    print(f"whole {whole / 1e6:.1f} MB, share {share / 1e6:.1f} MB, peak {peak / 1e6:.1f} MB")
    # read layer by layer: the share plus one of the 6 layers whole at most
    assert share < 0.6 * whole and peak < 0.75 * whole
