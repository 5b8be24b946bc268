"""Block-diffusion training on (prompt, response) pairs, as DiffusionGemma was
trained: full training of small models from a config, or LoRA fine-tuning of a
loaded (possibly quantized) checkpoint with mlx-lm's LoRA layers.

    python -m mlx_diffusiongemma.train --model DIR --data DIR --out DIR [--lora]

Each choice and its reason:
- Blocks: the response (plus eos, then pads to the canvas length) is cut into
  canvases; one block per example per step. The causal encoder reads the prompt
  and the clean earlier blocks, which is what generation commits to the cache
  before denoising that block.
- Noise: uniform-state, the kind the sampler undoes: a level t ~ U(0, 1) per
  example, each block token replaced by a uniform random id with probability t
  (t near 0 teaches the last, almost clean steps; near 1 the first, random ones).
- Loss: cross-entropy of the bidirectional decoder's logits against the clean
  block over every canvas position, pads after eos included: generation reads
  those positions too, and confident pads let the sampler stop early.
- Self-conditioning: the reference feeds each step the previous step's
  temperature-scaled logits, and none at the first step. So with probability
  `self_conditioning` a first pass runs without them (no gradient) and the
  trained pass gets its logits divided by a temperature from the sampler's
  range [0.4, 0.8]; otherwise the trained pass has none.
- Optional autoregressive loss (`ar_weight`): next-token cross-entropy of the
  encoder through the shared head, which keeps the encoder a language model.
- Batches left-pad their contexts in mlx-lm's batch caches, as generation
  encodes a batch of prompts: the decoder then reads a sliding layer's last
  window - 1 context tokens, as it does in generation.
"""

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load_tokenizer

from .arguments import ArgumentParser
from .cache_views import batch_caches
from .config import ModelArgs
from .load import copy_companions, load, load_config, load_model, resolve, write_model
from .model import Model
from .staging import claimed, staged


@dataclass
class TrainingArgs:
    iters: int = 1000
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    self_conditioning: float = 0.5  # probability of a self-conditioned step
    ar_weight: float = 0.0
    eval_every: int = 200
    eval_batches: int = 4
    save_every: int = 500
    seed: int = 0
    lora_rank: int = 0  # 0: full training; else LoRA of this rank on every linear layer
    lora_scale: float = 20.0
    noise_min: float = 0.0  # each example's noise level t ~ U(noise_min, noise_max)
    noise_max: float = 1.0

    @property
    def noise_levels(self) -> tuple:
        return (self.noise_min, self.noise_max)


def make_blocks(prompt: list, response: list, canvas_length: int, eos: int, pad: int) -> list:
    """(context, block) pairs of one example: the response and eos, padded to whole canvases."""
    target = response + [eos]
    target += [pad] * (-len(target) % canvas_length)
    return [
        (prompt + target[:start], target[start : start + canvas_length])
        for start in range(0, len(target), canvas_length)
    ]


class Batches:
    """Random batches of (context, block) pairs. Contexts are left-padded to
    the batch's longest in mlx-lm's batch caches, the padding masked, as a
    batch of prompts is encoded in generation; examples of similar context
    length are batched together (as mlx-lm's trainer batches by length), so
    little is padding."""

    def __init__(self, blocks: list, batch_size: int, seed: int):
        if not blocks:
            raise ValueError("no training examples")
        self.rng = random.Random(seed)
        shuffled = self.rng.sample(blocks, len(blocks))  # equal lengths in random order
        self.blocks = sorted(shuffled, key=lambda pair: len(pair[0]))
        self.batch_size = min(batch_size, len(self.blocks))

    def __next__(self) -> "Batch":
        start = self.rng.randrange(len(self.blocks) - self.batch_size + 1)
        return Batch.of(self.blocks[start : start + self.batch_size])


class Batch(NamedTuple):
    context: mx.array  # [B, L], left-padded
    padding: list  # each row's padding tokens
    block: mx.array  # [B, C]

    @classmethod
    def of(cls, pairs: list) -> "Batch":
        length = max(len(c) for c, _ in pairs)
        padding = [length - len(c) for c, _ in pairs]
        context = mx.array([[0] * pad + list(c) for pad, (c, _) in zip(padding, pairs)])
        return cls(context, padding, mx.array([b for _, b in pairs]))

    @property
    def tokens(self) -> int:
        return self.context.size - sum(self.padding) + self.block.size


