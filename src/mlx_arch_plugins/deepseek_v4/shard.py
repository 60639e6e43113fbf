"""Tensor and pipeline parallelism for DeepSeek-V4 across ``mx.distributed``.

Tensor parallel (``Model.shard``), per block:

* attention: the query heads (``wq_b`` rows, ``attn_sink``), the output
  groups of ``wo_a`` and the matching input columns of ``wo_b`` are split
  over the ranks; each rank's ``wo_b`` gives a partial sum, all-reduced once.
  The single KV head, ``wq_a``, the compressors and the indexer stay
  replicated, so the top-k choice is the same on every rank (exact).
* MoE: routing stays replicated; every routed expert and the shared expert
  are split along their intermediate width (``gate``/``up`` rows, ``down``
  columns) and the MoE output is all-reduced once, in float32 as the
  reference does.

Pipeline parallel comes from mlx-lm's ``PipelineMixin`` on the inner model;
``pipeline_hidden`` adds the receive / send of the hyper-connection state. As
with stock pipelined models, evaluate each forward pass before building the
next (mlx-lm's generate does): a receive has no inputs, so in one lazy graph
spanning several passes the receives may run out of order.

MLX's CUDA backend (NCCL) has no send / receive ("Recv has no CUDA
implementation", mlx 0.32.4, seen on two H200s). There the stages hand the
state on with all-reduces instead (``pipeline_transport``): after each stage
an all-sum to which only that stage's rank contributes, so every rank holds
the stage's output exactly (the others add zeros).
"""

from __future__ import annotations

import inspect
import os
from typing import List, Optional

import mlx.core as mx
from mlx.nn.layers.distributed import shard_inplace

_SPLIT = ("weight", "scales", "biases")


def _rows(path, w):
    """Split the output axis (rows) of a linear / switch / multi linear."""
    name = path.rsplit(".", 1)[-1]
    if name in _SPLIT:
        return max(w.ndim - 2, 0)
    if name == "bias":
        return -1
    return None  # e.g. a per-expert global scale: keep whole


def _cols(path, w):
    """Split the input axis; the bias is added once, after the sum."""
    name = path.rsplit(".", 1)[-1]
    return -1 if name in _SPLIT else None


def _leading(path, w):
    """Split the leading axis (the output groups of ``wo_a``)."""
    return 0 if path.rsplit(".", 1)[-1] in _SPLIT + ("bias",) else None


def _blocks(model) -> List:
    layers = [b for b in model.model.layers if b is not None]
    return layers + list(model.model.mtp)


def _quant(module):
    """(group_size, mode) of a quantized layer, None when unquantized."""
    if "scales" not in module:
        return None
    return module.group_size, getattr(module, "mode", "affine")


