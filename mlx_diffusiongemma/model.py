"""DiffusionGemma text model in MLX: a causal encoder that fills a KV cache and a
bidirectional decoder that denoises a canvas against it (reference:
transformers.models.diffusion_gemma).

Encoder and decoder share every weight except the per-layer `layer_scalar`, so the
layers live once, under `model.decoder.layers`; the encoder holds only its scalars.
Parameter paths are the checkpoint names, so `tree_flatten(model.parameters())`
lists exactly the keys of a converted checkpoint.
"""

import copy
import math
from functools import partial
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Dict, List, Optional

import mlx.core as mx
import numpy as np
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace
from mlx_lm.models.base import BaseModelArgs, scaled_dot_product_attention
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, KVCache, RotatingKVCache
from mlx_lm.models.gemma4_text import RMSNormNoScale, Router, geglu, logit_softcap
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchLinear

from .mlx_lm_internals import kv_cache_context, rotating_in_order  # a leaf: imports nothing of the package

MODEL_TYPE = "diffusion_gemma"
# The vision tower's weights: a text-only port drops them (mlx-vlm reads them).
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")

_REQUIRED_TEXT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "num_experts",
    "top_k_experts",
    "moe_intermediate_size",
)

_DEFAULT_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    "full_attention": {
        "rope_type": "proportional",
        "partial_rotary_factor": 0.25,
        "rope_theta": 1_000_000.0,
    },
}


# mlx holds each dimension of an array as a 32-bit int: a larger size is an
# OverflowError (or, multiplied out, a MemoryError) from deep inside mlx.
_DIMENSION_LIMIT = 2**31
MAX_LAYERS = 4096  # the released model has 30


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value >= _DIMENSION_LIMIT:
        raise ValueError(f"{name} must be below 2**31 (mlx's largest dimension), got {value!r}")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


