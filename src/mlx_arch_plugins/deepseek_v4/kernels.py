"""Optional CUDA kernels for DeepSeek-V4, on top of the portable paths they replace.

``sinkhorn_split`` (decoding): the hyper-connection mixing weights (pre, post and the
Sinkhorn-normalised comb matrix) in one kernel, one thread per token, instead of ~80
small kernels; the arithmetic is the mx.compile path's, step for step (sums in the same
order). ``affine_dequantize`` and ``mx_dequantize`` (prefill): weights dequantized bit
for bit as ``mx.dequantize`` does, with wider stores. ``indexer_scores`` (prefill): the
CSA indexer's scores on tensor cores, without writing out the per-head products.
``topk_rows`` (prefill blocks of queries): the indexer's top-k by radix select instead
of a full sort.

Only used on MLX's CUDA backend (tested there by tests/test_dsv4_kernels.py); every
other backend, and CUDA with ``MLX_ARCH_PLUGINS_FUSED=0``, takes the portable path in
model.py.
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx

_SOURCE = """
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= mixes_shape[0]) return;
    const float e = eps[0];
    const float* m = mixes + (size_t)n * (2 + HC) * HC;
    for (int i = 0; i < HC; ++i) {
        float a = m[i] * scale[0] + base[i];
        pre[n * HC + i] = 1.0f / (1.0f + expf(-a)) + e;
        float b = m[HC + i] * scale[1] + base[HC + i];
        post[n * HC + i] = 2.0f * (1.0f / (1.0f + expf(-b)));
    }
    float c[HC][HC];
    for (int i = 0; i < HC; ++i) {
        float mx_ = -INFINITY;
        for (int j = 0; j < HC; ++j) {
            c[i][j] = m[2 * HC + i * HC + j] * scale[2] + base[2 * HC + i * HC + j];
            mx_ = fmaxf(mx_, c[i][j]);
        }
        float s = 0.0f;
        for (int j = 0; j < HC; ++j) {
            c[i][j] = expf(c[i][j] - mx_);
            s += c[i][j];
        }
        for (int j = 0; j < HC; ++j) c[i][j] = c[i][j] / s + e;
    }
    for (int it = 0; it < ITERS; ++it) {
        if (it > 0) {
            for (int i = 0; i < HC; ++i) {
                float s = c[i][0];
                for (int j = 1; j < HC; ++j) s += c[i][j];
                s += e;
                for (int j = 0; j < HC; ++j) c[i][j] /= s;
            }
        }
        for (int j = 0; j < HC; ++j) {
            float s = c[0][j];
            for (int i = 1; i < HC; ++i) s += c[i][j];
            s += e;
            for (int i = 0; i < HC; ++i) c[i][j] /= s;
        }
    }
    for (int i = 0; i < HC; ++i)
        for (int j = 0; j < HC; ++j) comb[(size_t)n * HC * HC + i * HC + j] = c[i][j];
"""

_KERNEL = None


# Decode-sized inputs only (a batch of tokens, a verify's k + 1): at prefill sizes the
# mx.compile path is as fast. The row count is read from the input's shape, not made a
# template value: MLX compiles every custom kernel variant with NVRTC once per process
# and keeps none on disk (~1.4 s each on the H200), so a template row count stalled the
# first step of every new batch size.
MAX_ROWS = 64


def cuda_enabled() -> bool:
    if os.environ.get("MLX_ARCH_PLUGINS_FUSED", "1") == "0":
        return False
    try:
        return mx.default_device() == mx.gpu and mx.cuda.is_available()
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def _compute_capability() -> int:
    """The GPU's major compute capability; 0 where there is none (the CPU)."""
    try:
        return int(mx.device_info().get("compute_capability_major", 0))
    except Exception:
        return 0


def use_sinkhorn_kernel(rows: int) -> bool:
    return rows <= MAX_ROWS and cuda_enabled()


