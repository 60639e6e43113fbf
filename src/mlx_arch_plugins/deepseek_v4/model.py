"""DeepSeek-V4 (``model_type: deepseek_v4``) for mlx-lm.

Follows DeepSeek's reference inference code: hyper-connection streams mixed
with Sinkhorn-normalised matrices, single-KV-head attention over a sliding
window plus compressed KV entries (ratio 4 with an indexer that picks the top-k
entries, ratio 128 without), the FP8/FP4 rounding the model was trained with,
interleaved RoPE (YaRN on compressed layers) and its inverse on the output, a
grouped low-rank output projection, and a hash- or score-routed MoE with
clipped SwiGLU experts plus a shared expert.

Checkpoints in DeepSeek's own layout (FP8 e4m3 with E8M0 block scales, FP4
e2m1 experts) are re-packed by ``Model.sanitize`` into MLX ``mxfp8`` and
``mxfp4`` layers without dequantising; MLX-format conversions load as they are.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear
from mlx_lm.models.pipeline import PipelineMixin
from mlx_lm.models.switch_layers import SwitchLinear, _scatter_unsort

from . import kernels as _kernels
from . import packed_decode
from .cache import BatchDeepseekV4Cache, DeepseekV4Cache
from .chat_template import TOKENIZER_DEFAULTS, detect_release  # noqa: F401  (host declaration)
from .convert import convert_dequantize, convert_quantize  # noqa: F401  (host declarations)
from .shard import pipeline_hidden, pipeline_split, shard_model

# What the plugin host reads from this module (see mlx_arch_plugins.host.plugins).
CACHE_CLASSES = (DeepseekV4Cache, BatchDeepseekV4Cache)
TINY_BUILDER = f"{__package__}.tiny"


def chat_template_defaults(model_path) -> dict:
    """The encoder release of the checkpoint's own encoder, when it ships one."""
    release = detect_release(model_path)
    return {"encoder_release": release} if release is not None else {}


def selftest(report):
    """Declared for ``mlx-arch-plugins doctor --selftest``: runs a tiny shipped
    checkpoint against DeepSeek's reference logits (see selftest.py)."""
    from .selftest import selftest as run

    run(report)


SUPPORTED_RATIOS = (0, 4, 128)
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "qk_rope_head_dim",
    "q_lora_rank",
    "o_lora_rank",
    "o_groups",
    "sliding_window",
    "compress_ratios",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    sliding_window: int
    compress_ratios: List[int]
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_key_value_heads: int = 1
    n_shared_experts: int = 1
    num_hash_layers: int = 0
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    swiglu_limit: float = 0.0
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False
    quantization_config: Optional[Dict[str, Any]] = None
    quantization: Optional[Dict[str, Any]] = None
    expert_dtype: Optional[str] = None
    # Off only to compare with references that skip the QAT rounding.
    qat_rounding: bool = True
    layer_ids: Optional[List[int]] = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, params):
        missing = [k for k in _REQUIRED if k not in params]
        if missing:
            raise ValueError(
                f"DeepSeek-V4 config.json lacks {len(missing)} required "
                f"key(s): {', '.join(missing)}"
            )
        names = inspect.signature(cls).parameters
        args = {k: v for k, v in params.items() if k in names}
        args.setdefault("model_type", "deepseek_v4")
        return cls(**args)

    def __post_init__(self):
        problems = []
        n_layers = self.num_hidden_layers + self.num_nextn_predict_layers
        ratios = list(self.compress_ratios or [])
        if len(ratios) < self.num_hidden_layers:
            problems.append(
                f"compress_ratios has {len(ratios)} entries for {self.num_hidden_layers} layers"
            )
        bad = sorted({r for r in ratios if r not in SUPPORTED_RATIOS})
        if bad:
            problems.append(f"compress ratio(s) {bad} unsupported (supported: {SUPPORTED_RATIOS})")
        # MTP layers take the trailing entries; missing ones mean window only.
        self.compress_ratios = (ratios + [0] * n_layers)[:n_layers]
        if self.num_key_value_heads != 1:
            problems.append(
                f"num_key_value_heads={self.num_key_value_heads}; "
                "DeepSeek-V4 has one shared KV head"
            )
        rope = self.qk_rope_head_dim
        if rope % 2 or rope > self.head_dim or (self.head_dim - rope) % 64:
            problems.append(
                f"head_dim {self.head_dim} minus qk_rope_head_dim {rope} must be "
                "a multiple of 64 (FP8 rounding blocks) and rope dims even"
            )
        if self.num_attention_heads % self.o_groups:
            problems.append(
                f"num_attention_heads {self.num_attention_heads} not divisible "
                f"by o_groups {self.o_groups}"
            )
        if any(r == 4 for r in self.compress_ratios):
            d = self.index_head_dim
            if d & (d - 1) or d % 32 or d < rope:
                problems.append(
                    f"index_head_dim {d} must be a power of two, a multiple of "
                    f"32 and at least qk_rope_head_dim {rope}"
                )
        if self.num_experts_per_tok > self.n_routed_experts:
            problems.append(
                f"num_experts_per_tok {self.num_experts_per_tok} exceeds "
                f"n_routed_experts {self.n_routed_experts}"
            )
        if self.scoring_func not in ("sqrtsoftplus", "sigmoid", "softmax"):
            problems.append(f"scoring_func {self.scoring_func!r} unknown")
        if self.rope_scaling:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "deepseek_yarn", None, "default"):
                problems.append(f"rope_scaling type {kind!r} unsupported")
        if problems:
            raise ValueError("Unsupported DeepSeek-V4 configuration: " + "; ".join(problems))


# ----------------------------------------------------------------------------
# FP8 / FP4 rounding the model was trained with (QAT simulation)
# ----------------------------------------------------------------------------


def _exponent(x: mx.array) -> mx.array:
    """floor(log2|x|) of normal float32 values, exactly, from the bits."""
    bits = x.view(mx.uint32)
    return ((bits >> 23) & 0xFF).astype(mx.int32) - 127


def _pow2_scale(amax: mx.array, recip: mx.array) -> mx.array:
    """Smallest power of two >= amax * recip (recip = fp32(1/qmax))."""
    s = amax * recip
    bits = s.view(mx.uint32)
    e = _exponent(s) + ((bits & 0x7FFFFF) != 0).astype(mx.int32)
    return _exp2(e)


def _exp2(e: mx.array) -> mx.array:
    """2**e for int32 ``e``, exactly, from the exponent bits: Metal's ``pow``
    need not be exact for integer exponents. Normal range [-126, 127]; 128
    (an infinite or NaN amax) gives inf, as ``pow`` does."""
    e = mx.clip(e, -126, 128)
    return ((e + 127).astype(mx.uint32) << 23).view(mx.float32)


def _round_to_e2m1(q: mx.array) -> mx.array:
    """Round |q| <= 6 to the e2m1 grid (0, 0.5, 1, 1.5, 2, 3, 4, 6), ties to
    even: the grid step is 0.5 below 2, 1 below 4, then 2. (Selects, not an
    exponent: MLX 0.31's compiled CPU kernels got the exponent form wrong.)"""
    a = mx.abs(q)
    step = mx.where(a >= 4, 2.0, mx.where(a >= 2, 1.0, 0.5))
    return mx.round(q / step) * step


# fp32(1/qmax) as data: MLX 0.31's compiled CPU kernels print constants with
# too few digits (6 * (1/6) came out above 1, doubling some scales)
_RECIP = {fmt: mx.array(1.0 / q, dtype=mx.float32) for fmt, q in (("fp8", 448.0), ("fp4", 6.0))}


