"""DiffusionGemma text model in MLX: a causal encoder that fills a KV cache and a
bidirectional decoder that denoises a canvas against it (reference:
transformers.models.diffusion_gemma).

Encoder and decoder share every weight except the per-layer `layer_scalar`, so the
layers live once, under `model.decoder.layers`; the encoder holds only its scalars.
Parameter paths are the checkpoint names, so `tree_flatten(model.parameters())`
lists exactly the keys of a converted checkpoint.
"""

import math
from functools import partial
from typing import NamedTuple, Optional, Union

import mlx.core as mx
import numpy as np
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.gemma4_text import RMSNormNoScale, Router, geglu, logit_softcap
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchLinear

from .cache_views import Lookahead, after_context
from .config import GenerationConfig, ModelArgs
from .tp import shard

# The vision tower's weights: `sanitize` (the text model's, which mlx-lm's
# loaders use too) leaves them out; `load_model` gives them to the tower.
VISION_PREFIXES = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")


class Images(NamedTuple):
    """A batch's images as the encoder takes them: every image's soft tokens
    in order, and for each position of the batch's tokens [B, L] the feature
    row it takes and its image block (-1 for both at a text token). Rows and
    blocks are numpy arrays: chunk bounds and masks are decided on the host."""

    features: mx.array  # [N, hidden]
    rows: np.ndarray  # [B, L] int
    blocks: np.ndarray  # [B, L] int

    def span(self, start: int, end: int) -> Optional["Images"]:
        """Positions start..end-1, or None when they hold no image token."""
        rows = self.rows[:, start:end]
        if not (rows >= 0).any():
            return None
        return Images(self.features, rows, self.blocks[:, start:end])

    @classmethod
    def place(cls, ids: np.ndarray, features: list, image_token_id: int) -> "Images":
        """The images of a batch's ids [B, L] (padding included): row r's
        soft tokens take `features[r]` ([n_r, hidden], or None) in order; a
        block is a run of consecutive image tokens, as the reference builds
        it (`get_block_sequence_ids_for_mask`) from the image token's id."""
        is_image = ids == image_token_id
        rows = np.full(ids.shape, -1, np.int64)
        rows[is_image] = np.arange(int(is_image.sum()))  # row-major: row by row, in order
        starts = is_image & ~np.pad(is_image, ((0, 0), (1, 0)))[:, :-1]
        blocks = np.where(is_image, np.cumsum(starts, axis=1) - 1, -1)
        return cls(mx.concatenate([f for f in features if f is not None]), rows, blocks)

    def inside(self, position: int) -> bool:
        """Whether a cut before `position` would split an image block."""
        here, before = self.blocks[:, position], self.blocks[:, position - 1]
        return bool(((here >= 0) & (here == before)).any())


def chunk_bounds(length: int, chunk_size: int, images: Optional[Images] = None, shortest: int = 1) -> list:
    """(start, end) of the chunks `length` tokens are encoded in: `chunk_size`
    each, but never a cut inside an image block (its tokens attend to each
    other both ways, so the block must be in one pass) and no chunk shorter
    than `shortest` unless the input is. A cut that would split a block moves
    back to the block's start, or past its end when that leaves too short a
    chunk."""
    bounds, start = [], 0
    while start < length:
        end = min(start + chunk_size, length)
        if 0 < length - end < shortest:
            end = length - shortest if end - start > shortest else length
        if images is not None and end < length and images.inside(end):
            back = end
            while back > start and images.inside(back):
                back -= 1
            if back - start >= shortest:
                end = back
            else:
                while end < length and images.inside(end):
                    end += 1
                if 0 < length - end < shortest:
                    end = length
        bounds.append((start, end))
        start = end
    return bounds


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



def attend(q: mx.array, k: mx.array, v: mx.array, mask=None) -> mx.array:
    return scaled_dot_product_attention(q, k, v, cache=None, scale=1.0, mask=mask)


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
        gives (a layer cache appends it, a `Lookahead` sets it aside). The
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


class _Modules(nn.Module):
    """The modules a decoder segment reads, as one module (for nn.utils.checkpoint)."""

    def __init__(self, modules: list):
        super().__init__()
        self.parts = modules


class Probabilities(NamedTuple):
    """Exact self-conditioning from a step's own unnormalised probabilities:
    softmax = weights / total (the division follows the embedding product)."""

    weights: mx.array  # [B, C, V]
    total: mx.array  # [B, C, 1]


class TopK(NamedTuple):
    """Sparse self-conditioning: the k most probable tokens and their exact
    probabilities (not renormalised over the k)."""

    ids: mx.array  # [B, C, k] int32
    probs: mx.array  # [B, C, k]


# what `Model.decode` takes as self-conditioning: none, the reference's logits, or one of the two above
SelfConditioningInput = Union[None, mx.array, Probabilities, TopK]


