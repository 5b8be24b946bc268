"""Tensor parallelism, applied from outside the model (as gpt-fast's tp.py):
`shard(model, group)` cuts a loaded model across the ranks of an
mx.distributed group, in place. The model knows only where it sums the
ranks' shares (its `sharding_group` attributes); `Model.shard` calls in
here. Imports nothing of the package.

Each rank keeps its share of the attention heads, of the dense MLP's, the
experts' and the self-conditioning block's intermediate features, and the
model sums the shares where the reference adds them up: after o_proj, after
the dense MLP and the experts together, after the self-conditioning block.
Embeddings, lm_head, norms and router stay whole, so every rank computes the
same logits. The experts split along each expert's width (the reference's tp
plan: gate_up_proj packed_colwise, down_proj rowwise) rather than by expert:
with the decoder's static shapes a rank holding half the experts would still
multiply every routed row, where half the width halves the work of every
row, whatever the routing.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace


def shard(model, group) -> None:
    """Cut `model` across `group` (default: mx.distributed.init()), in place.
    A model sharded already, or a block narrower than the group (in
    quantization groups), is an error raised before any weight changes."""
    if any(layer.sharding_group is not None for layer in model.layers):
        raise ValueError("the model is sharded already: shard a whole model, once")
    group = group or mx.distributed.init()
    if group.size() == 1:
        return
    decoder = model.model.decoder
    blocks = {"model.decoder.self_conditioning": decoder.self_conditioning}
    for i, layer in enumerate(model.layers):
        blocks[f"model.decoder.layers.{i}.mlp"] = layer.mlp
        blocks[f"model.decoder.layers.{i}.experts"] = layer.experts
    spans = {name: _intermediate_span(block, group, name) for name, block in blocks.items()}
    for name, block in blocks.items():
        keep_intermediate(block, *spans[name])
    for layer in model.layers:
        shard_attention(layer.self_attn, group)
        layer.sharding_group = group
    decoder.self_conditioning.sharding_group = group


def attention_splits(attention, N: int) -> bool:
    """Whether the heads split across N ranks: each rank gets as many query
    heads, all reading as many kv heads (the kv heads divide among the
    ranks, or each rank's query heads share one), and a quantized o_proj's
    groups do not straddle ranks."""
    if attention.n_heads % N or (attention.n_kv_heads % N and N % attention.n_kv_heads):
        return False
    return attention.n_heads // N * attention.head_dim % _quantization_unit(attention.o_proj) == 0


def shard_attention(attention, group) -> None:
    """Keep this rank's query heads and the kv heads they read (the
    reference's tp plan: q/k/v colwise, o rowwise); `Attention.output` sums the ranks'
    o_proj results. Heads that do not split (`attention_splits`) stay whole on every
    rank: exact, and no communication."""
    N, rank = group.size(), group.rank()
    if not attention_splits(attention, N):
        return
    shard_inplace(attention.q_proj, "all-to-sharded", group=group)
    shard_inplace(attention.o_proj, "sharded-to-all", group=group)
    if "bias" in attention.o_proj and rank:  # added once, to the sum
        attention.o_proj.bias = mx.zeros_like(attention.o_proj.bias)
    # full layers have no v_proj: their values are k_proj's output, split with it
    kv = [attention.k_proj, *([attention.v_proj] if attention.is_sliding else [])]
    if attention.n_kv_heads % N == 0:
        for proj in kv:
            shard_inplace(proj, "all-to-sharded", group=group)
        attention.n_kv_heads //= N
    else:  # more ranks than kv heads: this rank's query heads all read one
        head = rank * attention.n_kv_heads // N
        for proj in kv:
            keep_outputs(proj, [(head * attention.head_dim, (head + 1) * attention.head_dim)])
        attention.n_kv_heads = 1
    attention.n_heads //= N
    attention.sharding_group = group


def _quantization_unit(module: nn.Module) -> int:
    """How many input features a linear or switch layer keeps together: its
    quantization group (1 when it is not quantized)."""
    return module.group_size if "scales" in module else 1


def keep_outputs(module: nn.Module, spans: list) -> None:
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


def keep_inputs(module: nn.Module, start: int, stop: int, size: int) -> None:
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
    """(width, unit) of a GeGLU block (MLP, SelfConditioning, or Experts, whose
    gate and up are one gate_up_proj): its
    intermediate features, and how many of them a share must keep together
    (down_proj's quantization group)."""
    rows = block.gate_up_proj.weight.shape[-2] // 2 if "gate_up_proj" in block else block.gate_proj.weight.shape[-2]
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


def keep_intermediate(block: nn.Module, start: int, stop: int) -> None:
    """Keep a GeGLU block's intermediate features [start, stop): gate and up
    rows (the experts' fused gate_up_proj keeps the matching rows of both
    halves, gate first), down_proj columns. The ranks' outputs sum to the
    whole block's."""
    width, _ = _intermediate(block)
    if "gate_up_proj" in block:
        keep_outputs(block.gate_up_proj, [(start, stop), (width + start, width + stop)])
    else:
        keep_outputs(block.gate_proj, [(start, stop)])
        keep_outputs(block.up_proj, [(start, stop)])
    keep_inputs(block.down_proj, start, stop, width)
