"""A generation's prompts as the model takes them: checked token ids, and
each prompt's images as the vision tower's inputs.

A prompt is a text (rendered with the chat template, its images before
the text), a conversation (chat messages whose content may hold image
items, rendered by the checkpoint's template) or token ids that already
hold each image's expanded soft tokens (what transformers'
`generate(input_ids, pixel_values=...)` takes). Either way the image soft
tokens in the ids must match the images' own counts exactly.
"""

import warnings
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx
import numpy as np

from ..chat import ImageTokens, check_length, check_text, render_conversation, render_prompt
from ..images import SUPPORTED_SOFT_TOKENS, preprocess

# Gemma4ImageProcessor's default, for a checkpoint without a processor config
DEFAULT_MAX_SOFT_TOKENS = 280
# keys an image item of a chat message may carry its image under (as transformers and mlx-vlm read them)
_IMAGE_KEYS = ("image", "path", "url")


@dataclass
class Prompt:
    """One prompt: token ids [L] and, with images, the tower's inputs."""

    ids: mx.array
    pixel_values: Optional[np.ndarray] = None
    position_ids: Optional[np.ndarray] = None
    counts: list = field(default_factory=list)  # soft tokens per image, in order


def is_batch(prompt) -> bool:
    """A list (or tuple) of prompts, each a string, a conversation or a
    sequence of ids; a list of ids is one prompt, a list of messages one
    conversation."""
    return (
        isinstance(prompt, (list, tuple))
        and len(prompt) > 0
        and not isinstance(prompt[0], (int, np.integer, dict))
    )


def prepare_prompts(prompt, images, tokenizer, model, max_soft_tokens=None, **rendering) -> list:
    """`Prompt`s for `prompt` (one, or a batch) and `images` (for one
    prompt a list of images; for a batch a list with each prompt's list,
    or None). `rendering`: system_prompt, enable_thinking, use_chat_template."""
    if max_soft_tokens is not None and (isinstance(max_soft_tokens, bool) or max_soft_tokens not in SUPPORTED_SOFT_TOKENS):
        raise ValueError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, got {max_soft_tokens!r}")
    batch = is_batch(prompt)
    prompts = list(prompt) if batch else [prompt]
    return [
        _prepare(p, sources, tokenizer, model, max_soft_tokens, f"prompt {i}" if batch else "prompt", rendering)
        for i, (p, sources) in enumerate(zip(prompts, _images_per_prompt(images, len(prompts), batch)))
    ]


def _images_per_prompt(images, count: int, batch: bool) -> list:
    if images is None:
        return [[] for _ in range(count)]
    if not batch:
        return [list(images) if isinstance(images, (list, tuple)) else [images]]
    if not isinstance(images, (list, tuple)) or len(images) != count:
        raise ValueError(f"images for a batch must be a list with one entry (a list of images, or None) per prompt, {count} in all")
    return [[] if i is None else list(i) if isinstance(i, (list, tuple)) else [i] for i in images]


def _prepare(prompt, sources: list, tokenizer, model, max_soft_tokens, what: str, rendering: dict) -> Prompt:
    args = model.args
    conversation = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and isinstance(prompt[0], dict)
    if conversation:
        in_messages = _message_images(prompt, what)
        if in_messages and sources:
            raise ValueError(f"{what}: images are given both in its messages and as images=; give them one way")
        sources = in_messages or sources
    result = Prompt(ids=None)
    image_tokens = None
    if sources:
        model.check_vision()
        config = model.vision_config
        budget = max_soft_tokens or model.max_soft_tokens or DEFAULT_MAX_SOFT_TOKENS
        result.pixel_values, result.position_ids, result.counts = preprocess(
            sources, budget, config.patch_size, config.pooling_kernel_size
        )
        if isinstance(prompt, str) or conversation:
            image_tokens = ImageTokens(tokenizer, args, result.counts)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{what} is empty")
        ids = render_prompt(
            tokenizer,
            prompt,
            rendering.get("system_prompt"),
            rendering.get("enable_thinking", False),
            rendering.get("use_chat_template", True),
            args.max_position_embeddings,
            image_tokens=image_tokens,
        )
    elif conversation:
        texts = [_text_of(m) for m in prompt]
        for text in texts:
            check_text(text, "prompt")
        if tokenizer is not None:
            check_length(tokenizer, "".join(texts), "prompt", args.max_position_embeddings)
        text = render_conversation(tokenizer, [_without_images(m) for m in prompt], rendering.get("enable_thinking", False))
        if image_tokens is not None:
            text = image_tokens.expand(text)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = prompt
    result.ids = token_ids(ids, args.vocab_size, what)
    _check_image_tokens(result, args.image_token_id, what)
    if (args.max_position_embeddings - result.ids.size) // args.canvas_length < 1:
        raise ValueError(
            f"{what} has {result.ids.size} tokens; with a canvas of {args.canvas_length} it does not fit the model's "
            f"context of {args.max_position_embeddings} tokens"
        )
    return result


