"""The fused sampler kernel on mlx's GPU backends.

One read of each row of logits gives the step's argmax, categorical draw,
entropy and logsumexp, and writes the self-conditioning weights in the
embedding dtype: the MLX path (sampling.py) reads the logits several times.
One algorithm, `metal/row_sampler.body`, written with Metal's built-in
names; `metal_prelude.h` or `cuda_prelude.h` before `row_sampler.h` makes
it `mx.fast.metal_kernel` or `mx.fast.cuda_kernel` source. sampling.py
decides when the kernel runs and checks it against the MLX path first.
"""

import functools
import math
from pathlib import Path
from typing import NamedTuple, Optional

import mlx.core as mx

NAME = "row_sampler"
INPUTS = ("logits", "params", "key")
OUTPUTS = ("argmax", "draw", "entropy", "logsumexp", "total_weight", "weights", "top_ids", "top_probs")
PRELUDES = {"metal": "metal_prelude.h", "cuda": "cuda_prelude.h"}
LOGITS_DTYPES = (mx.float32, mx.bfloat16, mx.float16)
MAX_SIMD_GROUPS = 32  # 1024 threads, the most both backends run in one group
MAX_TOP_K = 64  # two list slots per lane
# entries a lane loads at once, by the logits' bytes per entry: 8 keeps 16-32 KB in flight per
# multiprocessor, about an H100's bandwidth times its memory latency. 16 failed to launch there
# (registers) in a build that needed 58 per thread; benchmarks/fused_sampler.py times 4, 8 and 16.
LOADS = {2: 8, 4: 8}


class RowSample(NamedTuple):
    """The kernel's outputs, shaped as the logits' leading axes."""

    argmax: mx.array  # int32
    draw: mx.array  # int32
    entropy: mx.array  # float32
    logsumexp: mx.array  # float32
    total: mx.array  # float32: the sum of the weights
    weights: Optional[mx.array]  # [..., V] exp(z - shift) in the requested dtype, or None
    top_k: Optional[tuple]  # (ids int32, probabilities float32) [..., k] in no order, or None


def backend() -> Optional[str]:
    """The GPU backend the kernel would run on, or None (the CPU: MLX path)."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


def sources() -> Path:
    """metal/: inside the package once installed from a wheel, beside it in the
    repository (an editable install runs the package where it is)."""
    package = Path(__file__).parent
    return next((d for d in (package / "metal", package.parent / "metal") if (d / "row_sampler.body").is_file()), package / "metal")


def source(backend_name: str) -> tuple:
    """(header, body) as handed to mx.fast.{metal,cuda}_kernel."""
    files = sources()
    header = (files / PRELUDES[backend_name]).read_text() + "\n" + (files / "row_sampler.h").read_text()
    return header, (files / "row_sampler.body").read_text()


@functools.cache
def kernel(backend_name: str):
    header, body = source(backend_name)
    make = mx.fast.metal_kernel if backend_name == "metal" else mx.fast.cuda_kernel
    return make(name=NAME, input_names=list(INPUTS), output_names=list(OUTPUTS), source=body, header=header)


def simd_groups(vocab_size: int) -> int:
    """SIMD groups per row: up to 32, each reading at least 1024 entries (a
    short row is not worth a wide group)."""
    return max(1, min(MAX_SIMD_GROUPS, vocab_size // 1024))


def row_sample(
    logits: mx.array,
    temperature: mx.array,
    key: mx.array,
    softcap: Optional[float] = None,
    weights_dtype: Optional[mx.Dtype] = None,
    top_k: Optional[int] = None,
) -> RowSample:
    """Run the kernel over `logits` [..., V] (float32, bfloat16 or float16;
    with `softcap`, the raw lm_head output, softcapped inside). `key` is the
    step's key, [2] uint32, or [n, 2], one per batch row of logits [n, ..., V]:
    the rows under key j draw with sampling.row_uniforms(key)[j].
    Weights are written in `weights_dtype` if given, as exp(z - shift) for a
    shift of cap / temperature (a bound on z known before the read) or the
    row's own maximum where that bound is too far from it; softmax(z) is
    weights / total either way. With `top_k` (1..64), also the k largest
    entries' ids and probabilities (ties in no particular order)."""
    backend_name = backend()
    if backend_name is None:
        raise RuntimeError("the fused sampler kernel runs where mlx's default device is a GPU (Metal or CUDA)")
    if logits.dtype not in LOGITS_DTYPES:
        raise ValueError(f"the fused sampler reads float32, bfloat16 or float16 logits, got {logits.dtype}")
    *lead, V = logits.shape
    if top_k is not None and not 1 <= top_k <= min(MAX_TOP_K, V):
        raise ValueError(f"the fused sampler's top_k must be in [1, {min(MAX_TOP_K, V)}], got {top_k}")
    rows = math.prod(lead)
    keys = key.astype(mx.uint32).reshape(-1, 2)
    if keys.shape[0] not in (1, lead[0] if lead else 1):
        raise ValueError(f"the fused sampler needs one key per batch row: {keys.shape[0]} keys for logits {logits.shape}")
    temperature = temperature.astype(mx.float32).reshape(1)
    if softcap is None:
        params = mx.concatenate([temperature, mx.array([1.0, math.inf], mx.float32)])
    else:
        cap = mx.array([softcap], mx.float32)
        params = mx.concatenate([temperature, cap, cap / temperature])
    write = weights_dtype is not None
    weights_dtype = weights_dtype or mx.float32
    threads = 32 * simd_groups(V)
    scalars = [(rows,)] * 5
    outputs = kernel(backend_name)(
        inputs=[logits.reshape(rows, V), params, keys],
        template=[
            ("T", logits.dtype),
            ("W", weights_dtype),
            ("V", V),
            ("LOADS", LOADS[logits.dtype.size]),
            ("SOFTCAP", softcap is not None),
            ("WRITE_WEIGHTS", write),
            ("TOPK", top_k or 0),
            ("ROWS_PER_KEY", rows // keys.shape[0]),
        ],
        grid=(threads * rows, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[*scalars, (rows, V) if write else (1,), *[(rows, top_k) if top_k else (1,)] * 2],
        output_dtypes=[mx.int32, mx.int32, mx.float32, mx.float32, mx.float32, weights_dtype, mx.int32, mx.float32],
    )
    per_row = (out.reshape(lead) for out in outputs[:5])
    weights = outputs[5].reshape(*lead, V) if write else None
    top = tuple(out.reshape(*lead, top_k) for out in outputs[6:]) if top_k else None
    return RowSample(*per_row, weights, top)