def _conditioning_slots(value: SelfConditioningInput) -> tuple:
    """(logits, (weights, total), (ids, probs)), at most one set: the compiled
    first segment takes arrays, and tells the kinds apart by their slot."""
    if value is None:
        return None, None, None
    if isinstance(value, Probabilities):
        return None, tuple(value), None
    if isinstance(value, TopK):
        return None, None, tuple(value)
    if isinstance(value, mx.array):
        return value, None, None
    raise TypeError(
        f"self_conditioning must be None, logits (mx.array), Probabilities or TopK, got {type(value).__name__}"
    )


def _place_images(h: mx.array, images: Images) -> mx.array:
    """The soft tokens' embeddings replaced by their image features. Text
    embeddings were scaled by sqrt(hidden); the features are not (the
    reference scales in the embedding, then scatters the features)."""
    rows = mx.array(images.rows.astype(np.int32))
    features = images.features.astype(h.dtype)[mx.maximum(rows, 0)]
    return mx.where((rows >= 0)[..., None], features, h)


def _same_block(blocks: np.ndarray) -> mx.array:
    """[B, 1, L, L]: whether query and key are tokens of the same image."""
    same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    return mx.array(same[:, None])


def _open_blocks(mask: mx.array, same: mx.array) -> mx.array:
    """A chunk's causal (or sliding) mask [..., L, K] with each image block
    open both ways: use_bidirectional_attention "vision" ORs the block into
    every layer's mask, unclipped by the window (transformers 5.25's
    `blockwise_overlay`). The chunk's own keys are the last L."""
    B, _, L, _ = same.shape
    K = mask.shape[-1]
    mask = mx.broadcast_to(mask, (B, 1, L, K))
    return mx.concatenate([mask[..., : K - L], mask[..., K - L :] | same], axis=-1)


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
        self.max_soft_tokens = None  # the checkpoint's image processor setting, set by `load_model`
        # gradient checkpointing over the decoder's layers (training): each
        # compiled segment's activations are recomputed in the backward pass
        self.checkpointing = False

    @property
    def layers(self):
        return self.model.decoder.layers

    @property
    def dtype(self) -> mx.Dtype:
        """The activation dtype (norm weights are never quantized)."""
        return self.model.decoder.norm.weight.dtype

    def shard(self, group: Optional[mx.distributed.Group] = None) -> None:
        """Tensor parallelism over `group` (default: mx.distributed.init()), in
        place, as tp.py cuts the model; mlx-lm's `sharded_load` calls this."""
        shard(self, group)
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

    def encode(self, token_ids, cache: list, chunk_size: int = 512, images: Optional[Images] = None) -> None:
        """Append tokens (a prompt, or a committed canvas) to the cache, with
        the prompt's `images` written at their soft tokens.

        Long inputs run in chunks of `chunk_size` (never splitting an image
        block, see `chunk_bounds`), evaluating the cache after each, so memory
        stays bounded by the chunk, not the prompt.
        """
        ids = _token_batch(token_ids)
        for start, end in chunk_bounds(ids.shape[1], chunk_size, images):
            span = None if images is None else images.span(start, end)
            if span is None:
                self.encode_chunk(ids[:, start:end], cache)
            else:
                self.encode_chunk(ids[:, start:end], cache, span)
            mx.eval([c.state for c in cache])

    def lookahead(self, token_ids, cache: list) -> list:
        """The keys and values `encode` would append for these tokens, per
        layer ([B, kv_heads, L, head_dim] each), computed without changing the
        cache: same attention, same masks, so writing them later is exact."""
        views = [Lookahead(c) for c in cache[: len(self.layers)]]
        self.encode_chunk(_token_batch(token_ids), views)
        return [(view.keys, view.values) for view in views]

    def encode_chunk(self, ids: mx.array, cache: list, images: Optional[Images] = None) -> mx.array:
        """One encoder pass appending `ids` [B, L] to the cache, nothing
        evaluated (training differentiates through it); returns the last
        hidden states, before the final norm. `images` (whose blocks lie
        wholly in this chunk) replace their soft tokens' embeddings."""
        h = self._embed(ids)
        if images is not None:
            h = _place_images(h, images)
        L = ids.shape[1]
        window = self.args.sliding_window
        blocks = None
        if images is not None and self.args.use_bidirectional_attention == "vision" and L > 1:
            blocks = _same_block(images.blocks)
        scalars = self.model.encoder.language_model.layers
        for layer, scalar, c, kind in zip(self.layers, scalars, cache, self.args.layer_types):
            sliding = kind == "sliding_attention"
            mask = c.make_mask(L, return_array=blocks is not None, window_size=window if sliding else None)
            if blocks is not None:
                mask = _open_blocks(mask, blocks)
            h = layer(h, c, mask, layer_scalar=scalar.layer_scalar)
        # In generation the cache is the encoder's output; training's optional
        # autoregressive loss reads h through the shared final norm and head.
        return h

    @property
    def has_vision(self) -> bool:
        return "vision_tower" in self.model.encoder

    def attach_vision(self, vision) -> None:
        """Give the encoder its vision tower and embedder (vision.py's
        `VisionModel`, loaded): their parameters then sit under their
        checkpoint names, `model.encoder.vision_tower.*` and `.embed_vision.*`."""
        self.model.encoder.vision_tower = vision.vision_tower
        self.model.encoder.embed_vision = vision.embed_vision

    @property
    def vision_config(self):
        """The vision tower's config (vision.py's `VisionConfig`), or None: text only."""
        return self.model.encoder.vision_tower.config if self.has_vision else None

    def check_vision(self) -> None:
        if not self.has_vision:
            raise ValueError(
                "this model has no vision tower (its checkpoint holds no model.encoder.vision_tower.* "
                "weights): it takes text only"
            )

    def embed_images(self, pixel_values, position_ids) -> mx.array:
        """Soft tokens [n, hidden] of preprocessed images, every image's in
        order (the reference's `get_image_features(...).pooler_output`)."""
        self.check_vision()
        encoder = self.model.encoder
        return encoder.embed_vision(encoder.vision_tower(pixel_values, position_ids))

    def decode(
        self,
        canvas_ids,
        cache: list,
        self_conditioning: SelfConditioningInput = None,
        raw_logits: bool = False,
    ) -> mx.array:
        """Denoise a canvas against the cache: float32 softcapped logits [B, C, V],
        or with `raw_logits` the lm_head's output in the model's dtype, for a
        sampler that softcaps as it reads (the fused kernel).

        The canvas attends to the whole cached context and to itself in both
        directions; the cache holds the same tokens afterwards.
        `self_conditioning` is the previous step's prediction (None: none, the
        first step): as the reference passes it, logits (an mx.array [B, C, V],
        softmaxed here in float32 after the caller's cast), or as a sampler
        already holds it: `Probabilities` (exact, and saves a softmax over the
        logits) or `TopK` (sparse: only those tokens' embeddings, an
        approximation the caller opts into; no [C, V] @ [V, H] product).
        """
        segments, offset = self._segments, mx.array(cache[0].offset).astype(mx.int32)  # [B] in a batch's caches
        h, q, k, v = segments[0](_token_batch(canvas_ids), None, offset, _conditioning_slots(self_conditioning))
        *middle, last = segments[1:]
        for segment, c in zip(middle, cache):
            h, q, k, v = segment(h, attend(q, *after_context(c, k, v)), offset)
        return last(h, attend(q, *after_context(cache[len(middle)], k, v)), offset, None, raw_logits)

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
        modules = (self.checkpointing, *(id(m) for end in ends for m in end))
        built = self.__dict__.get("_compiled_segments")
        if built is None or built[0] != modules:
            segments = []
            for i, end in enumerate(ends):
                reads = [*end, *([layers[i]] if i < len(layers) else [])]
                segment = mx.compile(partial(self._segment, i), inputs=reads)
                if self.checkpointing and i > 0:  # (the first reads token ids: nothing to keep there)
                    # recomputed in the backward pass: the weights go in as arguments, so their gradients come out
                    segment = nn.utils.checkpoint(_Modules(reads), segment)
                segments.append(segment)
            built = self.__dict__["_compiled_segments"] = (modules, segments)
        return built[1]

    def __getstate__(self):
        # a copy (mlx-lm's DWQ deep-copies the model) compiles against its own weights
        return {k: v for k, v in self.__dict__.items() if k != "_compiled_segments"}

    def _segment(self, i: int, h, attended, offset, self_conditioning=None, raw_logits=False):
        """Segment i of the decoder: ids to the first projections (i = 0, with
        decode's self-conditioning in the three slots `_conditioning_slots`
        gives), layer i-1's second half to layer i's projections, or to the
        logits (raw or softcapped)."""
        if i == 0:
            h = self._conditioned_embedding(h, *self_conditioning)
        else:
            layer = self.layers[i - 1]
            h = layer.finish(h, attended, layer.layer_scalar)
        if i == len(self.layers):
            return self.head(h, softcap=not raw_logits)
        return (h, *self.layers[i].project(h, offset))

    def _conditioned_embedding(self, ids, logits, probabilities, top_k):
        decoder = self.model.decoder
        h = self._embed(ids)
        soft = None
        if logits is not None:
            probs = mx.softmax(logits.astype(mx.float32), axis=-1)
            soft = soft_embed(decoder.embed_tokens, probs.astype(h.dtype))
        elif probabilities is not None:
            weights, total = probabilities
            soft = soft_embed(decoder.embed_tokens, weights.astype(h.dtype)) / total.astype(h.dtype)
        elif top_k is not None:
            soft = soft_embed_top_k(decoder.embed_tokens, *top_k).astype(h.dtype)
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
