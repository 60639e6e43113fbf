"""The FP8 / FP4 rounding the model simulates (``qat_round``) against an
independent NumPy statement of the same rule, bit for bit.

Rule (DeepSeek's reference, blocks along the last axis): scale = the smallest
power of two >= max(amax, floor) / qmax; q = clip(x / scale, +-qmax) rounded
to the e4m3 (3 mantissa bits, exponent >= -6) or e2m1 (1 bit, exponent >= 0)
grid, ties to even; result q * scale in the input dtype.

Runs on the default device, so on the H200 it checks MLX's CUDA e4m3
conversion too (``PYTHONPATH=src python3 -m pytest tests/test_dsv4_qat.py``).
"""

import mlx.core as mx
import numpy as np

try:
    import pytest
except ImportError:  # the device machine may lack pytest; see __main__
    pytest = None
from mlx_arch_plugins.deepseek_v4 import model as dsv4

if pytest:
    pytestmark = pytest.mark.compat  # also on the older mlx / mlx-lm pair

FMT = {"fp8": (448.0, 1e-4, 3, -6), "fp4": (6.0, 6 * 2.0**-126, 1, 0)}


def reference(x: np.ndarray, block: int, fmt: str) -> np.ndarray:
    qmax, floor, mant, min_exp = FMT[fmt]
    shape = x.shape
    xb = x.astype(np.float32).reshape(-1, block)
    amax = np.abs(xb).max(-1, keepdims=True)
    s = np.maximum(amax, np.float32(floor)) * np.float32(1.0 / qmax)
    m, e = np.frexp(s)  # s = m * 2**e, m in [0.5, 1)
    scale = np.ldexp(np.float32(1), np.where(m == 0.5, e - 1, e)).astype(np.float32)
    q = np.clip(xb / scale, -qmax, qmax)
    _, qe = np.frexp(np.abs(q))  # floor(log2|q|) = qe - 1 for q != 0
    step = np.ldexp(np.float32(1), np.maximum(qe - 1, min_exp) - mant)
    r = np.round(q / step) * step  # numpy rounds half to even
    return (r * scale).astype(np.float32).reshape(shape)


def _inputs(block, seed):
    rng = np.random.default_rng(seed)
    rows = []
    for scale in (1e-7, 1e-3, 1.0, 300.0, 1e5):
        rows.append(rng.standard_normal(16 * block) * scale)
        rows.append(rng.standard_cauchy(16 * block) * scale)  # wide blocks
    z = np.zeros(16 * block)
    z[: block // 2] = 1e-30  # a block below the scale floor, one all zero
    rows.append(z)
    return np.stack(rows).astype(np.float32)


def _grid_points(fmt):
    """Every representable magnitude of the format at scale 1 and the
    midpoints between neighbours (the ties), with both signs."""
    qmax, _, mant, min_exp = FMT[fmt]
    vals = {0.0}
    e = min_exp
    while 2.0**e <= qmax:
        for k in range(2**mant):
            v = (1 + k / 2**mant) * 2.0**e
            if v <= qmax:
                vals.add(v)
        e += 1
    for k in range(1, 2**mant):  # subnormals
        vals.add(k / 2**mant * 2.0**min_exp)
    g = np.array(sorted(vals), np.float32)
    mids = (g[1:] + g[:-1]) / 2
    pts = np.concatenate([g, mids, np.nextafter(mids, 0), np.nextafter(mids, 1e9)])
    return np.concatenate([pts, -pts]).astype(np.float32)


CASES = [("fp8", 64), ("fp4", 32)]
DTYPES = [mx.float32, mx.bfloat16]


def _param(name, values):
    return pytest.mark.parametrize(name, values) if pytest else (lambda f: f)


@_param("fmt,block", CASES)
@_param("dtype", DTYPES)
def test_qat_round_matches_reference(fmt, block, dtype):
    x = mx.array(_inputs(block, 1)).astype(dtype)
    want = reference(np.array(x.astype(mx.float32)), block, fmt)
    got = np.array(dsv4.qat_round(x, block, fmt).astype(mx.float32))
    assert np.array_equal(got, np.array(mx.array(want).astype(dtype).astype(mx.float32)))


@_param("fmt,block", CASES)
def test_qat_round_ties_and_grid(fmt, block):
    # blocks whose amax is exactly qmax (scale 1): grid values stay, ties go
    # to the even neighbour, values next to a tie go to the nearer side
    qmax = FMT[fmt][0]
    pts = _grid_points(fmt)
    n = -(-pts.size // (block - 1)) * (block - 1)
    pts = np.resize(pts, n).reshape(-1, block - 1)
    x = np.concatenate([np.full((pts.shape[0], 1), qmax, np.float32), pts], 1)
    got = np.array(dsv4.qat_round(mx.array(x), block, fmt))
    assert np.array_equal(got, reference(x, block, fmt))
    # and the reference itself really rounds (a tie goes somewhere else)
    assert not np.array_equal(got, x)


def test_qat_round_head_keeps_the_tail_channels():
    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((2, 3, 512)).astype(np.float32)).astype(mx.bfloat16)
    got = dsv4.qat_round_head(x, 64, "fp8", 64)
    assert mx.array_equal(got[..., 448:], x[..., 448:])
    assert mx.array_equal(got[..., :448], dsv4.qat_round(x[..., :448], 64, "fp8"))
    assert not mx.array_equal(got[..., :448], x[..., :448])


if __name__ == "__main__":
    for fmt, block in CASES:
        for dtype in DTYPES:
            test_qat_round_matches_reference(fmt, block, dtype)
        test_qat_round_ties_and_grid(fmt, block)
    test_qat_round_head_keeps_the_tail_channels()
    print("qat rounding: all checks passed on", mx.default_device())
