"""The fused sampler kernel on a GPU: checked against the MLX path, then timed
against the MLX ops it replaces, at the real step's shape (256 x 262144).

    python benchmarks/fused_sampler.py                 # check and time
    python benchmarks/fused_sampler.py --json out.json

Needs mlx's default device to be a GPU (Metal, or mlx's CUDA build): on a
CPU the kernel does not run (the tests run its Metal source by emulation).

Check: sampling.fused_disagreements (argmax exactly, entropy, logsumexp and
probabilities closely, each draw inside the MLX path's cumulative crossing)
for every logits dtype x softcap x weights dtype on the guard's edge rows
(sampling.kernel_check_rows) at 4133 entries and on full-size rows, and the top 1
and top 64 on full-size rows; a chi-square of 20000 draws per row against
softmax(z) on a few rows of 64 tokens.

Kernel times alone, under Nsight Compute (CUDA):

    ncu --profile-from-start off --metrics gpu__time_duration.sum,dram__bytes_read.sum \
        python benchmarks/fused_sampler.py --profile stats --dtype bfloat16 --repeats 4

Timing (mean of --repeats evaluations after warm-up, mx.synchronize around):
  - fused, stats only: argmax, draw, entropy, logsumexp (one read);
  - fused + weights: as generation runs it, raw bfloat16 lm_head output in,
    softcap inside, bfloat16 weights out;
  - MLX path: the same step's work in MLX ops (softcap to float32, predict,
    the processed logits cast to bfloat16 for self-conditioning);
  - the same two with top-64 self-conditioning (the kernel's own top k and
    no weights, against the MLX path's top_k_indices over its weights);
  - copy: x + 0 over the logits (a read and a write), whose bytes per second
    give one read's floor: bytes(logits) / copy bandwidth;
  - entropy-bound acceptance, renoise and stopping over the 256 positions in
    MLX ops (what a second small kernel could replace);
  - copy and stats only again, 8 launches per evaluation (per-evaluation costs
    shared by 8);
  - stats only again with 4, 8 and 16 entries loaded per lane at once.
"""

import argparse
import json
import math
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_diffusiongemma import kernels, sampling

ROWS, VOCAB, CAP = 256, 262144, 30.0


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        mx.eval(fn())
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    mx.synchronize()
    return (time.perf_counter() - start) / repeats


def realistic_logits(dtype, key) -> mx.array:
    """Raw lm_head-like rows: a few tokens stand out of a broad background."""
    background = mx.random.normal((ROWS, VOCAB), key=key) * 4.0
    boost = (mx.random.uniform(shape=(ROWS, VOCAB), key=mx.random.split(key)[1]) < 1e-4) * 25.0
    return (background + boost).astype(dtype)


def check(report: dict) -> bool:
    ok = True
    for dtype in kernels.LOGITS_DTYPES:
        for softcap in (None, CAP):
            for weights_dtype in (mx.float32, mx.bfloat16):
                name = f"{dtype} logits, softcap {softcap}, {weights_dtype} weights"
                small = sampling.fused_disagreements(*sampling.kernel_check_rows(dtype, softcap, 4133), softcap, weights_dtype)
                full = sampling.fused_disagreements(
                    realistic_logits(dtype, mx.random.key(7)), mx.array(0.6, mx.float32), mx.random.key(8), softcap, weights_dtype
                )
                report[name] = {"small": small[:3], "full": full[:3]}
                print(f"check {name}: {'ok' if not small + full else small[:2] + full[:2]}", flush=True)
                ok &= not small + full
    for top_k in (1, 64):
        name = f"top {top_k}, bfloat16 raw logits, softcap {CAP}, no weights"
        full = sampling.fused_disagreements(
            realistic_logits(mx.bfloat16, mx.random.key(7)), mx.array(0.6, mx.float32), mx.random.key(8), CAP, None, top_k
        )
        report[name] = full[:3]
        print(f"check {name}: {'ok' if not full else full[:2]}", flush=True)
        ok &= not full
    # chi-square: 4 rows of 64 tokens, each repeated 5000 times in one launch
    # (rows differ in their counter, so each is an independent draw)
    logits = mx.random.normal((4, 64), key=mx.random.key(3)) * 2.0
    probs = np.array(mx.softmax(logits / 0.7, axis=-1), np.float64)
    repeats = 5000
    draws = np.array(kernels.row_sample(mx.repeat(logits, repeats, axis=0), mx.array(0.7), mx.random.key(4)).draw)
    for row in range(4):
        counts = np.bincount(draws[row * repeats : (row + 1) * repeats], minlength=64)
        expected = probs[row] * repeats
        keep = expected >= 5
        stat = (((counts - expected) ** 2 / expected)[keep]).sum()
        dof = keep.sum() - 1
        passed = stat < dof + 5 * math.sqrt(2 * dof)  # about 5 standard deviations
        print(f"chi-square row {row}: {stat:.1f} on {dof} degrees of freedom {'ok' if passed else 'FAIL'}")
        report[f"chi-square row {row}"] = [float(stat), int(dof)]
        ok &= bool(passed)
    return ok