def _message_images(messages, what: str) -> list:
    """The images the messages' content items carry, in order; each message
    checked to be what chat templates read (a role, and content that is a
    string or a list of typed items), so a malformed one is named here
    rather than failing inside the template."""
    found = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"{what}: message {i} must be an object with a string 'role'")
        content = message.get("content")
        items = content if isinstance(content, list) else []
        if not isinstance(content, str) and not (
            isinstance(content, list) and all(isinstance(item, dict) and isinstance(item.get("type"), str) for item in items)
        ):
            raise ValueError(f"{what}: message {i}'s content must be a string or a list of items with a 'type'")
        for item in items:
            if item["type"] == "image":
                source = next((item[k] for k in _IMAGE_KEYS if item.get(k) is not None), None)
                if isinstance(source, str) and source.startswith(("http://", "https://")):
                    raise ValueError(f"{what}: image URLs are not fetched ({source}); give a local path, a PIL image or an array")
                if source is not None:
                    found.append(source)
            elif item["type"] == "text" and not isinstance(item.get("text"), str):
                raise ValueError(f"{what}: message {i} has a text item without a string 'text'")
    return found


def _text_of(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(i["text"] for i in content if i["type"] == "text")


def _without_images(message: dict) -> dict:
    """The message as the template reads it: image items keep their type only
    (a template never needs the picture, and jinja should not copy it)."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    items = [{"type": "image"} if isinstance(i, dict) and i.get("type") == "image" else i for i in content]
    return {**message, "content": items}


def _check_image_tokens(prompt: Prompt, image_token_id: int, what: str) -> None:
    """The reference's own check (`get_placeholder_mask`): the image soft
    tokens in the ids and the images' soft tokens, equal in number. Ids
    with soft tokens but no images are text to the reference, which warns
    (`generate`); so do we."""
    held = int((np.asarray(prompt.ids) == image_token_id).sum())
    given = sum(prompt.counts)
    if not prompt.counts:
        if held:
            warnings.warn(
                f"{what} holds {held} image soft token(s) (id {image_token_id}) but no images were given: "
                "they are read as text",
                stacklevel=4,
            )
        return
    if held != given:
        raise ValueError(
            f"{what} holds {held} image soft token(s) (id {image_token_id}) but its {len(prompt.counts)} image(s) "
            f"give {given} ({', '.join(map(str, prompt.counts))})"
        )


def first_canvas(decoder_input_ids, rows: int, C: int, V: int) -> mx.array:
    """The caller's first canvas as [rows, C]: [C] (or [1, C]) for one prompt, [B, C] for a batch."""
    ids = np.asarray(decoder_input_ids.tolist() if isinstance(decoder_input_ids, mx.array) else decoder_input_ids)
    if rows == 1 and ids.size == C:
        ids = ids.reshape(1, C)
    if ids.shape != (rows, C):
        expected = f"exactly canvas_length={C} ids (one whole canvas)" if rows == 1 else f"shape [{rows}, {C}] (a canvas per prompt)"
        raise ValueError(f"decoder_input_ids must hold {expected}, got shape {list(ids.shape)}")
    return mx.stack([token_ids(row, V, "decoder_input_ids") for row in ids])


def token_ids(ids, vocab_size: int, what: str) -> mx.array:
    array = np.asarray(ids.tolist() if isinstance(ids, mx.array) else ids)
    if array.size == 0:
        raise ValueError(f"{what} is empty")
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must be a string, chat messages or a 1-D sequence of token ids, got shape {array.shape}")
    if array.min() < 0 or array.max() >= vocab_size:
        raise ValueError(f"{what} holds ids outside [0, {vocab_size}): {array.min()}..{array.max()}")
    return mx.array(array, dtype=mx.int32)
