"""Fine-tuning the way mlx_lm.lora does it, with the block-diffusion loss.

    mlx_diffusiongemma.lora --model PATH --train --data DIR [--fine-tune-type lora|dora|full] ...

mlx_lm.lora's command line and YAML keys (its own parser), its data formats
and loaders (chat `{"messages": [...]}` with optional `tools`, completions
`{"prompt", "completion"}`, text `{"text"}`; a local directory of
train/valid/test.jsonl or a Hugging Face dataset), its LoRA / DoRA layers
(on quantized bases too: QLoRA) and its adapter files, which
`mlx_lm.generate --adapter-path`, `mlx_lm.server --adapter-path`,
`mlx_lm.fuse` and our `load(..., adapter_path=)` read.

What differs is the objective (train.py): a diffusion model has no
next-token logits. Each example's answer (the assistant's last turn, the
completion; for text, everything after the first token) is cut into
canvases; the prompt and the clean earlier canvases go through the causal
encoder, the noised canvas through the decoder, whose cross-entropy against
the clean canvas is the loss. The prompt side is never predicted, so
`--mask-prompt` is always in effect for chat and completions data.
"""

import json
import os
import random
import sys
import time
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import yaml
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.lora import CONFIG_DEFAULTS, build_parser, yaml_loader
from mlx_lm.tuner.datasets import create_dataset, load_dataset
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers
from mlx_lm.utils import save_config

from .arguments import ArgumentParser
from .load import load
from .model import VISION_PREFIXES
from .staging import claimed
from .train import Batch, TrainingArgs, evaluate_batches, make_blocks, training_step

PROG = "mlx_diffusiongemma.lora"
# Our diffusion options (train.py's), beside mlx_lm.lora's keys
DIFFUSION_DEFAULTS = {"self_conditioning": 0.5, "ar_weight": 0.0, "noise_min": 0.0, "noise_max": 1.0}
# mlx_lm.lora's defaults, but a model and data of the user's own choosing
DEFAULTS = {**CONFIG_DEFAULTS, **DIFFUSION_DEFAULTS, "model": None, "data": None}
_FORMATS = {"messages": "chat", "prompt": "completions", "text": "text"}
_OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD, "adafactor": optim.Adafactor}


def configure_parser() -> ArgumentParser:
    """mlx_lm.lora's parser (its flags, help and spellings), one-line usage
    errors, and the diffusion options."""
    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], parents=[build_parser()],
                            add_help=False, conflict_handler="resolve")
    parser.add_argument("-h", "--help", action="help", help="show this help message and exit")
    group = parser.add_argument_group("diffusion")
    group.add_argument("--self-conditioning", type=float, default=None,
                       help="probability of a self-conditioned step (default 0.5)")
    group.add_argument("--ar-weight", type=float, default=None,
                       help="weight of the encoder's next-token loss (default 0)")
    group.add_argument("--noise-min", type=float, default=None, help="lowest noise level of a canvas (default 0)")
    group.add_argument("--noise-max", type=float, default=None, help="highest noise level of a canvas (default 1)")
    return parser


def resolve_args(argv=None) -> types.SimpleNamespace:
    """Command line over the YAML file (-c) over the defaults, as mlx_lm.lora merges them."""
    parser = configure_parser()
    args = vars(parser.parse_args(argv))
    if args.get("config"):
        try:
            with open(args["config"]) as file:
                config = yaml.load(file, yaml_loader)
        except (OSError, yaml.YAMLError) as e:
            parser.error(f"cannot read the config file {args['config']}: {' '.join(str(e).split())}")
        if not isinstance(config, dict):
            parser.error(f"the config file {args['config']} must hold a mapping of options")
        for key, value in config.items():
            if args.get(key) is None:
                args[key] = value
    for key, value in DEFAULTS.items():
        if args.get(key) is None:
            args[key] = value
    args = types.SimpleNamespace(**args)
    _check_args(parser, args)
    return args


