"""The fused sampler kernel (metal/, mlx_diffusiongemma/kernels.py).

There is no GPU here. The Metal source is run by emulation: the package's own
code launches it through `metal_emulation.metal_kernel` (mx.fast.metal_kernel's
interface: mlx's generated signature around the same header and body, compiled
with g++ against metal_shim.h). The CUDA source is compiled with nvcc for
sm_90. What neither checks: Metal's and NVRTC's compilers and math libraries,
and speed; benchmarks/fused_sampler.py does on a GPU.
"""

import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_diffusiongemma import diffusion_generate, kernels, load, sampling
from mlx_diffusiongemma.demo import problems, score

from helpers import metal_emulation
from helpers.cuda_build import cuda_source, nvcc_compile

ROOT = Path(__file__).resolve().parent.parent
T = mx.array(0.7, mx.float32)


@pytest.fixture
def emulated(monkeypatch):
    """The kernel path on: a 'Metal' backend whose kernels run by emulation."""
    monkeypatch.setattr(mx.fast, "metal_kernel", metal_emulation.metal_kernel)
    monkeypatch.setattr(kernels, "backend", lambda: "metal")
    monkeypatch.setattr(sampling, "_fused_checked", {})
    kernels.kernel.cache_clear()
    yield
    kernels.kernel.cache_clear()


@pytest.mark.parametrize("dtype", kernels.LOGITS_DTYPES)
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("weights_dtype", [mx.float32, mx.bfloat16])
def test_matches_mlx_path_on_edge_rows(emulated, dtype, softcap, weights_dtype):
    """The guard's rows (-inf entries, one-hot and flat rows, a maximum far
    from the bound) at 4133 entries: four SIMD groups, the last short."""
    logits, temperature, key = sampling.kernel_check_rows(dtype, softcap, 4133)
    assert sampling.fused_disagreements(logits, temperature, key, softcap, weights_dtype) == []


@pytest.mark.parametrize("V", [14, 33, 1000, 2047, 40000])
def test_matches_mlx_path_at_any_row_length(emulated, V):
    """Rows shorter than a SIMD group, not a multiple of anything, one to 32 SIMD groups."""
    logits = mx.random.normal((5, V), key=mx.random.key(V)) * 3.0
    assert sampling.fused_disagreements(logits, T, mx.random.key(2), 30.0, mx.bfloat16) == []
    assert sampling.fused_disagreements(logits, T, mx.random.key(3), None, mx.float32) == []


@pytest.mark.parametrize("V, k", [(14, 3), (40, 40), (4133, 64), (40000, 17)])
def test_top_k(emulated, V, k):
    """The k largest, on random rows and the guard's edge rows (a flat row:
    any k distinct ids; fewer than k finite entries: the rest at probability 0)."""
    logits = mx.random.normal((4, V), key=mx.random.key(V)) * 3.0
    assert sampling.fused_disagreements(logits, T, mx.random.key(2), 30.0, None, k) == []
    assert sampling.fused_disagreements(*sampling.kernel_check_rows(mx.bfloat16, None, V), None, mx.bfloat16, k) == []
    with pytest.raises(ValueError, match="top_k must be in"):
        kernels.row_sample(logits, T, mx.random.key(2), top_k=min(V, 64) + 1)


def test_edge_rows_by_their_own_rules(emulated):
    """What the rows must give whatever the MLX path says: a flat row's argmax
    is its first index and its entropy log V; a one-hot row always draws its
    token; -inf entries are never drawn."""
    V = 3000
    flat = mx.zeros((1, V))
    one_hot = mx.where(mx.arange(V) == 2999, 50.0, -50.0)[None]
    sparse = mx.where(mx.arange(V) % 1000 == 7, 0.0, -mx.inf)[None]  # 3 tokens: 7, 1007, 2007
    logits = mx.concatenate([flat, mx.repeat(one_hot, 50, axis=0), mx.repeat(sparse, 300, axis=0)])
    out = kernels.row_sample(logits, T, mx.random.key(0), None, mx.float32)
    assert out.argmax[0].item() == 0
    assert out.entropy[0].item() == pytest.approx(math.log(V), rel=1e-5)
    assert set(np.array(out.draw[1:51]).tolist()) == {2999}
    sparse_draws = np.array(out.draw[51:])
    assert set(sparse_draws.tolist()) == {7, 1007, 2007}  # all three, nothing else
    assert np.allclose(np.array(out.weights[51:]).sum(-1) / np.array(out.total[51:]), 1.0, rtol=1e-5)


