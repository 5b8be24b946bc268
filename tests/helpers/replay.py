"""Record the reference's `generate` and replay it through ours.

The recording wraps `torch.randint` / `torch.multinomial` (every random draw,
in order) and the model's forward (every decoder call's input canvas,
self-conditioning logits and output logits).
"""

from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
import torch

from mlx_diffusiongemma.model import Probabilities


@dataclass
class Recording:
    draws: list = field(default_factory=list)  # ("uniform" | "categorical", np.ndarray)
    canvases: list = field(default_factory=list)  # decoder input canvas per call
    self_conditioning: list = field(default_factory=list)  # None or np.ndarray per call
    logits: list = field(default_factory=list)  # decoder output per call
    routing_margins: list = field(default_factory=list)  # per call: see _recording_routing
    sequence: np.ndarray = None  # generated part of `sequences`
    tokens_per_forward: float = None


@contextmanager
def _recording_draws(recording: Recording):
    randint, multinomial = torch.randint, torch.multinomial

    def recorded_randint(*args, **kwargs):
        out = randint(*args, **kwargs)
        recording.draws.append(("uniform", out.numpy().copy()))
        return out

    def recorded_multinomial(*args, **kwargs):
        out = multinomial(*args, **kwargs)
        recording.draws.append(("categorical", out.numpy().copy()))
        return out

    torch.randint, torch.multinomial = recorded_randint, recorded_multinomial
    try:
        yield
    finally:
        torch.randint, torch.multinomial = randint, multinomial