def _check_args(parser, args) -> None:
    if not args.model:
        parser.error("--model is required (a local directory, a Hugging Face repo, or demo)")
    if not (args.train or args.test):
        parser.error("give --train, --test or both")
    if args.data is None:
        parser.error("--data is required: a directory with train.jsonl, valid.jsonl (and test.jsonl), or a dataset name")
    if args.fine_tune_type not in ("lora", "dora", "full"):
        parser.error(f"--fine-tune-type must be lora, dora or full, got {args.fine_tune_type!r}")
    if args.report_to:
        parser.error("--report-to is not supported here")
    if str(args.optimizer).lower() not in _OPTIMIZERS:
        parser.error(f"--optimizer must be one of {', '.join(_OPTIMIZERS)}, got {args.optimizer!r}")
    for name in ("batch_size", "iters", "steps_per_report", "steps_per_eval", "save_every", "grad_accumulation_steps",
                 "max_seq_length"):
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            parser.error(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if not 0 <= args.noise_min < args.noise_max <= 1:
        parser.error(f"noise levels must satisfy 0 <= noise-min < noise-max <= 1, got {args.noise_min}, {args.noise_max}")
    if not 0 <= args.self_conditioning <= 1:
        parser.error(f"--self-conditioning must be a probability, got {args.self_conditioning}")
    lora = args.lora_parameters
    if not isinstance(lora, dict) or not {"rank", "scale"} <= set(lora):
        parser.error(f"lora_parameters must hold rank and scale (and optionally dropout, keys), got {lora!r}")
    args.lora_parameters = {"dropout": 0.0, **lora}


# --- data: mlx-lm's formats and loaders, checked line by line ---------------------


def read_jsonl(file: Path) -> list:
    """The records of a JSONL file, each an object; a bad line is one error
    naming the file and the line. Blank lines are skipped."""
    records = []
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: cannot read it: {' '.join(str(e).split())}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{n}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{file}:{n}: each line must be a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def check_records(records: list, file: Path) -> str:
    """The records' format (chat, completions or text), the same on every
    line, each field of the right type."""
    kinds = {_record_format(r, file, n) for n, r in enumerate(records, start=1)}
    if len(kinds) > 1:
        raise ValueError(f"{file}: mixes formats ({', '.join(sorted(kinds))}); use one per file")
    return kinds.pop() if kinds else "text"


def _record_format(record: dict, file: Path, n: int) -> str:
    where = f"{file}:{n}"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise ValueError(f"{where}: message {i} must be an object with 'role' and 'content'")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's (the answer to learn)")
        if "tools" in record and not isinstance(record["tools"], list):
            raise ValueError(f"{where}: 'tools' must be a list")
        return "chat"
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{where}: completions data needs string fields 'prompt' and 'completion'")
        return "completions"
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"]:
            raise ValueError(f"{where}: 'text' must be a non-empty string")
        return "text"
    raise ValueError(f"{where}: expected 'messages' (chat), 'prompt' and 'completion', or 'text'")


def load_datasets(args, tokenizer) -> tuple:
    """(train, valid, test) mlx-lm datasets; a local directory's files
    checked first. Chat and completions data always split off the prompt
    (mlx-lm's mask_prompt): it is context, never predicted."""
    path = Path(args.data)
    options = types.SimpleNamespace(**{**vars(args), "mask_prompt": True})
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"--data {path} must be a directory holding train.jsonl, valid.jsonl and test.jsonl")
        splits = []
        for name in ("train", "valid", "test"):
            file = path / f"{name}.jsonl"
            records = read_jsonl(file) if file.is_file() else []
            if not records:
                splits.append([])
            else:  # text data has no prompt to mask
                text = check_records(records, file) == "text"
                splits.append(create_dataset(records, tokenizer, _without_masking(args) if text else options))
        train, valid, test = splits
        if args.train and not len(train):
            raise ValueError(f"{path / 'train.jsonl'}: no training examples")
        if args.test and not len(test):
            raise ValueError(f"{path / 'test.jsonl'}: no test examples")
        return train, valid, test
    try:
        return load_dataset(options, tokenizer)
    except ValueError as e:
        if "not supported for text" not in str(e):
            raise
        return load_dataset(_without_masking(args), tokenizer)  # text data: nothing to mask


