"""A checkpoint's configuration: `ModelArgs` from config.json, every field
checked so a bad config is one ValueError naming the field (not a TypeError
or an allocation from deep inside mlx), and `GenerationConfig`, the read-only
settings of generation_config.json. Imports nothing of the package."""

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
from mlx_lm.models.base import BaseModelArgs

MODEL_TYPE = "diffusion_gemma"

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
IMAGE_TOKEN_FIELDS = ("image_token_id", "boi_token_id", "eoi_token_id")
DIMENSION_LIMIT = 2**31
MAX_LAYERS = 4096  # the released model has 30


def check_range(
    name: str,
    value,
    low,
    high=math.inf,
    *,
    integer: bool = False,
    low_inclusive: bool = True,
    high_inclusive: bool = False,
    expected: str,
    beyond: Optional[str] = None,
):
    """`value` if it is an integer (with `integer`; bools are not) or a real
    number between `low` and `high` (inclusive or not); else a ValueError
    "{name} must be {expected}, got {value!r}", or "{name} must be {beyond}"
    for a value past `high` when `beyond` says so. The one range check of the
    package: config fields, sampler options, convert's flags, seeds."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    above_low = value >= low if low_inclusive else value > low
    below_high = value <= high if high_inclusive else value < high
    if above_low and not below_high and beyond is not None:
        raise ValueError(f"{name} must be {beyond}, got {value!r}")
    if not (above_low and below_high):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def token_ids(value) -> list:
    """Token ids given as configs and options give them (eos_token_id): one id,
    or a list or tuple of ids, as a list. Anything else is a list of itself,
    for the caller's check to name."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_int(name: str, value) -> None:
    check_range(name, value, 1, DIMENSION_LIMIT, integer=True, expected="an integer >= 1",
                beyond="below 2**31 (mlx's largest dimension)")


def _check_number(name: str, value) -> None:
    check_range(name, value, 0, low_inclusive=False, expected="a finite number > 0")


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
    # Gemma 4's image tokens (top-level in config.json; the reference's defaults):
    # a prompt's image is boi, its soft tokens, eoi; checked against the
    # vocabulary where a model takes images (`load_model`).
    image_token_id: int = 258_880
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882

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
        if self.num_attention_heads * self.canvas_length**2 >= DIMENSION_LIMIT:
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
        dimension too (see `DIMENSION_LIMIT`)."""
        widths = {"2 * moe_intermediate_size": 2 * self.moe_intermediate_size}
        shapes = {"": (self.head_dim, self.num_key_value_heads)}
        shapes.update((f" of layer {i}", self.attention_shape(i)) for i in self.per_layer_config)
        for where, (head_dim, kv_heads) in shapes.items():
            widths[f"num_attention_heads * head_dim{where}"] = self.num_attention_heads * head_dim
            widths[f"num_key_value_heads * head_dim{where}"] = kv_heads * head_dim
        for name, width in widths.items():
            if width >= DIMENSION_LIMIT:
                raise ValueError(f"{name} must be below 2**31 (mlx's largest dimension), got {width}")

    def check_token_ids(self, name: str, value) -> list:
        """`value`, a token id or a list of them, as a list; each must be in
        [0, vocab_size) (eos ids are compared with sampled tokens)."""
        ids = token_ids(value)
        if not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in ids
        ):
            raise ValueError(
                f"{name} must be a token id or a list of them, in [0, {self.vocab_size}), got {value!r}"
            )
        return ids

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
        fields.update((name, params[name]) for name in IMAGE_TOKEN_FIELDS if params.get(name) is not None)
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
