"""DiffusionGemma as mlx-lm loads it: the module `mlx_lm.models.diffusion_gemma`.

mlx-lm finds a model type by importing `mlx_lm.models.<model_type>`. The
`mlx_diffusiongemma.pth` file that this package installs registers a finder
(`_mlx_diffusiongemma_hook`) that answers for that one name with this module;
no file of mlx-lm is touched, and if mlx-lm ever ships its own
`diffusion_gemma` module, mlx-lm's own wins. Its `sharded_load` (tensor
parallelism under `mlx.launch`) calls the inherited `Model.shard`.

Two ways in:
- `model.diffusion_generate(prompt_ids, **kwargs)`: the hook a diffusion-aware
  `mlx_lm.generate` dispatches to; it streams our events (`Draft`, `Commit`,
  `DiffusionResponse`).
- `model(inputs, cache)`: mlx-lm's autoregressive loops, unchanged, for one
  sequence (`generate_step`) or a batch (`BatchGenerator`, `batch_generate`,
  the server). Asked for a row's next token, the model denoises a whole
  canvas against that row's context (the reference sampler, random draws
  from mlx's global state, so `--seed` works), then hands the canvas out one
  token per call with logits that make any sampler pick exactly that token.
  Rows of a batch that need a canvas at the same call are denoised together,
  and with them the next canvas of every row that will need one within a
  canvas (committed ahead: against its context and the rest of the canvas it
  is handing out, whose keys and values are held), unless that rest holds an
  eos id, where mlx-lm stops the row. Rows that join a batch apart then
  share their denoising from their second canvas on.

The cache invariant mlx-lm relies on (its server's prompt cache, trimming,
saving, deep copies): once its loop has fed n tokens, the cache describes
exactly those n tokens. So the canvas being handed out is part of the cache:
`make_cache` adds, after the layer caches, one entry per layer holding the
keys and values of the canvas tokens (computed in one encoder pass when the
canvas is denoised, as the reference commits a canvas), and one entry holding
those tokens and their positions. Canvas tokens fed back at their positions
are written into the layer caches from there: no encoder pass, and the same
keys and values a whole-canvas commit writes. Held are the canvas of the last
token fed, the rest, and at most one canvas ahead, so trimming back into them
(mlx-lm's server trims one token and feeds it again) and feeding the same
tokens continues the text. Anything else fed
(a prompt, the next chat turn) is encoded as context, the held canvases are
dropped, and the next canvas is denoised after it, as a fresh request would.

Those held entries are mlx-lm's ConcatenateKVCache, whose trim leaves its
arrays as they are (what a held canvas needs) and which `load_prompt_cache`
restores by name. mlx-lm batches a cache entry through its `merge`, which
ConcatenateKVCache lacks, so each held entry carries ours (`BatchHeld.merge`),
and a batch holds them as a `BatchHeld`, which follows the conventions of
mlx-lm's BatchKVCache (`extract`, `filter`, `extend`, `prepare`, `finalize`).
An entry restored from a file has no `merge`: it continues one sequence, and
mlx-lm refuses to batch it.

The model's context (`max_position_embeddings`) bounds a row as it bounds our
generate: a canvas is denoised only where it fits whole. mlx-lm 0.32 gives a
model no way to refuse a request before prefilling it (its server tokenizes
and then prefills inside its batch loop, where an exception stops the loop
for every request), so a row with no room left for a canvas ends there: its
next token is eos, with one warning on the log, and whatever is fed past the
room left is written to the caches as zeros, without an encoder pass (so a
prompt far longer than the context costs about one chunk, not hours, and the
cache still describes every token fed, as mlx-lm's prompt cache needs).

mlx-lm prefills a prompt in chunks whose logits it ignores and then feeds the
last prompt token alone to get the first generated token. So a call that
brings several new tokens is taken for prefill: it fills the cache and
returns zero logits without denoising. Only when a prompt of n tokens leaves
a one-token chunk ((n - 1) % prefill_step_size == 1) is one canvas wasted.
"""

import logging
import sys
from typing import NamedTuple

import mlx.core as mx
from mlx_lm.models.cache import (
    BatchKVCache,
    BatchRotatingKVCache,
    ConcatenateKVCache,
    KVCache,
    RotatingKVCache,
    dynamic_roll,
)