def computations(raw: mx.array) -> dict:
    """What is timed, by name: each a function returning the arrays to evaluate."""
    temperature = mx.array(0.6, mx.float32)
    key = mx.random.key(1)

    def mlx_path():
        p = sampling.predict(raw, temperature, sampling.Randomness(0), softcap=CAP)
        return p.argmax, p.draw, p.entropy, p.weights, p.processed.astype(mx.bfloat16)

    def fused_path():
        p = sampling.predict(raw, temperature, sampling.Randomness(0), CAP, mx.bfloat16, fused=True)
        return p.argmax, p.draw, p.entropy, p.weights, p.total

    def mlx_top_k():  # the MLX path with top-64 self-conditioning
        p = sampling.predict(raw, temperature, sampling.Randomness(0), softcap=CAP)
        ids = sampling.top_k_indices(p.weights, 64)
        return p.argmax, p.draw, p.entropy, ids, mx.take_along_axis(p.weights, ids, axis=-1) / p.total

    def fused_top_k():
        p = sampling.predict(raw, temperature, sampling.Randomness(0), CAP, None, True, 64)
        return p.argmax, p.draw, p.entropy, *p.top_k

    return {
        "copy": lambda: raw + 0,
        "stats": lambda: kernels.row_sample(raw, temperature, key, CAP)[:5],
        "weights": lambda: kernels.row_sample(raw, temperature, key, CAP, mx.bfloat16),
        "mlx": mlx_path,
        "fused": fused_path,
        "mlx-top64": mlx_top_k,
        "fused-top64": fused_top_k,
    }


