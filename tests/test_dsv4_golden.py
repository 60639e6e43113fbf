"""DeepSeek-V4 against DeepSeek's reference logits (tests/data/golden).

Every case runs through stock ``mlx_lm.utils.load_model`` and
``make_prompt_cache``, prefill of all positions then teacher-forced decode,
and must pass the fixture README's checks (see dsv4_golden.fp32_checks).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers.dsv4_golden import CASES, GOLDEN, expected, fp32_checks, load_case, run_protocol

pytestmark = pytest.mark.compat


def _all(exp, suffix=""):
    return np.concatenate(
        [np.array(exp["prefill_logits" + suffix]), np.array(exp["decode_logits" + suffix])]
    )


def _maxdev(exp):
    return np.concatenate(
        [np.array(exp["perturbation_maxdev_prefill"]), np.array(exp["perturbation_maxdev_decode"])]
    )


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("case", CASES)
def test_fp32_matches_reference(case, fmt):
    model = load_case(case, fmt)
    mtp = case.startswith("a_")
    pre, dec, mtp_logits = run_protocol(model, case, mtp=mtp)
    exp = expected(case, fmt)
    within, mean, top1 = fp32_checks(np.concatenate([pre, dec]), _all(exp), _maxdev(exp))
    assert within >= 0.98, f"check 1: only {within:.1%} of positions within bound"
    assert mean <= 1e-2, f"check 2: mean |diff| {mean:.3g}"
    assert top1 >= 0.97, f"check 3: top-1 agreement {top1:.1%}"
    if mtp:
        want = np.array(exp["mtp_prefill_logits"])
        err = np.abs(mtp_logits - want).max(-1)
        assert (err <= 0.05).mean() >= 0.98
        assert np.abs(mtp_logits - want).mean() <= 1e-2
        assert (mtp_logits.argmax(-1) == want.argmax(-1)).mean() >= 0.97


@pytest.mark.parametrize("case", CASES)
def test_without_qat_rounding_matches_noqat_targets(case):
    model = load_case(case, "bf16", qat_rounding=False)
    pre, dec, _ = run_protocol(model, case)
    exp = expected(case, "bf16")
    diff = np.abs(np.concatenate([pre, dec]) - _all(exp, "_noqat")).max()
    assert diff <= 1e-3


def test_qat_rounding_is_needed():
    """The checks discriminate: without the FP8/FP4 rounding the primary
    targets are missed (so the passing test above is not vacuous)."""
    case = CASES[0]
    model = load_case(case, "bf16", qat_rounding=False)
    pre, dec, _ = run_protocol(model, case)
    exp = expected(case, "bf16")
    within, _, _ = fp32_checks(np.concatenate([pre, dec]), _all(exp), _maxdev(exp))
    assert within < 0.98


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("case", CASES)
def test_bfloat16_run_within_bf16_bounds(case, fmt):
    # README: a bf16 run should reach mean |diff| <= 0.25 and top-1 >= 85%
    # over all positions against the fp32 targets.
    model = load_case(case, fmt, dtype=mx.bfloat16)
    pre, dec, _ = run_protocol(model, case)
    got = np.concatenate([pre, dec])
    want = _all(expected(case, fmt))
    assert np.abs(got - want).mean() <= 0.25
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.85


# -- official FP8/FP4 layers are MLX mxfp8/mxfp4, bit-exact -------------------

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])


def _e4m3(codes):
    """Independent decode of FP8 e4m3fn bytes (no NaN codes in checkpoints)."""
    c = codes.astype(np.int64)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exp = (c >> 3) & 0xF
    man = c & 0x7
    val = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7))
    return sign * val


def _e8m0(codes):
    return 2.0 ** (codes.astype(np.float64) - 127)


def test_official_fp8_loads_packed_and_bit_exact():
    case = "b_hca_long"
    model = load_case(case, "fp8", dtype=None)
    raw = mx.load(str(GOLDEN / case / "fp8" / "model.safetensors"))
    layer = model.layers[1]

    wq_a = layer.attn.wq_a
    assert isinstance(wq_a, nn.QuantizedLinear) and wq_a.mode == "mxfp8"
    experts = layer.ffn.switch_mlp.gate_proj
    assert experts.mode == "mxfp4" and experts.bits == 4
    assert layer.ffn.shared_experts.up_proj.mode == "mxfp8"
    assert layer.attn.wo_a.mode == "mxfp8"

    # dense: FP8 value x its 128x128 block's power-of-two scale
    w = np.array(raw["layers.1.attn.wq_a.weight"])
    s = np.array(raw["layers.1.attn.wq_a.scale"])
    ref = _e4m3(w) * np.repeat(np.repeat(_e8m0(s), 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
    got = mx.dequantize(wq_a.weight, wq_a.scales, None, 32, 8, mode="mxfp8")
    assert np.array_equal(np.array(got.astype(mx.float32)), ref.astype(np.float32))

    # experts: FP4 nibbles (low = even column, code 8 = -0) x per-32 scales
    for e in range(experts.weight.shape[0]):
        b = np.array(raw[f"layers.1.ffn.experts.{e}.w1.weight"]).view(np.uint8)
        codes = np.stack([b & 0xF, b >> 4], -1).reshape(b.shape[0], -1)
        se = np.array(raw[f"layers.1.ffn.experts.{e}.w1.scale"])
        ref = E2M1[codes] * np.repeat(_e8m0(se), 32, 1)
        got = mx.dequantize(experts.weight[e], experts.scales[e], None, 32, 4, mode="mxfp4")
        assert np.array_equal(np.array(got.astype(mx.float32)), ref.astype(np.float32))


def test_fp4_code_8_is_zero():
    """A byte of code 8 (-0) in both nibbles dequantizes to exactly zero."""
    packed = mx.array(np.full((1, 16), 0x88, np.uint8)).view(mx.uint32)
    scales = mx.array(np.full((1, 1), 127, np.uint8))
    out = mx.dequantize(packed, scales, None, 32, 4, mode="mxfp4")
    assert np.all(np.array(out.astype(mx.float32)) == 0)