from .cache_views import context
from .config import ModelArgs, token_ids
from .generate import DiffusionOptions, denoise_canvas, filter_rows, stream_diffusion_generate
from .load import _cast_for_cpu_experts, mlx_community_recipe
from .mlx_lm_internals import make_batch_cache, with_merge
from .model import Model as DiffusionGemma
from .sampling import Randomness, StableAndConfidentStopping

__all__ = ["BatchHeld", "Model", "ModelArgs"]

LAYER_CACHES = (KVCache, RotatingKVCache, BatchKVCache, BatchRotatingKVCache)

# mlx-lm's autoregressive tools (mlx_lm.lora, mlx_lm.evaluate, mlx_lm.perplexity)
# call the model on token ids without a cache, for next-token logits.
NO_NEXT_TOKEN_LOGITS = (
    "DiffusionGemma is a diffusion model: it has no next-token logits, so mlx-lm's autoregressive "
    "training, evaluation and perplexity do not apply; fine-tune and evaluate it with "
    "mlx_diffusiongemma.lora (--train, --test)"
)


class NoNextTokenLogits(ValueError):
    """Raised where a caller asks for next-token logits (a call without a cache)."""


def _one_line_hook(previous):
    """An excepthook that prints a NoNextTokenLogits reaching the top of a
    command (mlx-lm's commands do not catch it) as one line, and hands
    everything else to the hook before it."""

    def hook(kind, value, traceback):
        if issubclass(kind, NoNextTokenLogits):
            print(f"error: {value}", file=sys.stderr)
        else:
            previous(kind, value, traceback)

    hook.diffusiongemma = True
    return hook


# mlx_lm.evaluate scores continuations from the logits of a multi-token call
# with a cache, which a diffusion model cannot give (ours are placeholders
# there): refused as the model is built, by the module the command runs from.
AUTOREGRESSIVE_COMMANDS = ("mlx_lm.evaluate", "mlx_lm.perplexity")


def _refuse_autoregressive_commands() -> None:
    running = [name for name in AUTOREGRESSIVE_COMMANDS if name in sys.modules]
    if running:
        raise NoNextTokenLogits(f"{running[0]}: {NO_NEXT_TOKEN_LOGITS}")


if not getattr(sys.excepthook, "diffusiongemma", False):
    sys.excepthook = _one_line_hook(sys.excepthook)

log = logging.getLogger(__name__)


def _entry(keys: mx.array, values: mx.array) -> ConcatenateKVCache:
    """One sequence's held entry: two arrays [1, h, n, d] (see the module docstring)."""
    entry = ConcatenateKVCache()
    entry.state = (keys, values)
    return with_merge(entry, BatchHeld.merge)


def _padded(rows: list, length: int) -> mx.array:
    """Arrays [1, h, n_r, d] as one [B, h, length, d], each row's n_r first."""
    return mx.concatenate([mx.pad(a, [(0, 0), (0, 0), (0, length - a.shape[2]), (0, 0)]) for a in rows])


class RowChange(NamedTuple):
    """What a row holds next: the last `kept` of its held tokens (with their
    keys and values), then `tokens` and, per layer, their keys and values
    (`keys_values`, [] when none); the first kept token sits at `start`."""

    kept: int
    start: int
    tokens: list
    keys_values: list


class BatchHeld:
    """The held entries of a batch (one per layer, or the canvas tokens and
    positions): row r's two arrays [1, h, n_r, d] are keys[r, :, :n_r] and
    values[r, :, :n_r]. Trimming leaves them, as it leaves a
    ConcatenateKVCache's."""

    def __init__(self, keys: mx.array, values: mx.array, lengths: list):
        self.keys, self.values, self.lengths = keys, values, list(lengths)

    @classmethod
    def merge(cls, entries: list) -> "BatchHeld":
        for entry in entries:
            if not isinstance(entry, ConcatenateKVCache) or entry.keys is None:
                raise ValueError(f"a held canvas entry is a ConcatenateKVCache with arrays (from make_cache), got a {type(entry).__name__}")
        lengths = [entry.keys.shape[2] for entry in entries]
        N = max(lengths)
        return cls(_padded([e.keys for e in entries], N), _padded([e.values for e in entries], N), lengths)

    def row(self, r: int) -> tuple:
        n = self.lengths[r]
        return self.keys[r : r + 1, :, :n], self.values[r : r + 1, :, :n]

    def extract(self, idx: int) -> ConcatenateKVCache:
        return _entry(*(mx.contiguous(a) for a in self.row(idx)))

    def filter(self, batch_indices) -> None:
        batch_indices = list(batch_indices.tolist() if isinstance(batch_indices, mx.array) else batch_indices)
        self.lengths = [self.lengths[i] for i in batch_indices]
        index = mx.array(batch_indices, mx.int32)
        self.keys, self.values = self.keys[index], self.values[index]

    def extend(self, other: "BatchHeld") -> None:
        rows = [self.row(r) for r in range(len(self.lengths))] + [other.row(r) for r in range(len(other.lengths))]
        self.lengths += other.lengths
        N = max(self.lengths)
        self.keys, self.values = (_padded([row[i] for row in rows], N) for i in (0, 1))

    def prepare(self, **kwargs) -> None:
        """Nothing to prepare: prompt tokens go to the layer caches, never to a held canvas."""

    def finalize(self) -> None:
        pass

    @property
    def state(self) -> tuple:
        return self.keys, self.values

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        return 0

    def size(self) -> int:
        return 0

    def empty(self) -> bool:
        return False

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def _held_arrays(entry) -> tuple:
    """(keys [B, h, N, d], values, lengths) of a held entry, one sequence's or a batch's."""
    if isinstance(entry, BatchHeld):
        return entry.keys, entry.values, entry.lengths
    return entry.keys, entry.values, [entry.keys.shape[2]]