@dataclass
class ModelArgs(BaseModelArgs):
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_experts: int
    top_k_experts: int
    moe_intermediate_size: int
    canvas_length: int  # no default: a wrong canvas length makes a model write garbage
    model_type: str = MODEL_TYPE
    layer_types: Optional[List[str]] = None
    # Per-layer attention overrides ({layer index: {"head_dim", "num_key_value_heads"}}),
    # filled from either config form in `from_dict`.
    per_layer_config: Dict[int, Dict[str, int]] = field(default_factory=dict)
    rope_parameters: Optional[Dict[str, Dict[str, Any]]] = None
    sliding_window: int = 512
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float = 30.0
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    use_bidirectional_attention: Optional[str] = None
    max_position_embeddings: int = 131_072
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: Any = 1

    def __post_init__(self):
        # Checked here so a bad config is one ValueError naming the field, not a
        # TypeError or ZeroDivisionError from deep inside the model.
        for name in (*_REQUIRED_TEXT_FIELDS, "canvas_length", "sliding_window", "max_position_embeddings"):
            _check_int(name, getattr(self, name))
        if self.num_hidden_layers > MAX_LAYERS:  # a larger list of layers takes minutes to build before weights refuse it
            raise ValueError(f"num_hidden_layers must be at most {MAX_LAYERS}, got {self.num_hidden_layers}")
        if self.canvas_length > self.max_position_embeddings:
            raise ValueError(
                f"canvas_length ({self.canvas_length}) must fit the context, max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        if self.top_k_experts > self.num_experts:
            raise ValueError(
                f"top_k_experts ({self.top_k_experts}) must not exceed num_experts ({self.num_experts})"
            )
        for name in ("rms_norm_eps", "final_logit_softcapping"):
            _check_number(name, getattr(self, name))
        # Copies throughout: the caller's config (a dict `convert` saves) must not change.
        if self.layer_types is None:  # the reference's 5 sliding : 1 full pattern
            self.layer_types = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ]
        if not isinstance(self.layer_types, (list, tuple)):
            raise ValueError(f"layer_types must be a list, got {self.layer_types!r}")
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but "
                f"num_hidden_layers is {self.num_hidden_layers}"
            )
        self.layer_types[-1] = "full_attention"  # the reference forces this too
        unknown = {repr(t) for t in self.layer_types if t not in ("sliding_attention", "full_attention")}
        if unknown:  # reprs: an entry may be unhashable
            raise ValueError(f"unknown layer type(s) in layer_types: {', '.join(sorted(unknown))}")
        for name in ("rope_parameters", "per_layer_config"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{name} must be an object, got {value!r}")
        rope = copy.deepcopy(_DEFAULT_ROPE)
        rope.update(copy.deepcopy(self.rope_parameters or {}))
        self.rope_parameters = rope
        self._check_rope()
        per_layer = {}
        for key, override in (self.per_layer_config or {}).items():
            if not isinstance(override, dict) or not str(key).isdigit():
                raise ValueError(f"per_layer_config must map layer indices to objects, got {key!r}: {override!r}")
            for name in ("head_dim", "num_key_value_heads"):
                if name in override:
                    _check_int(f"per_layer_config[{key}].{name}", override[name])
            per_layer[int(key)] = dict(override)
        self.per_layer_config = per_layer
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(
                f"hidden_activation {self.hidden_activation!r} is not supported "
                "(DiffusionGemma uses 'gelu_pytorch_tanh')"
            )
        if not isinstance(self.attention_bias, bool):
            raise ValueError(f"attention_bias must be true or false, got {self.attention_bias!r}")
        if self.use_bidirectional_attention not in (None, "all", "vision"):
            raise ValueError(
                "use_bidirectional_attention must be 'all', 'vision' or null, "
                f"got {self.use_bidirectional_attention!r}"
            )
        self.check_token_ids("eos_token_id", self.eos_token_id)
        self._check_widths()
        if self.num_attention_heads * self.canvas_length**2 >= _DIMENSION_LIMIT:
            raise ValueError(
                f"canvas_length {self.canvas_length} is too long to denoise: one canvas's attention scores "
                f"(num_attention_heads x canvas_length**2) must stay below 2**31"
            )

    def _check_rope(self) -> None:
        """The entries the two attention kinds read, as `initialize_rope` uses
        them (it checks rope_type itself)."""
        for kind in ("sliding_attention", "full_attention"):
            entry = self.rope_parameters[kind]
            if not isinstance(entry, dict):
                raise ValueError(f"rope_parameters.{kind} must be an object, got {entry!r}")
            _check_number(f"rope_parameters.{kind}.rope_theta", entry.get("rope_theta"))
            for name in ("factor", "partial_rotary_factor"):
                if name in entry:
                    _check_number(f"rope_parameters.{kind}.{name}", entry[name])
            if entry.get("partial_rotary_factor", 1) > 1:
                raise ValueError(
                    f"rope_parameters.{kind}.partial_rotary_factor must be at most 1, "
                    f"got {entry['partial_rotary_factor']!r}"
                )

    def _check_widths(self) -> None:
        """The projections' widths are products of fields: each must fit an mlx
        dimension too (see `_DIMENSION_LIMIT`)."""
        widths = {"2 * moe_intermediate_size": 2 * self.moe_intermediate_size}
        shapes = {"": (self.head_dim, self.num_key_value_heads)}
        shapes.update((f" of layer {i}", self.attention_shape(i)) for i in self.per_layer_config)
        for where, (head_dim, kv_heads) in shapes.items():
            widths[f"num_attention_heads * head_dim{where}"] = self.num_attention_heads * head_dim
            widths[f"num_key_value_heads * head_dim{where}"] = kv_heads * head_dim
        for name, width in widths.items():
            if width >= _DIMENSION_LIMIT:
                raise ValueError(f"{name} must be below 2**31 (mlx's largest dimension), got {width}")

    def check_token_ids(self, name: str, value) -> list:
        """`value`, a token id or a list of them, as a list; each must be in
        [0, vocab_size) (eos ids are compared with sampled tokens)."""
        ids = [value] if isinstance(value, int) else value
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in ids
        ):
            raise ValueError(
                f"{name} must be a token id or a list of them, in [0, {self.vocab_size}), got {value!r}"
            )
        return list(ids)

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        """Build from a config.json dict (nested `text_config`, or a flat text config).

        Null values mean unset. Full-attention overrides may be given as
        `per_layer_config` or, in older files, as `global_head_dim` /
        `num_global_key_value_heads`. `params` is never changed.
        """
        if not isinstance(params, dict):
            raise ValueError(f"the config must be an object, got {type(params).__name__}")
        text = params.get("text_config", params)
        if not isinstance(text, dict):
            raise ValueError("'text_config' must be an object")
        text = {k: v for k, v in text.items() if v is not None}
        missing = [name for name in _REQUIRED_TEXT_FIELDS if name not in text]
        if missing:
            raise ValueError(f"text_config is missing required field(s): {', '.join(missing)}")
        if params.get("canvas_length") is None:
            raise ValueError(
                "config has no canvas_length (the block of tokens the model denoises at once, "
                "256 for the released model); set it at the top level"
            )
        fields = {k: v for k, v in text.items() if k in cls.__dataclass_fields__}
        fields["model_type"] = params.get("model_type", MODEL_TYPE)
        fields["canvas_length"] = params["canvas_length"]
        if text.get("use_bidirectional_attention") == "all":
            # The reference stores the window for an exclusive-bounds kernel.
            window = text.get("sliding_window", 512)
            _check_int("sliding_window", window)
            fields["sliding_window"] = window // 2 + 1
        args = cls(**fields)
        if "per_layer_config" not in text:
            override = {"head_dim": text.get("global_head_dim", 512)}
            _check_int("global_head_dim", override["head_dim"])
            if text.get("num_global_key_value_heads") is not None:
                override["num_key_value_heads"] = text["num_global_key_value_heads"]
                _check_int("num_global_key_value_heads", override["num_key_value_heads"])
            args.per_layer_config = {
                i: dict(override)
                for i, kind in enumerate(args.layer_types)
                if kind == "full_attention"
            }
            args._check_widths()
        return args

    def attention_shape(self, layer_idx: int):
        """(head_dim, num_key_value_heads) of one layer, overrides applied."""
        override = self.per_layer_config.get(layer_idx, {})
        return (
            override.get("head_dim", self.head_dim),
            override.get("num_key_value_heads", self.num_key_value_heads),
        )


