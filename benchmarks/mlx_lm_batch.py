"""mlx-lm's batching against the same prompts one at a time, in one run.

    LD_PRELOAD=<openblas> python benchmarks/mlx_lm_batch.py [--repeats 3]

- batch_generate: 16 held-out problems of the embedded demo model through
  `mlx_lm.batch_generate` (its defaults: 8 prompts prefilled at a time; and
  with all 16 prefilled together), against `mlx_lm.generate` once per
  prompt: correct answers and generated tokens per second of each. Best of
  --repeats, after a warm-up; mlx's global seed is set before each run.
- joining one per step: the same prompts into mlx-lm's `BatchGenerator`, one
  more after each of its steps, as requests arriving apart join a server's
  batch; and how many rows each canvas denoising took there and in
  batch_generate (rows share a denoising only when they need a canvas at the
  same step).
- several canvases, joining one per step: the speed issue's tiny
  configuration (random weights, no eos, 16 denoising steps a canvas), 8
  prompts of 64 tokens, 3 canvases each, joining mlx-lm's `BatchGenerator`
  one per step, against `generate_step` once per prompt. Rows that join
  apart need their first canvas apart; from then on each row's next canvas
  is denoised ahead with whichever rows need one, so the rows fall into
  step: rows per denoising call says how far.
- server: `mlx_lm.server` (its defaults) on loopback serving the same 16
  problems as chat requests without a seed (those are the ones it batches),
  one after another, then all at once: wall time of each, and whether every
  concurrent answer equals the one-at-a-time answer.

A demo answer is the digits sorted, at most 9 tokens and eos. Every canvas of
a batch takes as many denoising steps as its slowest row, so the gain is
bounded by (sum of steps) / (most steps) even where extra rows cost nothing
(benchmarks/batch.py measures that bound for our own batched call).
"""

import argparse
import concurrent.futures
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from batch import best_time
from mlx_lm.generate import BatchGenerator, generate_step
from speed import MODELS

import mlx_diffusiongemma
from mlx_diffusiongemma.demo import problems, prompt_ids
from mlx_diffusiongemma.mlx_lm_model import Model, ModelArgs
from mlx_diffusiongemma.model import GenerationConfig

DEMO = Path(mlx_diffusiongemma.__file__).parent / "demo_model"
MAX_TOKENS = 16


def batch_generate(repeats: int) -> dict:
    model, tokenizer = mlx_lm.load(str(DEMO))
    cases = problems(16, seed=3)
    prompts = [prompt_ids(tokenizer, digits) for digits, _ in cases]

    def tokens(texts):
        return sum(len(tokenizer.encode(t, add_special_tokens=False)) + 1 for t in texts)  # + eos

    def correct(texts):
        return sum(text == answer for text, (_, answer) in zip(texts, cases))

    one, singles = best_time(lambda: [mlx_lm.generate(model, tokenizer, p, max_tokens=MAX_TOKENS) for p in prompts], repeats)
    row = {"prompts": len(prompts), "correct, one by one": correct(singles)}
    for name, settings in (("defaults", {}), ("16 prefilled together", {"prefill_batch_size": 16})):
        seconds, batch = best_time(lambda: mlx_lm.batch_generate(model, tokenizer, prompts, max_tokens=MAX_TOKENS, **settings).texts, repeats)
        row[f"correct, batch ({name})"] = correct(batch)
        row[f"same answers as one by one ({name})"] = sum(a == b for a, b in zip(singles, batch))
        row[f"batch / one by one, tokens/s ({name})"] = (tokens(batch) / seconds) / (tokens(singles) / one)
    # the server's case: prompts arriving apart, each joining the batch a step after the one before
    stop = [[t] for t in tokenizer.eos_token_ids]
    seconds, staggered = best_time(lambda: _texts(tokenizer, _joining_one_per_step(model, prompts, stop, MAX_TOKENS)), repeats)
    row["correct, joining one per step"] = correct(staggered)
    row["batch / one by one, tokens/s (joining one per step)"] = (tokens(staggered) / seconds) / (tokens(singles) / one)
    row["rows per denoising call (joining one per step)"] = _mean(_rows_per_denoising_call(
        lambda: _joining_one_per_step(model, prompts, stop, MAX_TOKENS)))
    row["rows per denoising call (defaults)"] = _mean(_rows_per_denoising_call(
        lambda: mlx_lm.batch_generate(model, tokenizer, prompts, max_tokens=MAX_TOKENS)))
    row["one by one tokens/s"] = tokens(singles) / one
    return row


