"""The optional CUDA kernel for the hyper-connection Sinkhorn
(models/deepseek_v4_kernels.py) against the mx.compile path it replaces.

Runs only where MLX's CUDA backend is available (the H200 device machine:
`PYTHONPATH=src python3 -m pytest tests/test_dsv4_kernels.py`, or `python3
tests/test_dsv4_kernels.py` with the same PYTHONPATH); the package is imported
as installed, never by editing sys.path (that would change every later test);
elsewhere the kernel is never used and the test is skipped.
"""

import mlx.core as mx

try:
    import pytest
except ImportError:  # the device machine may lack pytest; see __main__
    pytest = None

from mlx_arch_plugins.deepseek_v4 import kernels as kern  # noqa: E402
from mlx_arch_plugins.deepseek_v4 import model as dsv4  # noqa: E402

HC, ITERS, EPS = 4, 20, 1e-6


def _cuda():
    try:
        return mx.default_device() == mx.gpu and mx.cuda.is_available()
    except Exception:
        return False


def _case(lead, seed):
    mx.random.seed(seed)
    mixes = mx.random.normal((*lead, (2 + HC) * HC)) * 3
    scale = mx.random.uniform(0.5, 2.0, (3,))
    base = mx.random.normal(((2 + HC) * HC,))
    return mixes, scale, base


def check_split():
    for lead, seed in (((1, 1), 0), ((8, 1), 1), ((2, 37), 2), ((1, 2048), 3)):
        mixes, scale, base = _case(lead, seed)
        want = dsv4._sinkhorn_split(mixes, scale, base, HC, ITERS, EPS)
        got = kern.sinkhorn_split(mixes, scale, base, HC, ITERS, EPS)
        assert got is not None, "kernel not enabled on CUDA"
        for name, w, g in zip(("pre", "post", "comb"), want, got):
            assert g.shape == w.shape, (name, g.shape, w.shape)
            err = mx.abs(g - w).max().item()
            assert err <= 2e-6, f"{name} {lead}: max abs diff {err}"
        # comb is doubly stochastic up to eps: a real Sinkhorn, not a copy
        cs = got[2].sum(-2)
        assert mx.abs(cs - 1).max().item() < 1e-4


def check_collapse():
    mx.random.seed(5)
    args = dsv4.ModelArgs.from_dict(
        dict(
            model_type="deepseek_v4",
            vocab_size=64,
            hidden_size=256,
            num_hidden_layers=1,
            num_attention_heads=2,
            head_dim=128,
            qk_rope_head_dim=64,
            q_lora_rank=64,
            o_lora_rank=64,
            o_groups=1,
            sliding_window=8,
            compress_ratios=[0],
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=64,
        )
    )
    hc = dsv4.HyperConnection(args)
    hc.fn = mx.random.normal(hc.fn.shape) * 0.05
    hc.base = mx.random.normal(hc.base.shape)
    h = mx.random.normal((3, 5, HC, 256))
    got = hc.collapse(h)
    want = dsv4._hc_collapse(h, hc.fn, hc.scale, hc.base, HC, ITERS, hc.eps, hc.norm_eps)
    for g, w in zip(got, want):
        assert mx.abs(g - w).max().item() <= 1e-5


if pytest is not None:
    needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend")

    @needs_cuda
    def test_sinkhorn_kernel_matches_compiled_path():
        check_split()

    @needs_cuda
    def test_collapse_with_kernel_matches_compiled_path():
        check_collapse()


if __name__ == "__main__":
    if not _cuda():
        print("SKIP: no CUDA backend")
        raise SystemExit(0)
    check_split()
    check_collapse()
    print("PASS sinkhorn kernel")