def _context(cache) -> tuple:
    """The cached context's keys and values, in temporal order, as a chunk
    after it attends to them: a sliding layer's last `window - 1` tokens, as
    the reference's sliding cache keeps them; a full layer's all. In a
    batch's BatchRotatingKVCache each row's context ends at the same index
    (left padding)."""
    if isinstance(cache, (RotatingKVCache, BatchRotatingKVCache)):
        past_keys, past_values = (rotating_in_order(cache, v) for v in (cache.keys, cache.values))
    elif isinstance(cache, BatchKVCache):
        past_keys, past_values = cache.keys_and_values()
    else:
        past_keys, past_values = kv_cache_context(cache)
    if isinstance(cache, (RotatingKVCache, BatchRotatingKVCache)):
        first = past_keys.shape[2] - min(cache.max_size - 1, past_keys.shape[2])
        past_keys, past_values = past_keys[..., first:, :], past_values[..., first:, :]
    return past_keys, past_values


def _with_context(cache, keys: mx.array, values: mx.array) -> tuple:
    """A chunk's keys and values after the cached context, the cache untouched."""
    return _appended(None if cache.keys is None else _context(cache), keys, values)


def _appended(context: Optional[tuple], keys: mx.array, values: mx.array) -> tuple:
    """Keys and values after a context's (None: no context)."""
    if context is None:
        return keys, values
    return tuple(mx.concatenate([past, new], axis=2) for past, new in zip(context, (keys, values)))


def _after_context(cache, keys: mx.array, values: mx.array) -> tuple:
    """A canvas's keys and values after the cached context, the cache holding
    the same tokens afterwards, and the mask of the context's padding (None
    for one sequence). A full layer's cache takes them into the slots after
    its tokens and gives them back (trim): attention reads the context where
    it lies, with no copy of it per step, and the next step or commit
    overwrites those slots. A sliding layer's context, at most a window, is
    copied in temporal order.

    A batch's caches (mlx-lm's BatchKVCache / BatchRotatingKVCache) hold the
    rows left-padded: row r's context is its last `offset[r]` entries, and
    the padding before them is masked out, as the reference masks a padded
    prompt (its decoder attention mask)."""
    canvas = keys.shape[2]
    if isinstance(cache, BatchKVCache):
        real = cache.offset
        keys, values = cache.update_and_fetch(keys, values)
        cache.trim(canvas)
        return keys, values, _padding_mask(real, keys.shape[2] - canvas, canvas)
    if isinstance(cache, BatchRotatingKVCache):
        keys, values = _with_context(cache, keys, values)
        return keys, values, _padding_mask(cache.offset, keys.shape[2] - canvas, canvas)
    if isinstance(cache, KVCache):
        both = cache.update_and_fetch(keys, values)
        cache.trim(canvas)
        return (*both, None)
    return (*_with_context(cache, keys, values), None)


def _padding_mask(real: mx.array, context: int, canvas: int) -> mx.array:
    """[B, 1, 1, context + canvas] True where a key is row b's: the last
    real[b] entries of the context (fewer than `context`: padding before
    them), and the whole canvas."""
    start = context - mx.minimum(real, context)
    return (mx.arange(context + canvas)[None] >= start[:, None])[:, None, None, :]


def _chunk_mask(real: mx.array, context: int, length: int, window: Optional[int]) -> mx.array:
    """[B, 1, L, context + L] for a causal chunk after a batch's context:
    query i (at context + i) sees the keys up to itself, within the sliding
    window if any, and none of the padding before a row's real tokens."""
    query = context + mx.arange(length)[:, None]
    key = mx.arange(context + length)[None]
    mask = key <= query
    if window is not None:
        mask = mask & (key > query - window)
    return mask[None, None] & _padding_mask(real, context, length)