def timing(report: dict, repeats: int) -> None:
    temperature = mx.array(0.6, mx.float32)
    key = mx.random.key(1)
    for dtype in (mx.bfloat16, mx.float32):
        raw = realistic_logits(dtype, mx.random.key(2))
        mx.eval(raw)
        nbytes = raw.nbytes
        step = computations(raw)
        copy = timed(step["copy"], repeats)
        bandwidth = 2 * nbytes / copy
        one_read = nbytes / bandwidth
        stats_only = timed(step["stats"], repeats)
        with_weights = timed(step["weights"], repeats)
        prediction = sampling.predict(raw, temperature, sampling.Randomness(0), CAP, mx.bfloat16, True)
        mx.eval(prediction.draw, prediction.entropy, prediction.argmax)
        canvas = mx.zeros((1, ROWS), mx.int32)

        def acceptance_and_renoise():  # in MLX ops: is a second kernel worth it?
            accepted, kept = sampling.EntropyBoundAcceptance(0.1)(canvas, prediction)
            done = sampling.StableAndConfidentStopping(1, 0.005)(prediction.argmax, prediction.entropy)
            return sampling.renoise(accepted, kept, sampling.Randomness(0).uniform_ids((1, ROWS), VOCAB)), done

        mlx, fused = timed(step["mlx"], repeats), timed(step["fused"], repeats)
        acceptance = timed(acceptance_and_renoise, repeats)
        mlx_k, fused_k = timed(step["mlx-top64"], repeats), timed(step["fused-top64"], repeats)
        row = {
            "logits MB": nbytes / 1e6,
            "copy ms": copy * 1e3,
            "copy GB/s (read + write)": bandwidth / 1e9,
            "one read ms": one_read * 1e3,
            "fused stats only ms": stats_only * 1e3,
            "fused stats only / one read": stats_only / one_read,
            "fused stats only GB/s": nbytes / stats_only / 1e9,
            "fused + bf16 weights ms": with_weights * 1e3,
            "fused + bf16 weights / one read": with_weights / one_read,
            "MLX path step ms": mlx * 1e3,
            "fused path step ms": fused * 1e3,
            "MLX path / fused path": mlx / fused,
            "acceptance, renoise, stopping (MLX ops) ms": acceptance * 1e3,
            "top-64 step, MLX path ms": mlx_k * 1e3,
            "top-64 step, fused path ms": fused_k * 1e3,
            "top-64 MLX path / fused path": mlx_k / fused_k,
        }
        # the same, 8 launches on 8 copies of the logits in one evaluation: what
        # each evaluation costs besides the kernels (graph building, the small
        # parameter arrays) is then shared by 8
        copies = [raw + i for i in range(8)]
        mx.eval(copies)
        amortized_copy = timed(lambda: [c + 0 for c in copies], repeats) / 8
        amortized_stats = timed(lambda: [kernels.row_sample(c, temperature, key, CAP)[:5] for c in copies], repeats) / 8
        row["copy, 8 per evaluation, ms each"] = amortized_copy * 1e3
        row["fused stats only, 8 per evaluation, ms each"] = amortized_stats * 1e3
        row["the same / one read at that copy's bandwidth"] = amortized_stats / (amortized_copy / 2)
        copies.clear()
        for loads in (4, 8, 16):  # entries per lane per round (kernels.LOADS)
            default, kernels.LOADS = kernels.LOADS, {dtype.size: loads}
            try:
                row[f"fused stats only, LOADS {loads} ms"] = timed(lambda: kernels.row_sample(raw, temperature, key, CAP)[:5], repeats) * 1e3
            except (RuntimeError, ValueError) as error:  # a launch over the registers a group may have
                print(f"LOADS {loads}: {error}")
            finally:
                kernels.LOADS = default
        report[f"timing {dtype}"] = row
        print(f"timing, {dtype} raw logits [{ROWS}, {VOCAB}]:")
        for k, v in row.items():
            print(f"  {k:34s} {v:10.3f}")


def profile(name: str, dtype: mx.Dtype, repeats: int) -> None:
    """Evaluate one computation `repeats` times between cuProfilerStart and
    cuProfilerStop (CUDA only), for a profiler started with its collection
    off: the kernels' own times, without what each evaluation costs besides."""
    import ctypes

    cuda = ctypes.CDLL("libcuda.so.1")
    raw = realistic_logits(dtype, mx.random.key(2))
    compute = computations(raw)[name]
    mx.eval(compute())  # compile and warm up outside the profile
    mx.synchronize()
    cuda.cuProfilerStart()
    for _ in range(repeats):
        mx.eval(compute())
        mx.synchronize()
    cuda.cuProfilerStop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the report here")
    parser.add_argument(
        "--profile",
        metavar="NAME",
        help="only evaluate one computation (copy, stats, weights, mlx, fused, mlx-top64, fused-top64) --repeats times, "
        "for ncu --profile-from-start off",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="the logits' dtype with --profile")
    args = parser.parse_args()
    backend = kernels.backend()
    if backend is None:
        print("mlx's default device is not a GPU: the fused kernel does not run here", file=sys.stderr)
        return 2
    if args.profile:
        profile(args.profile, getattr(mx, args.dtype), args.repeats)
        return 0
    print(f"backend: {backend}, mlx {mx.__version__}, LOADS {kernels.LOADS}")
    report = {"backend": backend, "mlx": mx.__version__}
    ok = check(report)
    timing(report, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
