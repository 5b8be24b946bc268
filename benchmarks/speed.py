"""Speed of ours (mlx-diffusiongemma, the default reference sampler, float32)
side by side with mlx-vlm 0.7.10 and transformers on torch CPU, on the same
saved random weights.

    python benchmarks/speed.py                          # every configuration and implementation
    python benchmarks/speed.py --quick                  # smoke test: 1 repetition
    python benchmarks/speed.py --configs medium-real-vocab --impls ours mlx-vlm --repeats 5 --json out.json

Configurations (sizes in MODELS below): tiny (per-op overhead), medium-real-vocab
(the real 262144 vocabulary and 256 canvas on a small body), body-heavy (hidden
512, 8 layers, 32 experts) at a 64-token prompt and, as body-heavy-8k, at 8192
tokens of context, and real-26b (the released configuration, random bfloat16
and 4-bit weights built in memory; ours and mlx-vlm only, and only where mlx's
default device is a GPU).

Per configuration and implementation: prefill tokens/s (the prompt through the
encoder), commit (one canvas encoded into a cache holding the prompt), decoder
(one pass without self-conditioning), self-conditioning (decoder with
self-conditioning logits minus without), sampler (everything between the
decoder's logits and the next decoder call), full step (one self-conditioned
step of the real loop), canvas tokens/s at --steps steps with adaptive stopping
off and no eos, mlx's peak memory over the generation runs (reset after the
isolated measures), one exp over [1, canvas, vocab] float32 logits (mx.exp /
torch.exp: the floor the sampler compares with), and for ours two floors of
the decoder: its attention over the cached context alone, and its matrix
products alone. Prefill, full step and canvas come from the same runs of each
implementation's own generation loop; the others are timed alone. Each prints
how it was taken; speed_workers.py says what each implementation runs. Ratios
are speed-ups of ours: peer time / our time, or our rate / peer rate (> 1: ours
is faster, or smaller). `ours-top-k` is ours with self_conditioning="top-k"
(k 64), compared with each peer on the lines under the table.

Each implementation runs in its own process (benchmarks/speed_workers.py), with
the same environment: on Linux, Debian's OpenBLAS is preloaded when installed
(apt-get install libopenblas0-pthread; it takes torch's sgemm_ calls too), and
each worker reports the BLAS its matrix products call. On a 2-core CPU a full
run takes about 35-40 minutes, two thirds of it body-heavy-8k (each
implementation prefills 8192 tokens 1 + warm-up + repeats times, 45-90 s each;
--configs can leave it out); --quick takes about 20 minutes, medium-real-vocab
alone about 7.

Weights: random (tests/helpers/reference.py's build_reference), saved once per model with
transformers' save_pretrained under benchmarks/.cache/speed/, in the
global_head_dim config form (mlx-vlm does not read per_layer_config). mlx-vlm is
installed with pip --no-deps into benchmarks/.peers/site, with the few modules
its import needs beyond this environment (requests and Pillow), never into the
environment itself. transformers needs the test extra (pip install -e ".[test]").
"""

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "speed"
PEERS_SITE = HERE / ".peers" / "site"
WORKERS = HERE / "speed_workers.py"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
MLX_VLM = "mlx-vlm==0.7.10"
# mlx-vlm's modules import these beyond our environment (its other requirements,
# audio, video, server, are not needed for text generation)
MLX_VLM_IMPORTS = {"requests": "requests", "urllib3": "urllib3", "charset_normalizer": "charset_normalizer",
                   "certifi": "certifi", "idna": "idna", "PIL": "Pillow"}
IMPLS = ("ours", "ours-top-k", "mlx-vlm", "transformers")  # ours-top-k: self_conditioning="top-k" (k 64)


def layer_types(n):
    """The reference's pattern: five sliding layers, one full, the last one full."""
    kinds = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    return kinds[:-1] + ["full_attention"]


