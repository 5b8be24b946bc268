"""Top-k self-conditioning (`self_conditioning="top-k"`) against the exact mode:
how often the generated tokens agree on trained models, and what it saves on the
real vocabulary.

    python benchmarks/self_conditioning_top_k.py [--problems 200] [--seeds 2] [--parts demo trained timing]

- demo: the shipped demo model (sorting 3-8 digits, vocabulary 14), held-out
  problems (demo.problems, seed 2), k = 1, 2, 4, 8.
- trained: a second small model trained here on another task with a larger
  vocabulary: reversing 3-8 symbols of 256 (vocabulary 260), hidden 64, 2
  layers, 1200 steps of 64 examples (about 2.5 minutes on 2 CPU cores), cached
  under benchmarks/.cache/self_conditioning_top_k/; k = 1, 2, 4, 8, 16, 64.
- timing: the medium-real-vocab shape of benchmarks/speed.py (vocabulary
  262144, canvas 256, hidden 256, 4 layers, 16 experts top 4), speed.py's
  saved checkpoint when there is one, else random weights built in memory:
  the self-conditioning input (top-k selection; the soft embedding), the
  decoder with it, the full step of the real loop (steps 2..N of
  stream_diffusion_generate, adaptive stopping off, no eos, the modes
  interleaved run by run) and peak memory, for exact and top-k.

Each generation of a mode runs with the same seed as the exact one; agreement
compares the generated tokens (eos and padding excluded): per token over the
longer of the two responses (a missing position disagrees), and per response
(identical lists). The exact-match score is the share of responses equal to
the answer. OpenBLAS is preloaded when present (the script re-executes itself);
this checkout's package is the one imported.
"""

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "self_conditioning_top_k"
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

from mlx_diffusiongemma import load, load_model, stream_diffusion_generate  # noqa: E402
from mlx_diffusiongemma.generate import DiffusionOptions  # noqa: E402
from mlx_diffusiongemma.model import Model, ModelArgs, soft_embed, soft_embed_top_k  # noqa: E402
from mlx_diffusiongemma.sampling import next_self_conditioning  # noqa: E402

DEMO_KS = (1, 2, 4, 8)
TRAINED_KS = (1, 2, 4, 8, 16, 64)
TIMING_KS = tuple(sorted({8, DiffusionOptions.self_conditioning_k, 256}))
NEVER_STOP = 1e-30  # confidence_threshold: adaptive stopping never triggers