def sinkhorn_split(mixes, scale, base, hc: int, iters: int, eps: float):
    """pre [.., hc], post [.., hc], comb [.., hc, hc] from the float32 mixing
    logits ``mixes`` [.., (2+hc)*hc]. Only where ``use_sinkhorn_kernel`` said yes."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = mx.fast.cuda_kernel(
            name="dsv4_sinkhorn_split",
            input_names=["mixes", "scale", "base", "eps"],
            output_names=["pre", "post", "comb"],
            source=_SOURCE,
        )
    lead = mixes.shape[:-1]
    rows = 1
    for d in lead:
        rows *= d
    pre, post, comb = _KERNEL(
        inputs=[
            mixes.astype(mx.float32).reshape(rows, -1),
            scale.astype(mx.float32),
            base.astype(mx.float32),
            mx.array([eps], dtype=mx.float32),
        ],
        template=[("HC", hc), ("ITERS", iters)],
        grid=(rows, 1, 1),
        threadgroup=(min(rows, 128), 1, 1),
        output_shapes=[(rows, hc), (rows, hc), (rows, hc, hc)],
        output_dtypes=[mx.float32] * 3,
    )
    return pre.reshape(*lead, hc), post.reshape(*lead, hc), comb.reshape(*lead, hc, hc)


# ``affine_dequantize``: MLX's CUDA kernel gives each thread one byte of packed
# weights (two 4-bit values, a 4-byte store), and the prefill dequantizes its expert and
# dense weights every chunk (3.2 ms of a 2048-token chunk's layer on the H200). Here each
# thread unpacks one 32-bit word and stores its values with one or two 16-byte writes:
# 2.6 TB/s against 1.0 for a chunk of Flash's experts (benchmarks/RESULTS.md, twelfth
# session; more words per thread were slower). The arithmetic is MLX's, in the output
# type: scale * q, rounded, plus bias, rounded.
_DEQUANT_SOURCE = """
    size_t words = 1;
    for (int d = 0; d < w_ndim; ++d) words *= w_shape[d];
    const size_t first = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * WORDS_PER_THREAD;
    constexpr int PER_WORD = 32 / BITS;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    constexpr int CHUNKS = PER_WORD * sizeof(T) / 16;
#pragma unroll
    for (int j = 0; j < WORDS_PER_THREAD; ++j) {
        const size_t word = first + j;
        if (word >= words) return;
        const size_t group = word * PER_WORD / GROUP;
        const T scale = scales[group];
        const T bias = biases[group];
        const unsigned int packed = w[word];
        alignas(16) T values[PER_WORD];
#pragma unroll
        for (int i = 0; i < PER_WORD; ++i) {
            const T q = static_cast<T>(static_cast<float>((packed >> (BITS * i)) & MASK));
            values[i] = scale * q + bias;
        }
        if constexpr (CHUNKS > 0) {
            uint4* dst = reinterpret_cast<uint4*>(out) + word * CHUNKS;
            const uint4* src = reinterpret_cast<const uint4*>(values);
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c) dst[c] = src[c];
        } else {
            reinterpret_cast<uint2*>(out)[word] = *reinterpret_cast<const uint2*>(values);
        }
    }
"""

_DEQUANT_KERNEL = None
_DEQUANT_BITS = (2, 4, 8)
_DEQUANT_DTYPES = (mx.bfloat16, mx.float16)


def dequant_enabled(mode: str, bits: int, dtype, biases) -> bool:
    """Whether ``affine_dequantize`` takes these weights (else ``mx.dequantize``)."""
    return (
        mode == "affine"
        and biases is not None
        and bits in _DEQUANT_BITS
        and dtype in _DEQUANT_DTYPES
        and cuda_enabled()
    )


def affine_dequantize(w, scales, biases, group_size: int, bits: int, dtype, per_thread: int = 1):
    """``mx.dequantize(w, scales, biases, group_size, bits, dtype=dtype)`` for affine
    weights, bit for bit, in one CUDA kernel that writes 16 bytes per store. Only where
    ``dequant_enabled`` said yes. ``per_thread``: consecutive words per thread."""
    global _DEQUANT_KERNEL
    if _DEQUANT_KERNEL is None:
        _DEQUANT_KERNEL = mx.fast.cuda_kernel(
            name="dsv4_affine_dequantize",
            input_names=["w", "scales", "biases"],
            output_names=["out"],
            source=_DEQUANT_SOURCE,
        )
    shape = (*w.shape[:-1], w.shape[-1] * 32 // bits)
    (out,) = _DEQUANT_KERNEL(
        inputs=[w, scales.astype(dtype), biases.astype(dtype)],
        template=[
            ("T", dtype),
            ("BITS", bits),
            ("GROUP", group_size),
            ("WORDS_PER_THREAD", per_thread),
        ],
        grid=(-(-w.size // per_thread), 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[shape],
        output_dtypes=[dtype],
    )
    return out


# ``mx_dequantize``: the same for mxfp4 and mxfp8 weights (groups of 32 with a
# power-of-two e8m0 scale). MLX's CUDA kernel gives a thread one byte (two fp4 values, or
# one fp8 value and a 2-byte store). Decoding is exact: each value times its scale in
# float32, then rounded to the output type, as MLX does.
_MX_DEQUANT_SOURCE = """
    size_t words = 1;
    for (int d = 0; d < w_ndim; ++d) words *= w_shape[d];
    const size_t word = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (word >= words) return;
    constexpr int PER_WORD = 32 / BITS;
    const unsigned int e = scales[word * PER_WORD / 32];
    // e8m0: 2^(e - 127); 0 is 2^-127 (a float32 subnormal), 255 is NaN
    const float scale = e == 255u ? __int_as_float(0x7fc00000)
        : (e == 0u ? __int_as_float(0x00400000) : __int_as_float((int)(e << 23)));
    const unsigned int packed = w[word];
    alignas(16) T values[PER_WORD];
