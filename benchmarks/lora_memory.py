"""QLoRA memory and throughput of block-diffusion training steps, measured on
speed.py's body-heavy configuration and carried over, by arithmetic, to the
released 26B-A4B model.

    python benchmarks/lora_memory.py                      # the default set: 5-12 minutes on 2 shared cores
    python benchmarks/lora_memory.py --repeats 3          # medians of 3 steps per configuration (RESULTS.md)
    python benchmarks/lora_memory.py --contexts 256 --batches 4 --fp32-contexts   # batch 4 (4-bit only)
    python benchmarks/lora_memory.py --arithmetic-only    # the 26B arithmetic, with the reported calibration
    python benchmarks/lora_memory.py --arithmetic-only --real-context 3840

Measured (random weights, speed.py's MODELS["body-heavy"]: hidden 512, 8
layers, 32 experts top 4, moe intermediate 512, vocabulary 32768, canvas 256):
one training step as mlx_diffusiongemma.lora takes it (train.training_step:
the encoder reads the context, the decoder denoises one canvas; then an Adam
update of the adapters), with self-conditioning probability
--self-conditioning (default 0: no extra decoder pass), for each context
length, batch size and gradient checkpointing (off / on) asked for, on the
model quantized in memory with the mlx-community recipe (4-bit experts and
self-conditioning block, 8-bit attention, dense MLP, router and embedding,
group 64), and on the float32 model at --fp32-contexts. Adapters: mlx-lm's
LoRA rank --rank (scale 20) on every linear layer of every layer, experts
included (mlx_lm.lora's default keys, --num-layers -1), float32 as mlx-lm
makes them. The quantized model keeps float32 activations (it is quantized
from float32 weights): mlx's CPU quantized kernels in bfloat16 are another
10x slower.

Per configuration: mlx's peak memory during the step (mx.reset_peak_memory /
mx.get_peak_memory) minus what was resident before it (`step`: activations,
gradients, logits, temporaries), the model's own resident memory (weights,
adapters, Adam state), their sum (`total`: what this model alone would peak
at; the models of the other configurations are resident beside it in this
process), the growth of the process's RSS during the step (peak VmHWM,
reset through /proc/self/clear_refs, minus the RSS before; memory an
earlier step freed but malloc kept mapped makes it an underestimate) and tokens/s
(context + canvas tokens per step, as mlx_lm.lora counts them; median over
--repeats steps). Use context lengths that are multiples of 256: mlx-lm's
KV caches grow in steps of 256. Every configuration has its own model (same seed, same
weights) so that each keeps its compiled decoder; before the timed steps
each model's step graph is built once without being evaluated (tracing the
compiled decoder: the warm-up), and configurations alternate, in reverse order
every other round.

The arithmetic (printed after the table; --arithmetic-only prints it alone):
weights, adapters and Adam state of the 26B model in 4-bit, from its real
shapes (tests/real_26b_config.json, built lazily: no weight is materialised),
LoRA on all layers' linear layers or on attention only; activations from a
per-token-per-layer byte count calibrated on the measurements (see
`calibrate` and `activations`: 4-bit and float32 steps keep the same
activations, so the fit takes both).
"""

import argparse
import gc
import json
import os
import random
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed import MODELS

from mlx_diffusiongemma import quantize
from mlx_diffusiongemma.config import ModelArgs
from mlx_diffusiongemma.lora import prepare_model, resolve_args
from mlx_diffusiongemma.model import Model
from mlx_diffusiongemma.train import Batch, TrainingArgs, training_step

GB = 1e9
MB = 1e6
REAL_CONFIG = ROOT / "tests" / "real_26b_config.json"
ATTENTION_KEYS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]


# ------------------------------------------------------------------ memory


