"""The Gemma 4 vision tower and its embedder, exact against
transformers' `Gemma4VisionModel` and DiffusionGemma's `embed_vision`.

Inputs are what `Gemma4ImageProcessor` gives: `pixel_values` [n_images,
max_patches, 3 * patch * patch], each patch's pixels in (row, column, channel)
order, values in [0, 1]; `position_ids` [n_images, max_patches, 2], each
patch's (x, y) = (column, row) in its image's patch grid, rows of (-1, -1)
for padding patches (which follow the image's own patches).

The output is the soft tokens of every image, concatenated in image order
([n_soft_tokens, text_hidden], as the reference's `get_image_features(...)
.pooler_output`); `soft_token_counts` says how many each image has.

Parameter paths of `VisionModel` are the checkpoint's names less
`model.encoder.`: `vision_tower.*` and `embed_vision.*`.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .config import DIMENSION_LIMIT, check_range

CHECKPOINT_PREFIX = "model.encoder."
_ROOTS = ("vision_tower.", "embed_vision.")


@dataclass
class VisionConfig:
    """A checkpoint config's `vision_config` (plus the text model's hidden
    size, which the embedder projects to). Every field is checked: a bad one
    is one ValueError naming it."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    text_hidden_size: int
    patch_size: int = 16
    pooling_kernel_size: int = 3
    position_embedding_size: int = 10 * 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    hidden_activation: str = "gelu_pytorch_tanh"
    use_clipped_linears: bool = False
    standardize: bool = False

    def __post_init__(self):
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "text_hidden_size",
            "patch_size",
            "pooling_kernel_size",
            "position_embedding_size",
        ):
            check_range(
                f"vision_config.{name}", getattr(self, name), 1, DIMENSION_LIMIT,
                integer=True, expected="a positive integer", beyond=f"below {DIMENSION_LIMIT}",
            )
        check_range("vision_config.rms_norm_eps", self.rms_norm_eps, 0, 1, low_inclusive=False, expected="a number in (0, 1)")
        check_range("vision_config.rope_parameters.rope_theta", self.rope_theta, 0, low_inclusive=False, expected="a positive number")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"vision_config.num_key_value_heads must divide num_attention_heads ({self.num_attention_heads}),"
                f" got {self.num_key_value_heads}"
            )
        if self.head_dim % 4:
            # axial 2-D RoPE: half the head per axis, rotated in halves
            raise ValueError(f"vision_config.head_dim must be a multiple of 4, got {self.head_dim}")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ValueError(f"vision_config.hidden_activation must be 'gelu_pytorch_tanh', got {self.hidden_activation!r}")
        for name in ("use_clipped_linears", "standardize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"vision_config.{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, vision_config: Mapping, text_hidden_size: int) -> "VisionConfig":
        if not isinstance(vision_config, Mapping):
            raise ValueError(f"vision_config must be an object, got {vision_config!r}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim"):
            if name not in vision_config:
                raise ValueError(f"vision_config.{name} is missing")
        rope = vision_config.get("rope_parameters") or {}
        if not isinstance(rope, Mapping):
            raise ValueError(f"vision_config.rope_parameters must be an object, got {rope!r}")
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision_config.rope_parameters.rope_type must be 'axial', got {rope.get('rope_type')!r}")
        kwargs: Dict[str, Any] = {
            name: vision_config[name]
            for name in cls.__dataclass_fields__
            if name in vision_config and name not in ("text_hidden_size", "rope_theta")
        }
        kwargs.setdefault("num_key_value_heads", vision_config["num_attention_heads"])
        # transformers' encoder always uses `rms_norm_eps`; `None` in the dict means the default
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        return cls(text_hidden_size=text_hidden_size, **kwargs)

    @classmethod
    def from_checkpoint_config(cls, config: Mapping) -> "VisionConfig":
        """From a whole config.json (`vision_config` and `text_config.hidden_size`)."""
        if not isinstance(config.get("vision_config"), Mapping):
            raise ValueError(f"vision_config must be an object, got {config.get('vision_config')!r}")
        text = config.get("text_config")
        if not isinstance(text, Mapping) or "hidden_size" not in text:
            raise ValueError("text_config.hidden_size is missing")
        return cls.from_dict(config["vision_config"], text["hidden_size"])


def _rms_norm(x: mx.array, weight: Optional[mx.array], eps: float) -> mx.array:
    """Gemma4RMSNorm: normalised (and scaled) in float32, cast back."""
    y = mx.fast.rms_norm(x.astype(mx.float32), None if weight is None else weight.astype(mx.float32), eps)
    return y.astype(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return _rms_norm(x, self.weight, self.eps)


class RMSNormNoScale(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return _rms_norm(x, None, self.eps)


class ClippableLinear(nn.Module):
    """`Gemma4ClippableLinear`: a bias-free linear (`.linear.weight`), its input
    and output clamped to scalar buffers when `use_clipped_linears`."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.clipped = clipped
        if clipped:
            self.input_min = mx.array(-np.inf, dtype=mx.float32)
            self.input_max = mx.array(np.inf, dtype=mx.float32)
            self.output_min = mx.array(-np.inf, dtype=mx.float32)
            self.output_max = mx.array(np.inf, dtype=mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        if self.clipped:
            x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        x = self.linear(x)
        if self.clipped:
            x = mx.clip(x, self.output_min.astype(x.dtype), self.output_max.astype(x.dtype))
        return x


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size**2, config.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, config.position_embedding_size, config.hidden_size))

    def __call__(self, pixel_values: mx.array, positions: mx.array, padding: mx.array) -> mx.array:
        dtype = self.input_proj.weight.dtype
        h = self.input_proj((2 * (pixel_values - 0.5)).astype(dtype))
        clamped = mx.maximum(positions, 0)
        pos = self.position_embedding_table[0][clamped[..., 0]] + self.position_embedding_table[1][clamped[..., 1]]
        pos = mx.where(padding[..., None], mx.zeros((), pos.dtype), pos)
        return h + pos


def _rotate_half(x: mx.array) -> mx.array:
    half = x.shape[-1] // 2
    return mx.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _axial_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """x [B, L, H, D]; cos/sin [B, L, D] laid out (x, x, y, y): the first half
    of each head turns with the x position, the second with y, each half
    rotated in halves (rotate_half)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    parts = []
    for lo in (0, half):
        xs, c, s = x[..., lo : lo + half], cos[..., lo : lo + half], sin[..., lo : lo + half]
        parts.append(xs * c + _rotate_half(xs) * s)
    return mx.concatenate(parts, axis=-1)


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        clipped = c.use_clipped_linears
        self.q_proj = ClippableLinear(c.hidden_size, c.num_attention_heads * c.head_dim, clipped)
        self.k_proj = ClippableLinear(c.hidden_size, c.num_key_value_heads * c.head_dim, clipped)
        self.v_proj = ClippableLinear(c.hidden_size, c.num_key_value_heads * c.head_dim, clipped)
        self.o_proj = ClippableLinear(c.num_attention_heads * c.head_dim, c.hidden_size, clipped)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.v_norm = RMSNormNoScale(c.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array, mask: mx.array) -> mx.array:
        B, L, _ = x.shape
        q = _axial_rope(self.q_norm(self.q_proj(x).reshape(B, L, -1, self.head_dim)), cos, sin)
        k = _axial_rope(self.k_norm(self.k_proj(x).reshape(B, L, -1, self.head_dim)), cos, sin)
        v = self.v_norm(self.v_proj(x).reshape(B, L, -1, self.head_dim))
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        # scale 1.0 (the q/k norms set the logits' size); padding keys masked out
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config
        self.gate_proj = ClippableLinear(c.hidden_size, c.intermediate_size, c.use_clipped_linears)
        self.up_proj = ClippableLinear(c.hidden_size, c.intermediate_size, c.use_clipped_linears)
        self.down_proj = ClippableLinear(c.intermediate_size, c.hidden_size, c.use_clipped_linears)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def __call__(self, h: mx.array, cos: mx.array, sin: mx.array, mask: mx.array) -> mx.array:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]
        spatial = config.head_dim // 2
        self._inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))

    def __call__(self, h: mx.array, positions: mx.array, padding: mx.array) -> mx.array:
        # positions are not clamped here: padding patches turn by -1, as in the reference
        freqs = positions[..., None].astype(mx.float32) * mx.array(self._inv_freq)  # [B, L, 2, D/4]
        fx, fy = freqs[:, :, 0], freqs[:, :, 1]
        layout = lambda f: mx.concatenate([f(fx), f(fx), f(fy), f(fy)], axis=-1).astype(h.dtype)
        cos, sin = layout(mx.cos), layout(mx.sin)
        mask = mx.logical_not(padding)[:, None, None, :]  # keys: True = attend
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return h


