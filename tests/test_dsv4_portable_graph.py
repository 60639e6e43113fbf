"""The portable (mx.compile) hyper-connection helpers: the elementwise forms
of the collapse, weighted sum and expand give what the reduction / matmul
forms give, up to fp32 rounding, and each is the number of fused kernels it
was written to be (a graph count: fusion that silently breaks apart shows
here, not in the logits).

Runs on the default device."""

import re
import tempfile

import mlx.core as mx
import numpy as np
import pytest

from mlx_arch_plugins.deepseek_v4 import model as dsv4

pytestmark = pytest.mark.compat

HC, ITERS, EPS, NORM_EPS, D = 4, 20, 1e-6, 1e-6, 64


def _kernels(*outputs):
    """Primitives of the graph behind ``outputs``, views excluded."""
    views = {
        "Slice",
        "Broadcast",
        "Reshape",
        "ExpandDims",
        "Squeeze",
        "Transpose",
        "View",
        "Flatten",
        "Unflatten",
    }
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        labels = re.findall(r'label ?= ?"([^"]*)"', f.read())
    return [lab.split()[0] for lab in labels if lab.split()[0] not in views]


def _slice_nodes(*outputs):
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        return len(re.findall(r'label ?= ?"Slice', f.read()))


def _params(seed):
    mx.random.seed(seed)
    fn = mx.random.normal(((2 + HC) * HC, HC * D)) * 0.05
    scale = mx.random.uniform(0.5, 2.0, (3,))
    base = mx.random.normal(((2 + HC) * HC,))
    mx.eval(fn, scale, base)
    return fn, scale, base


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("lead", [(1, 1), (3, 5)])
def test_collapse_views_equals_reference(dtype, lead):
    fn, scale, base = _params(1)
    h = (mx.random.normal((*lead, HC, D)) * 2).astype(dtype)
    got = dsv4._hc_collapse_views(h, fn, scale, base, HC, ITERS, EPS, NORM_EPS)
    want = dsv4._hc_collapse(h, fn, scale, base, HC, ITERS, EPS, NORM_EPS)
    assert got[0].dtype == want[0].dtype == dtype
    # x: float32 sums in another order, then the cast (one bf16 ulp at most)
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    np.testing.assert_allclose(
        np.array(got[0].astype(mx.float32)),
        np.array(want[0].astype(mx.float32)),
        atol=tol,
        rtol=tol,
    )
    np.testing.assert_allclose(np.array(got[1]), np.array(want[1]), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.array(got[2]), np.array(want[2]), atol=1e-6, rtol=0)


def test_weighted_and_expand_equal_reduction_forms():
    mx.random.seed(2)
    h = mx.random.normal((2, 3, HC, D))
    pre = mx.random.uniform(shape=(2, 3, HC))
    post = mx.random.uniform(shape=(2, 3, HC))
    comb = mx.random.uniform(shape=(2, 3, HC, HC))
    y = mx.random.normal((2, 3, D))
    want_x = (pre[..., None] * h).sum(-2)
    np.testing.assert_allclose(
        np.array(dsv4._hc_weighted(h, pre)), np.array(want_x), atol=1e-5, rtol=1e-6
    )
    want = post[..., None] * y[..., None, :] + comb.swapaxes(-1, -2) @ h
    np.testing.assert_allclose(
        np.array(dsv4._hc_expand(y, h, post, comb)), np.array(want), atol=1e-5, rtol=1e-6
    )


def test_helpers_are_the_kernels_they_were_written_to_be():
    fn, scale, base = _params(3)
    h = mx.random.normal((1, 1, HC, D)).astype(mx.bfloat16)
    y = mx.random.normal((1, 1, D)).astype(mx.bfloat16)
    post = mx.random.uniform(shape=(1, 1, HC))
    comb = mx.random.uniform(shape=(1, 1, HC, HC))
    mx.eval(h, y, post, comb)
    # the expand and the weighted sum: one fused kernel each
    assert len(_kernels(dsv4._hc_expand(y, h, post, comb))) == 1
    assert len(_kernels(dsv4._hc_weighted(h, post))) == 1
    # the collapse: the mixing logits (cast, square, mean, matmul, scale: 5),
    # one kernel for the softmax, a reduction and a fused divide per Sinkhorn
    # half-step (no slices: a slice node per term cost more host time than the
    # reduction kernel saved), post, weighted sum; no gathers (integer indices),
    # no softmax primitive
    half_steps = 2 * ITERS - 1
    got = _kernels(*dsv4._hc_collapse_views(h, fn, scale, base, HC, ITERS, EPS, NORM_EPS))
    assert "Softmax" not in got and "Gather" not in got
    assert got.count("Sum") == 1 + half_steps
    assert len(got) == 5 + 1 + 2 * half_steps + 2, got
    slices = [
        _slice_nodes(*dsv4._hc_collapse_views(h, fn, scale, base, HC, iters, EPS, NORM_EPS))
        for iters in (2, ITERS)
    ]
    assert slices[0] == slices[1], "the Sinkhorn iterations add slice nodes"
