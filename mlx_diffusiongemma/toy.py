"""A toy checkpoint: random weights at toy size and a word-level tokenizer
with Gemma 4's special tokens and turn-format chat template (`<|think|>` in the
system turn when thinking is on).

It exercises the whole path (save, load, chat template, generate, CLI) with no
network: the self-check and the tests use it. Its text is random words.
"""

import json
from pathlib import Path

import mlx.core as mx
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from .load import save_model
from .model import Model, ModelArgs

SPECIALS = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>"]
WORDS = ["thought", "user", "model", "system", "hello", "world", "sky", "blue", "why", "is", "the"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set system = messages[0].content if messages[0].role == 'system' else none -%}"
    "{%- if system is not none or enable_thinking -%}"
    "<|turn>system\n{% if enable_thinking %}<|think|>{% endif %}{{ system or '' }}<turn|>\n"
    "{%- endif -%}"
    "{%- for m in messages if m.role != 'system' -%}"
    "<|turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ m.content }}<turn|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|turn>model\n{%- endif -%}"
)


def _vocabulary(size: int) -> list:
    """Special tokens, a few words, then filler words w0, w1, ..."""
    return SPECIALS + WORDS + [f"w{i}" for i in range(size - len(SPECIALS) - len(WORDS))]


def token_id(token: str, vocab_size: int = 320) -> int:
    return _vocabulary(vocab_size).index(token)


def write_tokenizer(path, vocab_size: int = 320) -> None:
    vocab = {token: i for i, token in enumerate(_vocabulary(vocab_size))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


TOY_CONFIG = {
    "model_type": "diffusion_gemma",
    "canvas_length": 16,
    "text_config": {
        "hidden_size": 64, "num_hidden_layers": 6, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "global_head_dim": 32, "num_global_key_value_heads": 1, "sliding_window": 8,
        "num_experts": 8, "top_k_experts": 2, "moe_intermediate_size": 64, "vocab_size": 320,
        "max_position_embeddings": 4096,
    },
}


def write_toy_checkpoint(path, seed: int = 0) -> Path:
    """A random toy model with tokenizer and generation_config.json in a fresh directory."""
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(TOY_CONFIG))
    path = save_model(model, path, TOY_CONFIG)
    write_tokenizer(path, TOY_CONFIG["text_config"]["vocab_size"])
    eos = [token_id("<eos>"), token_id("<turn|>")]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": 0}))
    return path