def pooling_plan(position_ids, pooling_kernel_size: int):
    """Host-side plan of the reference pooler for `position_ids` [B, P, 2]:
    each patch's output slot [B, P] and each image's valid slots (a list of
    index arrays). Slot of a patch at (x, y): x//k + (max_x+1)//k * (y//k),
    max_x over the image's positions with padding clamped to 0; padding
    patches go to slot 0 (their hidden states are zeroed first). A slot is
    valid where some patch lands."""
    pos = np.asarray(position_ids)
    B, P, _ = pos.shape
    k = pooling_kernel_size
    length = P // (k * k)
    if length < 1 or length * k * k != P:
        raise ValueError(f"the number of patches per image ({P}) must be a multiple of pooling_kernel_size^2 ({k * k})")
    clamped = np.maximum(pos, 0)
    max_x = clamped[..., 0].max(axis=-1, keepdims=True) + 1
    kidx = clamped // k
    slots = kidx[..., 0] + (max_x // k) * kidx[..., 1]
    if (slots >= length).any():
        raise ValueError(f"image patch positions do not fit in {length} soft tokens (max_patches {P}, pooling {k})")
    valid = [np.unique(s) for s in slots]
    return slots, length, valid


def soft_token_counts(position_ids, pooling_kernel_size: int) -> List[int]:
    """How many soft tokens each image gives (its slice of `get_image_features`)."""
    return [len(v) for v in pooling_plan(position_ids, pooling_kernel_size)[2]]


class VisionTower(nn.Module):
    """`Gemma4VisionModel`: patch embedder, encoder, pooler, standardisation.
    Returns the valid pooled soft tokens of every image, concatenated
    [n_soft_tokens, vision_hidden], in the weights' dtype."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = Encoder(config)
        if config.standardize:
            self.std_bias = mx.zeros((config.hidden_size,))
            self.std_scale = mx.ones((config.hidden_size,))

    def __call__(self, pixel_values, position_ids) -> mx.array:
        c = self.config
        pos_np = np.asarray(position_ids).astype(np.int64)
        if pos_np.ndim != 3 or pos_np.shape[-1] != 2:
            raise ValueError(f"position_ids must be [n_images, n_patches, 2], got shape {pos_np.shape}")
        pixel_values = mx.array(pixel_values) if not isinstance(pixel_values, mx.array) else pixel_values
        want = (pos_np.shape[0], pos_np.shape[1], 3 * c.patch_size**2)
        if tuple(pixel_values.shape) != want:
            raise ValueError(f"pixel_values must have shape {want}, got {tuple(pixel_values.shape)}")
        slots, length, valid = pooling_plan(pos_np, c.pooling_kernel_size)
        padding_np = (pos_np == -1).all(axis=-1)
        positions = mx.array(pos_np.astype(np.int32))
        padding = mx.array(padding_np)

        h = self.patch_embedder(pixel_values, positions, padding)
        dtype = h.dtype
        h = self.encoder(h, positions, padding)

        # pooler: zero padding, average k x k patches by position, in float32, times sqrt(hidden)
        h = mx.where(padding[..., None], mx.zeros((), h.dtype), h)
        k2 = c.pooling_kernel_size**2
        if length != pos_np.shape[1]:
            weights = (slots[:, :, None] == np.arange(length)).astype(np.float32) / k2  # [B, P, length]
            h = mx.array(weights.transpose(0, 2, 1)) @ h.astype(mx.float32)
            h = h.astype(dtype)
            # (with pooling_kernel_size 1 the reference keeps padding_positions as its "valid" mask,
            # which picks the padding; here every patch's own slot is kept)
        h = h.astype(mx.float32) * (c.hidden_size**0.5)

        index = np.concatenate([b * length + v for b, v in enumerate(valid)])
        h = h.reshape(-1, c.hidden_size)[mx.array(index.astype(np.int32))]
        if c.standardize:
            h = (h - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return h.astype(dtype)


class ImageEmbedder(nn.Module):
    """DiffusionGemma's `embed_vision`: a weightless RMSNorm, then a bias-free
    linear vision hidden -> text hidden."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.eps = config.rms_norm_eps
        self.embedding_projection = nn.Linear(config.hidden_size, config.text_hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding_projection(_rms_norm(x, None, self.eps))


class VisionModel(nn.Module):
    """The encoder's `vision_tower` and `embed_vision` (paths as the checkpoint's
    less `model.encoder.`)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config)
        self.embed_vision = ImageEmbedder(config)

    def __call__(self, pixel_values, position_ids) -> mx.array:
        """Soft tokens [n_soft_tokens, text_hidden], every image's in order
        (`soft_token_counts` splits them), as `get_image_features(...).pooler_output`."""
        return self.embed_vision(self.vision_tower(pixel_values, position_ids))

    def image_features(self, pixel_values, position_ids) -> List[mx.array]:
        """Each image's soft tokens, [n_i, text_hidden]."""
        flat = self(pixel_values, position_ids)
        counts = soft_token_counts(position_ids, self.config.pooling_kernel_size)
        return mx.split(flat, np.cumsum(counts)[:-1].tolist(), axis=0) if len(counts) > 1 else [flat]


def get_image_features(model: VisionModel, pixel_values, position_ids) -> mx.array:
    """Soft tokens [n_soft_tokens, text_hidden] of the images."""
    return model(pixel_values, position_ids)


def sanitize_vision(weights: Mapping) -> Dict[str, mx.array]:
    """The checkpoint's vision tensors (`model.encoder.vision_tower.*`,
    `model.encoder.embed_vision.*`; torch layout) as `VisionModel` parameters.
    Other names are left out. torch's Linear weights are [out, in] like mlx's,
    and the tower has no convolution, so only the names change; the rotary
    `inv_freq` (not saved by transformers) is dropped if present."""
    out = {}
    for name, value in weights.items():
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        short = name[len(CHECKPOINT_PREFIX):]
        if not short.startswith(_ROOTS) or short.endswith(("inv_freq", "original_inv_freq")):
            continue
        out[short] = value if isinstance(value, mx.array) else mx.array(np.asarray(value))
    return out


def _names(short: list, shown: int = 5) -> str:
    names = ", ".join(CHECKPOINT_PREFIX + n for n in short[:shown])
    return names + (f" and {len(short) - shown} more" if len(short) > shown else "")


def load_vision_weights(model: VisionModel, weights: Mapping) -> None:
    """Loads sanitized weights strictly: a missing, unexpected or misshaped
    tensor is a ValueError naming it (with its checkpoint name)."""
    params = dict(tree_flatten(model.parameters()))
    missing = sorted(set(params) - set(weights))
    if missing:
        raise ValueError(f"missing vision weight(s): {_names(missing)}")
    extra = sorted(set(weights) - set(params))
    if extra:
        raise ValueError(f"unexpected vision weight(s): {_names(extra)}")
    for name, value in weights.items():
        if tuple(value.shape) != tuple(params[name].shape):
            raise ValueError(
                f"vision weight {CHECKPOINT_PREFIX + name} has shape {tuple(value.shape)},"
                f" expected {tuple(params[name].shape)}"
            )
    model.load_weights(list(weights.items()), strict=True)