class _Lookahead:
    """A layer cache as the encoder sees it, with the encoder's write set
    aside instead of applied: the chunk attends to the same keys, under the
    same mask, as `update_and_fetch` would give it. A batch's mask is built
    here from each row's real token count: mlx-lm 0.32's BatchRotatingKVCache
    masks a multi-token chunk wrongly once one-token writes have wrapped its
    ring (mlx-lm's decode loop writes one token at a time)."""

    def __init__(self, cache):
        self.cache, self.offset = cache, cache.offset
        self.context = None if cache.keys is None else _context(cache)
        self.keys = self.values = None

    def make_mask(self, N: int, window_size: Optional[int] = None, **kwargs):
        if not isinstance(self.cache, (BatchKVCache, BatchRotatingKVCache)):
            return self.cache.make_mask(N, window_size=window_size, **kwargs)
        context = 0 if self.context is None else self.context[0].shape[2]
        return _chunk_mask(self.cache.offset, context, N, window_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple:
        self.keys, self.values = keys, values
        return _appended(self.context, keys, values)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.is_sliding = args.layer_types[layer_idx] == "sliding_attention"
        self.head_dim, self.n_kv_heads = args.attention_shape(layer_idx)
        self.n_heads = args.num_attention_heads
        dim, bias = args.hidden_size, args.attention_bias

        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        if self.is_sliding:  # full layers use the raw k_proj output as values
            self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.v_norm = RMSNormNoScale(self.head_dim, eps=args.rms_norm_eps)

        rope = args.rope_parameters["sliding_attention" if self.is_sliding else "full_attention"]
        self.rope = initialize_rope(
            dims=self.head_dim,
            traditional=False,
            base=rope["rope_theta"],
            scaling_config=rope,
            max_position_embeddings=args.max_position_embeddings,
        )
        self.sharding_group = None  # set by `shard`: o_proj's output is then this rank's share

    def project(self, x: mx.array, offset) -> tuple:
        """Queries, keys and values [B, heads, L, head_dim] of a chunk at `offset`."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        k_raw = self.k_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, self.head_dim) if self.is_sliding else k_raw

        q = self.rope(q.transpose(0, 2, 1, 3), offset=offset)
        k = self.rope(self.k_norm(k_raw).transpose(0, 2, 1, 3), offset=offset)
        v = self.v_norm(v).transpose(0, 2, 1, 3)
        return q, k, v

    def output(self, attended: mx.array) -> mx.array:
        B, _, L, _ = attended.shape
        out = self.o_proj(attended.transpose(0, 2, 1, 3).reshape(B, L, -1))
        if self.sharding_group is not None:
            out = mx.distributed.all_sum(out, group=self.sharding_group)
        return out

    def splits(self, N: int) -> bool:
        """Whether the heads split across N ranks: each rank gets as many query
        heads, all reading as many kv heads (the kv heads divide among the
        ranks, or each rank's query heads share one), and a quantized o_proj's
        groups do not straddle ranks."""
        if self.n_heads % N or (self.n_kv_heads % N and N % self.n_kv_heads):
            return False
        return self.n_heads // N * self.head_dim % _quantization_unit(self.o_proj) == 0

    def shard(self, group) -> None:
        """Keep this rank's query heads and the kv heads they read (the
        reference's tp plan: q/k/v colwise, o rowwise); `output` sums the ranks'
        o_proj results. Heads that do not split (`splits`) stay whole on every
        rank: exact, and no communication."""
        N, rank = group.size(), group.rank()
        if not self.splits(N):
            return
        shard_inplace(self.q_proj, "all-to-sharded", group=group)
        shard_inplace(self.o_proj, "sharded-to-all", group=group)
        if "bias" in self.o_proj and rank:  # added once, to the sum
            self.o_proj.bias = mx.zeros_like(self.o_proj.bias)
        # full layers have no v_proj: their values are k_proj's output, split with it
        kv = [self.k_proj, *([self.v_proj] if self.is_sliding else [])]
        if self.n_kv_heads % N == 0:
            for proj in kv:
                shard_inplace(proj, "all-to-sharded", group=group)
            self.n_kv_heads //= N
        else:  # more ranks than kv heads: this rank's query heads all read one
            head = rank * self.n_kv_heads // N
            for proj in kv:
                _keep_outputs(proj, [(head * self.head_dim, (head + 1) * self.head_dim)])
            self.n_kv_heads = 1
        self.n_heads //= N
        self.sharding_group = group


def attend(q: mx.array, k: mx.array, v: mx.array, mask=None) -> mx.array:
    return scaled_dot_product_attention(q, k, v, cache=None, scale=1.0, mask=mask)


def _quantization_unit(module: nn.Module) -> int:
    """How many input features a linear or switch layer keeps together: its
    quantization group (1 when it is not quantized)."""
    return module.group_size if "scales" in module else 1


def _keep_outputs(module: nn.Module, spans: list) -> None:
    """Keep the output features in `spans` ([(start, stop)], in order) of a
    linear or switch layer: rows of its weight and of the quantization scales
    and biases (groups run along the inputs), entries of its bias."""
    update = {}
    for name, rows in (("weight", -2), ("scales", -2), ("biases", -2), ("bias", -1)):
        if name in module:
            tail = (slice(None),) * (-rows - 1)
            parts = [module[name][(..., slice(start, stop), *tail)] for start, stop in spans]
            update[name] = mx.contiguous(mx.concatenate(parts, axis=rows))
    module.update(update)


def _keep_inputs(module: nn.Module, start: int, stop: int, size: int) -> None:
    """Keep input features [start, stop) of `size` of a linear or switch layer
    (a quantized weight packs `size` inputs into its last axis, the scales and
    biases one entry per group; `start` and `stop` sit on group boundaries).
    A bias stays whole: the caller sums the ranks' outputs."""
    update = {}
    for name in ("weight", "scales", "biases"):
        if name in module:
            a = module[name]
            per = a.shape[-1]
            update[name] = mx.contiguous(a[..., start * per // size : stop * per // size])
    module.update(update)


def _intermediate(block: nn.Module) -> tuple:
    """(width, unit) of a GeGLU block (MLP, SelfConditioning, Experts): its
    intermediate features, and how many of them a share must keep together
    (down_proj's quantization group)."""
    rows = block.gate_up_proj.weight.shape[-2] // 2 if isinstance(block, Experts) else block.gate_proj.weight.shape[-2]
    return rows, _quantization_unit(block.down_proj)


def _intermediate_span(block: nn.Module, group, name: str) -> tuple:
    """This rank's share [start, stop) of a GeGLU block's intermediate
    features: contiguous, cut on quantization group boundaries, as even as
    they allow. mlx's `shard_inplace` cuts into equal parts, which the released
    4-bit experts (704 = 11 groups of 64) and dense blocks (2112 = 33) do not
    allow (two ranks hold 6 and 5 groups of each expert)."""
    width, unit = _intermediate(block)
    N, rank = group.size(), group.rank()
    pieces = width // unit
    if pieces < N:
        groups = f" = {pieces} quantization group(s) of {unit}" if unit > 1 else ""
        raise ValueError(f"cannot split {name} across {N} ranks: its intermediate size is {width}{groups}")
    return unit * (pieces * rank // N), unit * (pieces * (rank + 1) // N)


def _keep_intermediate(block: nn.Module, start: int, stop: int) -> None:
    """Keep a GeGLU block's intermediate features [start, stop): gate and up
    rows (the experts' fused gate_up_proj keeps the matching rows of both
    halves, gate first), down_proj columns. The ranks' outputs sum to the
    whole block's."""
    width, _ = _intermediate(block)
    if isinstance(block, Experts):
        _keep_outputs(block.gate_up_proj, [(start, stop), (width + start, width + stop)])
    else:
        _keep_outputs(block.gate_proj, [(start, stop)])
        _keep_outputs(block.up_proj, [(start, stop)])
    _keep_inputs(block.down_proj, start, stop, width)


class MLP(nn.Module):
    """Dense GeGLU feed-forward (also the shape of the self-conditioning block)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class Experts(nn.Module):
    """Mixture of experts on SwitchLinear, keeping the checkpoint's fused
    `gate_up_proj` ([E, 2I, H], gate rows first) so names match mlx-community repos."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        H, I, E = args.hidden_size, args.moe_intermediate_size, args.num_experts
        self.gate_up_proj = SwitchLinear(H, 2 * I, E, bias=False)
        self.down_proj = SwitchLinear(I, H, E, bias=False)

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        x = mx.expand_dims(x, (-2, -3))
        indices = mx.stop_gradient(indices)
        if indices.size < 64:  # grouping rows by expert pays off past a few tokens
            y = self._project(x, indices, sorted_indices=False).squeeze(-2)
        else:
            order = mx.argsort(indices.flatten())
            rows = x.reshape(-1, x.shape[-1])[order // indices.shape[-1]]  # [R, H], grouped by expert
            experts = indices.flatten()[order]
            if _tiles_pay_off(experts.size, self.gate_up_proj.num_experts):
                tiles, tile_experts, back = _tiles(rows, experts, self.gate_up_proj.num_experts)
                y = self._project(tiles, tile_experts, sorted_indices=True).reshape(-1, x.shape[-1])[back]
            else:
                y = self._project(rows[:, None], experts, sorted_indices=True)[:, 0]
            y = y[mx.argsort(order)].reshape(*indices.shape, -1)
        return (y * mx.expand_dims(weights, -1)).sum(-2)

    def _project(self, x: mx.array, experts: mx.array, sorted_indices: bool) -> mx.array:
        gate, up = mx.split(self.gate_up_proj(x, experts, sorted_indices=sorted_indices), 2, axis=-1)
        return self.down_proj(geglu(gate, up), experts, sorted_indices=sorted_indices)


ROWS_PER_TILE = 32


def _tiles_pay_off(rows: int, num_experts: int) -> bool:
    """mlx's CPU gather_mm multiplies row by row, reading an expert's weights
    again for every row; tiles of one expert's rows make those matrix
    products. Worth their padding (up to a tile per expert) once experts get
    about half a tile of rows on average. GPU kernels group sorted rows themselves."""
    return mx.default_device() == mx.cpu and rows * 2 >= num_experts * ROWS_PER_TILE


def _tiles(rows: mx.array, experts: mx.array, num_experts: int) -> tuple:
    """Rows grouped by expert ([R, H], `experts` [R] ascending) cut into tiles of
    ROWS_PER_TILE rows of one expert each, zero-padded: ([n, T, H] tiles, [n]
    their experts, [R] where each row lands in the flattened tiles). n is
    static (ceil(R / T) + E bounds the tiles any routing needs), so nothing
    waits for the routing's counts; spare tiles are all padding."""
    R, T = experts.size, ROWS_PER_TILE
    counts = (experts[:, None] == mx.arange(num_experts)).sum(0)
    first_row = mx.cumsum(counts) - counts
    tiles_per_expert = (counts + T - 1) // T
    first_tile = mx.cumsum(tiles_per_expert) - tiles_per_expert
    tile = mx.arange(-(-R // T) + num_experts)
    tile_experts = (first_tile <= tile[:, None]).sum(-1) - 1
    within = (tile - first_tile[tile_experts])[:, None] * T + mx.arange(T)  # [n, T] row within its expert
    valid = within < counts[tile_experts][:, None]
    source = mx.minimum(first_row[tile_experts][:, None] + within, R - 1)
    tiles = mx.where(valid[..., None], rows[source], 0)
    back = first_tile[experts] * T + mx.arange(R) - first_row[experts]
    return tiles, tile_experts, back


class TransformerLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(dim, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(args)
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(dim, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(dim, eps=eps)
        self.pre_feedforward_layernorm_2 = nn.RMSNorm(dim, eps=eps)
        self.post_feedforward_layernorm_1 = nn.RMSNorm(dim, eps=eps)
        self.post_feedforward_layernorm_2 = nn.RMSNorm(dim, eps=eps)
        self.layer_scalar = mx.ones((1,))
        self.sharding_group = None  # set by `Model.shard`: mlp and experts then give this rank's share

    def __call__(self, x, cache, mask, layer_scalar: mx.array) -> mx.array:
        """The encoder's pass: the chunk attends to what `cache.update_and_fetch`
        gives (a layer cache appends it, a `_Lookahead` sets it aside). The
        decoder runs `project` and `finish` itself, compiled (`Model.decode`)."""
        q, k, v = self.project(x, cache.offset)
        k, v = cache.update_and_fetch(k, v)
        return self.finish(x, attend(q, k, v, mask), layer_scalar)

    def project(self, x: mx.array, offset) -> tuple:
        return self.self_attn.project(self.input_layernorm(x), offset)

    def finish(self, x: mx.array, attended: mx.array, layer_scalar: mx.array) -> mx.array:
        """Everything after the attention itself: its output projection and the feed-forward blocks."""
        h = x + self.post_attention_layernorm(self.self_attn.output(attended))
        dense = self.mlp(self.pre_feedforward_layernorm(h))
        indices, weights = self.router(h)  # the router reads the raw residual
        sparse = self.experts(self.pre_feedforward_layernorm_2(h), indices, weights)
        if self.sharding_group is not None:
            dense, sparse = _all_sum_both(dense, sparse, self.sharding_group)
        dense = self.post_feedforward_layernorm_1(dense)
        sparse = self.post_feedforward_layernorm_2(sparse)
        return (h + self.post_feedforward_layernorm(dense + sparse)) * layer_scalar


def _all_sum_both(dense: mx.array, sparse: mx.array, group) -> tuple:
    """The ranks' shares of the dense MLP and of the experts, each summed.
    The reference normalises each block's whole output (post_feedforward_layernorm_1
    / _2) before adding them, so each sum must come before its norm; one
    all-reduce of both halves the count (latency) at the same volume."""
    both = mx.distributed.all_sum(mx.stack([dense, sparse]), group=group)  # in the wider dtype
    return both[0].astype(dense.dtype), both[1].astype(sparse.dtype)


class SelfConditioning(nn.Module):
    """Adds the previous step's soft prediction to the canvas embeddings."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.pre_norm = nn.RMSNorm(dim, eps=args.rms_norm_eps)
        self.gate_proj = nn.Linear(dim, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(dim, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, dim, bias=False)
        self.post_norm = RMSNormNoScale(dim, eps=args.rms_norm_eps)
        self.sharding_group = None  # set by `Model.shard`: down_proj then gives this rank's share

    def __call__(self, embeddings: mx.array, soft_embeddings: Optional[mx.array]) -> mx.array:
        # Without a previous prediction the block adds exactly zero (gelu(0) * 0).
        if soft_embeddings is not None:
            s = self.pre_norm(soft_embeddings)
            added = self.down_proj(geglu(self.gate_proj(s), self.up_proj(s)))
            if self.sharding_group is not None:
                added = mx.distributed.all_sum(added, group=self.sharding_group)
            embeddings = embeddings + added
        return self.post_norm(embeddings)


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)


class EncoderLayer(nn.Module):
    """The encoder's own share of a layer: everything else is the decoder's."""

    def __init__(self):
        super().__init__()
        self.layer_scalar = mx.ones((1,))


class EncoderLanguageModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = [EncoderLayer() for _ in range(args.num_hidden_layers)]


class Encoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.language_model = EncoderLanguageModel(args)


class DiffusionGemmaModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.encoder = Encoder(args)
        self.decoder = Decoder(args)


def _token_batch(ids) -> mx.array:
    """Token ids (list, numpy or mx array; [L] or [B, L]) as an mx array [B, L]."""
    ids = ids if isinstance(ids, mx.array) else mx.array(np.asarray(ids))
    return ids[None] if ids.ndim == 1 else ids


def soft_embed(embedding: nn.Module, probs: mx.array) -> mx.array:
    """probs @ embedding table, for plain and quantized embeddings alike."""
    if isinstance(embedding, nn.QuantizedEmbedding):
        return mx.quantized_matmul(
            probs,
            embedding.weight,
            embedding.scales,
            embedding.get("biases"),
            transpose=False,
            group_size=embedding.group_size,
            bits=embedding.bits,
            mode=embedding.mode,
        )
    return probs @ embedding.weight


def soft_embed_top_k(embedding: nn.Module, ids: mx.array, probs: mx.array) -> mx.array:
    """sum_j probs_j * embedding[ids_j] ([..., k] each -> [..., H]): the rows
    come through the embedding itself, so a quantized table is dequantized
    for those rows only, never copied whole."""
    rows = embedding(ids)
    return (probs.astype(rows.dtype)[..., None, :] @ rows).squeeze(-2)


class GenerationConfig(Mapping):
    """generation_config.json's settings, read-only. Not a dict, which
    nn.Module would take for a child module; unlike a MappingProxyType it can be
    deep-copied (mlx-lm's DWQ and dynamic quantization deep-copy the model)."""

    def __init__(self, settings: Optional[dict] = None):
        self._settings = dict(settings or {})

    def __getitem__(self, key):
        return self._settings[key]

    def __iter__(self):
        return iter(self._settings)

    def __len__(self) -> int:
        return len(self._settings)

    def __repr__(self) -> str:
        return f"GenerationConfig({self._settings!r})"


def _check_shared_bias(key: str, value: mx.array, weights: dict) -> None:
    """The encoder runs on the decoder's layers. The reference ties every
    encoder weight to the decoder's but not the biases (transformers ties only
    weights), so a checkpoint with attention biases could hold two different
    sets; this port has one."""
    decoder_key = "model.decoder." + key[len("model.encoder.language_model.") :]
    shared = weights.get(decoder_key)
    if shared is None or shared.shape != value.shape or not mx.array_equal(shared, value).item():
        raise ValueError(
            f"{key} differs from {decoder_key}: this port shares the decoder's layers with the encoder, "
            "biases included, and cannot run a checkpoint whose encoder has biases of its own"
        )


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DiffusionGemmaModel(args)
        self.generation_config = GenerationConfig()  # set by `load_model`

    @property
    def layers(self):
        return self.model.decoder.layers

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype (norm weights are never quantized)."""
        return self.model.decoder.norm.weight.dtype

    def shard(self, group: Optional[mx.distributed.Group] = None) -> None:
        """Tensor parallelism over `group` (default: mx.distributed.init()), in
        place; mlx-lm's `sharded_load` calls this. Each rank keeps its share of
        the attention heads, of the dense MLP's, the experts' and the
        self-conditioning block's intermediate features, and sums the shares
        where the reference adds them up: after o_proj (one all-reduce), after
        the dense MLP and the experts together (one, before their post-norms),
        after the self-conditioning block. Embeddings, lm_head, norms and router
        stay whole, so every rank computes the same logits.

        The experts split along each expert's width (the reference's tp plan:
        gate_up_proj packed_colwise, down_proj rowwise) rather than by expert:
        with the decoder's static shapes a rank holding half the experts would
        still multiply every routed row (the others' with weight zero), where
        half the width halves the work of every row, whatever the routing.

        Attention whose heads cannot split evenly (`Attention.splits`) stays
        whole on every rank. A block narrower than the group (in quantization
        groups) is an error naming it, raised before any weight changes."""
        if any(layer.sharding_group is not None for layer in self.layers):
            raise ValueError("the model is sharded already: shard a whole model, once")
        group = group or mx.distributed.init()
        if group.size() == 1:
            return
        decoder = self.model.decoder
        blocks = {"model.decoder.self_conditioning": decoder.self_conditioning}
        for i, layer in enumerate(self.layers):
            blocks[f"model.decoder.layers.{i}.mlp"] = layer.mlp
            blocks[f"model.decoder.layers.{i}.experts"] = layer.experts
        spans = {name: _intermediate_span(block, group, name) for name, block in blocks.items()}
        for name, block in blocks.items():
            _keep_intermediate(block, *spans[name])
        for layer in self.layers:
            layer.self_attn.shard(group)
            layer.sharding_group = group
        decoder.self_conditioning.sharding_group = group
        self.__dict__.pop("_compiled_segments", None)  # traced with the whole model's head counts

    def make_cache(self) -> list:
        return [
            RotatingKVCache(max_size=self.args.sliding_window)
            if kind == "sliding_attention"
            else KVCache()
            for kind in self.args.layer_types
        ]

    def _embed(self, ids: mx.array) -> mx.array:
        h = self.model.decoder.embed_tokens(ids)
        # The reference casts sqrt(hidden) to the weight dtype (53.07 -> 53.0 in bf16).
        return h * mx.array(math.sqrt(self.args.hidden_size), dtype=h.dtype)

    def encode(self, token_ids, cache: list, chunk_size: int = 512) -> None:
        """Append tokens (a prompt, or a committed canvas) to the cache.

        Long inputs run in chunks of `chunk_size`, evaluating the cache after
        each, so memory stays bounded by the chunk, not the prompt.
        """
        ids = _token_batch(token_ids)
        for start in range(0, ids.shape[1], chunk_size):
            self.encode_chunk(ids[:, start : start + chunk_size], cache)
            mx.eval([c.state for c in cache])

    def lookahead(self, token_ids, cache: list) -> list:
        """The keys and values `encode` would append for these tokens, per
        layer ([B, kv_heads, L, head_dim] each), computed without changing the
        cache: same attention, same masks, so writing them later is exact."""
        views = [_Lookahead(c) for c in cache[: len(self.layers)]]
        self.encode_chunk(_token_batch(token_ids), views)
        return [(view.keys, view.values) for view in views]

    def encode_chunk(self, ids: mx.array, cache: list) -> mx.array:
        """One encoder pass appending `ids` [B, L] to the cache, nothing
        evaluated (training differentiates through it); returns the last
        hidden states, before the final norm."""
        h = self._embed(ids)
        L = ids.shape[1]
        window = self.args.sliding_window
        scalars = self.model.encoder.language_model.layers
        for layer, scalar, c, kind in zip(self.layers, scalars, cache, self.args.layer_types):
            sliding = kind == "sliding_attention"
            mask = c.make_mask(L, return_array=False, window_size=window if sliding else None)
            h = layer(h, c, mask, layer_scalar=scalar.layer_scalar)
        # In generation the cache is the encoder's output; training's optional
        # autoregressive loss reads h through the shared final norm and head.
        return h

    def decode(
        self,
        canvas_ids,
        cache: list,
        self_conditioning_logits: Optional[mx.array] = None,
        self_conditioning_probs: Optional[tuple] = None,
        self_conditioning_top_k: Optional[tuple] = None,
        raw_logits: bool = False,
    ) -> mx.array:
        """Denoise a canvas against the cache: float32 softcapped logits [B, C, V],
        or with `raw_logits` the lm_head's output in the model's dtype, for a
        sampler that softcaps as it reads (the fused kernel).

        The canvas attends to the whole cached context and to itself in both
        directions; the cache holds the same tokens afterwards. The previous
        step's prediction comes as the reference passes it, logits (softmaxed
        here, in float32, after the caller's cast), or as probabilities a
        sampler already holds:
        (weights [B, C, V], total [B, C, 1]) with probs = weights / total, which
        saves a softmax over the logits (the division follows the product), or
        sparse, (ids [B, C, k], probs [B, C, k]): only those tokens' embeddings,
        weighted by their probabilities as given (an approximation the caller
        opts into; no [C, V] @ [V, H] product).
        """
        segments, offset = self._segments, mx.array(cache[0].offset).astype(mx.int32)  # [B] in a batch's caches
        h, q, k, v = segments[0](
            _token_batch(canvas_ids),
            None,
            offset,
            (self_conditioning_logits, self_conditioning_probs, self_conditioning_top_k),
        )
        *middle, last = segments[1:]
        for segment, c in zip(middle, cache):
            h, q, k, v = segment(h, attend(q, *_after_context(c, k, v)), offset)
        return last(h, attend(q, *_after_context(cache[len(middle)], k, v)), offset, None, raw_logits)

    @property
    def _segments(self) -> list:  # of compiled functions
        """The decoder compiled between attentions: the embedding, then each
        layer's feed-forward half with the next layer's projections, then the
        head. Their shapes are the canvas's, so neither a step nor a canvas
        retraces them (the offset is an array); the attention over the growing
        context runs between them. Each reads its modules' weights at every
        call, so updated weights are never stale, and modules swapped for
        others (quantization) give new segments."""
        decoder, layers = self.model.decoder, self.layers
        ends = [[decoder.embed_tokens, decoder.self_conditioning]] + [[layer] for layer in layers]
        ends[-1] += [decoder.norm, decoder.embed_tokens]
        modules = tuple(id(m) for end in ends for m in end)
        built = self.__dict__.get("_compiled_segments")
        if built is None or built[0] != modules:
            segments = [
                mx.compile(partial(self._segment, i), inputs=[end, *([layers[i]] if i < len(layers) else [])])
                for i, end in enumerate(ends)
            ]
            built = self.__dict__["_compiled_segments"] = (modules, segments)
        return built[1]

    def __getstate__(self):
        # a copy (mlx-lm's DWQ deep-copies the model) compiles against its own weights
        return {k: v for k, v in self.__dict__.items() if k != "_compiled_segments"}

    def _segment(self, i: int, h, attended, offset, self_conditioning=None, raw_logits=False):
        """Segment i of the decoder: ids to the first projections (i = 0,
        with decode's three self-conditioning inputs), layer i-1's second
        half to layer i's projections, or to the logits (raw or softcapped)."""
        if i == 0:
            h = self._conditioned_embedding(h, *self_conditioning)
        else:
            layer = self.layers[i - 1]
            h = layer.finish(h, attended, layer.layer_scalar)
        if i == len(self.layers):
            return self.head(h, softcap=not raw_logits)
        return (h, *self.layers[i].project(h, offset))

    def _conditioned_embedding(self, ids, self_conditioning_logits, self_conditioning_probs, self_conditioning_top_k):
        decoder = self.model.decoder
        h = self._embed(ids)
        soft = None
        if self_conditioning_logits is not None:
            probs = mx.softmax(self_conditioning_logits.astype(mx.float32), axis=-1)
            soft = soft_embed(decoder.embed_tokens, probs.astype(h.dtype))
        elif self_conditioning_probs is not None:
            weights, total = self_conditioning_probs
            soft = soft_embed(decoder.embed_tokens, weights.astype(h.dtype)) / total.astype(h.dtype)
        elif self_conditioning_top_k is not None:
            soft = soft_embed_top_k(decoder.embed_tokens, *self_conditioning_top_k).astype(h.dtype)
        if soft is not None:
            soft = soft * mx.array(math.sqrt(self.args.hidden_size), dtype=h.dtype)
        return decoder.self_conditioning(h, soft)

    def head(self, h: mx.array, softcap: bool = True) -> mx.array:
        """Final norm, tied lm_head, float32 tanh softcap (or the raw output)."""
        decoder = self.model.decoder
        logits = decoder.embed_tokens.as_linear(decoder.norm(h))
        if not softcap:
            return logits
        return logit_softcap(self.args.final_logit_softcapping, logits.astype(mx.float32))

    def sanitize(self, weights: dict) -> dict:
        """Map Hugging Face names onto this module tree.

        Drops the vision tower (text only), the tied lm_head and any tied encoder
        copies; gives the 3-D expert tensors their `.weight` suffix.
        """
        out = {}
        for key, value in weights.items():
            if key.startswith((*VISION_PREFIXES, "lm_head.")):
                continue
            if key.startswith("model.encoder.language_model.") and not key.endswith(".layer_scalar"):
                if key.endswith(".bias"):
                    _check_shared_bias(key, value, weights)
                continue  # tied to the decoder's copy
            if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
                key += ".weight"
            out[key] = value
        return out