def chi_square(draws: np.ndarray, probs: np.ndarray) -> tuple:
    expected = probs * draws.size
    keep = expected >= 5
    counts = np.bincount(draws, minlength=probs.size)
    assert counts[~keep].sum() <= 5 * max(1.0, expected[~keep].sum())
    stat = ((counts - expected)[keep] ** 2 / expected[keep]).sum()
    return stat, int(keep.sum()) - 1


def test_draws_follow_the_softmax_and_are_independent(emulated):
    """Chi-square of 3000 draws per distribution against softmax(z); rows
    (positions) and keys (steps, canvases) draw independently: pairs of
    draws of a fair coin fall in all four cells evenly."""
    base = mx.random.normal((3, 40), key=mx.random.key(5)) * 2.0
    n = 3000
    draws = np.array(kernels.row_sample(mx.repeat(base, n, axis=0), T, mx.random.key(6)).draw)
    probs = np.array(mx.softmax(base / T, axis=-1), np.float64)
    for row in range(3):
        stat, dof = chi_square(draws[row * n : (row + 1) * n], probs[row])
        assert stat < dof + 5 * math.sqrt(2 * dof), (row, stat, dof)  # about 5 standard deviations
    coin = mx.zeros((4000, 2))
    by_position = np.array(kernels.row_sample(coin, T, mx.random.key(7)).draw)
    other_step = np.array(kernels.row_sample(coin, T, mx.random.key(8)).draw)
    for a, b in ((by_position[0::2], by_position[1::2]), (by_position, other_step)):
        cells = np.bincount(2 * a + b, minlength=4)
        stat = ((cells - a.size / 4) ** 2 / (a.size / 4)).sum()
        assert stat < 3 + 5 * math.sqrt(6), cells


def test_same_key_same_draws_as_the_mlx_path(emulated):
    """Kernel and MLX path draw with the same uniforms (row_uniforms of the
    step's key): the same tokens from the same seed, but for a uniform that
    lands within rounding of a boundary of the cumulative sum."""
    logits = mx.random.normal((1, 64, 500), key=mx.random.key(9)) * 2.0
    randomness = sampling.Randomness(11)
    mlx_path = sampling.predict(logits, T, randomness)
    fused = sampling.predict(logits, T, sampling.Randomness(11), fused=True)
    again = sampling.predict(logits, T, sampling.Randomness(11), fused=True)
    assert np.array_equal(np.array(fused.draw), np.array(again.draw))
    assert np.array_equal(np.array(fused.draw), np.array(mlx_path.draw))
    assert np.array_equal(np.array(fused.argmax), np.array(mlx_path.argmax))
    assert fused.processed is None and mlx_path.processed is not None


def test_a_batch_row_draws_as_it_does_alone(emulated):
    """Logits [B, C, V] with one key per batch row: row b draws with its own
    key as the same canvas does alone, as the MLX path's batch draw does."""
    logits = mx.random.normal((3, 16, 300), key=mx.random.key(12)) * 2.0
    seeded = sampling.Randomness(21, rows=3)
    together = sampling.predict(logits, T, seeded, fused=True)
    mlx_path = sampling.predict(logits, T, sampling.Randomness(21, rows=3))
    assert np.array_equal(np.array(together.draw), np.array(mlx_path.draw))
    for b in range(3):
        alone = sampling.predict(logits[b : b + 1], T, sampling.Randomness(21 + b), fused=True)
        assert np.array_equal(np.array(alone.draw[0]), np.array(together.draw[b])), b
    with pytest.raises(ValueError, match="one key per batch row: 2 keys for logits"):
        kernels.row_sample(logits, T, mx.zeros((2, 2), mx.uint32))


def _broken_source(replace: tuple):
    source = kernels.source

    def patched(backend_name):
        header, body = source(backend_name)
        assert replace[0] in body
        return header, body.replace(*replace)

    return patched


