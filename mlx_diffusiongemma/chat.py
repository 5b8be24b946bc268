"""Chat format: prompts rendered with the checkpoint's own template, answers
split from the thought channel.

Public copies of the Gemma 4 template disagree on what "thinking off" renders,
so the checkpoint's template (jinja2, through the tokenizer) is the only source.
"""

from typing import Optional

import jinja2


def render_prompt(
    tokenizer,
    prompt: str,
    system_prompt: Optional[str] = None,
    enable_thinking: bool = False,
    use_chat_template: bool = True,
    context: Optional[int] = None,
    image_tokens=None,
) -> list:
    """Token ids of a user message, rendered with the chat template when the
    tokenizer has one and `use_chat_template` is set, else encoded raw. A
    text that cannot fit `context` tokens is refused before it is tokenized.
    With `image_tokens` (an `ImageTokens`) the message's images come before
    its text, as mlx-vlm places them, each expanded to its soft tokens; a raw
    prompt marks where they go with the image token itself."""
    if tokenizer is None:
        raise ValueError("a text prompt needs a tokenizer; pass token ids to generate without one")
    for what, text in (("prompt", prompt), ("system prompt", system_prompt)):
        if text is not None:
            check_text(text, what)
    if context is not None:
        check_length(tokenizer, prompt + (system_prompt or ""), "prompt", context)
    texts = [text for text in (prompt, system_prompt) if text]
    if use_chat_template and tokenizer.chat_template is not None:
        messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        content = prompt
        if image_tokens is not None:
            content = [{"type": "image"}] * len(image_tokens.counts) + [{"type": "text", "text": prompt}]
        messages.append({"role": "user", "content": content})
        try:
            text = render_conversation(tokenizer, messages, enable_thinking)
        except ValueError:
            for text in texts:  # unknown characters, when they are why, named as everywhere
                _refuse_unknown(tokenizer, text)
            raise
        if image_tokens is not None:
            text = image_tokens.expand(text)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = tokenizer.encode(prompt if image_tokens is None else image_tokens.expand(prompt))
    # the prompt is in `ids`: tokenized again, alone, only when they hold the
    # unknown token; a (short) system prompt may not be rendered at all
    if getattr(tokenizer, "unk_token_id", None) in ids:
        _refuse_unknown(tokenizer, prompt)
    if system_prompt:
        _refuse_unknown(tokenizer, system_prompt)
    return ids


def render_conversation(tokenizer, messages: list, enable_thinking: bool = False) -> str:
    """Chat messages rendered by the checkpoint's template, ready for the
    model's turn (image items as the template writes them: the image token)."""
    if tokenizer is None or tokenizer.chat_template is None:
        raise ValueError("chat messages need a tokenizer with a chat template")
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )
    except jinja2.TemplateError as e:  # the template refuses the messages (raise_exception)
        raise ValueError(f"the chat template refuses the prompt: {e}") from None


class ImageTokens:
    """A prompt's image placeholders, expanded as Gemma 4's processor does:
    each image token in the rendered text becomes boi + n soft tokens + eoi,
    n the image's soft-token count. The tokens' text comes from the
    tokenizer, their ids from the checkpoint's config."""

    def __init__(self, tokenizer, args, counts: list):
        self.counts = list(counts)
        names = {}
        for field in ("image_token_id", "boi_token_id", "eoi_token_id"):
            token_id = getattr(args, field)
            token = tokenizer.convert_ids_to_tokens(token_id)
            if not isinstance(token, str) or tokenizer.convert_tokens_to_ids(token) != token_id:
                raise ValueError(f"the tokenizer has no token for {field} {token_id} (config.json)")
            names[field] = token
        self.placeholder, self.boi, self.eoi = names["image_token_id"], names["boi_token_id"], names["eoi_token_id"]

    def expand(self, text: str) -> str:
        parts = text.split(self.placeholder)
        if len(parts) - 1 != len(self.counts):
            raise ValueError(
                f"the prompt has {len(parts) - 1} image placeholder(s) ({self.placeholder}) "
                f"but {len(self.counts)} image(s) were given"
            )
        pieces = [parts[0]]
        for count, part in zip(self.counts, parts[1:]):
            pieces += [self.boi + self.placeholder * count + self.eoi, part]
        return "".join(pieces)


def check_text(text, what: str) -> None:
    """Text the tokenizer can take: a str that is valid Unicode. Bytes that
    are not UTF-8 reach Python as lone surrogates (argv, a stdin decoded
    with surrogateescape), which the tokenizer refuses with a TypeError."""
    if not isinstance(text, str):
        raise ValueError(f"the {what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the {what} is not valid UTF-8 text (at character {e.start})") from None


def check_length(tokenizer, text: str, what: str, context: int) -> None:
    """Refuse, before tokenizing it, a text that cannot fit `context` tokens
    whatever it says (tokenizing megabytes first takes seconds and gigabytes)."""
    if len(text) > context and len(text) > longest_text(tokenizer, context):
        raise ValueError(
            f"the {what} has {len(text)} characters: more tokens than the model's context of {context} "
            f"(its tokenizer's longest token has {longest_text(tokenizer, context) // context} characters)"
        )


def longest_text(tokenizer, context: int) -> int:
    """The most characters a text of `context` tokens can have: each token
    stands for at most as many characters as its longest one has."""
    return context * max(map(len, tokenizer.get_vocab()), default=1)


SMALL_VOCABULARY = 1000  # up to this size, an unknown-character error lists the characters known


def _refuse_unknown(tokenizer, text: str) -> None:
    """A tokenizer that maps what it does not know to its unknown token would
    otherwise hand the model a different prompt without a word (the demo's turns
    "abc" into pads). Typing the unknown token itself is allowed, as often as
    it is typed."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or tokenizer.encode(text, add_special_tokens=False).count(unk) <= text.count(tokenizer.unk_token):
        return
    text = text.replace(tokenizer.unk_token, "")
    unknown = [c for c in dict.fromkeys(text) if unk in tokenizer.encode(c, add_special_tokens=False)]
    if unknown:
        message = f"the prompt holds characters the tokenizer does not know: {', '.join(map(repr, unknown))}"
    else:  # each character is known alone, not in this combination
        message = f"the tokenizer does not know parts of the prompt (it encodes them as {tokenizer.unk_token})"
    vocabulary = tokenizer.get_vocab()
    if len(vocabulary) <= SMALL_VOCABULARY:
        known = "".join(sorted(t for t in vocabulary if len(t) == 1))
        message += f" (the single characters it knows: {known})"
    raise ValueError(message)


def split_thinking(tokenizer, tokens: list) -> tuple[str, str]:
    """(thinking, answer) of generated tokens.

    The model writes `<|channel>thought\\n...<channel|>` before the answer when
    thinking is on. Uses mlx-lm's TokenizerWrapper markers; an unclosed channel
    is all thinking.
    """
    start, end = -1, -1
    if getattr(tokenizer, "has_thinking", False):
        start = tokenizer.find_think_start(tokens)
        end = tokenizer.find_think_end(tokens, start=max(start, 0))
    if start < 0 and end < 0:
        return "", _decode(tokenizer, tokens)
    begin = start + len(tokenizer.think_start_tokens) if start >= 0 else 0
    if end < 0:
        return _decode(tokenizer, tokens[begin:]).strip(), ""
    answer = tokens[: max(start, 0)] + tokens[end + len(tokenizer.think_end_tokens) :]
    return _decode(tokenizer, tokens[begin:end]).strip(), _decode(tokenizer, answer)


def _decode(tokenizer, tokens: list) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)