def _set_held(entry, rows: list) -> None:
    """Make `rows` (per row, two arrays [1, h, n_r, d]) what the entry holds."""
    if isinstance(entry, BatchHeld):
        lengths = [keys.shape[2] for keys, _ in rows]
        N = max(lengths)
        entry.keys, entry.values, entry.lengths = _padded([k for k, _ in rows], N), _padded([v for _, v in rows], N), lengths
    else:
        (entry.state,) = rows


def _canvases(entry) -> tuple:
    """Per row, the canvas tokens held and the position of the first."""
    tokens, positions, lengths = _held_arrays(entry)
    tokens, positions = tokens[:, 0, :, 0].tolist(), positions[:, 0, :1, 0].tolist()
    return [t[:n] for t, n in zip(tokens, lengths)], [p[0] if n else 0 for p, n in zip(positions, lengths)]


def _canvas_row(tokens: list, start: int) -> tuple:
    """A row's canvas tokens ([1, 1, n, 1]) and their positions."""
    tokens = mx.array(tokens, dtype=mx.int32).reshape(1, 1, -1, 1)
    return tokens, start + mx.arange(tokens.shape[2], dtype=mx.int32).reshape(tokens.shape)


class _Substituted:
    """A layer cache as the encoder writes it, taking the given keys and
    values instead of the computed ones for some rows (those that feed their
    held canvas, or zeros for those past the model's context)."""

    def __init__(self, cache, keys: mx.array, values: mx.array, held: mx.array):
        self.cache, self.offset = cache, cache.offset
        self.keys, self.values, self.held = keys, values, held[:, None, None, None]

    def make_mask(self, *args, **kwargs):
        return self.cache.make_mask(*args, **kwargs)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:
        return self.cache.update_and_fetch(mx.where(self.held, self.keys, keys), mx.where(self.held, self.values, values))