#pragma unroll
    for (int i = 0; i < PER_WORD; ++i) {
        const unsigned int code = (packed >> (BITS * i)) & ((1u << BITS) - 1u);
        float v;
        if constexpr (BITS == 4) {
            // e2m1: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is
            // subnormal (0 or 0.5)
            const unsigned int exponent = (code >> 1) & 3u;
            const unsigned int mantissa = code & 1u;
            v = exponent == 0u ? 0.5f * (float)mantissa
                : __int_as_float((int)(((exponent + 126u) << 23) | (mantissa << 22)));
            if (code & 8u) v = -v;
        } else {
            // e4m3 (bias 7, no infinities; exponent and mantissa all ones is NaN);
            // exponent 0 is subnormal: mantissa * 2^-9
            const unsigned int exponent = (code >> 3) & 0xfu;
            const unsigned int mantissa = code & 7u;
            if (exponent == 0xfu && mantissa == 7u) {
                v = __int_as_float(0x7fc00000);
            } else if (exponent == 0u) {
                v = (float)mantissa * 0.001953125f;
            } else {
                v = __int_as_float((int)(((exponent + 120u) << 23) | (mantissa << 20)));
            }
            if (code & 0x80u) v = -v;
        }
        values[i] = static_cast<T>(scale * v);
    }
    if constexpr (PER_WORD * sizeof(T) == 16) {
        reinterpret_cast<uint4*>(out)[word] = *reinterpret_cast<const uint4*>(values);
    } else {
        reinterpret_cast<uint2*>(out)[word] = *reinterpret_cast<const uint2*>(values);
    }