@contextmanager
def _recording_routing(reference, gaps: list):
    """Appends to `gaps`, per decoder call, the smallest gap between the k-th
    and (k+1)-th expert scores of the call's tokens in any decoder layer. A
    port whose scores differ from the reference's by float32 rounding may send
    a token at such a near-tie to the other expert: as right an answer, which
    moves the logits by O(1)."""
    k = reference.config.get_text_config().top_k_experts
    call = []

    def record(module, inputs, scores):
        top = torch.topk(scores.reshape(-1, scores.shape[-1]), k + 1, dim=-1).values
        call.append(float((top[:, k - 1] - top[:, k]).min()))
        if len(call) == len(reference.model.decoder.layers):
            gaps.append(min(call))
            call.clear()

    handles = [layer.router.proj.register_forward_hook(record) for layer in reference.model.decoder.layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def record_reference(reference, prompt_ids, seed: int = 0, **generate_kwargs) -> Recording:
    recording = Recording()
    forward = reference.forward

    def recorded_forward(**kwargs):
        out = forward(**kwargs)
        sc = kwargs.get("self_conditioning_logits")
        recording.canvases.append(kwargs["decoder_input_ids"].numpy().copy())
        recording.self_conditioning.append(None if sc is None else sc.numpy().copy())
        recording.logits.append(out.logits.numpy().copy())
        return out

    reference.forward = recorded_forward
    torch.manual_seed(seed)
    try:
        with _recording_draws(recording), _recording_routing(reference, recording.routing_margins), torch.no_grad():
            out = reference.generate(torch.tensor([prompt_ids]), **generate_kwargs)
    finally:
        del reference.forward
    recording.sequence = out.sequences[0, len(prompt_ids) :].numpy()
    recording.tokens_per_forward = float(out.tokens_per_forward[0])
    return recording


class ReplayedRandomness:
    """Hands out the reference's recorded draws, checking they are asked for
    in the reference's order and shapes."""

    def __init__(self, recording: Recording):
        self.draws = list(recording.draws)

    def _next(self, kind):
        assert self.draws, f"more random draws than the reference made (wanted {kind})"
        got, value = self.draws.pop(0)
        assert got == kind, f"draw order differs: ours asks for {kind}, the reference drew {got}"
        return value

    def select(self, rows):
        assert list(rows) == [0], "one prompt's recording replays one row"
        return self

    def uniform_ids(self, shape, vocab_size):
        value = self._next("uniform")
        assert value.shape == tuple(shape) and value.max() < vocab_size
        return mx.array(value, dtype=mx.int32)

    def categorical(self, weights):
        value = self._next("categorical")
        return mx.array(value.reshape(weights.shape[:-1]), dtype=mx.int32)


class ReplayedDecoder:
    """Our model, with `decode` answering the recorded logits and recording
    what our generate passes in. `encode` and the cache are the real ones."""

    def __init__(self, model, recording: Recording):
        self.model, self.recording = model, recording
        self.args, self.dtype, self.generation_config = model.args, model.dtype, model.generation_config
        self.canvases, self.self_conditioning = [], []

    def make_cache(self):
        return self.model.make_cache()

    def encode(self, ids, cache, **kwargs):
        self.model.encode(ids, cache, **kwargs)

    def decode(self, canvas, cache, self_conditioning=None, raw_logits=False):
        """Records the self-conditioning input as ("logits", array) or
        ("probs", weights / total)."""
        assert not raw_logits, "replayed randomness takes the MLX path, which reads softcapped logits"
        i = len(self.canvases)
        assert i < len(self.recording.logits), "more decoder calls than the reference made"
        self.canvases.append(np.array(canvas))
        if isinstance(self_conditioning, Probabilities):
            weights, total = self_conditioning
            self.self_conditioning.append(("probs", np.array(weights / total)))
        elif self_conditioning is not None:
            kind = type(self_conditioning).__name__
            assert isinstance(self_conditioning, mx.array), f"the reference passes logits, got {kind}"
            self.self_conditioning.append(("logits", np.array(self_conditioning)))
        else:
            self.self_conditioning.append(None)
        return mx.array(self.recording.logits[i])


class ReplayedRows:
    """A batch's randomness: row r replays recording r's draws (each prompt
    draws as it did alone), for whichever rows a step takes."""

    def __init__(self, replays: list, rows=None):
        self.replays, self.rows = replays, list(range(len(replays))) if rows is None else rows

    def select(self, rows):
        return ReplayedRows(self.replays, [self.rows[r] for r in rows])

    def uniform_ids(self, shape, vocab_size):
        return mx.concatenate([self.replays[r].uniform_ids((1, *shape[1:]), vocab_size) for r in self.rows])

    def categorical(self, weights):
        return mx.concatenate([self.replays[r].categorical(weights[i : i + 1]) for i, r in enumerate(self.rows)])


def record_reference_batch(reference, prompts: list, seed: int = 0, **generate_kwargs) -> Recording:
    """The reference's own batched `generate`: prompts left-padded with an
    attention mask. `sequence` and `tokens_per_forward` are per row."""
    recording = Recording()
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (length - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    with _recording_draws(recording), torch.no_grad():
        out = reference.generate(ids, attention_mask=mask, **generate_kwargs)
    recording.sequence = out.sequences[:, length:].numpy()
    recording.tokens_per_forward = out.tokens_per_forward.numpy()
    return recording


class ReplayedBatch:
    """Hands out the rows we ask for of the reference's batched draws. The
    reference draws for every row at every step (rows it has frozen too) and
    runs a canvas until all its rows stop; ours asks only for the rows still
    denoising, so each of our draws is matched to the reference's by canvas
    and step: a uniform draw after a categorical one renoises that step, any
    other starts the next canvas."""

    def __init__(self, recording: Recording, rows=None, state=None):
        self.rows = rows
        self.state = state or {"canvases": self._canvases(recording.draws), "canvas": -1, "step": -1, "last": None}

    @staticmethod
    def _canvases(draws) -> list:
        canvases, previous = [], None
        for kind, value in draws:
            if kind == "uniform" and previous != "categorical":
                canvases.append({"start": value, "steps": []})
            elif kind == "categorical":
                canvases[-1]["steps"].append([value, None])
            else:
                canvases[-1]["steps"][-1][1] = value
            previous = kind
        return canvases

    def select(self, rows):
        return ReplayedBatch(None, rows if self.rows is None else [self.rows[r] for r in rows], self.state)

    def uniform_ids(self, shape, vocab_size):
        state = self.state
        if state["last"] == "categorical":
            value = state["canvases"][state["canvas"]]["steps"][state["step"]][1]
        else:
            state["canvas"] += 1
            state["step"] = -1
            assert state["canvas"] < len(state["canvases"]), "more canvases than the reference denoised"
            value = state["canvases"][state["canvas"]]["start"]
        state["last"] = "uniform"
        value = value[self.rows]
        assert value.shape == tuple(shape)
        return mx.array(value, dtype=mx.int32)

    def categorical(self, weights):
        state = self.state
        state["step"] += 1
        steps = state["canvases"][state["canvas"]]["steps"]
        assert state["step"] < len(steps), "more denoising steps than the reference took"
        state["last"] = "categorical"
        value = steps[state["step"]][0].reshape(-1, weights.shape[-2])
        return mx.array(value[self.rows].reshape(weights.shape[:-1]), dtype=mx.int32)