def _mean(values: list) -> float:
    return sum(values) / len(values)


def several_canvases(repeats: int) -> dict:
    spec = MODELS["tiny"]
    text = {**spec["text"], "eos_token_id": []}  # random weights: generate every canvas
    model = Model(ModelArgs.from_dict({"model_type": "diffusion_gemma", "canvas_length": spec["canvas_length"], "text_config": text}))
    model.generation_config = GenerationConfig({"max_denoising_steps": 16})
    mx.eval(model.parameters())
    max_tokens = 3 * model.args.canvas_length
    prompts = np.random.default_rng(0).integers(3, model.args.vocab_size, (8, 64)).tolist()

    def one_by_one():
        return [[t for t, _ in generate_step(mx.array(p), model, max_tokens=max_tokens)] for p in prompts]

    one, singles = best_time(one_by_one, repeats)
    joined_s, joined = best_time(lambda: _joining_one_per_step(model, prompts, [], max_tokens), repeats)
    assert all(len(t) == max_tokens for t in singles + joined)
    return {
        "prompts": len(prompts),
        "tokens each": max_tokens,
        "one by one s": one,
        "joining one per step s": joined_s,
        "joining / one by one (tokens/s)": one / joined_s,
        "rows per denoising call (joining one per step)": _mean(_rows_per_denoising_call(
            lambda: _joining_one_per_step(model, prompts, [], max_tokens))),
    }


def _texts(tokenizer, tokens: list) -> list:
    return [tokenizer.decode(t) for t in tokens]


def _joining_one_per_step(model, prompts: list, stop_tokens: list, max_tokens: int) -> list:
    """Each prompt's generated tokens, the prompts joining mlx-lm's
    BatchGenerator one after each of its steps."""
    generator = BatchGenerator(model, stop_tokens=stop_tokens, max_tokens=max_tokens)
    waiting, uids, tokens = list(prompts), [], {}
    while True:
        if waiting:
            uids += generator.insert([waiting.pop(0)])
        responses = generator.next_generated()
        for r in responses:
            if r.finish_reason != "stop":
                tokens.setdefault(r.uid, []).append(r.token)
        if not responses and not waiting:
            return [tokens.get(uid, []) for uid in uids]


def _rows_per_denoising_call(run) -> list:
    """How many rows each of the model's canvas denoisings took, in one run."""
    rows, denoise = [], Model._denoise

    def counting(self, cache):
        rows.append(cache[0].offset.size if isinstance(cache[0].offset, mx.array) else 1)
        return denoise(self, cache)

    Model._denoise = counting
    try:
        run()
    finally:
        Model._denoise = denoise
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ask(url: str, digits: str) -> str:
    body = {"messages": [{"role": "user", "content": digits}], "max_tokens": MAX_TOKENS}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        return json.loads(reply.read())["choices"][0]["message"]["content"]


def server(repeats: int) -> dict:
    cases = problems(16, seed=3)
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(DEMO), "--host", "127.0.0.1",
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        digits = [d for d, _ in cases]

        def one_at_a_time():
            return [_ask(url, d) for d in digits]

        def all_at_once():
            with concurrent.futures.ThreadPoolExecutor(len(digits)) as pool:
                return list(pool.map(lambda d: _ask(url, d), digits))

        sequential, alone = best_time(one_at_a_time, repeats)
        concurrent_s, together = best_time(all_at_once, repeats)
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {
        "requests": len(cases),
        "correct, one at a time": sum(a == answer for a, (_, answer) in zip(alone, cases)),
        "correct, all at once": sum(a == answer for a, (_, answer) in zip(together, cases)),
        "all at once = one at a time": sum(a == b for a, b in zip(alone, together)),
        "one at a time s": sequential,
        "all at once s": concurrent_s,
        "one at a time / all at once (wall time)": sequential / concurrent_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name, run in (
        ("mlx_lm.batch_generate, demo, 16 prompts", batch_generate),
        ("several canvases, tiny-body, 8 prompts", several_canvases),
        ("mlx_lm.server, demo, 16 requests", server),
    ):
        print(f"{name}:")
        for k, v in run(args.repeats).items():
            print(f"  {k:48s} {v:10.3f}" if isinstance(v, float) else f"  {k:48s} {v:10d}")


if __name__ == "__main__":
    main()
