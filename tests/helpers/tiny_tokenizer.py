"""A small word-level tokenizer for the tests: Gemma 4's special tokens and a
turn-format chat template written for the tests (`<|think|>` in the system turn
when thinking is on)."""

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>"]
# Gemma 4's image tokens (boi, soft token, eoi), the vocabulary's last three ids
# (`image_token_ids`), as the test checkpoints' configs name them.
IMAGE_TOKENS = ["<|image>", "<|image|>", "<image|>"]
WORDS = ["thought", "user", "model", "system", "hello", "world", "sky", "blue", "why", "is", "the"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set system = messages[0].content if messages[0].role == 'system' else none -%}"
    "{%- if system is not none or enable_thinking -%}"
    "<|turn>system\n{% if enable_thinking %}<|think|>{% endif %}{{ system or '' }}<turn|>\n"
    "{%- endif -%}"
    "{%- for m in messages if m.role != 'system' -%}"
    "<|turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{% if m.content is string %}{{ m.content }}"
    "{% else %}{% for item in m.content %}"
    "{% if item.type == 'image' %}<|image|>{% else %}{{ item.text }}{% endif %}"
    "{% endfor %}{% endif %}<turn|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|turn>model\n{%- endif -%}"
)


def _vocabulary(size: int) -> list:
    """Special tokens, a few words, then filler words w0, w1, ..."""
    fillers = size - len(SPECIALS) - len(WORDS) - len(IMAGE_TOKENS)
    return SPECIALS + WORDS + [f"w{i}" for i in range(fillers)] + IMAGE_TOKENS


def image_token_ids(vocab_size: int = 320) -> dict:
    """The config fields naming the image tokens of a vocabulary this size."""
    return dict(boi_token_id=vocab_size - 3, image_token_id=vocab_size - 2, eoi_token_id=vocab_size - 1)


def token_id(token: str, vocab_size: int = 320) -> int:
    return _vocabulary(vocab_size).index(token)


def write_tokenizer(path, vocab_size: int = 320) -> None:
    vocab = {token: i for i, token in enumerate(_vocabulary(vocab_size))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS + IMAGE_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)

