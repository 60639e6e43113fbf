"""The CSA indexer's top-k: the portable path with a per-query limit, and the model
through the contract of the CUDA radix-select kernel (``kernels.topk_rows``, whose
own test runs on the device: tests/test_dsv4_kernels.py), stood in for here by its
numpy statement."""

import mlx.core as mx
import numpy as np
import pytest
from helpers.dsv4_golden import load_case, run_protocol
from helpers.topk_reference import topk_reference

from mlx_arch_plugins.deepseek_v4 import kernels
from mlx_arch_plugins.deepseek_v4 import model as dsv4


def _sets(idx):
    return [frozenset(r) for r in np.asarray(idx).reshape(-1, np.asarray(idx).shape[-1]).tolist()]


def test_portable_top_k_leaves_out_entries_past_the_limit():
    rng = np.random.default_rng(1)
    score = np.stack([rng.permutation(300) for _ in range(10)]).astype(np.float32)
    score = score.reshape(2, 5, 300)
    limit = np.array([10, 250, 300, 3, 21])
    got = np.array(dsv4.topk_indices(mx.array(score), 20, limit=mx.array(limit)))
    want = topk_reference(score, 20, limit)
    for g, w, lim in zip(got.reshape(-1, 20), want.reshape(-1, 20), np.tile(limit, 2)):
        if lim > 20:
            assert set(g) == set(w)
        else:  # every entry within reach, the rest from beyond it (masked later)
            assert set(range(lim)) <= set(g) and g.max() < 300


def test_portable_top_k_is_argpartition_without_a_limit():
    score = mx.array(np.random.default_rng(2).standard_normal((3, 1000)).astype(np.float32))
    want = mx.argpartition(-score, kth=63, axis=-1)[..., :64]
    assert mx.array_equal(dsv4.topk_indices(score, 64), want).item()


@pytest.mark.parametrize("case", ["b_hca_long", "c_mixed_hd256"])
def test_model_through_the_kernel_contract_matches_the_portable_path(monkeypatch, case):
    """With the kernel's promise (index order, limits instead of -inf scores, 0..k-1
    for a query that sees at most k entries) the logits move by fp32 noise only: the
    same entries, attended in another order. (Without the indexer's FP4 rounding,
    whose ties could pick another tied entry.)"""
    ref = run_protocol(load_case(case, qat_rounding=False), case)
    calls = []

    def contract(score, k, limit=None):
        calls.append(limit is not None)
        return mx.array(
            topk_reference(np.array(score), k, None if limit is None else np.array(limit))
        )

    monkeypatch.setattr(kernels, "topk_kernel_enabled", lambda score, k: True)
    monkeypatch.setattr(kernels, "topk_rows", contract)
    got = run_protocol(load_case(case, qat_rounding=False), case)
    assert any(calls), "no prefill selection went through the kernel's contract"
    for a, b in zip(got[:2], ref[:2]):
        assert np.abs(a - b).max() <= 1e-4
        assert np.array_equal(a.argmax(-1), b.argmax(-1))


def test_the_kernel_takes_prefill_blocks_not_decode_rows(monkeypatch):
    """One thread block per row leaves the GPU idle for a decode step's few rows."""
    monkeypatch.setattr(kernels, "cuda_enabled", lambda: True)
    monkeypatch.setattr(kernels, "_compute_capability", lambda: 9)
    rows = kernels.TOPK_MIN_ROWS
    assert kernels.topk_kernel_enabled(mx.zeros((1, rows, 4096)), 512)
    assert not kernels.topk_kernel_enabled(mx.zeros((8, 4096)), 512)
    assert not kernels.topk_kernel_enabled(mx.zeros((1, rows - 1, 4096)), 512)
    assert not kernels.topk_kernel_enabled(mx.zeros((1, rows, 4096), mx.bfloat16), 512)
    assert not kernels.topk_kernel_enabled(mx.zeros((1, rows, 500)), 512)
    monkeypatch.setattr(kernels, "_compute_capability", lambda: 6)
    assert not kernels.topk_kernel_enabled(mx.zeros((1, rows, 4096)), 512)
