"""The embedded demo: a small DiffusionGemma trained by this package to sort
digits, a task where parallel denoising shines (every output position depends
on the whole input, so the answer appears at once rather than left to right)
and correctness is checkable.

    python -m mlx_diffusiongemma.demo train   # rebuild the shipped model (under 30 min on 2 CPU cores)
    python -m mlx_diffusiongemma.generate --model demo --prompt 8150273

The prompt is 3 to 8 digits; the chat template renders it as
`<bos>digits=` and the answer is the digits sorted, then eos.
"""

import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .arguments import ArgumentParser

DEMO_DIR = Path(__file__).parent / "demo_model"
SPECIALS = ["<pad>", "<eos>", "<bos>"]
CHARACTERS = list("0123456789=")
# The last user message as `<bos>digits=`, and after it, when the conversation
# ends with the model's answer (chat-format training data), that answer and
# eos. A character the tokenizer does not know would become <pad> (its
# unknown token) without a word: the template refuses it, so every tool that
# renders the template (mlx-lm's server too) says so.
CHAT_TEMPLATE = (
    "{%- set answered = messages[-1]['role'] == 'assistant' and messages | length > 1 -%}"
    "{%- set text = (messages[-2] if answered else messages[-1])['content'] | trim -%}"
    "{%- set answer = messages[-1]['content'] | trim if answered else '' -%}"
    "{%- for c in (text ~ answer).replace('<pad>', '') if c not in '" + "".join(CHARACTERS) + "' -%}"
    "{%- if loop.first -%}{{ raise_exception('the demo model knows the characters "
    + "".join(CHARACTERS) + " only, not ' ~ c | tojson) }}{%- endif -%}"
    "{%- endfor -%}"
    "{{ bos_token }}{{ text }}="
    "{%- if answered -%}{{ answer }}{{ eos_token }}{%- endif -%}"
)
MIN_DIGITS, MAX_DIGITS = 3, 8

CONFIG = {
    "model_type": "diffusion_gemma",
    "canvas_length": 12,
    "text_config": {
        "vocab_size": len(SPECIALS) + len(CHARACTERS),
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "global_head_dim": 32, "num_global_key_value_heads": 2, "sliding_window": 64,
        "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32,
        "max_position_embeddings": 4096, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    },
}


def problem(rng: random.Random) -> tuple:
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS)))
    return digits, "".join(sorted(digits))


def problems(n: int, seed: int) -> list:
    """Held-out sets use other seeds than training (seed 0)."""
    rng = random.Random(seed)
    return [problem(rng) for _ in range(n)]


def write_tokenizer(path: Path) -> None:
    """Character-level, in the Hugging Face tokenizers format so `load` reads it unchanged."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    # <pad> reads as nothing, as transformers' decode(skip_special_tokens=True)
    # drops it: mlx-lm's detokenizers print every token they are given
    backend.decoder = decoders.Sequence([decoders.Replace("<pad>", ""), decoders.Fuse()])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    # <pad> doubles as the declared unknown token, so an unknown character is an error (chat.render_prompt)
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def write_setup(path: Path) -> None:
    """config.json, tokenizer and generation_config.json of an untrained demo model."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(CONFIG, indent=2))
    write_tokenizer(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1], "pad_token_id": 0}))


def prompt_ids(tokenizer, digits: str) -> list:
    return tokenizer.apply_chat_template([{"role": "user", "content": digits}], add_generation_prompt=True)


def score(model, tokenizer, cases: list, **options) -> tuple:
    """(exact-match rate, mean tokens_per_forward, pooled tokens per pass) with
    the default reference sampler (or `options`), one seeded generation per problem. The mean
    averages what each response reports; the pooled figure divides all tokens by
    all passes, so a few problems that never settle (48 passes) weigh heavily."""
    from .generate import diffusion_generate

    solved, per_problem, valid, passes = 0, [], 0.0, 0
    for seed, (digits, answer) in enumerate(cases):
        r = diffusion_generate(model, tokenizer, digits, seed=seed, max_tokens=CONFIG["canvas_length"], **options)
        solved += r.text == answer
        per_problem.append(r.tokens_per_forward)
        valid += r.tokens_per_forward * r.denoising_steps
        passes += r.denoising_steps
    return solved / len(cases), sum(per_problem) / len(per_problem), valid / passes


def train_demo(out: Path, iters: int, batch_size: int, examples: int = 60_000, log=print) -> Path:
    """Build the setup, train from scratch, and leave a loadable checkpoint in `out`."""
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    from .config import ModelArgs
    from .model import Model
    from .train import TrainingArgs, make_blocks, train

    with tempfile.TemporaryDirectory() as tmp:
        setup = Path(tmp)
        write_setup(setup)
        tokenizer = load_tokenizer(setup)

        def blocks(pairs):
            return [b for digits, answer in pairs
                    for b in make_blocks(prompt_ids(tokenizer, digits), tokenizer.encode(answer, add_special_tokens=False),
                                         CONFIG["canvas_length"], 1, 0)]

        args = TrainingArgs(iters=iters, batch_size=batch_size, learning_rate=3e-3, warmup=100,
                            eval_every=max(iters // 10, 1), save_every=max(iters // 4, 1))
        mx.random.seed(args.seed)
        model = Model(ModelArgs.from_dict(CONFIG))
        train(model, CONFIG, blocks(problems(examples, 0)), blocks(problems(500, 1)), out, args, source=setup, log=log)
    return out


def install(checkpoint: Path) -> None:
    """Copy a trained checkpoint's model files (not its optimizer state) into the package."""
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir()
    for f in checkpoint.iterdir():
        if f.name not in ("optimizer.safetensors", "training_state.json"):
            shutil.copyfile(f, DEMO_DIR / f.name)


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m mlx_diffusiongemma.demo")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the demo model and install it into the package")
    t.add_argument("--out", type=Path, default=Path("demo_checkpoint"))
    t.add_argument("--iters", type=int, default=1400)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--no-install", action="store_true", help="leave the package's demo model alone")
    args = parser.parse_args(argv)
    train_demo(args.out, args.iters, args.batch_size)
    if not args.no_install:
        install(args.out)
        print(f"\ninstalled into {DEMO_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