"""

_MX_DEQUANT_KERNEL = None
_MX_MODES = {"mxfp4": 4, "mxfp8": 8}


def mx_dequant_enabled(mode: str, bits: int, group_size: int, dtype) -> bool:
    """Whether ``mx_dequantize`` takes these weights (else ``mx.dequantize``)."""
    return (
        _MX_MODES.get(mode) == bits
        and group_size == 32
        and dtype in _DEQUANT_DTYPES
        and cuda_enabled()
    )


def mx_dequantize(w, scales, bits: int, dtype):
    """``mx.dequantize(w, scales, None, 32, bits, mode=mxfp4 / mxfp8, dtype=dtype)``,
    bit for bit, one 32-bit word of codes per thread. Only where ``mx_dequant_enabled``
    said yes."""
    global _MX_DEQUANT_KERNEL
    if _MX_DEQUANT_KERNEL is None:
        _MX_DEQUANT_KERNEL = mx.fast.cuda_kernel(
            name="dsv4_mx_dequantize",
            input_names=["w", "scales"],
            output_names=["out"],
            source=_MX_DEQUANT_SOURCE,
        )
    shape = (*w.shape[:-1], w.shape[-1] * 32 // bits)
    (out,) = _MX_DEQUANT_KERNEL(
        inputs=[w, scales],
        template=[("T", dtype), ("BITS", bits)],
        grid=(w.size, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[shape],
        output_dtypes=[dtype],
    )
    return out


# ``indexer_scores`` (prefill): the CSA indexer's score[b, t, n] = sum_h w[b,t,h] *
# relu(q[b,t,h] . keys[b,n]) in one kernel. The portable form (a bf16 matmul, then a
# compiled cast / relu / product and a reduction over heads) moves the [t, h, n] products
# through memory three times, in bf16 and twice in float32: 26 ms per 2048-token chunk
# of a CSA layer at 128K context on the H200 (benchmarks/RESULTS.md, ninth and
# thirteenth sessions), and MLX fuses no elementwise work into a reduction. Here the
# products stay in registers: one warp takes 16 heads of QW queries and runs tensor-core
# mma (m16n8k16, bf16 in, float32 accumulation) over the head dimension for 8 keys at a
# time; each product is rounded to bf16 as the matmul's output is, then relu, times its
# head's weight, summed over the warp's heads by shuffles and over the block's warps in
# shared memory. Same terms as the portable path, summed in another order. A 2048-query
# block over 32K entries: 5.2 ms against 25.9 for the portable form (indexer_probe.py).
_INDEXER_SOURCE = """
    constexpr int HT = HEADS / 16;
    constexpr int KS = DIM / 16;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int g = lane >> 2;
    const int tig = lane & 3;
    const int L = q_shape[1];
    const int N = keys_shape[1];
    const int key0 = blockIdx.x * KT;
    const int t0 = blockIdx.y * QW;
    const int b = blockIdx.z;
    __shared__ float part[QW][HT][KT];
    const unsigned int* q32 = reinterpret_cast<const unsigned int*>(q);
    const unsigned int* k32 = reinterpret_cast<const unsigned int*>(keys);
    unsigned int a[QW][KS][4];
    float w_lo[QW], w_hi[QW];
#pragma unroll
    for (int i = 0; i < QW; ++i) {
        const int t = min(t0 + i, L - 1);  // queries past L compute a copy, never written
        const size_t head = (size_t)(b * L + t) * HEADS + warp * 16 + g;
        const size_t word = head * (DIM / 2) + tig;
#pragma unroll
        for (int s = 0; s < KS; ++s) {
            a[i][s][0] = q32[word + s * 8];
            a[i][s][1] = q32[word + s * 8 + 4 * DIM];
            a[i][s][2] = q32[word + s * 8 + 4];
            a[i][s][3] = q32[word + s * 8 + 4 * DIM + 4];
        }
        w_lo[i] = w[head];
        w_hi[i] = w[head + 8];
    }
    // keys in stages of STAGE: with STAGED, copied to shared memory by the whole block
    // in 16-byte loads (rows padded by 4 words, so a warp's fragment reads hit 32
    // banks); without, each warp reads its fragments from global memory
    constexpr int ROW = DIM / 2 + 4;
    __shared__ uint4 staged4[STAGED ? STAGE * ROW / 4 : 1];
    const unsigned int* staged = reinterpret_cast<const unsigned int*>(staged4);
    for (int k0 = 0; k0 < KT; k0 += STAGE) {
        if constexpr (STAGED) {
            __syncthreads();
            for (int v = threadIdx.x; v < STAGE * DIM / 8; v += blockDim.x) {
                const int r = v / (DIM / 8);
                const int n = min(key0 + k0 + r, N - 1);
                const uint4* src = reinterpret_cast<const uint4*>(keys);
                staged4[r * ROW / 4 + v % (DIM / 8)] = src[((size_t)b * N + n) * (DIM / 8) + v % (DIM / 8)];
            }
            __syncthreads();
        }
        for (int nt = 0; nt < STAGE / 8; ++nt) {
            unsigned int bk[KS][2];
            if constexpr (STAGED) {
                const unsigned int* kr = staged + (nt * 8 + g) * ROW + tig;
#pragma unroll
                for (int s = 0; s < KS; ++s) {
                    bk[s][0] = kr[s * 8];
                    bk[s][1] = kr[s * 8 + 4];
                }
            } else {
                const int n = min(key0 + k0 + nt * 8 + g, N - 1);
                const size_t kword = ((size_t)b * N + n) * (DIM / 2) + tig;
#pragma unroll
                for (int s = 0; s < KS; ++s) {
                    bk[s][0] = k32[kword + s * 8];
                    bk[s][1] = k32[kword + s * 8 + 4];
                }
            }
            const int col = k0 + nt * 8 + tig * 2;
#pragma unroll
            for (int i = 0; i < QW; ++i) {
                float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int s = 0; s < KS; ++s) {
                    asm volatile(
                        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\\n"
                        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                        : "r"(a[i][s][0]), "r"(a[i][s][1]), "r"(a[i][s][2]), "r"(a[i][s][3]),
                          "r"(bk[s][0]), "r"(bk[s][1]));
                }
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    // round to bf16 (nearest even), as the portable matmul's output is
                    unsigned int u = __float_as_uint(c[j]);
                    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
                    c[j] = fmaxf(__uint_as_float(u), 0.f);
                }
                float v0 = w_lo[i] * c[0] + w_hi[i] * c[2];
                float v1 = w_lo[i] * c[1] + w_hi[i] * c[3];
#pragma unroll
                for (int m = 4; m < 32; m <<= 1) {
                    v0 += __shfl_xor_sync(0xffffffffu, v0, m);
                    v1 += __shfl_xor_sync(0xffffffffu, v1, m);
                }
                if (g == 0) {
                    part[i][warp][col] = v0;
                    part[i][warp][col + 1] = v1;
                }
            }
        }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < QW * KT; idx += blockDim.x) {
        const int i = idx / KT;
        const int kk = idx % KT;
        const int t = t0 + i;
        const int n = key0 + kk;
        if (t >= L || n >= N) continue;
        float s = part[i][0][kk];
        for (int h = 1; h < HT; ++h) s += part[i][h][kk];
        out[(size_t)(b * L + t) * N + n] = s;
    }