def _without_masking(args) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{**vars(args), "mask_prompt": False})


def to_blocks(dataset, tokenizer, model_args, max_seq_length: int, what: str) -> list:
    """(context, canvas) training pairs of every example: the prompt (for
    text, the first token) as context, the answer cut into canvases, each
    after the earlier ones. The answer ends at its first eos id (a chat
    template's end of turn), then eos and pads to whole canvases. Examples
    longer than `max_seq_length` lose the end of their answer."""
    eos_ids = set(tokenizer.eos_token_ids)
    eos = sorted(eos_ids)[0]
    blocks, cut = [], 0
    for i in range(len(dataset)):
        tokens, offset = dataset.process(dataset[i])
        tokens = list(tokens)
        offset = max(offset, 1)
        prompt, answer = tokens[:offset], tokens[offset:]
        end = next((j for j, t in enumerate(answer) if t in eos_ids), None)
        stop = eos if end is None else answer[end]
        answer = answer[:end]
        room = max_seq_length - len(prompt) - 1
        if room < 1:
            raise ValueError(f"{what} example {i}: its prompt has {len(prompt)} tokens, --max-seq-length is {max_seq_length}")
        if len(answer) > room:
            answer, cut = answer[:room], cut + 1
        blocks += make_blocks(prompt, answer, model_args.canvas_length, stop, model_args.pad_token_id)
    if cut:
        print(f"[WARNING] {cut} {what} example(s) longer than --max-seq-length {max_seq_length} were cut", file=sys.stderr)
    return blocks


# --- the model, the run ------------------------------------------------------------


def prepare_model(model, args) -> None:
    """Freeze the model, then open what is trained: LoRA / DoRA layers (mlx-lm's,
    quantized bases included) on the last `num_layers` layers, or those layers
    whole (full)."""
    layers = len(model.layers)
    if args.num_layers > layers:
        raise ValueError(f"--num-layers {args.num_layers}, but the model has {layers} layers (-1 trains them all)")
    if args.fine_tune_type == "full" and any(hasattr(m, "bits") for _, m in model.layers[0].named_modules()):
        raise ValueError(
            "full fine-tuning needs an unquantized model (quantized weights have no gradient); "
            "fine-tune this one with --fine-tune-type lora or dora (QLoRA)"
        )
    model.freeze()
    if args.fine_tune_type == "full":
        for layer in model.layers[-max(args.num_layers, 0):] if args.num_layers != -1 else model.layers:
            layer.unfreeze()
        args.lora_parameters = None
    else:
        if args.fine_tune_type == "dora" and "keys" not in args.lora_parameters:
            # mlx-lm has no DoRA for the experts (SwitchLinear): the dense projections take it
            # (written into adapter_config.json, so mlx-lm's loader adapts the same ones)
            args.lora_parameters["keys"] = _dense_projections(model)
        linear_to_lora_layers(model, args.num_layers if args.num_layers != -1 else layers, args.lora_parameters,
                              use_dora=args.fine_tune_type == "dora")
    if args.num_layers == -1:
        args.num_layers = layers  # what mlx-lm's adapter loader reads back
    model.checkpointing = bool(args.grad_checkpoint)


def _dense_projections(model) -> list:
    """The paths, within a layer, of its Linear / QuantizedLinear modules."""
    return sorted({path for path, m in model.layers[0].named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))})


def _optimizer(args):
    name = args.optimizer.lower()
    rate = build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
    return _OPTIMIZERS[name](learning_rate=rate, **(args.optimizer_config or {}).get(name, {}))