def text_config(**sizes):
    text = dict(
        rms_norm_eps=1e-6, final_logit_softcapping=30.0, sliding_window=1024, max_position_embeddings=32768,
    )
    text.update(sizes)
    text["layer_types"] = layer_types(text["num_hidden_layers"])
    return text


MODELS = {
    "medium-real-vocab": dict(canvas_length=256, text=text_config(
        vocab_size=262144, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
        num_experts=16, top_k_experts=4, moe_intermediate_size=256,
    )),
    "tiny": dict(canvas_length=32, text=text_config(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        num_experts=8, top_k_experts=2, moe_intermediate_size=64,
    )),
    "body-heavy": dict(canvas_length=256, text=text_config(
        vocab_size=32768, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, global_head_dim=128, num_global_key_value_heads=2,
        num_experts=32, top_k_experts=4, moe_intermediate_size=512,
    )),
}

# configuration -> (model, prompt tokens)
CONFIGS = {
    "tiny": ("tiny", 64),
    "medium-real-vocab": ("medium-real-vocab", 64),
    "body-heavy": ("body-heavy", 64),
    "body-heavy-8k": ("body-heavy", 8192),
    "real-26b": ("real-26b", 64),  # GPU only: bfloat16 and 4-bit, random weights built in memory
}

MEASURES = [  # key, label, kind ("time", "rate", "memory")
    ("prefill", "prefill (tokens/s)", "rate"),
    ("commit", "commit one canvas", "time"),
    ("decoder", "decoder, no self-cond.", "time"),
    ("self_conditioning", "self-conditioning", "time"),
    ("decoder_sc", "decoder + self-cond.", "time"),
    ("sampler", "sampler", "time"),
    ("sampler_derived", "sampler (step - dec+sc)", "time"),
    ("step", "full step (real loop)", "time"),
    ("canvas", "canvas (tokens/s)", "rate"),
    ("canvas_time", "canvas time", "time"),
    ("exp", "exp over [1,C,V] logits", "time"),
    ("attention_context", "attention over context", "time"),
    ("products", "decoder's products alone", "time"),
    ("peak_mlx_gb", "peak mlx, loop (GB)", "memory"),
    ("peak_rss_gb", "peak RSS (GB)", "memory"),
]


def describe(name):
    model, prompt = CONFIGS["real-26b" if name.startswith("real-26b") else name]
    if model == "real-26b":
        return f"the released 26B-A4B configuration (tests/real_26b_config.json), prompt {prompt}"
    m = MODELS[model]
    t = m["text"]
    return (
        f"vocab {t['vocab_size']}, canvas {m['canvas_length']}, hidden {t['hidden_size']}, "
        f"{t['num_hidden_layers']} layers, {t['num_experts']} experts top {t['top_k_experts']}, "
        f"intermediate {t['intermediate_size']}, moe intermediate {t['moe_intermediate_size']}, "
        f"{t['num_attention_heads']} heads / {t['num_key_value_heads']} kv x {t['head_dim']} "
        f"(full layers {t['num_global_key_value_heads']} kv x {t['global_head_dim']}), "
        f"sliding window {t['sliding_window']}, prompt {prompt}"
    )


# ---------------------------------------------------------------- processes


