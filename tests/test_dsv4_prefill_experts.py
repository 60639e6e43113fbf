"""Routed experts at prefill sizes through dequantized chunks + gather_mm.

Where a backend's quantized gather is slow for many rows (MLX CUDA), the experts are
dequantized a chunk at a time and the rows, sorted by expert, go through gather_mm. The
CPU keeps gather_qmm by default; these tests force the other path
(``MLX_ARCH_PLUGINS_DEQUANT_ROWS``) and hold it to the same references.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers.dsv4_golden import CASES, expected, fp32_checks, inputs, load_case, run_protocol
from mlx_lm.models.cache import make_prompt_cache

from mlx_arch_plugins.deepseek_v4 import model as dsv4

pytestmark = pytest.mark.compat


@pytest.fixture
def dequant_calls(monkeypatch):
    """Counts mx.dequantize calls made by the chunked expert path."""
    calls = []
    real = mx.dequantize

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(mx, "dequantize", spy)
    return calls


def _prefill(model, case):
    prompt, _ = inputs(case)
    return np.array(model(mx.array([prompt]), cache=make_prompt_cache(model))[0])


@pytest.mark.parametrize("case", CASES)
def test_official_experts_meet_the_golden_checks(case, monkeypatch, dequant_calls):
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "1")
    model = load_case(case, "fp8")  # routed experts in mxfp4
    pre, dec, _ = run_protocol(model, case)
    assert dequant_calls, "the chunked path did not run"
    exp = expected(case, "fp8")
    want = np.concatenate([np.array(exp["prefill_logits"]), np.array(exp["decode_logits"])])
    maxdev = np.concatenate(
        [np.array(exp["perturbation_maxdev_prefill"]), np.array(exp["perturbation_maxdev_decode"])]
    )
    within, mean, top1 = fp32_checks(np.concatenate([pre, dec]), want, maxdev)
    assert within >= 0.98 and mean <= 1e-2 and top1 >= 0.97


@pytest.mark.parametrize("case", CASES[:2])
def test_affine_experts_equal_gather_qmm(case, monkeypatch, dequant_calls):
    model = load_case(case, "bf16")
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda path, m: "switch_mlp" in path and hasattr(m, "to_quantized"),
    )
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "0")  # never: gather_qmm
    stock = _prefill(model, case)
    assert not dequant_calls
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "1")
    chunked = _prefill(model, case)
    assert dequant_calls
    np.testing.assert_allclose(chunked, stock, atol=1e-4, rtol=0)
    # one expert per chunk: the same rows meet the same weights, bit for bit
    calls = len(dequant_calls)
    monkeypatch.setattr(dsv4, "_DEQUANT_CHUNK_BYTES", 1)
    assert np.array_equal(_prefill(model, case), chunked)
    assert len(dequant_calls) - calls > calls  # more, smaller chunks


def test_below_the_threshold_gather_qmm_stays(monkeypatch, dequant_calls):
    case = CASES[0]
    model = load_case(case, "fp8")
    rows = len(inputs(case)[0]) * model.args.num_experts_per_tok
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", str(rows + 1))
    _prefill(model, case)
    assert not dequant_calls


def test_threshold_table_is_per_backend_and_mode(monkeypatch):
    monkeypatch.delenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", raising=False)
    monkeypatch.setattr(dsv4, "_backend", lambda: "cuda")
    assert dsv4._dequant_rows("affine") == dsv4.DEQUANT_ROWS[("cuda", "affine")]
    assert dsv4._dequant_rows("mxfp4") is None  # measured: gather_qmm is as fast
    monkeypatch.setattr(dsv4, "_backend", lambda: "metal")
    assert dsv4._dequant_rows("affine") is None  # no measurement: stock kernels
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "7")
    assert dsv4._dequant_rows("mxfp4") == 7
