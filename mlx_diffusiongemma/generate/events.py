"""What generation streams: a `Draft` per denoising step, a `Commit` per
canvas, and a `DiffusionResponse` per prompt when it ends."""

from dataclasses import dataclass, field

import mlx.core as mx


@dataclass
class Draft:
    """One denoising step. Its values stay mlx arrays until read, so a caller
    that only counts steps costs the loop no host transfer."""

    canvas: int  # index of the canvas being denoised, from 0
    step: int  # denoising steps taken on this canvas, from 1
    argmax: mx.array = field(repr=False)  # [C] the argmax canvas so far
    kept: mx.array = field(repr=False)  # positions the acceptance kept in this step
    entropy: mx.array = field(repr=False)  # mean entropy of the step's prediction
    tokenizer: object = field(default=None, repr=False)
    row: int = 0  # the prompt's index in a batch

    @property
    def tokens(self) -> list:
        return self.argmax.tolist()

    @property
    def accepted(self) -> int:
        return self.kept.item()

    @property
    def mean_entropy(self) -> float:
        return self.entropy.item()

    @property
    def text(self) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(self.tokens)


@dataclass
class Commit:
    """A canvas committed to the sequence: its tokens up to eos / max_tokens."""

    canvas: int
    tokens: list
    text: str  # the new text segment (streaming detokenizer)
    row: int = 0  # the prompt's index in a batch


@dataclass
class DiffusionResponse:
    """The final event, and what `diffusion_generate` returns. Statistics are
    named like mlx-lm's GenerationResponse where they overlap."""

    text: str  # the answer, without the thought channel
    thinking: str
    tokens: list  # generated ids, without eos and padding
    finish_reason: str  # "stop" (eos) or "length"
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    canvases: int
    denoising_steps: int
    tokens_per_forward: float  # the reference's definition: non-pad tokens of whole canvases / decoder passes
    wall_time: float  # seconds, from the start of the call to this row's end
    row: int = 0  # the prompt's index in a batch
