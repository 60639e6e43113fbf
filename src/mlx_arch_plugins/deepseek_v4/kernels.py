"""Optional fused kernels for DeepSeek-V4 decoding.

``sinkhorn_split``: the hyper-connection mixing weights (pre, post and the
Sinkhorn-normalised comb matrix) in one CUDA kernel, one thread per token,
instead of ~80 small kernels. Only used on MLX's CUDA backend (tested there by
tests/test_dsv4_kernels.py); every other backend, and CUDA with
``MLX_ARCH_PLUGINS_FUSED=0``, takes the mx.compile path in deepseek_v4.py.
The arithmetic is the same, step for step (sums in the same order).
"""

from __future__ import annotations

import os

import mlx.core as mx

_SOURCE = """
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= ROWS) return;
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


# The row count is a template parameter (one JIT compile per value), so the
# model uses the kernel for decode-sized inputs only: a handful of batch sizes.
MAX_ROWS = 64


def cuda_enabled() -> bool:
    if os.environ.get("MLX_ARCH_PLUGINS_FUSED", "1") == "0":
        return False
    try:
        return mx.default_device() == mx.gpu and mx.cuda.is_available()
    except Exception:
        return False


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
        template=[("HC", hc), ("ITERS", iters), ("ROWS", rows)],
        grid=(rows, 1, 1),
        threadgroup=(min(rows, 128), 1, 1),
        output_shapes=[(rows, hc), (rows, hc), (rows, hc, hc)],
        output_dtypes=[mx.float32] * 3,
    )
    return pre.reshape(*lead, hc), post.reshape(*lead, hc), comb.reshape(*lead, hc, hc)