class Model(DiffusionGemma):
    def __init__(self, args: ModelArgs):
        _refuse_autoregressive_commands()
        super().__init__(args)

    def make_cache(self) -> list:
        """The layer caches, the canvas's keys and values per layer, then the
        canvas tokens and their positions (see the module docstring)."""
        layers = super().make_cache()
        pending = []
        for layer in self.layers:
            attention = layer.self_attn
            empty = mx.zeros((1, attention.n_kv_heads, 0, attention.head_dim), self.dtype)
            pending.append(_entry(empty, empty))
        return layers + pending + [_entry(*_canvas_row([], 0))]

    def load_weights(self, weights, strict: bool = True):
        super().load_weights(weights, strict=strict)
        _cast_for_cpu_experts(self)  # as our own loader does
        return self

    @property
    def quant_predicate(self):
        """The mlx-community recipe, which `mlx_lm.convert -q` applies when it is
        given no other (the same plan as `python -m mlx_diffusiongemma.convert`)."""
        return mlx_community_recipe

    def diffusion_generate(self, prompt_ids, tokenizer=None, **kwargs):
        return stream_diffusion_generate(self, tokenizer, prompt_ids, **kwargs)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None, **kwargs) -> mx.array:
        layers, pending, canvas = self._parts(cache)
        if input_embeddings is not None:
            raise ValueError("DiffusionGemma through mlx-lm takes token ids only (no input_embeddings)")
        B = len(_held_arrays(canvas)[2])
        if inputs.ndim != 2 or inputs.shape[0] != B:
            raise ValueError(f"inputs must have shape [{B}, L], one row per row of the cache, got {tuple(inputs.shape)}")
        L = inputs.shape[1]
        fed = inputs.tolist()
        tokens, starts = _canvases(canvas)
        offsets = _offsets(layers[0])
        index = [o - s for o, s in zip(offsets, starts)]
        held = [bool(t) and i >= 0 and t[i : i + L] == f for t, i, f in zip(tokens, index, fed)]
        if all(held):  # canvas tokens fed back (again, after a trim): write their keys and values
            for layer, (keys, values) in zip(layers, self._held_at(pending, index, L)):
                layer.update_and_fetch(keys, values)
            mx.eval([c.state for c in layers])
        else:  # context: encoded, and a row's held canvases dropped
            self._encode_context(inputs, layers, pending, index, held, [not self._room_for_canvas(o) for o in offsets])
            tokens, starts = self._change_held(pending, canvas, {r: RowChange(0, 0, [], []) for r in range(B) if not held[r]})
        if L > 1:  # prefill: nobody reads these logits (a broadcast: nothing V-sized per token)
            return mx.broadcast_to(mx.zeros((1, 1, self.args.vocab_size), self.dtype), (B, L, self.args.vocab_size))
        offsets = [o + 1 for o in offsets]
        to_hand_out = [s + len(t) - o if t else 0 for t, s, o in zip(tokens, starts, offsets)]
        # a canvas starts after the tokens held (or, holding none, after the token fed)
        fits = [self._room_for_canvas(s + len(t) if t else o) for t, s, o in zip(tokens, starts, offsets)]
        ended = [r for r, n in enumerate(to_hand_out) if n == 0 and not fits[r]]
        eos_ids = self._eos_ids() if ended else []
        if any(fed[r][-1] not in eos_ids for r in ended):  # once: mlx-lm may feed the eos back
            self._warn_context_full(offsets, ended)
        if any(n == 0 and fits[r] for r, n in enumerate(to_hand_out)):  # then also the rows that will need one within a canvas, ahead of time
            C = self.args.canvas_length
            rows = [
                r for r, n in enumerate(to_hand_out)
                if fits[r] and (n == 0 or (n <= C and not self._stops(tokens[r][-n:])))
            ]
            tokens, starts = self._next_canvases(rows, layers, pending, canvas, tokens, starts, offsets)
        eos = (eos_ids or [self.args.pad_token_id])[0]  # no eos id known: pads, until max_tokens
        token = mx.array([eos if r in ended else tokens[r][offsets[r] - starts[r]] for r in range(B)])[:, None, None]
        zero, never = mx.array(0.0, self.dtype), mx.array(-mx.inf, self.dtype)  # in the model's dtype: one V-sized pass
        return mx.where(mx.arange(self.args.vocab_size) == token, zero, never)

    def _room_for_canvas(self, start: int) -> bool:
        """Whether a canvas starting at this position fits the model's context."""
        return start + self.args.canvas_length <= self.args.max_position_embeddings

    def _encode_context(self, inputs: mx.array, layers: list, pending: list, index: list, held: list, past: list) -> None:
        """Write fed context into the layer caches: encoded, except the rows
        that feed their held canvas (its keys and values) and the rows already
        past the room for a canvas (zeros: they end with eos, see the module
        docstring). Rows past it take no part in an encoder pass: the other
        rows are encoded apart, against their own context only (a row past the
        context may hold far more than any other row, and attending over it
        would cost as much as encoding it)."""
        if any(past):
            self._write_beside_past(inputs, layers, pending, index, held, past)
        elif any(held):
            mask = mx.array(held)
            layers_in = [_Substituted(c, *kv, mask) for c, kv in zip(layers, self._held_at(pending, index, inputs.shape[1]))]
            self.encode_chunk(inputs, layers_in)
            mx.eval([c.state for c in layers])
        else:
            self.encode(inputs, layers)

    def _write_beside_past(self, inputs: mx.array, layers: list, pending: list, index: list, held: list, past: list) -> None:
        """Per layer, zeros for the rows past the context, the held keys and
        values for the rows feeding their canvas, and for the others what
        encoding them alone (`lookahead` on their rows of the caches) gives."""
        B, L = inputs.shape
        live = [r for r in range(B) if not (held[r] or past[r])]
        if live:
            rows = mx.array(live)
            computed = self.lookahead(inputs[rows], [filter_rows(c, rows) for c in layers])
        held_kv = self._held_at(pending, index, L) if any(held) else [None] * len(layers)
        from_held = mx.array(held)[:, None, None, None]
        for i, (layer, attention) in enumerate(zip(layers, (l.self_attn for l in self.layers))):
            written = []
            for k in (0, 1):  # keys, values
                out = mx.zeros((B, attention.n_kv_heads, L, attention.head_dim), self.dtype)
                if held_kv[i] is not None:
                    out = mx.where(from_held, held_kv[i][k], out)
                if live:
                    out[rows] = computed[i][k].astype(self.dtype)
                written.append(out)
            layer.update_and_fetch(*written)
        mx.eval([c.state for c in layers])

    def _warn_context_full(self, offsets: list, rows: list) -> None:
        longest = max(offsets[r] for r in rows)
        log.warning(
            "DiffusionGemma: %d token(s) leave no room for a canvas of %d in the model's context of %d tokens "
            "(max_position_embeddings): the sequence ends here (eos)",
            longest, self.args.canvas_length, self.args.max_position_embeddings,
        )

    def _parts(self, cache) -> tuple:
        """(layer caches, pending keys and values per layer, pending canvas)."""
        n = len(self.layers)
        if cache is None:
            raise NoNextTokenLogits(NO_NEXT_TOKEN_LOGITS)
        if len(cache) != 2 * n + 1:
            raise ValueError(
                "DiffusionGemma generates against its own cache: pass cache=mlx_lm.models.cache."
                "make_prompt_cache(model) (or model.make_cache())"
            )
        layers = cache[:n]
        for i, c in enumerate(layers):
            if not isinstance(c, LAYER_CACHES):
                raise ValueError(
                    f"cache entry {i} is a {type(c).__name__}; DiffusionGemma needs the KVCache / RotatingKVCache "
                    "of make_prompt_cache, or mlx-lm's batch versions of them (a quantized KV cache, --kv-bits, "
                    "is not supported)"
                )
        for i, c in enumerate(cache[n:], start=n):
            if not isinstance(c, (ConcatenateKVCache, BatchHeld)):
                raise ValueError(f"cache entry {i} is a {type(c).__name__}; expected the held canvas entries of make_cache")
        return layers, cache[n : 2 * n], cache[2 * n]

    def _held_at(self, pending, index: list, L: int) -> list:
        """Per layer, each row's held keys and values at positions index[r] .. + L
        ([B, h, L, d]; clipped for rows that hold none there)."""
        last = max(_held_arrays(pending[0])[0].shape[2] - 1, 0)  # every layer's entry holds the same positions
        at = mx.clip(mx.array(index)[:, None] + mx.arange(L), 0, last)[:, None, :, None]
        return [tuple(mx.take_along_axis(a, at, axis=2) for a in _held_arrays(entry)[:2]) for entry in pending]

    def _next_canvases(self, rows: list, layers, pending, canvas, tokens: list, starts: list, offsets: list) -> tuple:
        """Denoise the next canvas of these rows together, each against its
        context and the rest of the canvas it is handing out (committed
        ahead: those keys and values are held already), and hold it after
        the canvas that holds the last token fed (so that trimming back one
        token at a canvas boundary, as mlx-lm's server does, and feeding it
        again still continues the text). The new canvas's keys and values are
        the ones committing it would write."""
        C = self.args.canvas_length
        ends = [starts[r] + len(tokens[r]) if tokens[r] else offsets[r] for r in rows]
        rest = [end - offsets[r] for end, r in zip(ends, rows)]
        if isinstance(layers[0], (BatchKVCache, BatchRotatingKVCache)):
            own = self._denoising_caches(layers, pending, rows, [offsets[r] - starts[r] for r in rows], rest, ends)
        else:  # one sequence, holding nothing to hand out
            own = layers
        new = self._denoise(own)
        added = self.lookahead(new, own)
        changes = {}
        for i, (r, canvas_tokens) in enumerate(zip(rows, new.tolist())):
            kept = len(tokens[r]) - (offsets[r] - 1 - starts[r]) // C * C if tokens[r] else 0
            changes[r] = RowChange(kept, ends[i] - kept, canvas_tokens, [(k[i : i + 1], v[i : i + 1]) for k, v in added])
        return self._change_held(pending, canvas, changes)

    def _denoising_caches(self, layers, pending, rows: list, at: list, counts: list, lengths: list) -> list:
        """Per layer, a batch cache of `rows` as committing the held tokens
        at[i] .. at[i] + counts[i] of row rows[i] would leave it (lengths[i]
        tokens in all), built from
        their held keys and values (no encoder pass): each row's context,
        then those tokens, real tokens ending at the same index (left
        padding, as mlx-lm's BatchKVCache keeps rows), a sliding layer's
        last window - 1 of them. Only as much padding as the longest row
        needs: mlx-lm's BatchRotatingKVCache keeps what each row joining
        added, and attention would read it at every step. Room for the
        canvas after it, which each step writes there and takes back."""
        index, R, C = mx.array(rows), max(counts), self.args.canvas_length
        everyone = [0] * len(_held_arrays(pending[0])[2])
        for r, a in zip(rows, at):
            everyone[r] = a
        shift = mx.array([R - n for n in counts])[:, None]
        offset = mx.array(lengths)
        caches = []
        for c, held, kind in zip(layers, self._held_at(pending, everyone, R), self.args.layer_types):
            real = min(max(lengths), self.args.sliding_window - 1) if kind == "sliding_attention" else max(lengths)
            keys, values = (
                dynamic_roll(mx.concatenate([past[index], later[index]], axis=2), shift, axis=2)
                for past, later in zip(context(c), held)
            )
            keys, values = (mx.pad(a[..., a.shape[2] - real :, :], [(0, 0), (0, 0), (0, C), (0, 0)]) for a in (keys, values))
            caches.append(make_batch_cache(keys, values, offset, real - mx.minimum(offset, real), real))
        return caches

    def _eos_ids(self) -> list:
        """The checkpoint's eos ids (config.json's first, then generation_config.json's)."""
        ids = []
        for eos in (self.args.eos_token_id, self.generation_config.get("eos_token_id", ())):
            ids += [e for e in token_ids(eos) if e not in ids]
        return ids

    def _stops(self, tokens: list) -> bool:
        """Whether these tokens hold an eos id of the checkpoint's: mlx-lm
        stops the row there, so a canvas ahead would be wasted."""
        return not set(self._eos_ids()).isdisjoint(tokens)

    def _change_held(self, pending, canvas, changes: dict) -> tuple:
        """Change what some rows hold (`changes`: row -> RowChange). Returns
        every row's (tokens, starts)."""
        tokens, starts = _canvases(canvas)
        for layer, entry in enumerate(pending):
            keys, values, lengths = _held_arrays(entry)
            rows = []
            for r, n in enumerate(lengths):
                kept, added = (changes[r].kept, changes[r].keys_values) if r in changes else (n, [])
                row = (keys[r : r + 1, :, n - kept : n], values[r : r + 1, :, n - kept : n])
                if added:
                    row = tuple(mx.concatenate([old, new], axis=2) for old, new in zip(row, added[layer]))
                rows.append(row)
            _set_held(entry, rows)
        for r, (kept, start, new_tokens, _) in changes.items():
            tokens[r] = tokens[r][len(tokens[r]) - kept :] + new_tokens
            starts[r] = start
        _set_held(canvas, [_canvas_row(t, s) for t, s in zip(tokens, starts)])
        mx.eval([entry.state for entry in pending], canvas.state)
        return tokens, starts

    def _denoise(self, cache) -> mx.array:
        """A canvas per row of `cache` ([B, C] ids), as the reference denoises it."""
        options = DiffusionOptions.resolve(self, None, {})
        stopping = StableAndConfidentStopping(options.stability_threshold, options.confidence_threshold)
        B = _rows(cache[0])
        randomness = Randomness(rows=B)
        canvas = randomness.uniform_ids((B, self.args.canvas_length), self.args.vocab_size)
        final = [None] * B
        for rows, argmax, _, _ in denoise_canvas(self, cache, canvas, options, randomness, options.make_acceptance(), stopping):
            for i, r in enumerate(rows):
                final[r] = argmax[i]
        return mx.stack(final)


def _offsets(cache) -> list:
    """Each row's count of tokens in a layer cache."""
    return cache.offset.tolist() if isinstance(cache.offset, mx.array) else [cache.offset]


def _rows(cache) -> int:
    return cache.offset.size if isinstance(cache.offset, mx.array) else 1
