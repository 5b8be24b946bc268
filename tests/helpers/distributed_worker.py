"""One rank of tests/test_distributed.py, started by `mlx.launch -n 2 --backend ring`.

    python distributed_worker.py OUT_DIR FLOAT_CHECKPOINT QUANTIZED_CHECKPOINT DEMO_CHECKPOINT

Every rank loads each checkpoint whole (what one process computes) and sharded
across the group, through our loader and through mlx-lm's `sharded_load`, runs
the same inputs through both and writes what it saw to OUT_DIR/<rank>.json; the
test compares the ranks' files with each other and with the whole model.
"""

import hashlib
import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import sharded_load

from mlx_diffusiongemma import diffusion_generate, load, load_model

DEMO_PROMPTS = ["81502739", "970"]


def _digest(a) -> str:
    return hashlib.sha256(np.array(a).tobytes()).hexdigest()


def stages(model, teacher=None) -> dict:
    """Float32 logits of each stage: the encoder's (its last hidden states
    through the head), a decode after the prefill, a self-conditioned decode
    (fed the whole model's logits: teacher-forced, as self-conditioning
    amplifies rounding), and a decode after committing the canvas."""
    rng = np.random.default_rng(0)
    vocab = model.args.vocab_size
    prompt, canvas, following = (rng.integers(0, vocab, n).tolist() for n in (21, 12, 12))
    cache = model.make_cache()
    out = {"encode": model.head(model.encode_chunk(mx.array(prompt[:9])[None], cache))}
    model.encode(prompt[9:], cache, chunk_size=5)  # chunks, and a final chunk of two tokens
    out["decode"] = model.decode(canvas, cache)
    conditioning = out["decode"] if teacher is None else mx.array(teacher["decode"])
    out["self-conditioned"] = model.decode(canvas, cache, self_conditioning=conditioning)
    model.encode(canvas, cache)
    out["after commit"] = model.decode(following, cache)
    return {k: np.array(v) for k, v in out.items()}


def sizes(model) -> dict:
    """Elements per parameter (quantized weights: packed words)."""
    return {k: v.size for k, v in tree_flatten(model.parameters())}


def generated(model, prompt_ids, **options) -> list:
    """Two whole canvases from one seed (no eos: both are denoised and the first committed)."""
    return diffusion_generate(model, None, prompt_ids, seed=5, max_tokens=24, eos_token_id=[], **options).tokens


def random_checkpoint(path: Path, group) -> dict:
    whole = load_model(path)
    expected = stages(whole)
    ours = load_model(path, tensor_group=group)
    theirs, _ = sharded_load(str(path), tensor_group=group)
    report = {"sizes": {"whole": sizes(whole), "sharded": sizes(ours)}}
    for name, model in (("ours", ours), ("mlx_lm", theirs)):
        got = stages(model, expected)
        report[name] = {
            stage: {"max_diff": float(np.abs(got[stage] - expected[stage]).max()), "digest": _digest(got[stage])}
            for stage in expected
        }
    # a random model's steps barely settle: a few per canvas keep the run short
    report["tokens"] = generated(ours, list(range(3, 20)), max_denoising_steps=3)
    # the text model's module kinds (the vision tower is never quantized)
    report["kinds"] = sorted({type(m).__name__ for path, m in ours.named_modules() if ".vision_tower" not in path
                              and ".embed_vision" not in path})
    return report


def demo(path: Path, group) -> dict:
    """The trained demo model: its answers are confident, so rounding
    differences never change a draw and generation must equal one process's."""
    whole, tokenizer = load(path)
    ours, _ = load(path, tensor_group=group)
    report = {"ours": [], "whole": [], "mlx_lm": [], "mlx_lm_whole": []}
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) for p in DEMO_PROMPTS]
    for ids in prompts:
        # the canvas after the answer never settles: 8 steps keep it short
        report["ours"].append(generated(ours, ids, max_denoising_steps=8))
        report["whole"].append(generated(whole, ids, max_denoising_steps=8))
    # mlx-lm's own loop on its model class: draws from mlx's global random state
    for key, (model, _) in (("mlx_lm", sharded_load(str(path), tensor_group=group)), ("mlx_lm_whole", mlx_lm.load(str(path)))):
        for ids in prompts:
            mx.random.seed(7)
            report[key].append([r.token for r in mlx_lm.stream_generate(model, tokenizer, ids, max_tokens=20)])
    return report


def main():
    out, float_path, quantized_path, demo_path = map(Path, sys.argv[1:])
    group = mx.distributed.init()
    if group.size() != 2:
        raise SystemExit(f"run under mlx.launch -n 2 (got a group of {group.size()})")
    report = {
        "rank": group.rank(),
        "float": random_checkpoint(float_path, group),
        "quantized": random_checkpoint(quantized_path, group),
        "demo": demo(demo_path, group),
    }
    (out / f"{group.rank()}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