def _noise(block: mx.array, vocab_size: int, levels: tuple = (0.0, 1.0)) -> mx.array:
    t = mx.random.uniform(*levels, shape=(block.shape[0], 1))
    replaced = mx.random.uniform(shape=block.shape) < t
    return mx.where(replaced, mx.random.randint(0, vocab_size, block.shape), block)


def encoded(model: Model, batch: Batch) -> tuple:
    """The caches of the batch's contexts, as generation's batch prefill
    builds them (a sliding layer's decoder then reads its last window - 1
    tokens, as in generation), and the encoder's last hidden states."""
    cache = batch_caches(model.make_cache()[: len(model.layers)], batch.padding)
    return cache, model.encode_chunk(batch.context, cache)


def loss_fn(model: Model, batch: Batch, noisy, self_conditioning, ar_weight: float):
    cache, hidden = encoded(model, batch)
    logits = model.decode(noisy, cache, self_conditioning)
    loss = nn.losses.cross_entropy(logits, batch.block, reduction="mean")
    if ar_weight:
        # next-token loss of the encoder where both tokens are the context's own
        L = batch.context.shape[1]
        real = (mx.arange(L - 1)[None] >= mx.array(batch.padding)[:, None]).astype(mx.float32)
        ar = nn.losses.cross_entropy(model.head(hidden[:, :-1]), batch.context[:, 1:], reduction="none")
        loss = loss + ar_weight * (ar * real).sum() / mx.maximum(real.sum(), 1)
    return loss


def training_step(model, batch: Batch, args: TrainingArgs):
    """Noise a batch and take the loss (and its gradient) of one denoising step."""
    noisy = _noise(batch.block, model.args.vocab_size, args.noise_levels)
    self_conditioning = None
    if random.random() < args.self_conditioning:
        cache, _ = encoded(model, batch)
        temperature = random.uniform(0.4, 0.8)
        self_conditioning = mx.stop_gradient(model.decode(noisy, cache)) / temperature
    step = nn.value_and_grad(model, loss_fn)
    return step(model, batch, noisy, self_conditioning, args.ar_weight)


def evaluate(model, batches: Batches, args: TrainingArgs) -> float:
    return evaluate_batches(model, [next(batches) for _ in range(args.eval_batches)], args)


def evaluate_batches(model, batches: list, args: TrainingArgs) -> float:
    """The mean loss of these batches, each noised once, without self-conditioning."""
    losses = []
    for batch in batches:
        noisy = _noise(batch.block, model.args.vocab_size, args.noise_levels)
        losses.append(loss_fn(model, batch, noisy, None, args.ar_weight).item())
    return sum(losses) / len(losses)


def _progress(step: int, total: int, loss: float, tokens_per_second: float) -> None:
    filled = int(30 * step / total)
    bar = "#" * filled + "." * (30 - filled)
    print(f"\r[{bar}] {step}/{total} loss {loss:.4f} {tokens_per_second:,.0f} tok/s", end="", flush=True)