def _qat_round(x, block, fmt, recip, rounded=None):
    dtype = x.dtype
    shape = x.shape
    xb = x.reshape(*shape[:-1], shape[-1] // block, block)
    # |x| and its max are exact in the input dtype: no float32 copy of x
    amax = mx.max(mx.abs(xb), axis=-1, keepdims=True).astype(mx.float32)
    if fmt == "fp8":
        qmax, floor = 448.0, 1e-4
    else:
        qmax, floor = 6.0, 6 * 2.0**-126
    scale = _pow2_scale(mx.maximum(amax, floor), recip)
    q = mx.clip(xb.astype(mx.float32) / scale, -qmax, qmax)
    if fmt == "fp8":
        # MLX's e4m3 conversion rounds to nearest even with the same
        # subnormals (tests/test_dsv4_qat.py checks it bit for bit)
        q = mx.from_fp8(mx.to_fp8(q), mx.float32)
    else:
        q = _round_to_e2m1(q)
    y = (q * scale).astype(dtype)
    if rounded is not None:  # channels outside the mask pass through
        y = mx.where(rounded, y, xb)
    return y.reshape(shape)


_qat_round_c = mx.compile(_qat_round)


def qat_round(x: mx.array, block: int, fmt: str) -> mx.array:
    """Round ``x`` through FP8 e4m3 (``fmt='fp8'``) or FP4 e2m1 (``'fp4'``) in
    blocks of ``block`` along the last axis with power-of-two scales."""
    return _qat_round_c(x, block, fmt, _RECIP[fmt])


# The module-level caches below hold plain data (built from Python/NumPy, never lazy
# ops): usable from any thread and inside compiled traces. They are bounded because
# their keys follow input shapes.


@functools.lru_cache(maxsize=32)
def _head_mask(d: int, block: int, keep: int) -> mx.array:
    cut = d - keep
    return mx.array([[i * block + j < cut for j in range(block)] for i in range(d // block)])


def qat_round_head(x: mx.array, block: int, fmt: str, keep: int) -> mx.array:
    """``qat_round`` of all but the last ``keep`` channels (a multiple of
    ``block``), which are returned as they are: no slice and concatenate."""
    mask = _head_mask(x.shape[-1], block, keep)
    return _qat_round_c(x, block, fmt, _RECIP[fmt], mask)


@functools.lru_cache(maxsize=16)
def _hadamard_matrix(n: int, dtype: mx.Dtype) -> mx.array:
    h = np.ones((1, 1), dtype=np.float32)
    while h.shape[0] < n:  # Sylvester order
        h = np.block([[h, h], [h, -h]])
    return mx.array(h * np.float32(n**-0.5)).astype(dtype)


def hadamard(x: mx.array) -> mx.array:
    """Normalised Sylvester-order Walsh-Hadamard transform of the last axis."""
    return x @ _hadamard_matrix(x.shape[-1], x.dtype)


# ----------------------------------------------------------------------------
# RoPE: interleaved pairs on the last rope dims; YaRN frequencies only
# ----------------------------------------------------------------------------


class DeepseekV4RoPE:
    """Rotates the last ``rope_dims`` of a vector, pairs (2i, 2i+1)."""

    def __init__(self, rope_dims: int, base: float, scaling: Optional[dict] = None):
        inv = [base ** (-2 * i / rope_dims) for i in range(rope_dims // 2)]
        orig = (scaling or {}).get("original_max_position_embeddings", 0) or 0
        if scaling and orig > 0:
            factor = scaling.get("factor", 1.0)
            fast = scaling.get("beta_fast", 32)
            slow = scaling.get("beta_slow", 1)

            def corr(rot):
                return rope_dims * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

            low = max(math.floor(corr(fast)), 0)
            high = min(math.ceil(corr(slow)), rope_dims - 1)
            if low == high:
                high += 0.001
            inv32 = mx.array(inv, dtype=mx.float32)
            ramp = mx.clip((mx.arange(rope_dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
            # The reference blends in float32; keep its rounding.
            inv = (inv32 / factor * ramp + inv32 * (1 - ramp)).tolist()
        self.rope_dims = rope_dims
        self.inv = inv
        self._freqs: Dict[Any, mx.array] = {}

    def freqs(self, head_dim: int, stride: int = 1, inverse: bool = False):
        """Wavelengths for mx.fast.rope over the whole head: the leading
        non-rope pairs get infinite wavelength (no rotation)."""
        key = (head_dim, stride, inverse)
        if key not in self._freqs:
            sign = -1.0 if inverse else 1.0
            f = [sign / (stride * mx.array(i, dtype=mx.float32).item()) for i in self.inv]
            pad = [math.inf] * ((head_dim - self.rope_dims) // 2)
            self._freqs[key] = mx.array(pad + f, dtype=mx.float32)
        return self._freqs[key]

    def __call__(self, x, offset, inverse: bool = False, stride: int = 1):
        """Rotate ``x`` [B, ..., L, head_dim] at positions stride*(offset + i);
        ``offset`` is an int or an array of one offset per sequence."""
        d = x.shape[-1]
        return mx.fast.rope(
            x,
            d,
            traditional=True,
            base=None,
            scale=1.0,
            offset=batch_offset(offset, x.shape[0]),
            freqs=self.freqs(d, stride, inverse),
        )


def batch_offset(offset, batch: int):
    """An int offset as an array of ``batch`` equal offsets when batch > 1.

    mlx 0.31's Metal kernel for a single position (L == 1) ignores the batch
    dimension when the offset is an int, leaving sequences 2..B unrotated
    (fixed in mlx 0.32.0). An array offset takes the per-sequence path; on
    CPU both give the same bits."""
    if batch == 1 or isinstance(offset, mx.array):
        return offset
    return mx.array([offset] * batch, dtype=mx.int32)  # plain data: fine in any thread


# ----------------------------------------------------------------------------
# Manifold-constrained hyper-connections
# ----------------------------------------------------------------------------


@mx.compile
def _hc_mix_logits(h, fn, eps):
    # the streams' RMS normalisation as one fast kernel (a square, a sum and the
    # scaling were three), applied before the projection instead of after it
    flat = h.reshape(*h.shape[:-2], -1).astype(mx.float32)
    return mx.fast.rms_norm(flat, None, eps) @ fn.T


def _sum_views(c, axis):
    # a short axis summed as adds of its slices (views): mx.compile fuses the sum
    # with the elementwise work around it, where .sum() is a reduction kernel
    # (fewer kernels, but a slice node per term: see _hc_collapse_views)
    idx = [slice(None)] * c.ndim
    total = None
    for j in range(c.shape[axis]):
        idx[axis] = slice(j, j + 1)
        total = c[tuple(idx)] if total is None else total + c[tuple(idx)]
    return total


@mx.compile
def _sinkhorn_split(mixes, scale, base, hc, iters, eps):
    pre = mx.sigmoid(mixes[..., :hc] * scale[0] + base[:hc]) + eps
    post = 2 * mx.sigmoid(mixes[..., hc : 2 * hc] * scale[1] + base[hc : 2 * hc])
    comb = mixes[..., 2 * hc :] * scale[2] + base[2 * hc :]
    comb = comb.reshape(*comb.shape[:-1], hc, hc)
    comb = mx.softmax(comb, axis=-1, precise=True) + eps
    comb = comb / (_sum_views(comb, -2) + eps)
    for _ in range(iters - 1):
        comb = comb / (_sum_views(comb, -1) + eps)
        comb = comb / (_sum_views(comb, -2) + eps)
    return pre, post, comb


@mx.compile
def _hc_collapse(h, fn, scale, base, hc, iters, eps, norm_eps):
    mixes = _hc_mix_logits(h, fn, norm_eps)
    pre, post, comb = _sinkhorn_split(mixes, scale, base, hc, iters, eps)
    x = (pre[..., None] * h.astype(mx.float32)).sum(-2)
    return x.astype(h.dtype), post, comb


# The helpers below keep a decode step's graph small on every backend: the
# hc = 4 streams and the 4 x 4 mixing matrix are tiny, so sums over them are
# written as adds of views (one fused elementwise kernel) instead of
# reductions and matmuls (a kernel each, plus the elementwise work around
# them). Sums run stream by stream, in index order. Scales are taken as
# slices (views): an integer index is a gather kernel.


def _pre_weights(mixes, scale, base, hc, eps):
    # pre_i = sigmoid(l_i s0 + b_i) + eps, each [..., 1] (views of the logits)
    return [
        mx.sigmoid(mixes[..., i : i + 1] * scale[0:1] + base[i : i + 1]) + eps for i in range(hc)
    ]


def _streams_sum(h, weights):
    # sum_i weights_i * h_i in float32, cast back to h's dtype
    x = None
    for i, w in enumerate(weights):
        t = w * h[..., i, :].astype(mx.float32)
        x = t if x is None else x + t
    return x.astype(h.dtype)


def _comb_softmax(mixes, scale, base, hc, eps):
    """softmax over each row of the hc x hc comb logits, + eps, in one
    elementwise kernel: the row max and sum come from column views of the
    raw logits (a softmax primitive and the affine before it are two)."""
    lead = mixes.shape[:-1]
    raw = mixes[..., 2 * hc :].reshape(*lead, hc, hc)
    b = base[2 * hc :].reshape(hc, hc)
    cols = [raw[..., j : j + 1] * scale[2:3] + b[:, j : j + 1] for j in range(hc)]
    top = cols[0]
    for c in cols[1:]:
        top = mx.maximum(top, c)
    total = None
    for c in cols:
        e = mx.exp(c - top)
        total = e if total is None else total + e
    return mx.exp(raw * scale[2:3] + b - top) / total + eps


# The Sinkhorn half-steps are a reduction and a divide each. Sums of the hc
# column / row views fuse each half-step into one kernel (half the kernels),
# but cost 4 slices and a 6-input kernel per half-step, and a step's host time
# follows its graph's edges (inputs and outputs of every node, views
# included), not its kernel count. On the H200 at 43 layers the reductions
# gave a 21% shorter portable decode step (benchmarks/RESULTS.md, eighth
# session). A whole iteration in one kernel (each lane recomputing it from the
# 16 entries) was slower still: that kernel reads 22 arrays.
@mx.compile
def _hc_collapse_views(h, fn, scale, base, hc, iters, eps, norm_eps):
    """``_hc_collapse`` in fewer kernels (the same arithmetic up to fp32
    rounding): softmax, pre weights and the weighted sum are elementwise; the
    Sinkhorn half-steps are reductions (see above)."""
    mixes = _hc_mix_logits(h, fn, norm_eps)
    comb = _comb_softmax(mixes, scale, base, hc, eps)
    comb = comb / (comb.sum(-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(-1, keepdims=True) + eps)
        comb = comb / (comb.sum(-2, keepdims=True) + eps)
    post = 2 * mx.sigmoid(mixes[..., hc : 2 * hc] * scale[1:2] + base[hc : 2 * hc])
    x = _streams_sum(h, _pre_weights(mixes, scale, base, hc, eps))
    return x, post, comb


@mx.compile
def _hc_weighted(h, pre):
    return _streams_sum(h, [pre[..., i : i + 1] for i in range(h.shape[-2])])


@mx.compile
def _hc_expand(y, residual, post, comb):
    # stream k = post_k * y + sum_j comb[j, k] * residual_j, all streams in
    # one elementwise kernel: row j of comb as a column [..., hc, 1] times
    # stream j [..., 1, D] (a matmul would be a kernel of its own)
    out = post[..., None] * y[..., None, :].astype(mx.float32)
    for j in range(residual.shape[-2]):
        out = out + comb[..., j, :, None] * residual[..., j : j + 1, :].astype(mx.float32)
    return out.astype(residual.dtype)


class HyperConnection(nn.Module):
    """Collapses the hc streams to one sub-layer input, then expands back."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hc = args.hc_mult
        self.hc = hc
        self.iters = args.hc_sinkhorn_iters
        self.eps = args.hc_eps
        self.norm_eps = args.rms_norm_eps
        self.fn = mx.zeros(((2 + hc) * hc, hc * args.hidden_size), dtype=mx.float32)
        self.base = mx.zeros(((2 + hc) * hc,), dtype=mx.float32)
        self.scale = mx.ones((3,), dtype=mx.float32)

    def collapse(self, h):
        if _kernels.use_sinkhorn_kernel(h.size // (h.shape[-1] * h.shape[-2])):
            # decode on CUDA: one kernel for the whole Sinkhorn
            mixes = _hc_mix_logits(h, self.fn, self.norm_eps)
            pre, post, comb = _kernels.sinkhorn_split(
                mixes, self.scale, self.base, self.hc, self.iters, self.eps
            )
            return _hc_weighted(h, pre), post, comb
        return _hc_collapse_views(
            h,
            self.fn,
            self.scale,
            self.base,
            self.hc,
            self.iters,
            self.eps,
            self.norm_eps,
        )


class HyperHead(nn.Module):
    """Final collapse of the hc streams (sigmoid weights, no Sinkhorn)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        hc = args.hc_mult
        self.eps = args.hc_eps
        self.norm_eps = args.rms_norm_eps
        self.fn = mx.zeros((hc, hc * args.hidden_size), dtype=mx.float32)
        self.base = mx.zeros((hc,), dtype=mx.float32)
        self.scale = mx.ones((1,), dtype=mx.float32)

    def __call__(self, h):
        mixes = _hc_mix_logits(h, self.fn, self.norm_eps)
        pre = mx.sigmoid(mixes * self.scale + self.base) + self.eps
        return (pre[..., None] * h.astype(mx.float32)).sum(-2).astype(h.dtype)


# ----------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------


class Compressor(nn.Module):
    """Pools each block of ``ratio`` tokens into one KV entry (softmax over the
    block per channel); ratio 4 blocks also pool the previous block through
    the first half of the channels."""

    def __init__(self, args: ModelArgs, ratio: int, dim: int, rope: DeepseekV4RoPE):
        super().__init__()
        self.ratio = ratio
        self.dim = dim
        self.overlap = ratio == 4
        width = dim * (2 if self.overlap else 1)
        self.wkv = nn.Linear(args.hidden_size, width, bias=False)
        self.wgate = nn.Linear(args.hidden_size, width, bias=False)
        self.ape = mx.zeros((ratio, width), dtype=mx.float32)
        self.norm = nn.RMSNorm(dim, eps=args.rms_norm_eps)
        self._rope = rope

    def project(self, x):
        return linear(self.wkv, x), linear(self.wgate, x)

    def __call__(self, proj, offset: int, kv_rows, score_rows, keep_all: bool = False):
        """Feed tokens at positions [offset, offset+L), given their
        ``project`` outputs.

        ``kv_rows``/``score_rows`` hold the pending rows from earlier calls
        (positions [start, offset)). Returns the new entries (normalised,
        RoPE'd, not yet rounded) and the new pending rows; with ``keep_all``
        every row seen, pooled or not (the cache keeps what an undo needs).
        """
        m, d = self.ratio, self.dim
        kv, score = proj
        B, L, _ = kv.shape
        dtype = kv.dtype
        kv = kv.astype(mx.float32)
        p0 = offset % m
        ape = self.ape[p0 : p0 + L] if p0 + L <= m else self.ape[mx.arange(offset, offset + L) % m]
        score = score.astype(mx.float32) + ape
        if kv_rows is not None:
            kv = mx.concatenate([kv_rows, kv], 1)
            score = mx.concatenate([score_rows, score], 1)
        start = offset - (0 if kv_rows is None else kv_rows.shape[1])
        end = offset + L
        first, last = offset // m, end // m  # new entries: blocks [first, last)
        entries = None
        if last > first:
            lo = (first - 1) * m if self.overlap else first * m
            if lo < start:  # block -1 of an overlapping first block: empty
                pad = start - lo
                kv = mx.concatenate([mx.zeros((B, pad, kv.shape[2])), kv], 1)
                score = mx.concatenate([mx.full((B, pad, kv.shape[2]), -mx.inf), score], 1)
                start = lo
            blk_kv = kv[:, lo - start : last * m - start]
            blk_sc = score[:, lo - start : last * m - start]
            nb = last - first
            if self.overlap:
                blk_kv = blk_kv.reshape(B, nb + 1, m, 2 * d)
                blk_sc = blk_sc.reshape(B, nb + 1, m, 2 * d)
                blk_kv = mx.concatenate([blk_kv[:, :-1, :, :d], blk_kv[:, 1:, :, d:]], 2)
                blk_sc = mx.concatenate([blk_sc[:, :-1, :, :d], blk_sc[:, 1:, :, d:]], 2)
            else:
                blk_kv = blk_kv.reshape(B, nb, m, d)
                blk_sc = blk_sc.reshape(B, nb, m, d)
            w = mx.softmax(blk_sc, axis=2, precise=True)
            entries = (blk_kv * w).sum(2).astype(dtype)
            entries = self.norm(entries)
            # entry k sits at position k*m: stride-m rotation from block index
            entries = self._rope(entries, first, stride=m)
        keep = (last - 1) * m if (self.overlap and last > 0) else last * m
        keep = max(keep, start) if not keep_all else start
        rows_kv = kv[:, keep - start :] if end > keep else None
        rows_sc = score[:, keep - start :] if end > keep else None
        return entries, rows_kv, rows_sc


# Two-stage top-k for the CSA indexer (off by default; see topk_indices).
TOPK_CHUNK_ENV = "MLX_ARCH_PLUGINS_TOPK_CHUNK"


def _topk_chunk() -> int:
    try:
        return int(os.environ.get(TOPK_CHUNK_ENV, "0"))
    except ValueError:
        return 0


def topk_indices(
    score: mx.array, k: int, chunk: Optional[int] = None, limit: Optional[mx.array] = None
) -> mx.array:
    """Indices of the ``k`` largest scores along the last axis (in no order).

    ``limit`` (broadcast to the leading shape): each row's entries from there on are
    out of reach; a row with at most ``k`` entries before it also gets entries past
    it, for the caller to mask. On MLX CUDA, for enough rows, a radix-select kernel
    (``kernels.topk_rows``) does it. Elsewhere ``argpartition``, a full sort on Metal
    and CUDA, over the
    indexer's n/4 entries per query (32K at 128K context). With a ``chunk``
    (argument, else ``MLX_ARCH_PLUGINS_TOPK_CHUNK``; 0 = off, the default) larger
    than ``k`` and shorter than the row, each chunk's top ``k`` is found first and
    then the top ``k`` of those candidates: the same set for distinct scores, since
    an entry of the overall top k is in its own chunk's top k.
    benchmarks/topk_probe.py measures whether it pays."""
    chunk = _topk_chunk() if chunk is None else chunk
    n = score.shape[-1]
    two_stage = k < chunk < n
    if not two_stage and _kernels.topk_kernel_enabled(score, k):
        return _kernels.topk_rows(score, k, limit)
    if limit is not None:
        score = mx.where(mx.arange(n) < mx.expand_dims(limit, -1), score, -mx.inf)
    if not two_stage:
        return mx.argpartition(-score, kth=k - 1, axis=-1)[..., :k]
    return _top_k_two_stage(score, k, chunk)


def _top_k_two_stage(score, k, chunk):
    n, lead = score.shape[-1], score.shape[:-1]
    nb = n // chunk
    full = nb * chunk
    blocks = score[..., :full].reshape(*lead, nb, chunk)
    part = mx.argpartition(-blocks, kth=k - 1, axis=-1)[..., :k]  # [..., nb, k]
    cand = (part + mx.arange(0, full, chunk, dtype=mx.uint32)[:, None]).reshape(*lead, nb * k)
    if full < n:  # the short last chunk: all of it is a candidate (no padding to pick)
        tail = mx.broadcast_to(mx.arange(full, n, dtype=mx.uint32), (*lead, n - full))
        cand = mx.concatenate([cand, tail], axis=-1)
    best = mx.argpartition(-mx.take_along_axis(score, cand, axis=-1), kth=k - 1, axis=-1)
    return mx.take_along_axis(cand, best[..., :k], axis=-1)


class Indexer(nn.Module):
    """Scores compressed entries for CSA and keeps the top ``index_topk``."""

    def __init__(self, args: ModelArgs, rope: DeepseekV4RoPE):
        super().__init__()
        self.n_heads = args.index_n_heads
        self.head_dim = args.index_head_dim
        self.topk = args.index_topk
        self.qat = args.qat_rounding
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.weights_proj = nn.Linear(args.hidden_size, self.n_heads, bias=False)
        self.compressor = Compressor(args, 4, self.head_dim, rope)
        self._rope = rope

    def rotate(self, v):
        v = hadamard(v)
        return qat_round(v, 32, "fp4") if self.qat else v

    def queries(self, q, offset):
        """Index queries from the ``wq_b`` projection of the low-rank q."""
        B, L, _ = q.shape
        q = q.reshape(B, L, self.n_heads, self.head_dim)
        q = self._rope(q.transpose(0, 2, 1, 3), offset).transpose(0, 2, 1, 3)
        return self.rotate(q)

    def fused(self, q, keys) -> bool:
        """Whether ``scores`` takes the CUDA kernel for these queries and keys."""
        return q.shape[1] >= FUSED_INDEX_QUERIES and _kernels.indexer_kernel_enabled(q, keys)

    def scores(self, q, w, keys):
        """score[b, t, k] = sum_h w[b,t,h] relu(q[b,t,h] . keys[b,k]), with
        w the ``weights_proj`` output."""
        w = w.astype(mx.float32)
        w = w * (self.head_dim**-0.5 * self.n_heads**-0.5)
        if self.fused(q, keys):
            return _kernels.indexer_scores(q, w, keys)
        dots = q @ keys[:, None].swapaxes(-1, -2)  # [B, L, H, N]
        return _relu_weighted_sum(dots, w[..., None])


# Blocks of at least this many queries (prefill) take the CUDA indexer kernel where it
# is enabled; decode and verify keep the compiled portable sum.
FUSED_INDEX_QUERIES = 8


@functools.partial(mx.compile, shapeless=True)
def _relu_weighted_sum(dots, w):
    """sum over heads (axis 2) of w * relu(dots) in float32. Compiled, the cast, relu
    and product are one kernel over the [B, L, H, N] products (at 128K context a
    prefill block's are 256 MB) instead of three; shapeless, as N grows every few
    tokens."""
    return (mx.maximum(dots.astype(mx.float32), 0) * w).sum(2)


def memoised(owner, name: str, anchors: tuple, key, build):
    """``build()``'s value, kept on ``owner`` as ``name`` while ``anchors`` are the same
    objects and ``key`` is equal; ``build`` returns ``(value, keep)``.

    The one memo idiom of the model. Held as a plain attribute (``nn.Module`` would take
    a tuple of arrays for a child) together with the anchors' ids: a deep copy of the
    model (whose anchors have new ids) builds its own values instead of using closures
    over the original's modules. ``key`` must be picklable (no ``mx.Dtype``: use str).
    """
    ids = (tuple(id(a) for a in anchors), key)
    held = owner.__dict__.get(name)
    if held is not None and held[0] == ids and all(x is y for x, y in zip(held[1], anchors)):
        return held[2]
    value, keep = build()
    if keep:
        object.__setattr__(owner, name, (ids, anchors, value))
    return value


def row_offsets(B: int, cap: int, ndim: int) -> mx.array:
    """``b * cap`` for each batch row ``b``, shaped to broadcast over ``ndim`` axes."""
    return (mx.arange(B) * cap).reshape(B, *([1] * (ndim - 1)))


def gather_rows(flat: mx.array, top: mx.array, base: mx.array) -> mx.array:
    """The rows each batch row's top-k picked: ``flat`` is the batch's rows flattened
    to [B * cap, hd], ``top`` [B, ..., k] indices within a row's own ``cap`` rows and
    ``base`` their ``row_offsets``. Returns [B, ..., k, hd]."""
    return flat[(top + base).reshape(-1)].reshape(*top.shape, flat.shape[-1])


class DeepseekV4Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.head_dim = args.head_dim
        self.rope_dims = args.qk_rope_head_dim
        self.window = args.sliding_window
        self.ratio = args.compress_ratios[layer_id]
        self.o_groups = args.o_groups
        self.eps = args.rms_norm_eps
        self.qat = args.qat_rounding
        self.scale = self.head_dim**-0.5

        self.wq_a = nn.Linear(args.hidden_size, args.q_lora_rank, bias=False)
        self.q_norm = nn.RMSNorm(args.q_lora_rank, eps=args.rms_norm_eps)
        self.wq_b = nn.Linear(args.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wkv = nn.Linear(args.hidden_size, self.head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.head_dim, eps=args.rms_norm_eps)
        self.wo_a = MultiLinear(
            self.n_heads * self.head_dim // args.o_groups, args.o_lora_rank, args.o_groups
        )
        self.wo_b = nn.Linear(args.o_groups * args.o_lora_rank, args.hidden_size, bias=False)
        self.attn_sink = mx.zeros((self.n_heads,), dtype=mx.float32)
        self.sharding_group = None  # set by Model.shard

        if self.ratio:
            self._rope = DeepseekV4RoPE(
                args.qk_rope_head_dim, args.compress_rope_theta, args.rope_scaling
            )
            self.compressor = Compressor(args, self.ratio, self.head_dim, self._rope)
            if self.ratio == 4:
                self.indexer = Indexer(args, self._rope)
        else:
            self._rope = DeepseekV4RoPE(args.qk_rope_head_dim, args.rope_theta)

    def _round_kv(self, kv):
        """FP8 round-trip of the non-rope dims (blocks of 64)."""
        if not self.qat:
            return kv
        nope = self.head_dim - self.rope_dims
        if nope == 0:
            return kv
        if self.rope_dims % 64 == 0:
            return qat_round_head(kv, 64, "fp8", self.rope_dims)
        return mx.concatenate([qat_round(kv[..., :nope], 64, "fp8"), kv[..., nope:]], axis=-1)

    def __call__(self, x, cache=None):
        q, kv, proj = self.project(x, self.index_flag(cache, x.shape[1]))
        return self.output(self.attend(q, kv, proj, cache))

    # The call is cut in three so that a decode step can compile the parts
    # that do not touch the cache (see DeepseekV4Block).
    def index_flag(self, cache, L: int) -> bool:
        """Whether the indexer selects after these L tokens (CSA only)."""
        if self.ratio != 4:
            return False
        last = (cache.size() if cache is not None else 0) + L
        return last // self.ratio > self.indexer.topk

    def project(self, x, index: bool):
        """Queries, KV rows and compressor/indexer projections of ``x``."""
        B, L, _ = x.shape
        qr = self.q_norm(linear(self.wq_a, x))
        q = linear(self.wq_b, qr).reshape(B, L, self.n_heads, self.head_dim)
        q = mx.fast.rms_norm(q, None, self.eps)
        kv = self.kv_norm(linear(self.wkv, x))
        # compressor/indexer projections for all rows at once (weights read once)
        proj = self._project(x, qr, index) if self.ratio else {}
        return q, kv, proj

    def attend(self, q, kv, proj, cache=None):
        """Attention output [B, L, H, hd] of the projected rows; updates the cache."""
        L = q.shape[1]
        if isinstance(cache, BatchDeepseekV4Cache) and cache.decoding(L):
            return packed_decode.decode(self, q, kv, proj, cache)
        if isinstance(cache, BatchDeepseekV4Cache):
            outs = []
            for b, lo, n in cache.segments(L):
                if n == 0:
                    outs.append(mx.zeros((1, L, self.n_heads, self.head_dim), q.dtype))
                    continue
                sl = (slice(b, b + 1), slice(lo, lo + n))
                sub = {k: v[sl] for k, v in proj.items()}
                o = self._attend(q[sl], kv[sl], sub, cache.caches[b])
                parts = [o]
                if lo:
                    parts.insert(0, mx.zeros((1, lo) + o.shape[2:], o.dtype))
                if L - lo - n:
                    parts.append(mx.zeros((1, L - lo - n) + o.shape[2:], o.dtype))
                outs.append(mx.concatenate(parts, 1) if len(parts) > 1 else o)
            return mx.concatenate(outs, 0)
        if cache is None:
            cache = DeepseekV4Cache(self.window, self.ratio)
        return self._attend(q, kv, proj, cache)

    def output(self, o):
        """Grouped low-rank output projection: heads are cut into o_groups."""
        B, L = o.shape[:2]
        G = self.o_groups
        o = o.reshape(B, L, G, -1).transpose(0, 2, 1, 3)
        o = linear(self.wo_a, o).transpose(0, 2, 1, 3).reshape(B, L, -1)
        o = linear(self.wo_b, o)
        if self.sharding_group is not None:  # partial sums over head groups
            o = mx.distributed.all_sum(o, group=self.sharding_group)
        return o

    def _project(self, x, qr, index: bool):
        """Compressor (and indexer) projections; the index queries and head
        weights only when the indexer is going to select (``index``)."""
        proj = dict(zip(("ckv", "cgate"), self.compressor.project(x)))
        if self.ratio == 4:
            proj.update(zip(("ikv", "igate"), self.indexer.compressor.project(x)))
            if index:
                proj["iq"] = linear(self.indexer.wq_b, qr)
                proj["iw"] = linear(self.indexer.weights_proj, x)
        return proj

    def _sinks(self, dtype):
        # cast once per weight array and dtype, not once per step
        def build():
            cast = self.attn_sink.astype(dtype)
            try:  # keep only evaluated data (any thread may use it later)
                mx.eval(cast)
            except Exception:  # e.g. inside a compiled trace: do not keep
                return cast, False
            return cast, True

        return memoised(self, "_sink_memo", (self, self.attn_sink), str(dtype), build)

    def _attend(self, q, kv, proj, cache: DeepseekV4Cache):
        """Attention for tokens at positions [T, T+L) of one aligned batch."""
        B, L = q.shape[:2]
        T = cache.offset
        cache.checkpoint(L)  # references only: lets trim() undo these tokens
        q = self._rope(q.transpose(0, 2, 1, 3), T)  # [B, H, L, hd]
        kv = self._round_kv(self._rope(kv, T))  # [B, L, hd]
        if L == 1:
            return self._decode_one(q, kv, proj, cache)

        # raw window: cached rows (positions [T-W0, T)) then the new ones
        win = cache.window
        keys = kv if win is None else mx.concatenate([win, kv], 1)
        W0 = 0 if win is None else win.shape[1]
        sinks = self._sinks(q.dtype)
        N = self._update_compressed(proj, T, cache) if self.ratio else 0
        if self.ratio == 4 and N > self.indexer.topk:
            o = self._sparse(q, keys, W0, T, proj, cache, sinks)
        else:
            # every visible entry is attended (HCA, or CSA whose visible entries all
            # fit in the top-k)
            o = self._dense(q, keys, W0, T, cache.comp if N else None, sinks)
        o = self._rope(o, T, inverse=True).transpose(0, 2, 1, 3)
        cache.push_window(kv)
        cache.offset = T + L
        return o

    def _decode_one(self, q, kv, proj, cache: DeepseekV4Cache):
        """One token of an aligned batch: after the push the window holds
        exactly the rows this query sees, and every compressed entry is
        visible, so no mask is built."""
        T = cache.offset
        cache.push_window(kv)
        keys = cache.window
        sinks = self._sinks(q.dtype)
        N = self._update_compressed(proj, T, cache) if self.ratio else 0
        if self.ratio == 4 and N > self.indexer.topk:
            B, hd = keys.shape[0], keys.shape[-1]
            iq = self.indexer.queries(proj["iq"], T)
            score = self.indexer.scores(iq, proj["iw"], cache.index)[:, 0]  # [B, N]
            top = topk_indices(score, self.indexer.topk)
            cap = cache._comp.shape[1]
            flat = cache._comp.reshape(-1, hd)
            keys = mx.concatenate([keys, gather_rows(flat, top, row_offsets(B, cap, 2))], 1)
        elif N:
            keys = mx.concatenate([keys, cache.comp], 1)
        o = mx.fast.scaled_dot_product_attention(
            q, keys[:, None], keys[:, None], scale=self.scale, sinks=sinks
        )
        cache.offset = T + 1
        return self._rope(o, T, inverse=True).transpose(0, 2, 1, 3)

    def _update_compressed(self, proj, T, cache: DeepseekV4Cache) -> int:
        """Feed the compressors; append completed entries; return their count."""
        # a chunk hands all its rows to the cache, which keeps the pending
        # ones plus what trim() needs to stop inside the chunk
        chunk = proj["ckv"].shape[1] > 1
        end = T + proj["ckv"].shape[1]
        new, kv, sc = self.compressor(
            (proj["ckv"], proj["cgate"]), T, cache.comp_kv, cache.comp_score, chunk
        )
        cache.comp_kv, cache.comp_score = (
            cache.keep_rows("comp", kv, sc, end) if chunk else (kv, sc)
        )
        new_idx = None
        if self.ratio == 4:
            new_idx, kv, sc = self.indexer.compressor(
                (proj["ikv"], proj["igate"]), T, cache.index_kv, cache.index_score, chunk
            )
            cache.index_kv, cache.index_score = (
                cache.keep_rows("index", kv, sc, end) if chunk else (kv, sc)
            )
            if new_idx is not None:
                new_idx = self.indexer.rotate(new_idx)
        if new is not None:
            cache.append_entries(self._round_kv(new), new_idx)
        return cache.n_comp

    # Bound on the elements of one query block's scores / gathered keys (prefill
    # activations stay bounded at any context length).
    _BLOCK_ELEMS = 1 << 26

    # Bound on the elements of one query block's indexer products [n, Hi, N] (bf16,
    # then float32 in the head sum). A trade, measured on the H200 at 128K context
    # (benchmarks/RESULTS.md, ninth session): 4x this bound made the CSA layer 11%
    # faster and the 43-layer prefill's peak 16 GB higher (likely because a GPU holds
    # the buffers of every queued block until it has run it; the CPU does not). With
    # the CUDA indexer kernel the bound is on the block's [n, N] float32 scores (a
    # whole 2048-token chunk at 128K; the 43-layer peak fell 5 GB, thirteenth session).
    _INDEX_BLOCK_ELEMS = 1 << 26

    def _sparse_block(self, L: int) -> int:
        """Queries per block of the sparse branch's attention (each has its own keys)."""
        keys = self._BLOCK_ELEMS // ((self.window + self.indexer.topk) * self.head_dim)
        return max(1, min(L, keys))

    def _index_block(self, L: int, N: int, fused: bool = False) -> int:
        """Queries per block of the indexer's scores over ``N`` cached entries. The
        bound is on the [n, heads, N] products, or with the fused kernel (which keeps
        them in registers) on the [n, N] scores."""
        per_query = N if fused else self.indexer.n_heads * N
        return max(1, min(L, self._INDEX_BLOCK_ELEMS // max(1, per_query)))

    def _query_block(self, L: int, width: int) -> int:
        """Queries per block when each query scores ``width`` keys in every head: at
        most a window's worth, so a block's keys (its queries' window rows plus the
        entries) are at most twice what each query sees. Larger blocks score mostly
        masked keys: on the H200 a 2048-token chunk's window attention took 10 ms in
        one block and 4.3 ms in blocks of the window (benchmarks/prefill_parts.py)."""
        budget = self._BLOCK_ELEMS // max(1, self.n_heads * width)
        return max(1, min(L, self.window, budget))

    def _dense(self, q, keys, W0, T, comp, sinks):
        """Causal window attention (plus every visible compressed entry in ``comp``)
        for queries at positions [T, T+L), in blocks of queries. Each block takes only
        the window rows its queries can see, so no score buffer grows with L x keys
        (head_dim 512 has no fused attention kernel: scores are materialised)."""
        B, H, L, hd = q.shape
        win, m = self.window, self.ratio
        N = 0 if comp is None else comp.shape[1]
        bq = self._query_block(L, min(L, win) + win + N)
        outs = []
        for a in range(0, L, bq):
            n = min(bq, L - a)
            lo, hi = max(0, a + W0 - win + 1), a + n + W0  # window rows seen by the block
            # at prefill sizes, keys in a multiple of _KEY_ALIGN (aligned products, as
            # in the sparse branch): earlier rows, which the mask hides from every query
            # of the block, and where there are none, masked zero rows
            pad = -(hi - lo + N) % _KEY_ALIGN if n >= _ALIGN_QUERIES else 0
            lo, zeros = max(0, lo - pad), max(0, pad - lo)
            kpos = mx.arange(T - W0 + lo, T - W0 + hi)
            qpos = mx.arange(T + a, T + a + n)
            mask = (kpos[None] <= qpos[:, None]) & (kpos[None] > qpos[:, None] - win)
            kk = keys[:, lo:hi]
            if N:
                seen = mx.arange(N)[None] < ((qpos + 1) // m)[:, None]
                kk = mx.concatenate([kk, comp], 1)
                mask = mx.concatenate([mask, seen], 1)
            if zeros:
                kk = mx.concatenate([kk, mx.zeros((B, zeros, hd), kk.dtype)], 1)
                mask = mx.concatenate([mask, mx.zeros((n, zeros), mx.bool_)], 1)
            mask = mx.broadcast_to(mask, (B, n, kk.shape[1]))[:, None]
            qq = q[:, :, a : a + n] if n < L else q
            outs.append(
                mx.fast.scaled_dot_product_attention(
                    qq, kk[:, None], kk[:, None], scale=self.scale, mask=mask, sinks=sinks
                )
            )
        return outs[0] if len(outs) == 1 else mx.concatenate(outs, 2)

    def _select(self, proj, T, L, cache):
        """The indexer's choice for queries at [T, T+L): [B, L, k] entry indices and
        whether each entry was complete by then. In query blocks of their own: their
        bound (the products over every entry) shrinks as the context grows, and the
        attention's blocks need not shrink with it."""
        k, m, N = self.indexer.topk, self.ratio, cache.n_comp
        iq = self.indexer.queries(proj["iq"], T)  # [B, L, Hi, ihd]
        bq = self._index_block(L, N, self.indexer.fused(iq, cache.index))
        tops, oks = [], []
        for a in range(0, L, bq):
            n = min(bq, L - a)
            complete = (T + mx.arange(a, a + n) + 1) // m  # entries each query sees
            score = self.indexer.scores(iq[:, a : a + n], proj["iw"][:, a : a + n], cache.index)
            top = topk_indices(score, k, limit=complete)  # [B, n, k]
            tops.append(top)
            oks.append(top < complete[:, None])
        return _joined(tops, 1), _joined(oks, 1)

    def _sparse(self, q, keys, W0, T, proj, cache, sinks):
        """CSA with the indexer's top-k: each query attends to its own window
        rows and its own chosen entries. Queries are processed in blocks and,
        within a block, each one as a batch row of a one-query SDPA."""
        B, H, L, hd = q.shape
        win, k = self.window, self.indexer.topk
        N, comp = cache.n_comp, cache.comp
        top, ok_entries = self._select(proj, T, L, cache)
        span = win + k
        pad = _aligned_keys(span) - span - 1
        bq = self._sparse_block(L)
        # every row a query may take, in one array: the window's keys, the entries,
        # then a zero row (the sink's key and value, and the padding's)
        nk = keys.shape[1]
        rows_of = mx.concatenate(
            [keys.reshape(B * nk, hd), comp.reshape(B * N, hd), mx.zeros((1, hd), keys.dtype)]
        )
        key_base = row_offsets(B, nk, 3)
        entry_base = B * nk + row_offsets(B, N, 3)
        outs = []
        for a in range(0, L, bq):
            n = min(bq, L - a)
            rows = mx.arange(a, a + n)
            # window rows of query t: key indices t-win+1 .. t (in `keys`)
            iw = (rows + W0 - win + 1)[:, None] + mx.arange(win)[None]  # [n, win]
            ok_w = mx.broadcast_to(iw >= 0, (B, n, win))
            zero = mx.full((B, n, 1 + pad), B * (nk + N), dtype=mx.int32)
            chosen = top[:, a : a + n]
            pick = mx.concatenate([key_base + mx.maximum(iw, 0), entry_base + chosen, zero], 2)
            kk = take_rows(rows_of, pick).reshape(B * n, 1, span + 1 + pad, hd)
            ok = mx.concatenate([ok_w, ok_entries[:, a : a + n]], 2).reshape(B * n, 1, 1, span)
            # the heads as the query axis of one KV head: each query's scores are one
            # [H, hd] x [hd, span] product that reads its keys once (as H queries
            # sharing one KV head, the unfused attention re-read them for every head:
            # 44 ms instead of ~10 for a 2048-token chunk on the H200)
            qq = q[:, :, a : a + n].transpose(0, 2, 1, 3).reshape(B * n, 1, H, hd)
            bias = _sink_bias(ok, sinks, qq.dtype, pad)
            o = mx.fast.scaled_dot_product_attention(qq, kk, kk, scale=self.scale, mask=bias)
            outs.append(o.reshape(B, n, H, hd))
        return _joined(outs, 1).transpose(0, 2, 1, 3)


def _joined(parts, axis):
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis)


# Keys per query of the sparse branch are padded to a multiple of this (masked zero
# rows): with rows of an odd length (641) the H200 ran the attention's two products
# with cuBLAS's unaligned kernels (benchmarks/RESULTS.md, eleventh session).
_KEY_ALIGN = 8
_ALIGN_QUERIES = 64  # dense branch: blocks of fewer queries (decode, verify) are not padded


def _aligned_keys(width: int) -> int:
    """Key rows of an attention over ``width`` keys: those, the sink's zero row, and
    masked padding up to a multiple of ``_KEY_ALIGN``."""
    return -(-(width + 1) // _KEY_ALIGN) * _KEY_ALIGN


def take_rows(rows: mx.array, pick: mx.array) -> mx.array:
    """``rows[pick]`` for [R, D] ``rows``: gathered as 8-byte words where a row's bytes
    allow (a quarter of the elements of a 2-byte gather). Returns [*pick.shape, D]."""
    D = rows.shape[-1]
    flat = pick.reshape(-1)
    if (D * rows.dtype.size) % 8 or rows.dtype.size >= 8:
        return rows[flat].reshape(*pick.shape, D)
    words = rows.view(mx.uint64)[flat]
    return words.view(rows.dtype).reshape(*pick.shape, D)


def _sink_bias(ok: mx.array, sinks: mx.array, dtype, pad: int = 0) -> mx.array:
    """Additive mask [R, 1, H, span + 1 + pad] for queries laid out as heads: 0 where
    ``ok`` [R, 1, 1, span], -inf elsewhere; then head h's sink logit (its key and value
    rows are zero: the sink adds exp(sink) to the softmax's sum and nothing to the
    output, as ``sdpa(..., sinks=...)`` does per head); then ``pad`` masked columns."""
    R, span, H = ok.shape[0], ok.shape[-1], sinks.shape[0]
    bias = mx.where(ok, mx.array(0, dtype), mx.array(-mx.inf, dtype))
    sink = sinks.astype(dtype).reshape(1, 1, H, 1)
    parts = [mx.broadcast_to(bias, (R, 1, H, span)), mx.broadcast_to(sink, (R, 1, H, 1))]
    if pad:
        parts.append(mx.full((R, 1, H, pad), -mx.inf, dtype=dtype))
    return mx.concatenate(parts, -1)


# ----------------------------------------------------------------------------
# MoE
# ----------------------------------------------------------------------------


@mx.compile
def _gate_scores(x, weight, scoring):
    logits = x.astype(mx.float32) @ weight.astype(mx.float32).T
    if scoring == "softmax":
        return mx.softmax(logits, axis=-1, precise=True)
    if scoring == "sigmoid":
        return mx.sigmoid(logits)
    return mx.sqrt(nn.softplus(logits))


@mx.compile
def _gate_keys(x, weight, bias, scoring):
    # scores and the negated biased scores argpartition ranks, in one pass
    scores = _gate_scores(x, weight, scoring)
    return scores, -(scores + bias)


@mx.compile
def _route_weights(w, scale, normalize):
    if normalize:  # the top-k sum as adds of views: fused with the division
        w = w / _sum_views(w, -1)
    return w * scale


class MoEGate(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.hash = layer_id < args.num_hash_layers
        self.scoring = args.scoring_func
        self.route_scale = args.routed_scaling_factor
        self.normalize = args.norm_topk_prob
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        if self.hash:
            self.tid2eid = mx.zeros((args.vocab_size, self.top_k), dtype=mx.int32)
        else:
            self.e_score_correction_bias = mx.zeros((args.n_routed_experts,), dtype=mx.float32)

    def __call__(self, x, input_ids):
        if self.hash:
            scores = _gate_scores(x, self.weight, self.scoring)
            inds = self.tid2eid[input_ids]
        else:
            scores, keys = _gate_keys(x, self.weight, self.e_score_correction_bias, self.scoring)
            k = self.top_k
            inds = mx.argpartition(keys, kth=k - 1, axis=-1)[..., :k]
        weights = mx.take_along_axis(scores, inds, axis=-1)
        normalize = self.scoring != "softmax" and self.normalize
        return inds, _route_weights(weights, self.route_scale, normalize)


@mx.compile
def _clipped_swiglu(gate, up, limit):
    gate = gate.astype(mx.float32)
    up = up.astype(mx.float32)
    if limit > 0:
        gate = mx.minimum(gate, limit)
        up = mx.clip(up, -limit, limit)
    return nn.silu(gate) * up


def _weighted_swiglu_impl(gate, up, w, limit):
    # routed experts: the routing weight scales the activation (one kernel)
    return (_clipped_swiglu(gate, up, limit) * w).astype(gate.dtype)


_weighted_swiglu = mx.compile(_weighted_swiglu_impl)
# The tiled expert path meets a new tile count in nearly every layer: one trace for all.
_weighted_swiglu_tiles = mx.compile(_weighted_swiglu_impl, shapeless=True)


class _SwitchLinear(SwitchLinear):
    """SwitchLinear whose unquantized form also runs on MLX's CPU backend in
    half precision (its gather_mm takes float32 only)."""

    def __call__(self, x, indices, sorted_indices=False):
        if self.weight.dtype == mx.float32 or mx.default_device() != mx.cpu:
            return super().__call__(x, indices, sorted_indices)
        y = mx.gather_mm(
            x.astype(mx.float32),
            self.weight.astype(mx.float32).swapaxes(-1, -2),
            rhs_indices=indices,
            sorted_indices=sorted_indices,
        )
        return y.astype(x.dtype)


@functools.lru_cache(maxsize=64)
def _lhs_indices(batch: tuple) -> mx.array:
    return mx.array(np.arange(math.prod(batch), dtype=np.uint32).reshape(batch))


def _experts(layer, x, idx, sorted_indices):
    """``layer(x, idx)``; quantized layers get their row indices from a cache
    (plain data), where gather_qmm would build them with an arange and its
    reshape/broadcast on every call."""
    if (
        sorted_indices
        or "scales" not in layer
        or "bias" in layer
        or getattr(layer, "global_scale", None) is not None
    ):
        return layer(x, idx, sorted_indices=sorted_indices)
    return mx.gather_qmm(
        x,
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        lhs_indices=_lhs_indices(tuple(x.shape[:-2])),
        rhs_indices=idx,
        transpose=True,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


# Routed experts at prefill sizes: MLX's quantized gather (gather_qmm) is tuned for few
# rows per expert. Where a backend's gather_qmm is measured slower than dequantizing the
# experts and running gather_mm in half precision, and at least this many routed rows
# (tokens x top-k) go through a layer, the experts are dequantized a chunk at a time.
# Keyed by (backend, quantization mode); only measured pairs are listed
# (benchmarks/RESULTS.md, "Prefill"): on the H200 affine 4-bit gather_qmm is 1.8x slower
# at 1536 rows and 14x at 24576, but faster below 400; mxfp4 (the official format's
# experts) breaks even at 1536 rows and is 1.55x slower at 12288, and 43 layers
# prefilled 4K tokens 1.6x faster in tiles (fourteenth session; two earlier "tiled"
# runs had in fact run gather_qmm, their benchmark having reset the switch). Metal and
# the CPU keep gather_qmm. MLX_ARCH_PLUGINS_DEQUANT_ROWS overrides for every mode
# (0: never).
DEQUANT_ROWS = {("cuda", "affine"): 1536, ("cuda", "mxfp4"): 1536}
_DEQUANT_CHUNK_BYTES = 256 << 20  # bound on one chunk's dequantized weights


def _backend() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    return "cuda" if cuda is not None and cuda.is_available() else "gpu"


def _dequant_rows(mode: str) -> Optional[int]:
    value = os.environ.get("MLX_ARCH_PLUGINS_DEQUANT_ROWS")
    if value is not None:
        rows = int(value)
        return rows if rows > 0 else None
    return DEQUANT_ROWS.get((_backend(), mode))


# Dense quantized linears at prefill sizes: on the H200 the quantized_matmul of
# Flash's dense projections ran 1.4x (affine 4-bit) / 1.3x (mxfp8) slower than
# dequantizing the weight and a bf16 matmul at 512 rows, 2.5x / 2.3x at 2048
# (benchmarks/prefill_dense.py). From this many rows of one product on, the
# weight is dequantized to the activations' dtype. Keyed like DEQUANT_ROWS, whose
# variable overrides both tables; Metal and the CPU keep the quantized kernels.
DENSE_DEQUANT_ROWS = {("cuda", "affine"): 512, ("cuda", "mxfp8"): 512}


def _dense_dequant_rows(mode: str) -> Optional[int]:
    if os.environ.get("MLX_ARCH_PLUGINS_DEQUANT_ROWS") is not None:
        return _dequant_rows(mode)
    return DENSE_DEQUANT_ROWS.get((_backend(), mode))


def linear(layer, x):
    """``layer(x)`` for a Linear or mlx-lm MultiLinear, quantized or not; a quantized
    one given at least the backend's threshold of rows runs as a plain matmul on its
    dequantized weight (a copy the size of the weight, freed after the product)."""
    # exact classes: a subclass may do more in its call than the product
    plain = type(layer) in (nn.QuantizedLinear, QuantizedMultiLinear)
    if not plain or not _dequantizable(layer):
        return layer(x)
    threshold = _dense_dequant_rows(layer.mode)
    weight = layer["weight"]
    # rows of each product: a MultiLinear multiplies every head's rows by its own matrix
    rows = x.size // x.shape[-1] // (weight.shape[0] if weight.ndim == 3 else 1)
    if threshold is None or rows < threshold:
        return layer(x)
    w = dequantize(layer, weight, layer["scales"], layer.get("biases"), x.dtype)
    return x @ w.swapaxes(-1, -2)


def dequantize(layer, weight, scales, biases, dtype):
    """``weight`` of the quantized ``layer`` (or a slice of it, with its ``scales`` and
    ``biases``) in ``dtype``: through a CUDA kernel of kernels.py where one applies
    (affine, mxfp4 and mxfp8; ``MLX_ARCH_PLUGINS_FUSED=0`` turns them off), else
    ``mx.dequantize``. Bit for bit the same either way."""
    mode, bits, group = layer.mode, layer.bits, layer.group_size
    if _kernels.dequant_enabled(mode, bits, dtype, biases):
        return _kernels.affine_dequantize(weight, scales, biases, group, bits, dtype)
    if biases is None and _kernels.mx_dequant_enabled(mode, bits, group, dtype):
        return _kernels.mx_dequantize(weight, scales, bits, dtype)
    return mx.dequantize(weight, scales, biases, group, bits, mode=mode, dtype=dtype)


def _dequantizable(layer) -> bool:
    return (
        "scales" in layer and "bias" not in layer and getattr(layer, "global_scale", None) is None
    )


# Rows per tile of the dequantized expert path: each expert's rows are cut into tiles of
# this many (its last tile padded), and gather_mm multiplies every tile by its expert's
# matrix. On the H200 (benchmarks/RESULTS.md, eleventh session) one Flash projection over
# 12288 routed rows took 1.2-1.3 ms in tiles of 64 or 128 rows, 1.6-2.3 ms in tiles of
# 16-32, 2.5-3.2 ms as one-row products (MLX CUDA's grouped kernel for sorted one-row
# gathers) and 38 ms in tiles of 256.
_TILE_ROWS = 64


class _ExpertTiles:
    """Where each routed row goes in tiles of ``rows`` rows of one expert, planned on the
    host from the experts ``flat`` [R] of the flat rows (token * k + slot).

    Experts' tiles are in expert order; a padding slot repeats its expert's first row
    (its output is never read). ``row`` [tiles * rows]: the flat row in each slot;
    ``back`` [R]: each flat row's slot; ``first_tile`` [E + 1]: expert e's tiles are
    ``first_tile[e]:first_tile[e + 1]``; ``expert`` [tiles]: each tile's expert."""

    def __init__(self, flat: np.ndarray, n_experts: int, rows: int):
        flat = flat.astype(np.int64)
        counts = np.bincount(flat, minlength=n_experts)
        tiles = -(-counts // rows)
        self.first_tile = np.concatenate([[0], np.cumsum(tiles)])
        self.expert = np.repeat(np.arange(n_experts), tiles)
        order = np.argsort(flat, kind="stable")
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        by_expert = flat[order]
        slot = self.first_tile[by_expert] * rows + np.arange(len(flat)) - starts[by_expert]
        row = np.repeat(order[starts[self.expert]], rows)
        row[slot] = order
        back = np.empty(len(flat), dtype=np.int64)
        back[order] = slot
        self.rows = rows
        self.row = row.astype(np.uint32)
        self.back = back.astype(np.uint32)


def _tiles_matmul(layer, xs, plan: _ExpertTiles, dtype):
    """``layer`` (a quantized SwitchLinear) applied to tiles ``xs`` [tiles, rows, in]:
    each chunk of experts is dequantized to ``dtype`` and its tiles go through one
    gather_mm. Nothing larger than one chunk's weights is ever dequantized."""
    E, out_dims = layer["weight"].shape[:2]
    per_expert = out_dims * xs.shape[-1] * dtype.size
    step = max(1, _DEQUANT_CHUNK_BYTES // per_expert)
    biases = layer.get("biases")
    outs = []
    for e0 in range(0, E, step):
        e1 = min(E, e0 + step)
        t0, t1 = int(plan.first_tile[e0]), int(plan.first_tile[e1])
        if t1 == t0:
            continue
        w = dequantize(
            layer,
            layer["weight"][e0:e1],
            layer["scales"][e0:e1],
            None if biases is None else biases[e0:e1],
            dtype,
        )
        local = mx.array((plan.expert[t0:t1] - e0).astype(np.uint32))
        outs.append(mx.gather_mm(xs[t0:t1], w.swapaxes(-1, -2), rhs_indices=local))
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, 0)


class SwitchClippedGLU(nn.Module):
    """Routed experts: clipped SwiGLU, routing weight applied before
    ``down_proj`` as in the reference."""

    def __init__(self, dims: int, hidden: int, n_experts: int, limit: float):
        super().__init__()
        self.gate_proj = _SwitchLinear(dims, hidden, n_experts, bias=False)
        self.up_proj = _SwitchLinear(dims, hidden, n_experts, bias=False)
        self.down_proj = _SwitchLinear(hidden, dims, n_experts, bias=False)
        self.limit = limit

    def tiled(self, indices) -> bool:
        """Whether ``indices`` take the dequantized path in tiles (which reads the
        routing on the host)."""
        threshold = None
        if _dequantizable(self.gate_proj):
            threshold = _dequant_rows(getattr(self.gate_proj, "mode", "affine"))
        return threshold is not None and indices.size >= max(64, threshold)

    def __call__(self, x, indices, weights):
        if self.tiled(indices):
            return self._tiled(x, indices, weights)
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= 64
        idx, inv = indices, None
        w = weights[..., None, None]
        if do_sort:
            # group rows by expert so each expert's weights are read once
            k = indices.shape[-1]
            order = mx.argsort(indices.flatten())
            inv = mx.argsort(order)
            x = x.flatten(0, -3)[order // k]
            idx = indices.flatten()[order]
            w = weights.flatten()[order][:, None, None]
        project = functools.partial(_experts, sorted_indices=do_sort)
        h = _weighted_swiglu(
            project(self.gate_proj, x, idx),
            project(self.up_proj, x, idx),
            w,
            self.limit,
        )
        y = project(self.down_proj, h, idx)
        if do_sort:
            y = _scatter_unsort(y, inv, indices.shape)
        return y.squeeze(-2)

    def _tiled(self, x, indices, weights):
        """The dequantized path for many rows (``_ExpertTiles``, ``_tiles_matmul``).
        Reads the routing on the host: one wait per layer for the work before it."""
        k, dims = indices.shape[-1], x.shape[-1]
        plan = _ExpertTiles(
            np.array(indices.reshape(-1)), self.gate_proj["weight"].shape[0], _TILE_ROWS
        )
        dtype = mx.float32 if mx.default_device() == mx.cpu else x.dtype  # CPU gather_mm: fp32
        row = mx.array(plan.row)
        xs = take_rows(x.reshape(-1, dims), row // k).astype(dtype)
        xs = xs.reshape(-1, plan.rows, dims)
        w = weights.reshape(-1)[row].reshape(-1, plan.rows, 1)
        h = _weighted_swiglu_tiles(
            _tiles_matmul(self.gate_proj, xs, plan, dtype),
            _tiles_matmul(self.up_proj, xs, plan, dtype),
            w,
            self.limit,
        )
        y = _tiles_matmul(self.down_proj, h, plan, dtype).reshape(-1, dims)
        y = take_rows(y, mx.array(plan.back))
        return y.astype(x.dtype).reshape(*indices.shape, dims)


class SharedExpert(nn.Module):
    def __init__(self, dims: int, hidden: int, limit: float):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)
        self.limit = limit

    def __call__(self, x):
        h = _clipped_swiglu(linear(self.gate_proj, x), linear(self.up_proj, x), self.limit)
        return linear(self.down_proj, h.astype(x.dtype))


def _experts_sum_f32(routed):
    # routed [.., k, D] summed over k in float32, expert by expert: views of the
    # input cast one by one fuse into one elementwise kernel (a cast of the whole
    # array, then a reduction, are two)
    total = None
    for j in range(routed.shape[-2]):
        t = routed[..., j, :].astype(mx.float32)
        total = t if total is None else total + t
    return total


@mx.compile
def _moe_sum(routed, shared):
    # routed [.., k, D] + shared [.., D], summed in float32; shared has the
    # activations' dtype
    y = _experts_sum_f32(routed) + shared.astype(mx.float32)
    return y.astype(shared.dtype)


@mx.compile
def _moe_partial_sum(routed, shared):
    # a tensor-parallel rank's share, in float32, before the all-sum
    return _experts_sum_f32(routed) + shared.astype(mx.float32)


def _overlap_enabled() -> bool:
    return os.environ.get("MLX_ARCH_PLUGINS_OVERLAP", "1") != "0"


class DeepseekV4MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.gate = MoEGate(args, layer_id)
        self.switch_mlp = SwitchClippedGLU(
            args.hidden_size,
            args.moe_intermediate_size,
            args.n_routed_experts,
            args.swiglu_limit,
        )
        self.shared_experts = SharedExpert(
            args.hidden_size,
            args.moe_intermediate_size * args.n_shared_experts,
            args.swiglu_limit,
        )
        self.sharding_group = None  # set by Model.shard

    def __call__(self, x, input_ids):
        inds, weights = self.gate(x, input_ids)
        routed = self.switch_mlp(x, inds, weights)
        shared = self.shared_experts(x)
        if self.sharding_group is None:
            y = _moe_sum(routed, shared)
            if self.switch_mlp.tiled(inds) and _overlap_enabled():
                # the tiled path waited for the routing; start this layer's experts
                # now, so the GPU runs them while the host builds the next layer
                mx.async_eval(y)
            return y
        # partial sums over expert widths, added in float32
        y = mx.distributed.all_sum(_moe_partial_sum(routed, shared), group=self.sharding_group)
        return y.astype(x.dtype)


# ----------------------------------------------------------------------------
# Blocks and model
# ----------------------------------------------------------------------------


# Key order of the compressor/indexer projections (compiled graphs return tuples).
_PROJ_KEYS = ("ckv", "cgate", "ikv", "igate", "iq", "iw")
# Longest single-sequence step that runs compiled: a decode token, or the k+1 tokens of a
# speculative verify (at most the caches' trim bound).
COMPILED_MAX_TOKENS = 16


def _compile_enabled() -> bool:
    # MLX_ARCH_PLUGINS_COMPILE=0: plain eager decode (for debugging)
    return os.environ.get("MLX_ARCH_PLUGINS_COMPILE", "1") != "0"


class DeepseekV4Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attn = DeepseekV4Attention(args, layer_id)
        self.ffn = DeepseekV4MoE(args, layer_id)
        self.attn_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.ffn_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.attn_hc = HyperConnection(args)
        self.ffn_hc = HyperConnection(args)

    def __call__(self, h, cache, input_ids):
        B, L = h.shape[:2]
        compiled = self._compiled_decode() if B == 1 and L <= COMPILED_MAX_TOKENS else None
        if compiled is not None:
            front, back = compiled
            # single-sequence decode (and speculative verify of a few tokens):
            # everything but the cache work runs as two compiled graphs (a
            # fraction of the Python graph building), one trace per length.
            # Batches stay eager: a trace per batch size, and the two packed
            # batch-8 A/B pairs on the H200 were not faster (RESULTS.md).
            q, kv, proj, post, comb = front(h, self.attn.index_flag(cache, L))
            o = self.attn.attend(q, kv, dict(zip(_PROJ_KEYS, proj)), cache)
            return back(o, h, post, comb, input_ids)
        x, post, comb = self.attn_hc.collapse(h)
        y = self.attn(self.attn_norm(x), cache)
        h = _hc_expand(y, h, post, comb)
        return self._ffn_half(h, input_ids)

    def _ffn_half(self, h, input_ids):
        x, post, comb = self.ffn_hc.collapse(h)
        y = self.ffn(self.ffn_norm(x), input_ids)
        return _hc_expand(y, h, post, comb)

    def _front_impl(self, h, index):
        x, post, comb = self.attn_hc.collapse(h)
        q, kv, proj = self.attn.project(self.attn_norm(x), index)
        return q, kv, tuple(proj.get(k) for k in _PROJ_KEYS if k in proj), post, comb

    def _back_impl(self, o, h, post, comb, input_ids):
        h = _hc_expand(self.attn.output(o), h, post, comb)
        return self._ffn_half(h, input_ids)

    def _compiled_decode(self):
        """The compiled (front, back) pair of a single-sequence decode step, or None.
        Tensor-parallel blocks compile too: their all-sums are nodes of the graph like
        any other, in the same order on every rank."""
        if not _compile_enabled():
            return None
        # the block's arrays are passed as implicit inputs, so weights loaded or
        # replaced later are seen (they are not baked in)
        return memoised(self, "_compiled", (self,), None, self._compile_parts)

    def _compile_parts(self):
        compile_ = functools.partial(mx.compile, inputs=[self])
        return (compile_(self._front_impl), compile_(self._back_impl)), True


class MTPBlock(DeepseekV4Block):
    """Multi-token prediction block (``mtp.N.*``): predicts the token after
    next from the final hyper-connection state and the next token."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__(args, layer_id)
        d = args.hidden_size
        self.e_proj = nn.Linear(d, d, bias=False)
        self.h_proj = nn.Linear(d, d, bias=False)
        self.enorm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.hnorm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.norm = nn.RMSNorm(d, eps=args.rms_norm_eps)
        self.hc_head = HyperHead(args)


class DeepseekV4Model(PipelineMixin, nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DeepseekV4Block(args, i) for i in range(args.num_hidden_layers)]
        n = args.num_hidden_layers
        self.mtp = [MTPBlock(args, n + i) for i in range(args.num_nextn_predict_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.hc_head = HyperHead(args)

    def pipeline(self, group, split=None):
        pipeline_split(self, group, split)

    def hidden(self, inputs, cache=None):
        """Final hyper-connection state [B, L, hc, D] (input of ``hc_head``)."""
        h = self.embed_tokens(inputs)
        h = mx.broadcast_to(h[:, :, None], (*h.shape[:2], self.args.hc_mult, h.shape[-1]))
        h, cache = pipeline_hidden(self, h, inputs, cache)
        for c in cache:
            if isinstance(c, BatchDeepseekV4Cache):
                c.advance(inputs.shape[1])
        return h

    def __call__(self, inputs, cache=None):
        return self.norm(self.hc_head(self.hidden(inputs, cache)))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DeepseekV4Model(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, **kwargs):
        h = self.model.hidden(inputs, cache)
        if inputs.shape == (1, 1) and _compile_enabled():
            return self._compiled_tail()(h)
        return self._tail(h)

    def _tail(self, h):
        return self.lm_head(self.model.norm(self.model.hc_head(h)))

    def _compiled_tail(self):
        # built again if a part was replaced
        parts = (self, self.model.hc_head, self.model.norm, self.lm_head)
        build = lambda: (mx.compile(self._tail, inputs=list(parts[1:])), True)  # noqa: E731
        return memoised(self, "_tail_memo", parts, None, build)

    def mtp_logits(self, hidden, next_ids, cache=None, index: int = 0):
        """Logits of MTP block ``index`` on the main model's final state
        ``hidden`` [B, L, hc, D] and the following tokens ``next_ids``."""
        return self.mtp_forward(hidden, next_ids, cache, index)[0]

    def mtp_forward(self, hidden, next_ids, cache=None, index: int = 0):
        """MTP block logits and its output state (which, in place of the
        main model's, chains the drafts after the first)."""
        blk = self.model.mtp[index]
        e = blk.enorm(self.model.embed_tokens(next_ids))
        x = blk.e_proj(e)[:, :, None] + blk.h_proj(blk.hnorm(hidden))
        h = DeepseekV4Block.__call__(blk, x, cache, next_ids)
        return self.lm_head(blk.norm(blk.hc_head(h))), h

    @property
    def layers(self):
        # this pipeline rank's layers (all of them without pipelining)
        return self.model.pipeline_layers

    def shard(self, group: Optional[mx.distributed.Group] = None):
        """Tensor-parallel split over ``group`` (see deepseek_v4_shard)."""
        shard_model(self, group)

    def make_cache(self):
        return [
            DeepseekV4Cache(self.args.sliding_window, layer.attn.ratio) for layer in self.layers
        ]

    def quant_predicate(self, path, module):
        # The official checkpoint keeps the compressors and the indexer's
        # head weights unquantized; so do conversions.
        return not (".compressor." in path or path.endswith("weights_proj"))

    @property
    def cast_predicate(self):
        # Kept in float32 as the reference does: small, precision-critical.
        keep = (
            "_hc.",
            "hc_head.",
            "attn_sink",
            "e_score_correction_bias",
            ".ape",
            "ffn.gate.weight",
        )

        def predicate(k):
            return not any(s in k for s in keep)

        return predicate

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        from .checkpoint import sanitize_weights

        return sanitize_weights(self, weights)


def make_draft_model(model: Model, name: str, main_path: Optional[str] = None):
    """The draft object for ``--draft-model name`` (the host's load patch asks
    the main model's module): the checkpoint's own MTP block, sharing every
    weight, for ``mtp``; None for anything else (a separate draft model then
    loads as usual)."""
    from .speculative import make_mtp_draft

    return make_mtp_draft(model, name, main_path)