# The second model: reverse 3-8 symbols of 256. Token ids: 0 pad, 1 eos, 2 bos, 3 "=", 4.. the symbols.
SYMBOLS, FIRST = 256, 4
TRAINED_CONFIG = {
    "model_type": "diffusion_gemma",
    "canvas_length": 12,
    "text_config": {
        "vocab_size": FIRST + SYMBOLS, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"], "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "global_head_dim": 32, "num_global_key_value_heads": 2, "sliding_window": 64,
        "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32, "max_position_embeddings": 4096,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    },
}
TRAINING = dict(iters=1200, batch_size=64, learning_rate=3e-3, warmup=100, eval_every=400, save_every=1200)


def reverse_problems(n: int, seed: int) -> list:
    """(prompt ids, answer ids): <bos> symbols =, then the symbols reversed. Training uses seed 0."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        symbols = [FIRST + rng.randrange(SYMBOLS) for _ in range(rng.randint(3, 8))]
        cases.append(([2, *symbols, 3], symbols[::-1]))
    return cases


def trained_model():
    """The reverse model, trained once and cached (the key covers config and training)."""
    from mlx_diffusiongemma.train import TrainingArgs, make_blocks, train

    key = hashlib.sha256(json.dumps([TRAINED_CONFIG, TRAINING, SYMBOLS]).encode()).hexdigest()[:10]
    path = CACHE / f"reverse-{SYMBOLS}-{key}"
    record = path / "benchmark_training.json"
    if not record.is_file():
        print(f"training the reverse model into {path.relative_to(ROOT)} ...", flush=True)

        def blocks(cases):
            C = TRAINED_CONFIG["canvas_length"]
            return [b for prompt, answer in cases for b in make_blocks(prompt, answer, C, 1, 0)]

        start = time.perf_counter()
        mx.random.seed(0)
        model = Model(ModelArgs.from_dict(TRAINED_CONFIG))
        train(model, TRAINED_CONFIG, blocks(reverse_problems(60_000, 0)), blocks(reverse_problems(500, 1)), path,
              TrainingArgs(**TRAINING), log=lambda line: print(line, flush=True))
        record.write_text(json.dumps({"seconds": time.perf_counter() - start}))
    seconds = json.loads(record.read_text())["seconds"]
    print(f"\nthe reverse model ({path.relative_to(ROOT)}) trained in {seconds:.0f} s", flush=True)
    return load_model(path), path, seconds


def generate(model, prompt, seed, **options):
    """(generated ids, denoising steps) of one seeded generation."""
    for event in stream_diffusion_generate(model, None, prompt, seed=seed, eos_token_id=[1], pad_token_id=0,
                                           max_tokens=model.args.canvas_length, **options):
        pass
    return event.tokens, event.denoising_steps


def agreement(name, model, cases, seeds, ks) -> dict:
    """Exact and each top-k on every (case, seed): scores, steps and agreement with exact."""
    runs = [(prompt, answer, i * seeds + s) for i, (prompt, answer) in enumerate(cases) for s in range(seeds)]
    start = time.perf_counter()
    exact = [generate(model, prompt, seed) for prompt, _, seed in runs]
    modes = {"exact": summary(runs, exact, exact)}
    print(f"[{name}] exact: {len(runs)} runs in {time.perf_counter() - start:.0f} s", flush=True)
    for k in ks:
        start = time.perf_counter()
        options = dict(self_conditioning="top-k", self_conditioning_k=k)
        top = [generate(model, prompt, seed, **options) for prompt, _, seed in runs]
        modes[f"top-{k}"] = summary(runs, top, exact)
        print(f"[{name}] top-{k}: {time.perf_counter() - start:.0f} s", flush=True)
    return {"runs": len(runs), "problems": len(cases), "seeds_per_problem": seeds,
            "vocab_size": model.args.vocab_size, "modes": modes}


def summary(runs, results, exact) -> dict:
    same_tokens = positions = 0
    for (tokens, _), (reference, _) in zip(results, exact):
        same_tokens += sum(a == b for a, b in zip(tokens, reference))
        positions += max(len(tokens), len(reference))
    return {
        "token_agreement": same_tokens / max(positions, 1),
        "response_agreement": statistics.mean(a == b for (a, _), (b, _) in zip(results, exact)),
        "exact_match": statistics.mean(tokens == answer for (tokens, _), (_, answer, _) in zip(results, runs)),
        "mean_steps": statistics.mean(steps for _, steps in results),
    }


def print_agreement(title, result) -> None:
    print(f"\n{title}: {result['problems']} problems x {result['seeds_per_problem']} seeds = {result['runs']} runs, "
          f"vocabulary {result['vocab_size']}")
    print("| mode | token agreement | response agreement | exact-match | mean steps |\n|---|---|---|---|---|")
    for mode, m in result["modes"].items():
        print(f"| {mode} | {m['token_agreement']:.2%} | {m['response_agreement']:.2%} | {m['exact_match']:.2%} | "
              f"{m['mean_steps']:.2f} |")


# ---------------------------------------------------------------- timing


def timing_model(path):
    """speed.py's saved medium-real-vocab checkpoint, or its shape with random weights."""
    if path is None:
        found = sorted((HERE / ".cache" / "speed").glob("medium-real-vocab-*/model.safetensors"))
        path = found[0].parent if found else None
    if path is not None:
        return load_model(path), str(path)
    sys.path.insert(0, str(HERE))
    from speed import MODELS

    shape = MODELS["medium-real-vocab"]
    model = Model(ModelArgs.from_dict({"canvas_length": shape["canvas_length"], "text_config": shape["text"]}))
    mx.eval(model.parameters())
    return model, "random weights built in memory (speed.py's medium-real-vocab shape)"


def seconds(fn, repeats: int) -> float:
    """Median seconds of fn() (evaluated), after one untimed call."""
    mx.eval(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def isolated(model, canvas, cache, modes: dict, repeats: int) -> dict:
    """Per mode, on one first-step prediction: the input `next_self_conditioning`
    builds, the soft embedding the decoder makes of it, the decoder with it."""
    from mlx_diffusiongemma.sampling import Randomness, predict

    embedding = model.model.decoder.embed_tokens
    prediction = predict(model.decode(canvas, cache), mx.array(0.8, mx.float32), Randomness(0))  # t_max
    mx.eval(prediction.weights, prediction.total)
    out = {}
    for mode, k in modes.items():
        sc = next_self_conditioning(prediction, model.dtype, k)
        mx.eval(sc)
        if k is None:
            weights, total = sc  # Probabilities
            soft = lambda: soft_embed(embedding, weights) / total  # noqa: E731
        else:  # TopK
            soft = lambda: soft_embed_top_k(embedding, *sc)  # noqa: E731
        m = out[mode] = {
            "input": seconds(lambda: next_self_conditioning(prediction, model.dtype, k), repeats),
            "soft_embedding": seconds(soft, repeats),
            "decoder": seconds(lambda: model.decode(canvas, cache, sc), repeats),
        }
        print(f"[timing] {mode}: input {m['input']:.3f} s, soft embedding {m['soft_embedding']:.3f} s, "
              f"decoder with it {m['decoder']:.3f} s", flush=True)
    return out


def timing(path, ks, steps: int, repeats: int) -> dict:
    model, source = timing_model(path)
    C, V = model.args.canvas_length, model.args.vocab_size
    rng = random.Random(0)
    prompt = [rng.randrange(3, V) for _ in range(64)]
    canvas = mx.array([[rng.randrange(3, V) for _ in range(C)]], dtype=mx.int32)
    cache = model.make_cache()
    model.encode(prompt, cache)
    modes = {"exact": None, **{f"top-{k}": k for k in ks}}
    out = {"source": source, "dtype": str(model.dtype), "steps": steps, "repeats": repeats}
    out["decoder_no_self_conditioning"] = seconds(lambda: model.decode(canvas, cache), repeats)
    print(f"[timing] decoder, no self-conditioning: {out['decoder_no_self_conditioning']:.3f} s", flush=True)
    out["modes"] = isolated(model, canvas, cache, modes, repeats)
    options = dict(max_tokens=C, max_denoising_steps=steps, confidence_threshold=NEVER_STOP, eos_token_id=[])
    steps_of = {mode: [] for mode in modes}
    for run in range(repeats + 1):  # run 0 warms up
        for mode, k in modes.items():
            extra = {} if k is None else dict(self_conditioning="top-k", self_conditioning_k=k)
            mx.reset_peak_memory()
            stamps = []
            for event in stream_diffusion_generate(model, None, prompt, seed=run, **options, **extra):
                if type(event).__name__ == "Draft":
                    stamps.append(time.perf_counter())
            if run:
                steps_of[mode] += [b - a for a, b in zip(stamps, stamps[1:])]  # steps 2..N: self-conditioned
                m = out["modes"][mode]
                m["peak_gb"] = max(m.get("peak_gb", 0.0), mx.get_peak_memory() / 1e9)
        print(f"[timing] generation run {run}{' (warm-up)' if run == 0 else ''} done", flush=True)
    for mode, samples in steps_of.items():
        out["modes"][mode].update(step=statistics.median(samples), step_samples=samples)
    return out


def print_timing(result) -> None:
    print(f"\nCost on the medium-real-vocab shape ({result['source']}; {result['dtype']}; medians; full step over "
          f"{result['repeats']} canvases x {result['steps'] - 1} self-conditioned steps)")
    print(f"decoder without self-conditioning: {result['decoder_no_self_conditioning']:.3f} s")
    print("| mode | input (selection) | soft embedding | decoder with it | full step | step vs exact | peak memory |")
    print("|---|---|---|---|---|---|---|")
    exact = result["modes"]["exact"]["step"]
    for mode, m in result["modes"].items():
        print(f"| {mode} | {m['input'] * 1e3:.1f} ms | {m['soft_embedding'] * 1e3:.1f} ms | {m['decoder']:.3f} s | "
              f"{m['step']:.3f} s | {exact / m['step']:.2f}x | {m['peak_gb']:.2f} GB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=200, help="problems per model")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per problem")
    parts = ("demo", "trained", "timing")
    parser.add_argument("--parts", nargs="+", choices=parts, default=list(parts))
    parser.add_argument("--timing-model", type=Path, default=None, help="a checkpoint of the timed shape")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of each timed canvas")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=CACHE / "results.json")
    parser.add_argument("--no-openblas", action="store_true")
    args = parser.parse_args()
    preload = os.environ.get("LD_PRELOAD", "").split()
    if sys.platform == "linux" and not args.no_openblas and Path(OPENBLAS).exists() and OPENBLAS not in preload:
        os.environ["LD_PRELOAD"] = " ".join([OPENBLAS, *preload])
        os.execv(sys.executable, [sys.executable, *sys.argv])

    import mlx_diffusiongemma
    from mlx_diffusiongemma.demo import problems, prompt_ids

    start = time.perf_counter()
    results = {"settings": {**vars(args), "json": str(args.json), "timing_model": str(args.timing_model),
                            "ld_preload": os.environ.get("LD_PRELOAD", ""),
                            "module": os.path.dirname(mlx_diffusiongemma.__file__), "mlx": mx.__version__}}
    if "demo" in args.parts:
        model, tokenizer = load("demo")
        cases = [(prompt_ids(tokenizer, digits), tokenizer.encode(answer, add_special_tokens=False))
                 for digits, answer in problems(args.problems, seed=2)]  # held out
        results["demo"] = agreement("demo", model, cases, args.seeds, DEMO_KS)
        print_agreement("Demo model (sort digits)", results["demo"])
    if "trained" in args.parts:
        model, path, trained_s = trained_model()
        results["trained"] = agreement("trained", model, reverse_problems(args.problems, 2), args.seeds, TRAINED_KS)
        results["trained"].update(checkpoint=str(path), training=TRAINING, training_s=trained_s)
        print_agreement("Trained reverse model (reverse 3-8 of 256 symbols)", results["trained"])
    if "timing" in args.parts:
        results["timing"] = timing(args.timing_model, TIMING_KS, args.steps, args.repeats)
        print_timing(results["timing"])
    results["total_s"] = time.perf_counter() - start
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nJSON: {args.json}\ntotal {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