def rss() -> int:
    """Current resident set size in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS (VmHWM) of this process; False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # since the start: monotonic
        return usage * (1 if sys.platform == "darwin" else 1024)


def nbytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree))


# ------------------------------------------------------------------ models


def body_heavy_args() -> ModelArgs:
    m = MODELS["body-heavy"]
    return ModelArgs.from_dict({"canvas_length": m["canvas_length"], "text_config": m["text"]})


def lora_args(rank: int, checkpointing: bool, keys=None):
    argv = ["--model", "random", "--train", "--data", "unused", "--num-layers", "-1"]
    if checkpointing:
        argv.append("--grad-checkpoint")
    args = resolve_args(argv)
    args.lora_parameters["rank"] = rank
    if keys is not None:
        args.lora_parameters["keys"] = list(keys)
    return args


class Entry:
    """One model of the run: quantized or float32, checkpointing off or on,
    with its adapters and Adam optimizer (state allocated up front)."""

    def __init__(self, kind: str, checkpointing: bool, rank: int, seed: int):
        self.kind, self.checkpointing = kind, checkpointing
        mx.random.seed(seed)
        model = Model(body_heavy_args())
        if kind == "q4":
            quantize(model, bits=4, group_size=64)
        mx.eval(model.parameters())
        mx.random.seed(seed + 1)
        prepare_model(model, lora_args(rank, checkpointing))
        self.optimizer = optim.Adam(learning_rate=1e-5)  # mlx_lm.lora's default optimizer and rate
        self.optimizer.init(model.trainable_parameters())
        mx.eval(model.parameters(), self.optimizer.state)
        model.train()
        self.model = model
        params = dict(tree_flatten(model.parameters()))
        trainable = dict(tree_flatten(model.trainable_parameters()))
        self.weight_bytes = sum(v.nbytes for k, v in params.items() if k not in trainable)
        self.adapter_bytes = nbytes(trainable)
        self.adapter_params = sum(v.size for v in trainable.values())
        self.optimizer_bytes = nbytes(self.optimizer.state)

    @property
    def resident(self) -> int:
        return self.weight_bytes + self.adapter_bytes + self.optimizer_bytes

    @property
    def label(self) -> str:
        return f"{'4-bit' if self.kind == 'q4' else 'float32'}, checkpointing {'on' if self.checkpointing else 'off'}"


def make_batch(context: int, batch: int, canvas: int, vocab: int, seed: int) -> Batch:
    rng = random.Random(seed)
    return Batch.of([([rng.randrange(4, vocab) for _ in range(context)], [rng.randrange(4, vocab) for _ in range(canvas)])
                     for _ in range(batch)])


def step(entry: Entry, batch: Batch, training: TrainingArgs, evaluate: bool = True):
    loss, grads = training_step(entry.model, batch, training)
    if not evaluate:  # the warm-up: the graph is built (compiled functions traced), nothing computed
        return None
    entry.optimizer.update(entry.model, grads)
    mx.eval(loss, entry.model.trainable_parameters(), entry.optimizer.state)
    return loss.item()


def measure(entry: Entry, batch: Batch, training: TrainingArgs) -> dict:
    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    rss_before = rss()
    hwm = reset_peak_rss()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    loss = step(entry, batch, training)
    seconds = time.perf_counter() - tic
    peak = mx.get_peak_memory()
    return dict(seconds=seconds, tokens=batch.tokens, loss=loss, active_before=before, peak=peak,
                step_bytes=peak - before, rss_before=rss_before, peak_rss=peak_rss(), rss_reset=hwm)


def logits_probe(entry: Entry, batch: int, canvas: int, seed: int) -> dict:
    """Memory of the head and loss alone (final norm, tied head, softcap,
    cross-entropy, and their gradient with respect to the hidden states),
    in copies of a float32 [batch, canvas, vocab] array."""
    model = entry.model
    vocab, hidden = model.args.vocab_size, model.args.hidden_size
    mx.random.seed(seed)
    h = mx.random.normal((batch, canvas, hidden))
    target = mx.random.randint(0, vocab, (batch, canvas))
    mx.eval(h, target)

    def loss(h):
        return nn.losses.cross_entropy(model.head(h), target, reduction="mean")

    gc.collect()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    value, grad = mx.value_and_grad(loss)(h)
    mx.eval(value, grad)
    used = mx.get_peak_memory() - before
    one = batch * canvas * vocab * 4
    return dict(bytes=used, copies=used / one, logits_bytes=one)


# ------------------------------------------------------------------ the 26B arithmetic


def real_model(keys=None, rank: int = 8, dtype=mx.bfloat16):
    """The released configuration, random weights never materialised (mlx
    arrays are lazy: shapes and dtypes, and so bytes, are known without
    evaluation), cast to bfloat16 as the released weights are, quantized with
    the mlx-community recipe, LoRA applied on all layers."""
    config = json.loads(REAL_CONFIG.read_text())
    model = Model(ModelArgs.from_dict(config))
    model.set_dtype(dtype)
    quantize(model, bits=4, group_size=64)
    weights = weight_breakdown(model)
    prepare_model(model, lora_args(rank, False, keys))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    dtypes = sorted({str(v.dtype) for v in trainable.values()})
    return model, weights, sum(v.size for v in trainable.values()), nbytes(trainable), dtypes


def weight_breakdown(model) -> dict:
    """Bytes by kind: quantized weights (packed), their scales and biases, the rest."""
    out = {"experts (4-bit)": 0, "self-conditioning (4-bit)": 0, "attention, dense, router (8-bit)": 0,
           "embedding / tied head (8-bit)": 0, "norms, scalars (bfloat16)": 0}
    scales = 0
    for name, value in tree_flatten(model.parameters()):
        part = name.rsplit(".", 1)[-1]
        if ".experts." in name:
            key = "experts (4-bit)"
        elif ".self_conditioning." in name and name.split(".self_conditioning.")[1].split(".")[0].endswith("proj"):
            key = "self-conditioning (4-bit)"
        elif "embed_tokens" in name:
            key = "embedding / tied head (8-bit)"
        elif re.search(r"\.(self_attn|mlp)\.\w+_proj\.|router\.proj\.", name):
            key = "attention, dense, router (8-bit)"
        else:
            key = "norms, scalars (bfloat16)"
        out[key] += value.nbytes
        if part in ("scales", "biases") and key != "norms, scalars (bfloat16)":
            scales += value.nbytes
    out["(of which group scales and biases)"] = scales
    out["total"] = sum(v for k, v in out.items() if not k.startswith("("))
    return out


def layer_width(args: ModelArgs) -> float:
    """Floats one layer computes per token, each tensor counted once, averaged
    over the layers (the alternative scale for the calibration, beside the
    plain hidden size H): 15 H-wide tensors (norms, projections' outputs,
    residual sums, the experts' sum), 4 Q-wide (q_proj, q_norm, rope,
    attended), 5 K-wide (k_proj, k_norm, rope, v_proj, v_norm; 4 on a full
    layer, which has no v_proj), 4 D-wide (dense gate, up, gelu, product)
    and per routed row 5 H-wide (gathered input, tile, down, unsorted,
    weighted) and 4 I-wide (gate_up, gelu, product)."""
    H, n = args.hidden_size, args.num_hidden_layers
    total = 0
    for i in range(n):
        head_dim, kv_heads = args.attention_shape(i)
        Q, K = args.num_attention_heads * head_dim, kv_heads * head_dim
        sliding = args.layer_types[i] == "sliding_attention"
        total += (15 * H + 4 * Q + (5 if sliding else 4) * K + 4 * args.intermediate_size
                  + args.top_k_experts * (5 * H + 4 * args.moe_intermediate_size))
    return total / n


# The calibration of the run reported in RESULTS.md (bytes, float32
# activations): --arithmetic-only uses it, as does a run without the points
# the fit needs.
REPORTED_CALIBRATION = dict(  # `python benchmarks/lora_memory.py --repeats 3`, 2 shared cores
    points=8, contexts=[256, 512, 768], fitted_scores=True, max_residual=139110.5, score_copies=0.9110,
    e_tok=119570.2, d_tok_off=248718.9, d_tok_on=38713.9, logits_copies=6.0783, width=33984.0, hidden=512,
)


def calibrate(rows: list, probe: dict, args: ModelArgs, adapter_bytes: int) -> dict:
    """Fit the batch-1 step memory (both models: their activations are the
    same, float32) as

        step = grads + logits + D[checkpointing] + e * ctx + q * ctx^2

    grads: the adapters' gradients (their size); logits: the head-and-loss
    probe; D: the decoder's canvas (C tokens) with checkpointing off or on;
    e: per context token (the encoder's activations, and the decoder's
    attention probabilities over that token); q: the encoder's attention
    scores (heads x ctx x ctx per layer). q is fitted with three context
    lengths or more; with fewer it is taken as one float32 copy of the
    scores per layer. Then, per layer (L layers, H hidden, h heads, scores
    counted as `score_copies` float32 copies):

        encoder, per context token per layer:  e_tok  = (e - L h C 4 copies) / L
        decoder, per canvas token per layer:   d_off  = (D[off] - L h C^2 4 copies) / (L C)
        with checkpointing, what each layer keeps per canvas token, besides
        one layer's activations recomputed at a time in the backward pass:
                                               d_on   = (D[on] - L h C^2 4 copies - C d_off) / (L C)

    each also divided by H (bytes per token per layer per hidden unit)."""
    import numpy as np

    L, h, C, H = args.num_hidden_layers, args.num_attention_heads, args.canvas_length, args.hidden_size
    points = [r for r in rows if r["batch"] == 1]
    states = sorted({r["checkpointing"] for r in points})
    contexts = sorted({r["context"] for r in points})
    if len(contexts) < 2 or probe is None:
        return None
    fixed = adapter_bytes + probe["bytes"]
    fit_q = len(contexts) >= 3
    A, y = [], []
    for r in points:
        row = [1.0 if r["checkpointing"] == s else 0.0 for s in states] + [r["context"]]
        target = r["step_bytes"] - fixed
        if fit_q:
            row.append(r["context"] ** 2)
        else:
            target -= L * h * 4 * r["context"] ** 2
        A.append(row)
        y.append(target)
    solution, *_ = np.linalg.lstsq(np.array(A, dtype=float), np.array(y, dtype=float), rcond=None)
    residual = np.array(y) - np.array(A) @ solution
    D = dict(zip(states, solution[: len(states)]))
    e = solution[len(states)]
    q = solution[len(states) + 1] if fit_q else L * h * 4
    copies = q / (L * h * 4)
    e_tok = (e - L * h * C * 4 * copies) / L
    d_tok = {s: (D[s] - L * h * C * C * 4 * copies) / (L * C) for s in states}
    if True in d_tok and False in d_tok:
        d_tok[True] -= d_tok[False] / L  # the recomputed layer, counted once
    return dict(
        points=len(points), contexts=contexts, fitted_scores=fit_q, max_residual=float(abs(residual).max()),
        score_copies=float(copies), e_tok=float(e_tok),
        d_tok_off=float(d_tok[False]) if False in d_tok else None,
        d_tok_on=float(d_tok[True]) if True in d_tok else None,
        logits_copies=float(probe["copies"]), width=layer_width(args), hidden=H,
    )


def activations(cal: dict, args: ModelArgs, context: int, batch: int, checkpointing: bool, scale: str,
                activation_bytes: int) -> dict:
    """Activation bytes of one step of a model with `args` (L layers, h
    heads, canvas C), at batch B:

        B L (ctx e_tok + C d) [+ B C d_off with checkpointing]
          + B 4 copies h sum over layers (ctx^2 + C (read + C))

    d = d_off, or d_on with checkpointing; read: the context a layer's
    decoder reads (a sliding layer's last window - 1 tokens). The per-token
    terms are scaled from the calibration by hidden size (scale "hidden":
    x H / H_calibration) or by the per-token layer width (scale "width",
    `layer_width`); `activation_bytes` 4 (float32, as measured) or 2
    (bfloat16: every term halved)."""
    L, h, C, H = args.num_hidden_layers, args.num_attention_heads, args.canvas_length, args.hidden_size
    factor = H / cal["hidden"] if scale == "hidden" else layer_width(args) / cal["width"]
    e_tok = cal["e_tok"] * factor
    d_tok = (cal["d_tok_on"] if checkpointing else cal["d_tok_off"]) * factor
    per_token = batch * L * (context * e_tok + C * d_tok)
    if checkpointing:
        per_token += batch * C * cal["d_tok_off"] * factor  # one layer recomputed at a time
    window = args.sliding_window
    # encoder: the whole context in one chunk, its scores materialised ([ctx, ctx] per head, the window
    # applied by the mask); decoder: the canvas over the context it reads (a sliding layer's last window - 1)
    scores = 0
    for kind in args.layer_types:
        read = context if kind == "full_attention" else min(context, window - 1)
        scores += h * (context * context + C * (read + C))
    scores *= batch * 4 * cal["score_copies"]
    ratio = activation_bytes / 4
    return dict(per_token=per_token * ratio, scores=scores * ratio, total=(per_token + scores) * ratio,
                e_tok=e_tok * ratio, d_tok=d_tok * ratio)


def arithmetic(cal: dict, context: int = 768, batch: int = 1, rank: int = 8, out=print) -> dict:
    """The released model in 4-bit, LoRA rank `rank` on every layer: all
    linear layers (experts included), or attention only."""
    config = json.loads(REAL_CONFIG.read_text())
    args = ModelArgs.from_dict(config)
    C, V = args.canvas_length, args.vocab_size
    runs = {}
    for name, keys in (("all linear layers", None), ("attention only", ATTENTION_KEYS)):
        _, weights, params, adapter_bytes, dtypes = real_model(keys, rank)
        runs[name] = dict(params=params, adapter_bytes=adapter_bytes, dtypes=dtypes)
    text = sum(v.size for _, v in tree_flatten(Model(args).parameters()))
    logits = cal["logits_copies"] * batch * C * V * 4
    out(f"\n26B-A4B ({REAL_CONFIG.relative_to(ROOT)}): 4-bit mlx-community recipe from bfloat16 weights, "
        f"batch {batch}, context {context} + canvas {C}, LoRA rank {rank}")
    out(f"text model {text / 1e9:.3f} B parameters (the vision tower, ~0.57 B, is neither loaded nor trained)")
    for key, value in weights.items():
        out(f"  weights, {key}: {value / GB:.3f} GB")
    for name, run in runs.items():
        out(f"  adapters, {name}: {run['params'] / 1e6:.2f} M params ({', '.join(run['dtypes'])}) = "
            f"{run['adapter_bytes'] / GB:.3f} GB; gradients the same; Adam state 2x = "
            f"{2 * run['adapter_bytes'] / GB:.3f} GB")
    out(f"  logits and loss: {cal['logits_copies']:.2f} x float32 [{batch}, {C}, {V}] = {logits / GB:.3f} GB")
    acts = {}
    for bytes_, dtype in ((2, "bfloat16"), (4, "float32")):
        for scale in ("hidden", "width"):
            for ckpt in (False, True):
                a = activations(cal, args, context, batch, ckpt, scale, bytes_)
                acts[dtype, scale, ckpt] = a
                out(f"  activations, {dtype}, scaled by {scale}, checkpointing {'on ' if ckpt else 'off'}: "
                    f"{a['total'] / GB:6.3f} GB (per-token terms {a['per_token'] / GB:.3f}: {a['e_tok'] / 1e3:.0f} KB "
                    f"per context token and {a['d_tok'] / 1e3:.0f} KB per canvas token per layer"
                    f"{' + one recomputed layer' if ckpt else ''}; attention probabilities {a['scores'] / GB:.3f})")
    totals = {}
    for name, run in runs.items():
        for ckpt in (False, True):
            pair = [acts["bfloat16", scale, ckpt]["total"] for scale in ("hidden", "width")]
            base = weights["total"] + 4 * run["adapter_bytes"] + logits
            totals[name, ckpt] = (base + min(pair), base + max(pair))
            out(f"  TOTAL, LoRA on {name}, checkpointing {'on ' if ckpt else 'off'} (bfloat16 activations): "
                f"{totals[name, ckpt][0] / GB:.2f}-{totals[name, ckpt][1] / GB:.2f} GB")
    return dict(weights=weights, runs=runs, logits=logits, activations=acts, totals=totals, text_params=text)


# ------------------------------------------------------------------ run


def parse(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/lora_memory.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--contexts", type=int, nargs="*", default=[256, 768],
                        help="context lengths of the 4-bit model (default 256 768; the canvas adds 256)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1], help="batch sizes (default 1)")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both",
                        help="gradient checkpointing over the decoder's layers (default both)")
    parser.add_argument("--fp32-contexts", type=int, nargs="*", default=[256, 512],
                        help="context lengths of the float32 comparison, batch 1 (default 256 512: 512 gives the "
                             "fit its third length; none: no comparison)")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per configuration (default 1)")
    parser.add_argument("--self-conditioning", type=float, default=0.0, choices=(0.0, 1.0),
                        help="0: no self-conditioned step (default); 1: every step runs the extra no-gradient "
                             "decoder pass first")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-logits-probe", action="store_true", help="skip the head-and-loss memory probe")
    parser.add_argument("--arithmetic-only", action="store_true",
                        help="print the 26B arithmetic alone, with the calibration of the reported run")
    parser.add_argument("--real-context", type=int, default=768,
                        help="context length of the 26B arithmetic (default 768; the canvas adds 256)")
    parser.add_argument("--no-compile", action="store_true",
                        help="mx.disable_compile(): the decoder's segments run uncompiled (to see what compiling keeps)")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.arithmetic_only:
        print_calibration(REPORTED_CALIBRATION, "the run reported in RESULTS.md")
        arithmetic(REPORTED_CALIBRATION, args.real_context, 1, args.rank)
        return 0
    if not args.contexts and not args.fp32_contexts:
        raise SystemExit("nothing to measure: give --contexts or --fp32-contexts (or --arithmetic-only)")
    if args.no_compile:
        mx.disable_compile()
    states = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    odd = sorted({c for c in (args.contexts or []) + (args.fp32_contexts or []) if c % 256})
    if odd:
        print(f"note: contexts {odd} are not multiples of 256: mlx-lm's KV caches grow in steps of 256, so their "
              "memory includes unused slots, and the 26B fit below is distorted", flush=True)
    canvas = body_heavy_args().canvas_length
    vocab = body_heavy_args().vocab_size
    training = TrainingArgs(self_conditioning=args.self_conditioning)
    tic = time.perf_counter()
    entries = {}
    for kind, contexts in (("q4", args.contexts), ("fp32", args.fp32_contexts)):
        if contexts:
            for ckpt in states:
                entries[kind, ckpt] = Entry(kind, ckpt, args.rank, args.seed)
    resident = mx.get_active_memory()
    print(f"models built in {time.perf_counter() - tic:.0f} s; active memory {resident / GB:.3f} GB, "
          f"their resident sum {sum(e.resident for e in entries.values()) / GB:.3f} GB", flush=True)
    for e in entries.values():
        print(f"  {e.label}: weights {e.weight_bytes / MB:.1f} MB, adapters {e.adapter_params / 1e6:.3f} M params "
              f"= {e.adapter_bytes / MB:.1f} MB, Adam state {e.optimizer_bytes / MB:.1f} MB", flush=True)
    configs = []
    for kind, contexts, batches in (("q4", args.contexts, args.batches), ("fp32", args.fp32_contexts, [1])):
        for context in contexts or []:
            for b in batches:
                for ckpt in states:
                    configs.append((kind, ckpt, context, b))
    tic = time.perf_counter()
    warmed = set()
    for kind, ckpt, context, b in configs:
        if (kind, ckpt, b) not in warmed:
            step(entries[kind, ckpt], make_batch(16, b, canvas, vocab, 0), training, evaluate=False)
            warmed.add((kind, ckpt, b))
    gc.collect()
    print(f"warm-up (graphs built, not evaluated) {time.perf_counter() - tic:.1f} s", flush=True)
    results = {c: [] for c in configs}
    for r in range(args.repeats):
        order = configs if r % 2 == 0 else configs[::-1]
        for config in order:
            kind, ckpt, context, b = config
            m = measure(entries[kind, ckpt], make_batch(context, b, canvas, vocab, 1000 * r + context + b), training)
            results[config].append(m)
            print(f"  round {r + 1}: {entries[kind, ckpt].label}, context {context}, batch {b}: "
                  f"{m['seconds']:.1f} s, step {m['step_bytes'] / GB:.3f} GB, peak RSS {m['peak_rss'] / GB:.2f} GB",
                  flush=True)
    rows = []
    for config, ms in results.items():
        kind, ckpt, context, b = config
        e = entries[kind, ckpt]
        step_bytes = max(m["step_bytes"] for m in ms)
        rows.append(dict(kind=kind, checkpointing=ckpt, context=context, batch=b, canvas=canvas,
                         tokens=ms[0]["tokens"], seconds=[m["seconds"] for m in ms],
                         tokens_per_second=ms[0]["tokens"] / statistics.median(m["seconds"] for m in ms),
                         step_bytes=step_bytes, weight_bytes=e.weight_bytes, adapter_bytes=e.adapter_bytes,
                         optimizer_bytes=e.optimizer_bytes, total=e.resident + step_bytes,
                         peak_rss=max(m["peak_rss"] for m in ms), rss_before=min(m["rss_before"] for m in ms),
                         rss_reset=all(m["rss_reset"] for m in ms)))
    print()
    print("| model | checkpointing | context + canvas | batch | step (GB) | resident (GB) | total (GB) | "
          "RSS growth (GB) | tokens/s | step times (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'4-bit' if r['kind'] == 'q4' else 'float32'} | {'on' if r['checkpointing'] else 'off'} | "
              f"{r['context']} + {r['canvas']} | {r['batch']} | {r['step_bytes'] / GB:.3f} | "
              f"{(r['total'] - r['step_bytes']) / GB:.3f} | {r['total'] / GB:.3f} | "
              f"{(r['peak_rss'] - r['rss_before']) / GB:.3f} | {r['tokens_per_second']:.1f} | "
              f"{', '.join(f'{t:.1f}' for t in r['seconds'])} |")
    print(f"step: mlx's peak during the step minus its active memory before; resident: this model's weights, "
          f"adapters and Adam state; RSS growth: the process's peak RSS during the step minus its RSS before "
          f"(before: {min(r['rss_before'] for r in rows) / GB:.2f}-{max(r['rss_before'] for r in rows) / GB:.2f} GB, "
          f"every model of the run{'' if all(r['rss_reset'] for r in rows) else '; peak RSS not resettable here: since the start'}); "
          f"tokens/s: context + canvas tokens over the median step time")
    probe = None
    if not args.no_logits_probe:
        e = entries.get(("fp32", False)) or entries.get(("fp32", True)) or next(iter(entries.values()))
        probe = logits_probe(e, 1, canvas, args.seed)
        print(f"\nhead and loss alone ({e.label}, batch 1): {probe['bytes'] / MB:.1f} MB = "
              f"{probe['copies']:.2f} x the float32 logits [1, {canvas}, {vocab}]")
    any_entry = next(iter(entries.values()))
    cal = calibrate(rows, probe, body_heavy_args(), any_entry.adapter_bytes)
    source = "this run"
    if cal is None or cal.get("d_tok_off") is None or cal.get("d_tok_on") is None:
        cal, source = REPORTED_CALIBRATION, "the run reported in RESULTS.md (this run lacks the points the fit needs)"
    print_calibration(cal, source)
    result = arithmetic(cal, args.real_context, 1, args.rank)
    if args.json:
        args.json.write_text(json.dumps(dict(rows=rows, probe=probe, calibration=cal, args={k: str(v) for k, v in vars(args).items()},
                                             totals={f"{k[0]}, checkpointing {k[1]}": v for k, v in result["totals"].items()}),
                                        indent=2))
    return 0


def print_calibration(cal: dict, source: str) -> None:
    H = cal["hidden"]
    print(f"\ncalibration from {source} (float32 activations, body-heavy: hidden {H}):")
    if "contexts" in cal:
        print(f"  fit over {cal['points']} batch-1 steps at contexts {cal['contexts']}, "
              f"largest residual {cal['max_residual'] / MB:.1f} MB; attention probabilities "
              f"{'fitted' if cal['fitted_scores'] else 'assumed'}: {cal['score_copies']:.2f} float32 copies")
    print(f"  encoder: {cal['e_tok'] / 1e3:.1f} KB per context token per layer = {cal['e_tok'] / H:.1f} bytes x hidden")
    print(f"  decoder, checkpointing off: {cal['d_tok_off'] / 1e3:.1f} KB per canvas token per layer = "
          f"{cal['d_tok_off'] / H:.1f} bytes x hidden")
    print(f"  decoder, checkpointing on:  {cal['d_tok_on'] / 1e3:.1f} KB per canvas token per layer = "
          f"{cal['d_tok_on'] / H:.1f} bytes x hidden (plus one layer's {cal['d_tok_off'] / 1e3:.1f} KB, recomputed)")
    print(f"  head and loss: {cal['logits_copies']:.2f} float32 copies of the logits; layer width "
          f"{cal['width']:.0f} floats per token")


if __name__ == "__main__":
    sys.exit(main())