"""

_INDEXER_KERNEL = None
# The tile measured fastest at 128K context (benchmarks/RESULTS.md, thirteenth session):
# 256 keys per thread block, 4 queries per warp (2: 6.0 ms, 1: 20 ms), keys staged 64 at
# a time in shared memory (fragments read from global memory instead, stage 0: 9.9 ms).
INDEXER_KEYS_PER_BLOCK = 256
INDEXER_QUERIES_PER_WARP = 4
INDEXER_STAGE = 64


def indexer_kernel_enabled(q, keys) -> bool:
    """Whether ``indexer_scores`` takes these [B, L, H, D] queries and [B, N, D] keys:
    bf16, heads and head dim in multiples of 16 (the mma's tile), at most DeepSeek-V4's
    64 x 128 (the block's shared memory grows by 4 KB a head tile, a thread's registers
    with D x queries per warp)."""
    _, _, H, D = q.shape
    return (
        q.dtype == mx.bfloat16
        and keys.dtype == mx.bfloat16
        and H % 16 == 0
        and D % 16 == 0
        and H <= 64
        and D <= 128
        and keys.shape[1] > 0
        and cuda_enabled()
        and bf16_mma_available()
    )


def bf16_mma_available() -> bool:
    """Whether the GPU has bf16 ``mma.sync`` (compute capability 8.0 and up); older ones
    would fail to compile the indexer kernel."""
    return _compute_capability() >= 8


def indexer_scores(q, w, keys, keys_per_block=None, queries_per_warp=None, stage=None):
    """score [B, L, N] float32 = sum_h w[b,t,h] relu(bf16(q[b,t,h] . keys[b,n])) for
    bf16 ``q`` [B, L, H, D], float32 ``w`` [B, L, H] and bf16 ``keys`` [B, N, D]. Only
    where ``indexer_kernel_enabled`` said yes."""
    global _INDEXER_KERNEL
    if _INDEXER_KERNEL is None:
        _INDEXER_KERNEL = mx.fast.cuda_kernel(
            name="dsv4_indexer_scores",
            input_names=["q", "w", "keys"],
            output_names=["out"],
            source=_INDEXER_SOURCE,
        )
    kt = keys_per_block or INDEXER_KEYS_PER_BLOCK
    qw = queries_per_warp or INDEXER_QUERIES_PER_WARP
    stage = INDEXER_STAGE if stage is None else stage
    if stage and (kt % stage or stage % 8):
        raise ValueError(f"indexer_scores: stage {stage} must divide {kt} keys, in 8s")
    B, L, H, D = q.shape
    N = keys.shape[1]
    threads = 32 * (H // 16)
    (out,) = _INDEXER_KERNEL(
        inputs=[q, w.astype(mx.float32), keys],
        template=[
            ("HEADS", H),
            ("DIM", D),
            ("KT", kt),
            ("QW", qw),
            ("STAGED", bool(stage)),
            ("STAGE", stage or kt),
        ],
        grid=(-(-N // kt) * threads, -(-L // qw), B),
        threadgroup=(threads, 1, 1),
        output_shapes=[(B, L, N)],
        output_dtypes=[mx.float32],
    )
    return out


# ``topk_rows``: the CSA indexer keeps the top ``k`` (512) of n/4 entries per query, and
# MLX's argpartition is a full sort on CUDA (and Metal): at 128K context a 2048-query
# block's sort of 32K scores a row took 4.4 ms of a CSA layer's 9.6 on the H200
# (benchmarks/RESULTS.md, thirteenth session). Here one thread block finds a row's k-th
# largest score by radix select (four passes of 8 bits over the scores as order-keeping
# 32-bit keys, each a histogram of the keys that share the digits found so far), then
# writes the indices of the larger scores and of the first equal ones, in index order:
# the set argpartition keeps up to which of several tied scores at the k-th place goes in
# (here the lowest indices, so the result does not depend on timing). Entries at or past
# a row's ``limit`` are left out; a row with at most k entries below its limit gets
# 0..k-1, every one past the limit to be masked by the caller.
_TOPK_SOURCE = """
    const int row = blockIdx.x;
    const int N = score_shape[1];
    const int K = kth[0];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const int lim = min(max(limit[row], 0), N);
    const float* s = score + (size_t)row * N;
    unsigned int* o = out + (size_t)row * K;
    if (lim <= K) {
        for (int j = threadIdx.x; j < K; j += blockDim.x) o[j] = j;
        return;
    }
    // larger float, larger key (negatives' bits flipped, positives' sign bit set);
    // -0 counts as +0, as argpartition compares them
    auto key = [](float f) {
        unsigned int u = __float_as_uint(f);
        if (u == 0x80000000u) u = 0u;
        return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    };
    __shared__ unsigned int hist[256];
    __shared__ unsigned int found_digit, found_need;
    __shared__ unsigned int per_warp_eq[32], per_warp_take[32];
    __shared__ unsigned int eq_before_tile, written_before_tile;
    unsigned int prefix = 0u, mask = 0u, need = (unsigned int)K;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        for (int i0 = 0; i0 < lim; i0 += blockDim.x) {
            const int i = i0 + threadIdx.x;
            unsigned int digit = 256u;  // not counted: past the limit or off the prefix
            if (i < lim) {
                const unsigned int u = key(s[i]);
                if ((u & mask) == prefix) digit = (u >> shift) & 255u;
            }
            // one shared atomic per distinct digit of the warp (the high digits of
            // similar scores are mostly the same)
            const unsigned int peers = __match_any_sync(0xffffffffu, digit);
            if (digit < 256u && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
        }
        __syncthreads();
        if (warp == 0) {
            // lane l holds bins 255-8l down to 248-8l; counts summed from the top bin
            unsigned int c[8];
            unsigned int total = 0u;
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                c[j] = hist[255 - (lane * 8 + j)];
                total += c[j];
            }
            unsigned int upto = total;
#pragma unroll
            for (int d = 1; d < 32; d <<= 1) {
                const unsigned int v = __shfl_up_sync(0xffffffffu, upto, d);
                if (lane >= d) upto += v;
            }
            unsigned int above = upto - total;
            if (above < need && need <= upto) {
                for (int j = 0; j < 8; ++j) {
                    if (above + c[j] >= need) {
                        found_digit = 255u - (unsigned int)(lane * 8 + j);
                        found_need = need - above;
                        break;
                    }
                    above += c[j];
                }
            }
        }
        __syncthreads();
        prefix |= found_digit << shift;
        mask |= 255u << shift;
        need = found_need;
    }
    // prefix is now the k-th largest key; take every larger key and the first `need`
    // equal ones, tile by tile in index order
    if (threadIdx.x == 0) {
        eq_before_tile = 0u;
        written_before_tile = 0u;
    }
    __syncthreads();
    const unsigned int below = (1u << lane) - 1u;
    for (int i0 = 0; i0 < lim; i0 += blockDim.x) {
        const int i = i0 + threadIdx.x;
        const unsigned int u = i < lim ? key(s[i]) : 0u;
        const bool eq = i < lim && u == prefix;
        const unsigned int eq_votes = __ballot_sync(0xffffffffu, eq);
        if (lane == 0) per_warp_eq[warp] = __popc(eq_votes);
        __syncthreads();
        unsigned int eq_rank = eq_before_tile + __popc(eq_votes & below);
        for (int w = 0; w < warp; ++w) eq_rank += per_warp_eq[w];
        const bool take = (i < lim && u > prefix) || (eq && eq_rank < need);
        const unsigned int take_votes = __ballot_sync(0xffffffffu, take);
        if (lane == 0) per_warp_take[warp] = __popc(take_votes);
        __syncthreads();
        unsigned int slot = written_before_tile + __popc(take_votes & below);
        for (int w = 0; w < warp; ++w) slot += per_warp_take[w];
        if (take) o[slot] = (unsigned int)i;
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 0; w < warps; ++w) {
                eq_before_tile += per_warp_eq[w];
                written_before_tile += per_warp_take[w];
            }
        }
        __syncthreads();
        if (written_before_tile >= (unsigned int)K) break;
    }
