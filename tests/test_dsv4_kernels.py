"""The optional CUDA kernels of deepseek_v4/kernels.py against what they replace: the
hyper-connection Sinkhorn against the mx.compile path, the dequantize kernels (affine,
mxfp4, mxfp8) against ``mx.dequantize``, bit for bit, the indexer's fused scores
against the portable matmul and head sum, and the radix-select top-k against
argpartition and the numpy statement of its contract (helpers/topk_reference.py).

Runs only where MLX's CUDA backend is available (the H200 device machine:
`PYTHONPATH=src python3 -m pytest tests/test_dsv4_kernels.py`, or `python3
tests/test_dsv4_kernels.py` with the same PYTHONPATH); the package is imported
as installed, never by editing sys.path (that would change every later test);
elsewhere the kernel is never used and the test is skipped.
"""

import mlx.core as mx
import numpy as np
from helpers.topk_reference import topk_reference

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


# (bits, group size, packed shape [.., words], dtype): Flash's expert and dense shapes,
# a word count that leaves the last thread block part empty, and every bit width the
# kernel takes
DEQUANT_CASES = (
    (4, 64, (4, 2048, 512), mx.bfloat16),
    (4, 64, (1024, 128), mx.bfloat16),
    (4, 32, (3, 40, 8), mx.float16),
    (2, 64, (64, 256), mx.bfloat16),
    (8, 128, (96, 64), mx.bfloat16),
)


def check_dequantize():
    for i, (bits, group, packed_shape, dtype) in enumerate(DEQUANT_CASES):
        mx.random.seed(10 + i)
        cols = packed_shape[-1] * 32 // bits
        w = mx.random.normal((*packed_shape[:-1], cols)).astype(dtype)
        q, scales, biases = mx.quantize(w, group_size=group, bits=bits)
        assert q.shape == packed_shape, (q.shape, packed_shape)
        assert kern.dequant_enabled("affine", bits, dtype, biases)
        want = mx.dequantize(q, scales, biases, group, bits, dtype=dtype)
        for per_thread in (1, 2):
            got = kern.affine_dequantize(q, scales, biases, group, bits, dtype, per_thread)
            assert got.shape == want.shape and got.dtype == dtype
            # bit for bit: compare the raw 16-bit patterns
            same = mx.array_equal(got.view(mx.uint16), want.view(mx.uint16)).item()
            assert same, f"bits {bits} group {group} {packed_shape} per_thread {per_thread}"


def check_mx_dequantize():
    for i, (mode, bits, shape, dtype) in enumerate(
        (
            ("mxfp4", 4, (4, 2048, 4096), mx.bfloat16),
            ("mxfp4", 4, (3, 40, 96), mx.float16),
            ("mxfp8", 8, (1024, 4096), mx.bfloat16),
            ("mxfp8", 8, (7, 64), mx.bfloat16),
        )
    ):
        mx.random.seed(30 + i)
        # a wide spread of magnitudes: scales far from 1, codes of every kind
        w = mx.random.normal(shape) * mx.exp(mx.random.uniform(-8, 8, shape[:-1] + (1,)))
        q, scales = mx.quantize(w.astype(dtype), group_size=32, bits=bits, mode=mode)[:2]
        assert kern.mx_dequant_enabled(mode, bits, 32, dtype)
        want = mx.dequantize(q, scales, None, 32, bits, mode=mode, dtype=dtype)
        got = kern.mx_dequantize(q, scales, bits, dtype)
        assert got.shape == want.shape and got.dtype == dtype
        same = mx.array_equal(got.view(mx.uint16), want.view(mx.uint16)).item()
        assert same, f"{mode} {shape} {dtype}"


def check_dequantize_slice():
    # the expert path dequantizes a slice of experts: a view with an offset
    mx.random.seed(20)
    w = mx.random.normal((6, 256, 512)).astype(mx.bfloat16)
    q, scales, biases = mx.quantize(w, group_size=64, bits=4)
    want = mx.dequantize(q[2:5], scales[2:5], biases[2:5], 64, 4, dtype=mx.bfloat16)
    got = kern.affine_dequantize(q[2:5], scales[2:5], biases[2:5], 64, 4, mx.bfloat16)
    assert mx.array_equal(got.view(mx.uint16), want.view(mx.uint16)).item()


def _portable_scores(q, w, keys):
    dots = q @ keys[:, None].swapaxes(-1, -2)
    return dsv4._relu_weighted_sum(dots, w[..., None])