@pytest.mark.parametrize(
    "replace, reason",
    [
        (("int(begin + pick.index)", "int(begin)"), "drew"),  # a wrong draw
        (("flog(total.s) - total.t / total.s", "flog(total.s)"), "entropy"),
        (("RowStats stats;", "RowStats stats = ;"), "g\\+\\+ rejected"),  # does not compile
    ],
)
def test_a_broken_kernel_is_never_used(emulated, monkeypatch, replace, reason):
    monkeypatch.setattr(kernels, "source", _broken_source(replace))
    with pytest.warns(RuntimeWarning, match=f"fused sampler kernel .* is not used.*{reason}"):
        assert not sampling.fused_sampler_ready(mx.float32, mx.float32, 30.0, 14)
    assert not sampling.fused_sampler_ready(mx.float32, mx.float32, 30.0, 14)  # decided once, warned once
    model, tokenizer = load("demo")
    result = sampling_run(model, tokenizer)
    assert result.text.isdigit()


def sampling_run(model, tokenizer, **options):
    return diffusion_generate(model, tokenizer, "5180", seed=1, max_tokens=12, **options)


def test_generation_takes_the_kernel_and_can_be_told_not_to(emulated, monkeypatch):
    model, tokenizer = load("demo")
    calls = []
    row_sample = kernels.row_sample
    monkeypatch.setattr(kernels, "row_sample", lambda *a, **k: (calls.append(a[0].dtype), row_sample(*a, **k))[1])
    decode = model.decode
    raw = []
    monkeypatch.setattr(model, "decode", lambda *a, **k: (raw.append(k["raw_logits"]), decode(*a, **k))[1])
    fused = sampling_run(model, tokenizer)
    assert calls and all(raw)
    calls.clear(), raw.clear()
    plain = sampling_run(model, tokenizer, fused_sampling=False)
    assert not calls and not any(raw)
    assert fused.text == plain.text == "0158"


@pytest.mark.parametrize(
    "options",
    [
        {"self_conditioning": "top-k", "self_conditioning_k": 3},
        {"self_conditioning": "top-k", "self_conditioning_k": 3, "acceptance": "confidence", "min_confidence": 0.5},
        {"acceptance": "confidence", "min_confidence": 0.5},
    ],
)
def test_other_sampler_options_with_the_kernel(emulated, options):
    """Top-k self-conditioning (the kernel's own top k) and confidence
    acceptance (the kernel's weights) give the MLX path's answers from the
    same seeds."""
    model, tokenizer = load("demo")
    for seed in range(3):
        fused = diffusion_generate(model, tokenizer, "93170", seed=seed, max_tokens=12, **options)
        plain = diffusion_generate(model, tokenizer, "93170", seed=seed, max_tokens=12, fused_sampling=False, **options)
        assert fused.tokens == plain.tokens and fused.denoising_steps == plain.denoising_steps
    assert sampling._fused_checked


def test_demo_quality_with_the_kernel(emulated):
    """The demo's held-out problems with the kernel forced on score as the
    MLX path does (within 1 point)."""
    model, tokenizer = load("demo")
    cases = problems(200, seed=2)
    fused, _, _ = score(model, tokenizer, cases)
    assert sampling._fused_checked  # the kernel ran
    plain, _, _ = score(model, tokenizer, cases, fused_sampling=False)
    assert abs(fused - plain) <= 0.01 and fused >= 0.95


def test_cpu_takes_the_mlx_path(monkeypatch):
    monkeypatch.setattr(sampling, "_fused_checked", {})
    with mx.stream(mx.cpu):
        mx.set_default_device(mx.cpu)
        assert kernels.backend() is None
        assert not sampling.fused_sampler_ready(mx.float32, mx.float32, 30.0, 14)
        with pytest.raises(RuntimeError, match="default device is a GPU"):
            kernels.row_sample(mx.zeros((1, 14)), T, mx.random.key(0))
    assert not sampling._fused_checked  # nothing was tried