def _save(path: Path, arrays: dict) -> None:
    """Written beside, then renamed over: a reader never sees half a file."""
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")  # mlx adds .safetensors to other names
    mx.save_safetensors(str(partial), arrays)
    os.replace(partial, path)


def save_adapters(model, adapter_path: Path, step: int, optimizer) -> None:
    """adapters.safetensors (and the step's copy, as mlx-lm names it), and
    what resuming needs beside them: the optimizer's state and the step."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    _save(adapter_path / "adapters.safetensors", weights)
    _save(adapter_path / f"{step:07d}_adapters.safetensors", weights)
    _save(adapter_path / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
    state = adapter_path / ".training_state.json.partial"
    state.write_text(json.dumps({"step": step}))
    os.replace(state, adapter_path / "training_state.json")


def _resume(model, optimizer, file: Path) -> int:
    """Load adapter weights (as mlx_lm.lora does); when the optimizer state
    and step saved beside them are there too, continue from that step."""
    if not file.is_file():
        raise ValueError(f"--resume-adapter-file {file} does not exist")
    model.load_weights(str(file), strict=False)
    state, step = file.parent / "optimizer.safetensors", file.parent / "training_state.json"
    if state.is_file() and step.is_file():
        optimizer.state = tree_unflatten(list(mx.load(str(state)).items()))
        return json.loads(step.read_text())["step"]
    return 0


def _seeded(seed: int, step: int) -> None:
    """Each step's draws from (seed, step) alone: a resumed run draws what
    the uninterrupted one would have."""
    mx.random.seed(seed * 1_000_003 + step)
    random.seed(seed * 1_000_003 + step)


def train_model(model, args, train_blocks: list, valid_blocks: list, log=print) -> list:
    """mlx_lm.lora's loop (reports, evaluations, saves) around the diffusion
    loss; returns the training losses by step."""
    adapter_path = Path(args.adapter_path)
    adapter_path.mkdir(parents=True, exist_ok=True)
    save_config({k: v for k, v in vars(args).items() if k != "config"}, adapter_path / "adapter_config.json")
    optimizer = _optimizer(args)
    start = _resume(model, optimizer, Path(args.resume_adapter_file)) if args.resume_adapter_file else 0
    training = TrainingArgs(batch_size=args.batch_size, self_conditioning=args.self_conditioning,
                            ar_weight=args.ar_weight, noise_min=args.noise_min, noise_max=args.noise_max)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for name, v in tree_flatten(model.parameters()) if not name.startswith(VISION_PREFIXES))
    log(f"Trainable parameters: {100 * trainable / total:.3f}% ({trainable / 1e6:.3f}M/{total / 1e6:.3f}M)")
    if start:
        log(f"Resuming at iteration {start}")
    losses, window, tokens, tic = {}, [], 0, time.perf_counter()
    model.train()
    for step in range(start + 1, args.iters + 1):
        if step == 1 or step % args.steps_per_eval == 0 or step == args.iters:
            _report_validation(model, args, valid_blocks, training, step, log)
        _seeded(args.seed, step)
        loss, tokens_step = _step(model, optimizer, args, training, train_blocks, step)
        losses[step] = loss
        window.append(loss)
        tokens += tokens_step
        if step % args.steps_per_report == 0 or step == args.iters:
            elapsed = time.perf_counter() - tic
            log(f"Iter {step}: Train loss {sum(window) / len(window):.3f}, "
                f"Learning Rate {float(optimizer.learning_rate):.3e}, It/sec {len(window) / elapsed:.3f}, "
                f"Tokens/sec {tokens / elapsed:.3f}, Peak mem {mx.get_peak_memory() / 1e9:.3f} GB")
            window, tokens, tic = [], 0, time.perf_counter()
        if step % args.save_every == 0 or step == args.iters:
            save_adapters(model, adapter_path, step, optimizer)
            log(f"Iter {step}: Saved adapter weights to {adapter_path / 'adapters.safetensors'}")
    model.eval()
    return losses


def _step(model, optimizer, args, training, blocks: list, step: int) -> tuple:
    """One optimizer update over grad_accumulation_steps batches of random
    examples (drawn from the seed and step); (loss, tokens)."""
    rng = random.Random(args.seed * 1_000_003 + step)
    total_loss, total_grads, tokens = 0.0, None, 0
    for _ in range(args.grad_accumulation_steps):
        batch = Batch.of(rng.sample(blocks, min(args.batch_size, len(blocks))))
        loss, grads = training_step(model, batch, training)
        total_grads = grads if total_grads is None else _add(total_grads, grads)
        mx.eval(loss, total_grads)
        total_loss += loss.item()
        tokens += batch.tokens
    if args.grad_accumulation_steps > 1:
        total_grads = _scale(total_grads, 1 / args.grad_accumulation_steps)
    optimizer.update(model, total_grads)
    mx.eval(model.trainable_parameters(), optimizer.state)
    if args.clear_cache_threshold and mx.get_cache_memory() > args.clear_cache_threshold:
        mx.clear_cache()
    return total_loss / args.grad_accumulation_steps, tokens


def _add(a, b):
    return tree_map(lambda x, y: x + y, a, b)


def _scale(a, factor: float):
    return tree_map(lambda x: x * factor, a)


def _report_validation(model, args, blocks: list, training, step: int, log) -> None:
    if not blocks:
        return
    tic = time.perf_counter()
    model.eval()
    loss = evaluate_blocks(model, blocks, args.batch_size, args.val_batches, training, seed=args.seed)
    model.train()
    log(f"Iter {step}: Val loss {loss:.3f}, Val took {time.perf_counter() - tic:.3f}s")


def evaluate_blocks(model, blocks: list, batch_size: int, num_batches: int, training, seed: int = 0) -> float:
    """The diffusion loss over the first `num_batches` batches (-1: all),
    in order, with noise drawn from `seed`: the same figure every time."""
    batches = [blocks[i : i + batch_size] for i in range(0, len(blocks), batch_size)]
    if num_batches != -1:
        batches = batches[:num_batches]
    mx.random.seed(seed)
    random.seed(seed)
    return evaluate_batches(model, [Batch.of(b) for b in batches], training)


def run(args, log=print) -> dict:
    """The command's work: returns {"train": losses by step, "test": test loss} (those run)."""
    np.random.seed(args.seed)
    model, tokenizer = load(args.model)
    train_set, valid_set, test_set = load_datasets(args, tokenizer)
    results = {}
    if args.train:
        with claimed(Path(args.adapter_path)):
            mx.random.seed(args.seed)  # the adapters' initial weights, as mlx_lm.lora seeds them
            prepare_model(model, args)
            train_blocks = to_blocks(train_set, tokenizer, model.args, args.max_seq_length, "train")
            valid_blocks = to_blocks(valid_set, tokenizer, model.args, args.max_seq_length, "valid") if len(valid_set) else []
            log(f"Training on {len(train_blocks)} canvases of {len(train_set)} examples")
            results["train"] = train_model(model, args, train_blocks, valid_blocks, log)
    elif args.adapter_path and (Path(args.adapter_path) / "adapter_config.json").is_file():
        from mlx_lm.tuner.utils import load_adapters

        load_adapters(model, args.adapter_path)
    if args.test:
        training = TrainingArgs(self_conditioning=0.0, ar_weight=args.ar_weight,
                                noise_min=args.noise_min, noise_max=args.noise_max)
        test_blocks = to_blocks(test_set, tokenizer, model.args, args.max_seq_length, "test")
        model.eval()
        results["test"] = evaluate_blocks(model, test_blocks, args.batch_size, args.test_batches, training, seed=args.seed)
        log(f"Test loss {results['test']:.3f} (block-diffusion cross-entropy per canvas token)")
    return results


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    args = resolve_args(argv)
    try:
        run(args)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