def check_indexer():
    """Same bf16-rounded products, relu and weights; only the order of the float32 sums
    differs (and, rarely, a product's rounding when the two accumulations straddle a
    bf16 tie). Odd key counts, query counts off the kernel's tiles, a batch of two."""
    shapes = [(1, 32, 64, 128, 4096), (2, 9, 64, 128, 77), (1, 130, 16, 32, 1000)]
    shapes += [(1, 8, 64, 128, 8), (1, 64, 64, 128, 32768)]
    for seed, (B, L, H, D, N) in enumerate(shapes):
        mx.random.seed(seed)
        q = mx.random.normal((B, L, H, D)).astype(mx.bfloat16)
        keys = mx.random.normal((B, N, D)).astype(mx.bfloat16)
        w = mx.random.normal((B, L, H)) * (D * H) ** -0.5
        assert kern.indexer_kernel_enabled(q, keys)
        want = _portable_scores(q, w, keys)
        got = kern.indexer_scores(q, w, keys)
        assert got.shape == want.shape == (B, L, N) and got.dtype == mx.float32
        staged = kern.indexer_scores(q, w, keys, stage=32)  # the same sums, keys via smem
        assert mx.array_equal(staged, got).item(), "staged keys changed the scores"
        scale = mx.abs(want).max().item()
        worst = mx.abs(got - want).max().item() / scale
        mean = mx.abs(got - want).mean().item() / scale
        assert worst < 4e-3 and mean < 1e-4, ((B, L, H, D, N), worst, mean)
        if N >= 1024:  # the indexer's use: the same top entries
            k = 512
            top_w = np.array(mx.argpartition(-want, kth=k - 1, axis=-1)[..., :k])
            top_g = np.array(mx.argpartition(-got, kth=k - 1, axis=-1)[..., :k])
            rows = zip(top_w.reshape(-1, k), top_g.reshape(-1, k))
            same = np.mean([len(np.intersect1d(a, b)) / k for a, b in rows])
            assert same > 0.97, ((B, L, H, D, N), same)


def check_topk():
    """Distinct scores: argpartition's set, exactly the contract's array. Ties (scores
    from a handful of values), limits below, at and above k, negatives and -inf:
    exactly the contract's array (lowest indices first among ties, index order)."""
    rng = np.random.default_rng(0)
    for lead, n, k in [
        ((1,), 32768, 512),
        ((8,), 32768, 512),
        ((3, 70), 8192, 512),
        ((4,), 262144, 512),
        ((5,), 1000, 4),
        ((2,), 600, 600),
    ]:
        rows = int(np.prod(lead))
        score = np.stack([rng.permutation(n) for _ in range(rows)]).astype(np.float32)
        score = (score / n - 0.5).reshape(*lead, n)
        assert kern.topk_kernel_enabled(mx.array(score), k) == (rows >= kern.TOPK_MIN_ROWS)
        got = np.array(kern.topk_rows(mx.array(score), k))
        np.testing.assert_array_equal(got, topk_reference(score, k), err_msg=str((lead, n, k)))
        if k < n:
            part = np.array(mx.argpartition(-mx.array(score), kth=k - 1, axis=-1)[..., :k])
            assert (np.sort(part, -1) == got).all(), (lead, n, k)
    tied = rng.integers(-20, 20, (64, 4096)).astype(np.float32)
    tied[:8, 3000:] = -np.inf
    tied[8:16] = np.where(rng.random((8, 4096)) < 0.5, 0.0, -0.0)
    limits = np.array([0, 1, 511, 512, 513, 4096, 5000] * 10)[:64]
    rng.shuffle(limits)
    for limit in (None, limits):
        want = topk_reference(tied, 512, limit)
        got = np.array(
            kern.topk_rows(mx.array(tied), 512, None if limit is None else mx.array(limit))
        )
        np.testing.assert_array_equal(got, want)
    # a query axis broadcast over the batch, as the prefill's indexer passes it
    score = rng.standard_normal((2, 33, 3000)).astype(np.float32)
    limit = rng.integers(0, 3001, 33)
    got = np.array(kern.topk_rows(mx.array(score), 512, mx.array(limit)))
    np.testing.assert_array_equal(got, topk_reference(score, 512, limit))


if pytest is not None:
    needs_cuda = pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend")

    @needs_cuda
    def test_sinkhorn_kernel_matches_compiled_path():
        check_split()

    @needs_cuda
    def test_collapse_with_kernel_matches_compiled_path():
        check_collapse()

    @needs_cuda
    def test_dequantize_kernel_is_bit_equal_to_mlx():
        check_dequantize()

    @needs_cuda
    def test_mx_dequantize_kernel_is_bit_equal_to_mlx():
        check_mx_dequantize()

    @needs_cuda
    def test_dequantize_kernel_on_a_slice_of_experts():
        check_dequantize_slice()

    @needs_cuda
    def test_indexer_kernel_matches_portable_scores():
        check_indexer()

    @needs_cuda
    def test_topk_kernel_keeps_the_contract():
        check_topk()


if __name__ == "__main__":
    if not _cuda():
        print("SKIP: no CUDA backend")
        raise SystemExit(0)
    check_split()
    check_collapse()
    print("PASS sinkhorn kernel")
    check_dequantize()
    check_dequantize_slice()
    print("PASS dequantize kernel")
    check_mx_dequantize()
    print("PASS mx dequantize kernel")
    check_indexer()
    print("PASS indexer kernel")
    check_topk()
    print("PASS top-k kernel")
