"""What tensor parallelism sends: all-reduces per decoder pass, by arithmetic
for the released 26B configuration and counted on loopback with a small model.

    python benchmarks/distributed.py [--steps 48] [--no-launch]

1. The 26B configuration (tests/real_26b_config.json), bfloat16 activations,
   canvas 256, at 2 and 4 ranks: all-reduces and bytes per denoising step
   (one decoder pass with self-conditioning) and per commit (one encoder pass
   over the canvas), the bytes each rank sends in mlx's ring all-reduce
   (2 (N - 1) / N of the payload) and what that costs at a link's bandwidth.
   And the GB of weights each rank holds (the 4-bit recipe).
2. One rank's expert work at 2 ranks, in one process: each expert's width
   halved (what `Model.shard` does) against half the experts, whole.
3. Then it runs itself on two ranks (`mlx.launch -n 2 --backend ring` on
   loopback): a small random model (the real 5:1 layer pattern, fewer kv heads
   on full layers) is sharded, and every `mx.distributed.all_sum` of a decoder
   pass, a self-conditioned pass and a commit is counted (compilation off, so
   each call is seen), against the same arithmetic. It also times a step
   sharded and whole, and one all-reduce of the small model's and of the 26B
   model's step size. Loopback on a 2-core machine shares the cores between
   the ranks: those times say nothing about two Macs; the counts are exact.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map

from mlx_diffusiongemma import quantize
from mlx_diffusiongemma.model import Experts, Model, ModelArgs
from mlx_diffusiongemma.tp import attention_splits, keep_intermediate

ROOT = Path(__file__).resolve().parents[1]
REAL = json.loads((ROOT / "tests" / "real_26b_config.json").read_text())
LINKS = {"Thunderbolt 4 (~4 GB/s)": 4e9, "10 GbE (~1 GB/s)": 1e9}

SMALL = {
    "model_type": "diffusion_gemma",
    "canvas_length": 64,
    "text_config": {
        "hidden_size": 256, "num_hidden_layers": 6, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "global_head_dim": 128, "num_global_key_value_heads": 1,
        "vocab_size": 2048, "num_experts": 16, "top_k_experts": 4, "moe_intermediate_size": 128,
        "sliding_window": 128,
    },
}


def all_reduces(model: Model, ranks: int, tokens: int, self_conditioned: bool, value_bytes: int) -> list:
    """[(site, all-reduces, bytes each)] of one pass of `tokens` tokens of a
    whole (unsharded) model split across `ranks`: after o_proj where the heads
    split, the dense MLP and experts together in every layer, and the
    self-conditioning block when the pass is self-conditioned."""
    H = model.args.hidden_size
    split = sum(attention_splits(layer.self_attn, ranks) for layer in model.layers)
    sites = [("attention", split, tokens * H * value_bytes),
             ("dense MLP + experts", len(model.layers), 2 * tokens * H * value_bytes)]
    if self_conditioned:
        sites.append(("self-conditioning", 1, tokens * H * value_bytes))
    return sites


def totals(sites: list) -> tuple:
    return sum(n for _, n, _ in sites), sum(n * b for _, n, b in sites)


def arithmetic(steps: int) -> None:
    args = ModelArgs.from_dict(REAL)
    model = Model(args)  # never evaluated: its random weights are never allocated
    C, bf16 = args.canvas_length, 2
    print(f"26B configuration, bfloat16 activations, canvas {C}, {args.num_hidden_layers} layers")
    header = f"{'ranks':>5} {'pass':<17} {'all-reduces':>11} {'MB reduced':>10} {'MB sent/rank':>12}"
    print(header + "".join(f" {name:>24}" for name in LINKS))
    for N in (2, 4):
        for name, sc in (("denoising step", True), ("commit (encode)", False)):
            count, payload = totals(all_reduces(model, N, C, sc, bf16))
            sent = payload * 2 * (N - 1) / N
            row = f"{N:>5} {name:<17} {count:>11} {payload / 1e6:>10.1f} {sent / 1e6:>12.1f}"
            print(row + "".join(f" {sent / bw * 1e3:>21.1f} ms" for bw in LINKS.values()))
        count, payload = totals(all_reduces(model, N, C, True, bf16))
        commit_count, commit = totals(all_reduces(model, N, C, False, bf16))
        sent = (steps * payload + commit) * 2 * (N - 1) / N
        print(f"{N:>5} canvas of {steps} steps + its commit: {steps * count + commit_count} all-reduces, "
              f"{sent / 1e9:.2f} GB sent per rank: "
              + ", ".join(f"{sent / bw:.2f} s over {name}" for name, bw in LINKS.items()))
    print("Each all-reduce also pays the link's latency once: every 100 us of it adds "
          f"{totals(all_reduces(model, 2, C, True, bf16))[0] * 0.1:.1f} ms to a step.")


class Rank:
    """What `Model.shard` reads of a group, for sizing shares in one process
    (the weights are never evaluated, so nothing is sent or allocated)."""

    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def weights_per_rank() -> None:
    """GB each rank holds of the 26B model in the mlx-community 4-bit recipe (bfloat16 otherwise)."""
    print("\n26B, mlx-community 4-bit recipe: weights held per rank (GB)")
    for N in (1, 2, 4):
        held = []
        for rank in range(N):
            model = Model(ModelArgs.from_dict(REAL))
            model.update(tree_map(lambda a: a.astype(mx.bfloat16), model.parameters()))
            quantize(model, bits=4)
            model.shard(Rank(N, rank))
            held.append(sum(a.nbytes for _, a in tree_flatten(model.parameters())) / 1e9)
        print(f"  {N} rank(s): " + ", ".join(f"{gb:.2f}" for gb in held))


def experts_split(repeats: int = 3) -> None:
    """One rank's expert work at 2 ranks, in this process: each expert's
    width halved (what `Model.shard` does) against half the experts whole.
    With the decoder's static shapes a rank holding half the experts still
    multiplies every routed row (the others' weighted zero); "only its rows"
    is the dynamic-shape ideal, which a compiled decoder cannot have."""
    H, I, E, k, T = 1024, 704, 32, 8, 256  # the real expert width and top-k, fewer experts, narrower hidden
    config = {**SMALL, "canvas_length": T}
    config["text_config"] = {**SMALL["text_config"], "hidden_size": H, "num_experts": E, "top_k_experts": k,
                             "moe_intermediate_size": I}
    mx.random.seed(0)
    by_width = Experts(ModelArgs.from_dict(config))
    keep_intermediate(by_width, 0, I // 2)
    config["text_config"]["num_experts"] = E // 2
    by_expert = Experts(ModelArgs.from_dict(config))
    x = mx.random.normal((1, T, H))
    indices = mx.argpartition(mx.random.normal((1, T, E)), -k, axis=-1)[..., -k:]
    weights = mx.softmax(mx.random.normal((1, T, k)), axis=-1)
    local = indices < E // 2
    rows = np.nonzero(np.array(local).reshape(-1))[0]
    row_x = mx.repeat(x.reshape(T, H), k, axis=0)[mx.array(rows)][:, None]
    row_expert = indices.reshape(-1)[mx.array(rows)][:, None]
    mx.eval(by_width.parameters(), by_expert.parameters(), x, indices, weights, row_x, row_expert)
    runs = {
        "each expert's width halved (ours)": lambda: by_width(x, indices, weights),
        "half the experts, every row": lambda: by_expert(x, mx.where(local, indices, 0), mx.where(local, weights, 0)),
        f"half the experts, only its {len(rows)} rows": lambda: by_expert(row_x, row_expert, mx.ones(row_expert.shape)),
    }
    print(f"\nOne rank's experts at 2 ranks ({T} tokens, top-{k} of {E} experts, width {I}, hidden {H}, float32, "
          f"{mx.default_device()}):")
    for name, run in runs.items():
        print(f"  {name:<38} {seconds(lambda: mx.eval(run()), repeats) * 1e3:8.1f} ms")


def launch() -> None:
    """This script on two ranks, ring backend, loopback."""
    launcher = Path(sys.executable).with_name("mlx.launch")
    launcher = str(launcher) if launcher.is_file() else shutil.which("mlx.launch")
    if launcher is None:
        raise SystemExit("mlx.launch not found next to this Python nor on PATH (it is installed with mlx)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([launcher, "-n", "2", "--backend", "ring", "--python", sys.executable, "--", __file__],
                   check=True, env=env, timeout=600)


class Counter:
    """Wraps mx.distributed.all_sum, counting calls and bytes."""

    def __init__(self):
        self.calls, self.bytes, self._all_sum = 0, 0, mx.distributed.all_sum

    def __enter__(self):
        def counted(x, *args, **kwargs):
            self.calls += 1
            self.bytes += x.nbytes
            return self._all_sum(x, *args, **kwargs)

        mx.distributed.all_sum = counted
        return self

    def __exit__(self, *exc):
        mx.distributed.all_sum = self._all_sum


def seconds(fn, repeats: int = 5) -> float:
    """Best of `repeats` calls after a warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def loopback() -> None:
    """One rank of the measurement (under mlx.launch); rank 0 prints."""
    group = mx.distributed.init()
    N, say = group.size(), print if group.rank() == 0 else (lambda *a, **k: None)
    args = ModelArgs.from_dict(SMALL)
    C = args.canvas_length
    models = []
    for _ in range(2):  # the same weights on every rank, whole and sharded
        mx.random.seed(0)
        models.append(Model(args))
        mx.eval(models[-1].parameters())
    whole, sharded = models
    sharded.shard(group)
    rng = np.random.default_rng(0)
    prompt, canvas = rng.integers(0, args.vocab_size, 200).tolist(), rng.integers(0, args.vocab_size, C).tolist()
    caches = {}
    for name, model in (("whole", whole), ("sharded", sharded)):
        caches[name] = model.make_cache()
        model.encode(prompt, caches[name])
    logits = whole.decode(canvas, caches["whole"])
    value_bytes = logits.dtype.size

    say(f"\nLoopback, {N} ranks, small model (hidden {args.hidden_size}, {args.num_hidden_layers} layers, canvas {C}, "
        f"float32): all-reduces counted per pass against the arithmetic")
    say(f"{'pass':<24} {'counted':>8} {'predicted':>9} {'bytes counted':>13} {'predicted':>10}")
    passes = {
        "decode": (lambda: sharded.decode(canvas, caches["sharded"]), False),
        "self-conditioned decode": (lambda: sharded.decode(canvas, caches["sharded"], self_conditioning=logits), True),
        "commit (encode)": (lambda: sharded.lookahead(canvas, caches["sharded"]), False),
    }
    mx.disable_compile()
    for name, (run, sc) in passes.items():
        with Counter() as counter:
            mx.eval(run())
        count, payload = totals(all_reduces(whole, N, C, sc, value_bytes))
        say(f"{name:<24} {counter.calls:>8} {count:>9} {counter.bytes:>13} {payload:>10}")
        if (counter.calls, counter.bytes) != (count, payload):
            raise SystemExit(f"{name}: counted {counter.calls} all-reduces of {counter.bytes} bytes, "
                             f"the arithmetic says {count} of {payload}")
    mx.enable_compile()

    step = {name: seconds(lambda m=model, c=caches[name]: mx.eval(m.decode(canvas, c, self_conditioning=logits)))
            for name, model in (("whole", whole), ("sharded", sharded))}
    say(f"self-conditioned step: whole {step['whole'] * 1e3:.1f} ms, sharded {step['sharded'] * 1e3:.1f} ms "
        "(the ranks share this machine's cores)")
    for shape, dtype in (((C, args.hidden_size), mx.float32), ((256, 2816), mx.bfloat16)):
        x = mx.ones(shape, dtype)
        t = seconds(lambda: mx.eval(mx.distributed.all_sum(x)), repeats=20)
        say(f"one all-reduce of {shape} {str(dtype).split('.')[-1]}: {t * 1e3:.2f} ms on loopback")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=48, help="denoising steps per canvas (the reference's maximum)")
    parser.add_argument("--no-launch", action="store_true", help="only the arithmetic")
    args = parser.parse_args()
    if mx.distributed.init().size() > 1:
        loopback()
        return
    arithmetic(args.steps)
    weights_per_rank()
    experts_split()
    if not args.no_launch:
        launch()


if __name__ == "__main__":
    main()