"""

_TOPK_KERNEL = None
TOPK_THREADS = 1024
# False sends every top-k to argpartition (benchmarks alternate it within one process)
USE_TOPK_KERNEL = True
# One thread block per row, so a few rows leave most of the GPU idle. Device time per
# call on the H200 against argpartition (benchmarks/topk_probe.py --per-eval 20;
# benchmarks/RESULTS.md, fifteenth session): 0.62x / 0.44x at 16 rows of 8K / 32K
# entries, 0.22-0.46x from 128 rows on, but 1.28x / 1.04x for one decode row. Decode and
# verify (fewer rows than this) keep argpartition.
TOPK_MIN_ROWS = 16


def topk_kernel_enabled(score, k: int) -> bool:
    """Whether ``topk_rows`` takes these float32 scores [..., N] (N >= k): enough rows
    of them (``TOPK_MIN_ROWS``) on MLX CUDA."""
    n = score.shape[-1] if score.ndim else 0
    return (
        USE_TOPK_KERNEL
        and score.dtype == mx.float32
        and 0 < k <= n < 2**31
        and score.size // n >= TOPK_MIN_ROWS
        and cuda_enabled()
        and _compute_capability() >= 7  # __match_any_sync
    )


@functools.lru_cache(maxsize=16)
def _int_scalar(value: int):
    # made once: an array built from host data on every call would be uploaded each time
    return mx.array([value], dtype=mx.int32)


def topk_rows(score, k: int, limit=None):
    """uint32 indices [..., k] of the ``k`` largest of each row of ``score`` [..., N],
    in index order, ties at the k-th score broken towards lower indices. ``limit``
    (int, broadcast to the leading shape): entries from there on are left out; a row
    with at most k entries before it gets 0..k-1. Only where ``topk_kernel_enabled``
    said yes."""
    global _TOPK_KERNEL
    if _TOPK_KERNEL is None:
        _TOPK_KERNEL = mx.fast.cuda_kernel(
            name="dsv4_topk_rows",
            input_names=["score", "limit", "kth"],
            output_names=["out"],
            source=_TOPK_SOURCE,
        )
    lead, N = score.shape[:-1], score.shape[-1]
    rows = 1
    for d in lead:
        rows *= d
    if limit is None:
        limit = mx.full((rows,), N, dtype=mx.int32)
    else:
        limit = mx.broadcast_to(mx.array(limit).astype(mx.int32), lead).reshape(rows)
    (out,) = _TOPK_KERNEL(
        inputs=[score.reshape(rows, N), limit, _int_scalar(k)],
        grid=(rows * TOPK_THREADS, 1, 1),
        threadgroup=(TOPK_THREADS, 1, 1),
        output_shapes=[(rows, k)],
        output_dtypes=[mx.uint32],
    )
    return out.reshape(*lead, k)