def worker(kind, spec, env, python):
    """Run one worker process; its progress goes to stderr, its JSON comes back."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([python, str(WORKERS), kind, str(spec_path), str(out_path)], env=env, cwd=ROOT)
        if out_path.exists():
            return json.loads(out_path.read_text())
        return {"error": f"worker exited with status {proc.returncode} and no result"}


def environment(args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    blas = "mlx's own BLAS"
    if sys.platform == "linux" and not args.no_openblas and Path(OPENBLAS).exists():
        preload = [p for p in env.get("LD_PRELOAD", "").split() if p]
        if OPENBLAS not in preload:
            env["LD_PRELOAD"] = " ".join([OPENBLAS] + preload)
        blas = f"LD_PRELOAD={env['LD_PRELOAD']}"
    elif sys.platform == "linux" and args.no_openblas:
        blas = "no OpenBLAS preload (--no-openblas)"
    elif sys.platform == "linux":
        blas = "no OpenBLAS preload (apt-get install libopenblas0-pthread makes matrix products 20-30x faster)"
    return env, blas


def setup_mlx_vlm(python):
    """mlx-vlm 0.7.10 in benchmarks/.peers/site (pip --target, no dependencies:
    mlx, transformers and the rest come from this environment); returns None or
    why it cannot run."""
    version = PEERS_SITE / "mlx_vlm" / "version.py"
    if not (version.exists() and "0.7.10" in version.read_text()):
        print(f"installing {MLX_VLM} into {PEERS_SITE.relative_to(ROOT)} ...", flush=True)
        proc = subprocess.run(
            [python, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(PEERS_SITE), MLX_VLM],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            return f"pip install {MLX_VLM} failed: {proc.stderr.strip()[-300:]}"
    missing = [
        dist for module, dist in MLX_VLM_IMPORTS.items()
        if importlib.util.find_spec(module) is None and not any(PEERS_SITE.glob(f"{module}/__init__.py"))
    ]
    if missing:
        print(f"installing mlx-vlm's import requirements {missing} into {PEERS_SITE.relative_to(ROOT)} ...", flush=True)
        proc = subprocess.run(
            [python, "-m", "pip", "install", "-q", "--no-deps", "--target", str(PEERS_SITE), *missing],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            return f"pip install {' '.join(missing)} failed: {proc.stderr.strip()[-300:]}"
    return None


def check_transformers():
    for module in ("torch", "transformers"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[test]')"
    if importlib.util.find_spec("transformers.models.diffusion_gemma") is None:
        return "this transformers has no diffusion_gemma (needs >= 5.23)"
    return None


def model_spec(model, seed):
    m = MODELS[model]
    digest = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()[:10]
    return dict(m, seed=seed, checkpoint=str(CACHE / f"{model}-{digest}"))


def ensure_checkpoint(model, seed, env, python):
    spec = model_spec(model, seed)
    if not Path(spec["checkpoint"]).exists():
        print(f"building random checkpoint {model} (transformers save_pretrained) ...", flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        result = worker("build", dict(spec, impl="build", config=model), env, python)
        if "error" in result:
            raise SystemExit(f"building {model} failed: {result['error']}")
    return spec


def real_26b_checkpoint(env, python):
    """A directory with the released config (in the global_head_dim form that
    mlx-vlm reads; the values are the released ones), generation config and a
    word-level tokenizer: the workers build random weights in memory."""
    config = json.loads((ROOT / "tests" / "real_26b_config.json").read_text())
    text = config["text_config"]
    full = next(iter(text.pop("per_layer_config").values()))
    text.update(global_head_dim=full["head_dim"], num_global_key_value_heads=full["num_key_value_heads"])
    path = CACHE / "real-26b-config"
    if not (path / "tokenizer.json").exists():
        worker("config-only", dict(checkpoint=str(path), config_json=config, impl="build", config="real-26b"), env, python)
    return path


# ---------------------------------------------------------------- results


def finish(result, canvas_length):
    """Derived measures: rates, self-conditioning, the derived sampler."""
    m = {k: v.get("median") for k, v in result.get("measures", {}).items()}
    out = dict(m)
    if m.get("prefill"):
        out["prefill"] = result["prompt_tokens"] / m["prefill"]
    if m.get("canvas"):
        out["canvas_time"] = m["canvas"]
        out["canvas"] = canvas_length / m["canvas"]
    if m.get("decoder_sc") is not None and m.get("decoder") is not None:
        out["self_conditioning"] = m["decoder_sc"] - m["decoder"]
    if m.get("step") is not None and m.get("decoder_sc") is not None:
        out["sampler_derived"] = m["step"] - m["decoder_sc"]
    for key in ("peak_mlx_gb", "peak_rss_gb"):
        if result.get(key) is not None:
            out[key] = result[key]
    result["summary"] = out
    return result


def fmt(value, kind):
    if value is None:
        return "-"
    if kind == "rate":
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    if kind == "memory":
        return f"{value:.2f}"
    if abs(value) < 1e-3:
        return f"{value * 1e3:.3f} ms"
    return f"{value * 1e3:.1f} ms" if abs(value) < 10 else f"{value:.1f} s"


def ratio(ours, peer, kind):
    """Speed-up of ours over the peer (> 1: ours is faster / smaller)."""
    if ours is None or peer is None or ours <= 0 or peer <= 0:
        return "-"
    r = ours / peer if kind == "rate" else peer / ours
    return f"{r:.2f}x"


def print_table(name, results, impls):
    print(f"\n== {name}: {describe(name)}")
    shown = [i for i in impls if i in results]
    peers = [i for i in shown if not i.startswith("ours")] if "ours" in shown else []
    header = f"{'measure':<26}" + "".join(f"{i:>15}" for i in shown) + "".join(f"{'vs ' + p:>17}" for p in peers)
    print(header)
    print("-" * len(header))
    for key, label, kind in MEASURES:
        values = {i: results[i].get("summary", {}).get(key) for i in shown}
        errors = {i: results[i].get("measures", {}).get(key, {}).get("error") for i in shown}
        if all(v is None for v in values.values()) and not any(errors.values()):
            continue
        cells = "".join(f"{('error' if errors[i] else fmt(values[i], kind)):>15}" for i in shown)
        ratios = "".join(f"{ratio(values['ours'], values[p], kind):>17}" for p in peers)
        print(f"{label:<26}{cells}{ratios}")
    if "ours-top-k" in shown:
        for p in peers:
            summary = lambda i, key: results[i].get("summary", {}).get(key)  # noqa: E731
            print(f"ours-top-k vs {p}: full step {ratio(summary('ours-top-k', 'step'), summary(p, 'step'), 'time')}, "
                  f"canvas {ratio(summary('ours-top-k', 'canvas'), summary(p, 'canvas'), 'rate')}")
    for i in shown:
        r = results[i]
        if r.get("error"):
            print(f"  {i}: FAILED: {r['error']}")
        for key, value in r.get("measures", {}).items():
            if "error" in value:
                print(f"  {i}: {key} not measured: {value['error']}")
        info = [f"device {r.get('device', '?')}", f"dtype {r.get('dtype', '?')}", f"BLAS: {r.get('blas', '?')}"]
        print(f"  {i}: " + "; ".join(info))
        for key in ("prefill_method", "sampler_method", "step_method"):
            if r.get(key):
                print(f"  {i}: {key.replace('_', ' ')}: {r[key]}")
        for note in r.get("notes", []):
            print(f"  {i}: {note}")


def print_context_comparison(all_results):
    """(step at 8k) - (step at 64) next to the decoder's attention over the
    cached context measured alone, for ours."""
    short, long = all_results.get("body-heavy", {}).get("ours"), all_results.get("body-heavy-8k", {}).get("ours")
    if not short or not long:
        return
    s, l = short.get("summary", {}), long.get("summary", {})
    if None in [d.get(k) for d in (s, l) for k in ("step", "decoder", "attention_context")]:
        return
    print(
        f"\nours, body-heavy, 8k vs 64 context: full step +{(l['step'] - s['step']) * 1e3:.1f} ms "
        f"({s['step'] * 1e3:.1f} -> {l['step'] * 1e3:.1f}); attention over the cached context alone "
        f"+{(l['attention_context'] - s['attention_context']) * 1e3:.1f} ms "
        f"({s['attention_context'] * 1e3:.1f} -> {l['attention_context'] * 1e3:.1f}); "
        f"decoder +{(l['decoder'] - s['decoder']) * 1e3:.1f} ms"
    )


# ---------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per measure (default 3, --quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the timed canvases (>= 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=CACHE / "results.json", help="where the JSON goes")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 repetition")
    parser.add_argument("--no-openblas", action="store_true", help="do not preload OpenBLAS")
    args = parser.parse_args()
    if args.steps < 3:
        parser.error("--steps must be >= 3 (the full step is timed on self-conditioned steps 2..N-1)")
    repeats = args.repeats or (1 if args.quick else 3)
    if repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")

    start = time.perf_counter()
    python = sys.executable
    env, blas = environment(args)
    print(f"python {python}; {blas}; repeats {repeats}, warm-up {args.warmup}, steps {args.steps}")
    unavailable = {}
    if "mlx-vlm" in args.impls:
        reason = setup_mlx_vlm(python)
        if reason:
            unavailable["mlx-vlm"] = reason
    if "transformers" in args.impls:
        reason = check_transformers()
        if reason:
            unavailable["transformers"] = reason
    for impl, reason in unavailable.items():
        print(f"{impl}: not run: {reason}")

    all_results = {"settings": dict(repeats=repeats, warmup=args.warmup, steps=args.steps, seed=args.seed, blas=blas,
                                    python=python, unavailable=unavailable), "configs": {}}
    skipped = {}
    probe = None
    for name in args.configs:
        model, prompt_tokens = CONFIGS[name]
        if model == "real-26b":
            probe = probe or worker("probe", {}, env, python)
            if not probe.get("gpu"):
                memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
                skipped[name] = (
                    f"needs a GPU: mlx's default device here is {probe.get('default_device', '?')}; the 26B parameters "
                    f"are 52 GB in bfloat16 (this machine has {memory:.0f} GiB), mlx's CPU gather_mm (the experts) "
                    "takes float32 only, and a decoder pass would take minutes"
                )
                print(f"\n== {name}: skipped: {skipped[name]}")
                continue
            variants = [("real-26b-bf16", None), ("real-26b-4bit", 4)]
            base = dict(checkpoint=str(real_26b_checkpoint(env, python)), random_init=True,
                        canvas_length=256, vocab_size=262144)
            impls = [i for i in args.impls if i in ("ours", "ours-top-k", "mlx-vlm")]
            if "transformers" in args.impls:
                print(f"{name}: transformers not run: a 26B model on torch's CPU build")
        else:
            spec = ensure_checkpoint(model, args.seed, env, python)
            variants = [(name, None)]
            base = dict(checkpoint=spec["checkpoint"], canvas_length=spec["canvas_length"],
                        vocab_size=spec["text"]["vocab_size"])
            impls = list(args.impls)
        rng = np.random.default_rng(args.seed)
        prompt = rng.integers(3, base["vocab_size"], prompt_tokens).tolist()
        canvas = rng.integers(3, base["vocab_size"], base["canvas_length"]).tolist()
        for variant, bits in variants:
            results = {}
            for impl in impls:
                if impl in unavailable:
                    continue
                print(f"\n[{variant}] {impl} ...", flush=True)
                spec = dict(base, impl=impl, config=variant, prompt=prompt, canvas=canvas, steps=args.steps,
                            repeats=repeats, warmup=args.warmup, seed=args.seed, bits=bits,
                            peers_site=str(PEERS_SITE))
                result = worker(impl, spec, env, python)
                result["prompt_tokens"] = prompt_tokens
                results[impl] = finish(result, base["canvas_length"])
                print(f"[{variant}] {impl} done in {result.get('wall_s', 0):.0f} s", flush=True)
            all_results["configs"][variant] = results
            print_table(variant, results, IMPLS)

    print(f"\nsettings: repeats {repeats}, warm-up {args.warmup}, steps {args.steps}; {blas}")
    for impl, reason in unavailable.items():
        print(f"{impl}: not run: {reason}")
    for name, reason in skipped.items():
        print(f"{name}: skipped: {reason}")
    print_context_comparison(all_results["configs"])
    total = time.perf_counter() - start
    all_results["settings"]["skipped"] = skipped
    all_results["settings"]["total_s"] = total
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(all_results, indent=1))
    print(f"\nJSON: {args.json}\ntotal {total:.0f} s")


if __name__ == "__main__":
    main()