def save_checkpoint(model: Model, out: Path, config: dict, source: Optional[Path], args: TrainingArgs,
                    optimizer, step: int) -> None:
    """Our checkpoint layout (loadable by `load`), plus what resuming needs: the
    optimizer state and step. It replaces the previous checkpoint only once
    complete (`staging.staged`), so a failed save keeps that one."""
    with staged(out) as staging:
        if args.lora_rank:
            adapters = dict(tree_flatten(model.trainable_parameters()))
            mx.save_safetensors(str(staging / "adapters.safetensors"), adapters)
            (staging / "adapter_config.json").write_text(json.dumps(
                {"fine_tune_type": "lora", "base_model": str(source), "num_layers": len(model.layers),
                 "lora_parameters": {"rank": args.lora_rank, "scale": args.lora_scale, "dropout": 0.0}}, indent=2))
        else:
            write_model(model, staging, config)
            if source is not None:
                copy_companions(source, staging)
        mx.save_safetensors(str(staging / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (staging / "training_state.json").write_text(json.dumps({"step": step, "args": asdict(args)}, indent=2))


def train(model: Model, config: dict, train_blocks: list, valid_blocks: list, out: Path, args: TrainingArgs,
          source: Optional[Path] = None, resume: bool = False, log=print) -> list:
    """Train in place; returns the (step, training loss) history."""
    mx.random.seed(args.seed)
    random.seed(args.seed)
    if model.has_vision:
        # training reads text only: the tower is neither updated (weight decay
        # would move it) nor read into memory
        model.model.encoder.vision_tower.freeze()
        model.model.encoder.embed_vision.freeze()
    if args.lora_rank:
        model.freeze()
        linear_to_lora_layers(model, len(model.layers),
                              {"rank": args.lora_rank, "scale": args.lora_scale, "dropout": 0.0})
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-7, args.learning_rate, max(args.warmup, 1)),
         optim.cosine_decay(args.learning_rate, max(args.iters - args.warmup, 1), args.learning_rate / 10)],
        [max(args.warmup, 1)],
    )
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=args.weight_decay)
    start = 0
    if resume and (out / "training_state.json").is_file():
        start = json.loads((out / "training_state.json").read_text())["step"]
        if args.lora_rank:
            model.load_weights(str(out / "adapters.safetensors"), strict=False)
        else:
            model.update(load_model(out).parameters())
        optimizer.state = tree_unflatten(list(mx.load(str(out / "optimizer.safetensors")).items()))
        log(f"resuming at step {start}")
    model.train()
    batches, valid = Batches(train_blocks, args.batch_size, args.seed + start), Batches(valid_blocks, args.batch_size, 1)
    history, tokens, tic = [], 0, time.perf_counter()
    for step in range(start + 1, args.iters + 1):
        batch = next(batches)
        loss, grads = training_step(model, batch, args)
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss)
        history.append((step, loss.item()))
        tokens += batch.tokens
        _progress(step, args.iters, loss.item(), tokens / (time.perf_counter() - tic))
        if step % args.eval_every == 0 or step == args.iters:
            model.eval()
            log(f"\nstep {step}: validation loss {evaluate(model, valid, args):.4f}")
            model.train()
        if step % args.save_every == 0 or step == args.iters:
            save_checkpoint(model, out, config, source, args, optimizer, step)
    model.eval()
    return history


def read_pairs(path: Path) -> list:
    """(prompt, response) string pairs from a JSONL file of {"prompt", "response"}."""
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
            raise ValueError(f"{path}:{n}: each line needs string fields 'prompt' and 'response'")
        pairs.append((record["prompt"], record["response"]))
    return pairs


def encode_pairs(tokenizer, pairs: list, args: ModelArgs, eos: int) -> list:
    blocks = []
    for prompt, response in pairs:
        blocks += make_blocks(tokenizer.encode(prompt), tokenizer.encode(response, add_special_tokens=False),
                              args.canvas_length, eos, args.pad_token_id)
    return blocks


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m mlx_diffusiongemma.train", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True,
                        help="a checkpoint to fine-tune (LoRA) or continue, or a directory with config.json and a "
                             "tokenizer to train from scratch (--from-scratch)")
    parser.add_argument("--data", required=True, type=Path, help="directory with train.jsonl and valid.jsonl")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--from-scratch", action="store_true", help="random initial weights from config.json")
    parser.add_argument("--resume", action="store_true")
    for name, value in asdict(TrainingArgs()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    training = TrainingArgs(**{k: getattr(args, k) for k in asdict(TrainingArgs())})
    try:
        source = resolve(args.model)  # "demo", a directory or a hub repo, as everywhere
    except (FileNotFoundError, NotADirectoryError) as e:
        parser.error(str(e))
    if args.from_scratch:
        config = load_config(source)
        mx.random.seed(training.seed)
        model = Model(ModelArgs.from_dict(config))
        tokenizer = load_tokenizer(source)
    else:
        model, tokenizer = load(source)
        config = load_config(source)
    eos = sorted(tokenizer.eos_token_ids)[0]
    train_blocks = encode_pairs(tokenizer, read_pairs(args.data / "train.jsonl"), model.args, eos)
    valid_blocks = encode_pairs(tokenizer, read_pairs(args.data / "valid.jsonl"), model.args, eos)
    with claimed(args.out):  # no second run writes the same checkpoint meanwhile
        train(model, config, train_blocks, valid_blocks, args.out, training, source=source, resume=args.resume)
    print(f"\nsaved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
