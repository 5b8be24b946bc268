"""Proof that fine-tuning learns: the embedded demo (which sorts digits
ascending) taught to sort them descending from chat-format data, with
mlx_diffusiongemma.lora, on a 4-bit base (QLoRA) and, for comparison, the
float one; exact match on held-out problems before and after, the
command's wall time, and the adapter served by mlx_lm.server.

    LD_PRELOAD=<OpenBLAS> python benchmarks/lora_demo.py [--iters 1500] [--bases 4bit float]

Writes its data, the 4-bit base and the adapters under --work (default a
fresh temporary directory) and prints a table for RESULTS.md.
"""

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def problems(n: int, seed: int, exclude=frozenset()) -> list:
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8)))
        if digits not in seen:
            seen.add(digits)
            out.append(digits)
    return out


def chat(digits: str) -> dict:
    return {"messages": [{"role": "user", "content": digits},
                         {"role": "assistant", "content": "".join(sorted(digits, reverse=True))}]}


def write_data(directory: Path, train: int) -> list:
    directory.mkdir(parents=True)
    held_out = problems(100, seed=3)
    train_set = problems(train, seed=1, exclude=set(held_out))
    valid_set = problems(100, seed=2, exclude=set(held_out) | set(train_set))
    for name, items in (("train", train_set), ("valid", valid_set), ("test", held_out)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(chat(d)) + "\n" for d in items))
    return held_out


def exact_match(model_path, adapter_path, held_out: list) -> int:
    from mlx_diffusiongemma import diffusion_generate, load

    model, tokenizer = load(model_path, adapter_path=adapter_path)
    right = 0
    for i, digits in enumerate(held_out):
        text = diffusion_generate(model, tokenizer, digits, max_tokens=12, seed=i).text
        right += text == "".join(sorted(digits, reverse=True))
    return right


def quantized_demo(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "mlx_diffusiongemma.convert", "--hf-path", "demo", "--mlx-path", str(path),
                    "-q", "--q-bits", "4", "--q-group-size", "32"], check=True, cwd=ROOT, capture_output=True)
    return path


def fine_tune(base, data: Path, adapters: Path, args) -> float:
    command = [sys.executable, "-m", "mlx_diffusiongemma.lora", "--model", str(base), "--train", "--test",
               "--data", str(data), "--num-layers", "-1", "--batch-size", str(args.batch_size),
               "--iters", str(args.iters), "--learning-rate", str(args.learning_rate),
               "--steps-per-report", "100", "--steps-per-eval", str(args.iters), "--save-every", str(args.iters),
               "--adapter-path", str(adapters), "-c", str(adapters.parent / f"{adapters.name}.yaml")]
    (adapters.parent / f"{adapters.name}.yaml").write_text(
        f"lora_parameters:\n  rank: {args.rank}\n  scale: 20.0\n  dropout: 0.0\n")
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"fine-tuning failed:\n{result.stderr[-3000:]}")
    for line in result.stdout.splitlines():
        if "Val loss" in line or "Test loss" in line:
            print("  ", line)
    return wall


def served(base, adapters: Path, held_out: list) -> int:
    """Answers of mlx_lm.server (with the adapter) that are right."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(base), "--adapter-path",
                               str(adapters), "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        right = 0
        for digits in held_out:
            body = json.dumps({"messages": [{"role": "user", "content": digits}], "max_tokens": 12, "seed": 0}).encode()
            request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            answer = json.loads(urllib.request.urlopen(request, timeout=120).read())["choices"][0]["message"]["content"]
            right += answer.strip() == "".join(sorted(digits, reverse=True))
        return right
    finally:
        server.terminate()
        server.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-examples", type=int, default=3000)
    parser.add_argument("--bases", nargs="+", choices=["4bit", "float"], default=["4bit", "float"])
    parser.add_argument("--served", type=int, default=20, help="held-out problems asked through mlx_lm.server")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lora_demo_"))
    held_out = write_data(work / "data", args.train_examples)
    rows = []
    for name in args.bases:
        base = quantized_demo(work / "demo-4bit") if name == "4bit" else "demo"
        before = exact_match(base, None, held_out)
        adapters = work / f"adapters-{name}"
        wall = fine_tune(base, work / "data", adapters, args)
        after = exact_match(base, adapters, held_out)
        served_right = served(ROOT / "mlx_diffusiongemma" / "demo_model" if base == "demo" else base, adapters,
                              held_out[: args.served]) if args.served else None
        rows.append((name, before, after, wall, served_right))
        print(f"{name}: held-out exact {before}/100 before, {after}/100 after; fine-tuning {wall:.0f} s; "
              f"mlx_lm.server {served_right}/{args.served}", flush=True)
    print("\n| base | held-out exact before | after | fine-tuning wall time | mlx_lm.server --adapter-path |")
    print("|---|---|---|---|---|")
    for name, before, after, wall, served_right in rows:
        print(f"| {name} | {before}/100 | {after}/100 | {wall:.0f} s | {served_right}/{args.served} |")
    print(f"\n{args.iters} iters, batch {args.batch_size}, rank {args.rank}, lr {args.learning_rate}, "
          f"{args.train_examples} training examples; work in {work}; device {os.uname().machine}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