def check_shardable(model, n: int) -> None:
    """Raise ValueError naming the numbers when ``model`` cannot be split
    over ``n`` ranks."""
    args = model.args
    problems = []
    if args.num_attention_heads % n:
        problems.append(
            f"num_attention_heads={args.num_attention_heads} is not divisible by the group size {n}"
        )
    if args.o_groups % n:
        problems.append(
            f"o_groups={args.o_groups} is not divisible by the group size {n} "
            "(each rank needs whole output groups)"
        )
    widths = {"moe_intermediate_size": args.moe_intermediate_size}
    widths["shared expert width"] = args.moe_intermediate_size * args.n_shared_experts
    for what, width in widths.items():
        if width % n:
            problems.append(f"{what}={width} is not divisible by the group size {n}")
    if not problems:
        # Quantized layers split along their input need whole scale groups.
        seen = set()
        for i, blk in enumerate(_blocks(model)):
            cuts = {
                "attn.wo_b": (blk.attn.wo_b, args.o_groups * args.o_lora_rank),
                "ffn.switch_mlp.down_proj": (
                    blk.ffn.switch_mlp.down_proj,
                    args.moe_intermediate_size,
                ),
                "ffn.shared_experts.down_proj": (
                    blk.ffn.shared_experts.down_proj,
                    widths["shared expert width"],
                ),
            }
            for name, (mod, width) in cuts.items():
                q = _quant(mod)
                if q is None or (width // n) % q[0] == 0 or (name, q) in seen:
                    continue
                seen.add((name, q))
                problems.append(
                    f"{name} ({q[1]}, group size {q[0]}) has {width} inputs: "
                    f"{width // n} per rank over {n} ranks is not a whole number "
                    "of quantization groups"
                )
    if problems:
        raise ValueError(
            f"Cannot shard this DeepSeek-V4 model over {n} ranks: " + "; ".join(problems)
        )


def shard_model(model, group: Optional[mx.distributed.Group] = None) -> None:
    """Tensor-parallel split of ``model`` in place over ``group``."""
    group = group or mx.distributed.init()
    n, r = group.size(), group.rank()
    check_shardable(model, n)
    if n == 1:
        return
    for blk in _blocks(model):
        attn = blk.attn
        heads = attn.n_heads // n
        shard_inplace(attn.wq_b, _rows, group=group)
        shard_inplace(attn.wo_a, _leading, group=group)
        shard_inplace(attn.wo_b, _cols, group=group)
        attn.attn_sink = mx.contiguous(attn.attn_sink[r * heads : (r + 1) * heads])
        attn.n_heads = heads
        attn.o_groups //= n
        attn.sharding_group = group

        ffn = blk.ffn
        for mlp in (ffn.switch_mlp, ffn.shared_experts):
            shard_inplace(mlp.gate_proj, _rows, group=group)
            shard_inplace(mlp.up_proj, _rows, group=group)
            shard_inplace(mlp.down_proj, _cols, group=group)
        ffn.sharding_group = group


def even_split(n_layers: int, size: int) -> List[int]:
    """Layers per pipeline rank: as even as possible, low ranks get the
    extra ones (rank 0 runs the last layers)."""
    base, extra = divmod(n_layers, size)
    return [base + (1 if r < extra else 0) for r in range(size)]


def pipeline_split(model, group, split=None) -> None:
    """``PipelineMixin.pipeline`` plus two things for DeepSeek-V4: the MTP
    block is kept only on rank 0 (which also holds the last layers), and on
    mlx-lm versions whose stock split drops a layer when the count is uneven
    (0.31.x computes each rank's start from its own share) the even split is
    applied instead."""
    from mlx_lm.models.pipeline import PipelineMixin

    layers = list(model.layers)
    size = group.size()
    if split is not None or "split" in inspect.signature(PipelineMixin.pipeline).parameters:
        PipelineMixin.pipeline(model, group, split)
    else:
        PipelineMixin.pipeline(model, group)
        want = even_split(len(layers), size)
        start = sum(want[model.pipeline_rank + 1 :])
        end = start + want[model.pipeline_rank]
        if (model.start_idx, model.end_idx) != (start, end):
            model.start_idx, model.end_idx = start, end
            model.layers = [None] * start + layers[start:end]
    if model.pipeline_rank != 0:
        model.mtp = []


def _tie(cache, h):
    """Make evaluating the cache also run the send of ``h`` (mlx-lm evaluates
    only the cache state after a prefill chunk)."""
    subs = getattr(cache, "caches", None)
    for c in subs if subs is not None else [cache]:
        if c is not None and c.window is not None:
            c.window = mx.depends(c.window, h)


TRANSPORT_ENV = "MLX_ARCH_PLUGINS_PIPELINE_TRANSPORT"
TRANSPORTS = ("p2p", "allreduce")


def pipeline_transport() -> str:
    """How pipeline stages hand the state on: ``p2p`` (send / receive) or
    ``allreduce`` (where the backend has no send / receive: MLX on CUDA).
    ``MLX_ARCH_PLUGINS_PIPELINE_TRANSPORT`` chooses either explicitly."""
    chosen = os.environ.get(TRANSPORT_ENV, "")
    if chosen:
        if chosen not in TRANSPORTS:
            raise ValueError(f"{TRANSPORT_ENV}={chosen!r}: expected one of {', '.join(TRANSPORTS)}")
        return chosen
    try:
        on_cuda = mx.default_device() == mx.gpu and mx.cuda.is_available()
    except Exception:  # an MLX without the cuda module
        on_cuda = False
    return "allreduce" if on_cuda else "p2p"


def _stage(layers, h, cache, inputs):
    for layer, c in zip(layers, cache):
        h = layer(h, c, inputs)
    return h


def _hidden_by_allreduce(model, h, inputs, cache):
    """Every stage in turn (the last rank holds the first layers), each handing
    its output to all ranks through an all-sum of it and the others' zeros."""
    rank = model.pipeline_rank
    for stage in range(model.pipeline_size - 1, -1, -1):
        if stage == rank:
            h = _stage(model.pipeline_layers, h, cache, inputs)
            h = mx.distributed.all_sum(h)
        else:
            # the zeros must wait for the previous hand-over: without the dependency
            # this all-sum would not follow (or even need) the one before it, and
            # the ranks' collectives would pair up out of order
            h = mx.distributed.all_sum(mx.depends(mx.zeros_like(h), h))
    if cache:
        # every rank takes part in every all-sum: evaluating its cache (what
        # mlx-lm does after a prefill chunk) must run the later stages' too
        _tie(cache[-1], h)
    return h


def pipeline_hidden(model, h, inputs, cache):
    """Run this rank's layers on the [B, L, hc, D] state ``h``: receive it
    from the rank holding the earlier layers, send it on, then give every
    rank the final state (rank 0 holds the last layers)."""
    rank, size = model.pipeline_rank, model.pipeline_size
    layers = model.pipeline_layers
    if cache is None:
        cache = [None] * len(layers)
    if size > 1 and pipeline_transport() == "allreduce":
        return _hidden_by_allreduce(model, h, inputs, cache), cache
    if rank < size - 1:
        h = mx.distributed.recv_like(h, rank + 1)
    h = _stage(layers, h, cache, inputs)
    if rank != 0:
        h = mx.distributed.send(h, rank - 1)
        if cache:
            _tie(cache[-1], h)
    if size > 1:
        h = mx.distributed.all_gather(h)[: h.shape[0]]
    return h, cache
