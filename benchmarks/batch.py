"""Batched generation against the same prompts one at a time, in one run.

    LD_PRELOAD=<openblas> python benchmarks/batch.py [--repeats 3]

- demo: 16 held-out problems of the embedded demo model (the default
  sampler), one `diffusion_generate` per prompt against one call with the
  list of 16: correct answers and throughput of each.
- tiny-body: the speed issue's tiny configuration (benchmarks/speed.py:
  hidden 64, 6 layers, V 1024, canvas 32), random weights, 64-token
  prompts, 2 canvases of 16 denoising steps each (the default stopping
  never fires on random weights, so every row does the same work):
  generated tokens per second at batch 1, 2, 4 and 8, and a straight-line
  fit of time against batch size: the part a batch shares and the part each
  row adds, which bounds what any batch size can gain on this machine.

Times are the best of --repeats (whole calls, prefill included), after a
warm-up. On this CPU a small model's step is mostly per-operation overhead,
which a batch shares; on a GPU it is mostly reading the weights, which a
batch shares too.
"""

import argparse
import time

import mlx.core as mx
import numpy as np
from speed import MODELS

from mlx_diffusiongemma import diffusion_generate, load
from mlx_diffusiongemma.demo import problems, prompt_ids
from mlx_diffusiongemma.model import Model, ModelArgs


def best_time(fn, repeats: int) -> tuple:
    """(best seconds, last output) of `repeats` calls after a warm-up; mlx's
    global seed is set before each, so unseeded calls draw alike."""
    fn()  # warm-up: compilation, caches
    times, out = [], None
    for _ in range(repeats):
        mx.random.seed(0)
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def demo(repeats: int) -> dict:
    model, tokenizer = load("demo")
    cases = problems(16, seed=3)
    prompts = [prompt_ids(tokenizer, digits) for digits, _ in cases]

    def answers(responses):
        return sum(r.text == answer for r, (_, answer) in zip(responses, cases))

    one_by_one, singles = best_time(lambda: [diffusion_generate(model, tokenizer, p, seed=i) for i, p in enumerate(prompts)], repeats)
    batched, batch = best_time(lambda: diffusion_generate(model, tokenizer, prompts, seed=0), repeats)
    tokens = sum(r.generation_tokens for r in batch)
    steps = [r.denoising_steps for r in singles]
    return {
        "prompts": len(prompts),
        "correct, one by one": answers(singles),
        "correct, batch": answers(batch),
        "same tokens as one by one (seed + row)": sum(a.tokens == b.tokens for a, b in zip(singles, batch)),
        "one by one s": one_by_one,
        "batch s": batched,
        "one by one tokens/s": sum(r.generation_tokens for r in singles) / one_by_one,
        "batch tokens/s": tokens / batched,
        "batch / one by one (throughput)": one_by_one / batched,
        # a batch takes as many steps as its slowest prompt: even if extra rows
        # cost nothing, it is at most (sum of steps) / (most steps) faster
        "denoising steps, all prompts": sum(steps),
        "denoising steps, slowest prompt": max(steps),
        "bound if extra rows were free": sum(steps) / max(steps),
    }


def tiny_body(repeats: int) -> dict:
    spec = MODELS["tiny"]
    model = Model(ModelArgs.from_dict({"model_type": "diffusion_gemma", "canvas_length": spec["canvas_length"], "text_config": spec["text"]}))
    mx.eval(model.parameters())
    C, V = model.args.canvas_length, model.args.vocab_size
    prompts = np.random.default_rng(0).integers(3, V, (8, 64)).tolist()
    options = dict(max_tokens=2 * C, max_denoising_steps=16, eos_token_id=[])
    row, seconds = {}, {}
    for batch in (1, 2, 4, 8):
        seconds[batch], responses = best_time(
            lambda: diffusion_generate(model, None, prompts[0] if batch == 1 else prompts[:batch], seed=0, **options), repeats
        )
        tokens = sum(r.generation_tokens for r in (responses if batch > 1 else [responses]))
        row[f"batch {batch} s"] = seconds[batch]
        row[f"batch {batch} tokens/s"] = tokens / seconds[batch]
    row["batch 8 / batch 1 (tokens/s)"] = row["batch 8 tokens/s"] / row["batch 1 tokens/s"]
    # time = shared + per_row * batch (least squares): what a batch shares
    # (per-operation overhead) and what each row adds (its arithmetic); no
    # batch gets more than (shared + per_row) / per_row times batch 1's tokens/s
    per_row, shared = np.polyfit(list(seconds), list(seconds.values()), 1)
    row["fit: shared s per call"] = shared
    row["fit: s per row per call"] = per_row
    row["bound at any batch size"] = (shared + per_row) / per_row
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name, run in (("demo, 16 prompts", demo), ("tiny-body", tiny_body)):
        print(f"{name}:")
        for k, v in run(args.repeats).items():
            print(f"  {k:42s} {v:10.3f}" if isinstance(v, float) else f"  {k:42s} {v:10d}")


if __name__ == "__main__":
    main()