def test_emulation_runs_the_text_mlx_would_compile():
    """The emulated source is mlx's Metal signature around the package's own
    header and body, unchanged."""
    header, body = kernels.source("metal")
    kernel = metal_emulation.metal_kernel("row_sampler", kernels.INPUTS, kernels.OUTPUTS, body, header)
    inputs = [mx.zeros((4, 100), mx.bfloat16), mx.zeros(3), mx.zeros(2, mx.uint32)]
    text = kernel.signature_source(inputs, [mx.int32] * 2 + [mx.float32] * 3 + [mx.bfloat16], [("T", mx.bfloat16), ("V", 100)])
    assert text.startswith(header) and body in text
    assert "template <typename T, int V>\n[[kernel]] void custom_kernel_row_sampler(" in text
    assert "const device bfloat16_t* logits [[buffer(0)]]" in text
    assert "const constant float* params [[buffer(1)]]" in text  # fewer than 8 elements: constant
    assert "uint thread_index_in_simdgroup [[thread_index_in_simdgroup]]" in text


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize(
    "dtype, weights_dtype, softcap, top_k",
    [(mx.bfloat16, mx.bfloat16, True, 0), (mx.float16, mx.float32, False, 64)],
)
def test_cuda_source_compiles_for_sm90(tmp_path, dtype, weights_dtype, softcap, top_k):
    header, body = kernels.source("cuda")
    dtypes = [mx.int32, mx.int32, mx.float32, mx.float32, mx.float32, weights_dtype, mx.int32, mx.float32]
    outputs = list(zip(kernels.OUTPUTS, dtypes, strict=True))
    template = [
        ("T", dtype), ("W", weights_dtype), ("V", 262144), ("LOADS", kernels.LOADS[dtype.size]),
        ("SOFTCAP", softcap), ("WRITE_WEIGHTS", True), ("TOPK", top_k), ("ROWS_PER_KEY", 256),
    ]
    source = cuda_source("row_sampler", header, body, [("logits", dtype), ("params", mx.float32), ("key", mx.uint32)], outputs, template)
    result = nvcc_compile(source, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_chunk_loads_are_in_flight_together(tmp_path):
    """A full chunk's LOADS loads are issued back to back, before the first is
    used. A load under its own bounds check waits for the one before it: one
    load in flight per lane held an H100 to a sixth of its bandwidth."""
    header, body = kernels.source("cuda")
    dtypes = [mx.int32, mx.int32, mx.float32, mx.float32, mx.float32, mx.bfloat16, mx.int32, mx.float32]
    loads = kernels.LOADS[2]
    template = [
        ("T", mx.bfloat16), ("W", mx.bfloat16), ("V", 262144), ("LOADS", loads),
        ("SOFTCAP", True), ("WRITE_WEIGHTS", False), ("TOPK", 0), ("ROWS_PER_KEY", 256),
    ]
    inputs = [("logits", mx.bfloat16), ("params", mx.float32), ("key", mx.uint32)]
    source = cuda_source("row_sampler", header, body, inputs, list(zip(kernels.OUTPUTS, dtypes, strict=True)), template)
    result = nvcc_compile(source, tmp_path, ptx=True)
    assert result.returncode == 0, result.stderr[-3000:]
    instructions = [line.split()[0] for line in (tmp_path / "kernel.ptx").read_text().splitlines() if line.strip() and not line.strip().startswith("//")]
    longest = run = 0
    for op in instructions:
        run = run + 1 if op == "ld.global.u16" else 0
        longest = max(longest, run)
    assert longest >= loads, f"at most {longest} logits loads in a row, expected {loads}"


def _run(*command, **kwargs) -> str:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_wheel_ships_the_kernel_sources(tmp_path):
    """metal/ is installed inside the package, and the installed package
    reads its kernel sources from there."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT))
    (wheel,) = wheels.glob("mlx_diffusiongemma-*.whl")
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("mlx_diffusiongemma/metal/")}
    expected = {f"mlx_diffusiongemma/metal/{p.name}" for p in (ROOT / "metal").iterdir() if p.suffix in (".h", ".body", ".md", ".py")}
    assert expected <= shipped and len(expected) >= 5
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel))
    probe = (
        "from mlx_diffusiongemma import kernels; h, b = kernels.source('cuda'); "
        "print(kernels.__file__); print('__syncthreads' in h and 'row_uniform' in b)"
    )
    out = _run(sys.executable, "-c", probe, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)})
    module, found = out.split()
    assert module.startswith(str(target)) and found == "True"


def test_no_fused_sampling_flag():
    from mlx_diffusiongemma.generate.command import parse_args

    _, args = parse_args(["--model", "m", "--prompt", "p", "--no-fused-sampling"])
    assert args.fused_sampling is False
    _, args = parse_args(["--model", "m", "--prompt", "p"])
    assert args.fused_sampling is None  # unset: the option's default (True)
