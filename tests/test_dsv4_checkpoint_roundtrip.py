"""make-tiny in each format -> stock ``mlx_lm.utils.load_model`` -> logits vs the bf16 load.

All checkpoints share one seed, so they are the same model: ``bf16`` is the exact
dequantization of ``official``; ``mlx-affine4`` and ``mxfp4`` are stock
``mlx_lm.convert`` quantizations of ``bf16``. Runs are in float32 so that only
the format's own error shows.
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_arch_plugins.deepseek_v4 import tiny

CFG_FILE = Path(__file__).parent / "data" / "formats" / "golden_a_fp8_config.json"
PROMPT = np.random.default_rng(0).integers(2, 256, size=40).tolist()


@pytest.fixture(scope="module")
def cfg():
    # golden case a: every code path, vocab 256 (self-made tokenizer), FP8 dims of 128
    return tiny.resolve_config(str(CFG_FILE))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, cfg):
    root = tmp_path_factory.mktemp("rt")
    out = {}
    for fmt in ("official", "bf16"):
        out[fmt] = tiny.make_tiny(root / fmt, fmt, seed=7, cfg=cfg)
    return out


@pytest.fixture(scope="module")
def mlx_ckpts(tmp_path_factory, cfg, ckpts):
    root = tmp_path_factory.mktemp("rtq")
    return {
        fmt: tiny.make_tiny(root / fmt, fmt, seed=7, cfg=cfg) for fmt in ("mlx-affine4", "mxfp4")
    }


def load(path):
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    model.set_dtype(mx.float32)
    return model


def logits(model, ids=PROMPT):
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def quantized_modules(model):
    return {
        p: m
        for p, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        or type(m).__name__.startswith("Quantized")
    }


def dequantized(m):
    biases = getattr(m, "biases", None)
    return mx.dequantize(
        m.weight, m.scales, biases, m.group_size, m.bits, mode=getattr(m, "mode", "affine")
    )


def rms(a):
    return float(np.sqrt(np.mean(np.square(a))))


@pytest.mark.compat
def test_official_loads_packed_and_bit_exact(ckpts):
    off, ref = load(ckpts["official"]), load(ckpts["bf16"])
    layer = off.model.layers[1]
    assert isinstance(layer.attn.wq_a, nn.QuantizedLinear) and layer.attn.wq_a.mode == "mxfp8"
    assert layer.ffn.switch_mlp.gate_proj.mode == "mxfp4"
    assert layer.ffn.shared_experts.up_proj.mode == "mxfp8"
    ref_w = dict(tree_flatten(ref.parameters()))
    q = quantized_modules(off)
    # every FP8/FP4 linear of the checkpoint: dense ones per layer and MTP, experts, indexer
    n_fp8 = 3 * (5 + 3) + 1 + (5 + 3 + 2)  # 3 layers + indexer of layer 1 + mtp block
    assert sum(m.mode == "mxfp8" for m in q.values()) == n_fp8
    assert sum(m.mode == "mxfp4" for m in q.values()) == 3 * 4
    for path, m in q.items():
        w = dequantized(m)
        want = ref_w[path + ".weight"]
        # bf16 file = numpy dequantization of the official file (tests/test_tiny.py)
        assert np.array_equal(
            np.array(w.reshape(want.shape).astype(mx.float32)), np.array(want.astype(mx.float32))
        ), path


@pytest.mark.compat
def test_official_logits_match_bf16(ckpts):
    d = np.abs(logits(load(ckpts["official"])) - logits(load(ckpts["bf16"])))
    # Weights are bit-identical (test above), so only fp32 summation order differs
    # (quantized matmul vs dense matmul). Measured max 1e-5 on logits of +-10; one
    # FP8 step in a single block moves logits by far more than 1e-3.
    assert d.max() < 1e-3, d.max()


def _noise_reference(ref_path, qmodel, seed=0):
    """Logits of the bf16 model after adding Gaussian noise of the same rms as the
    format's quantization error, matrix by matrix: what this amount of weight error
    does to the logits when it has no structure."""
    ref = load(ref_path)
    ref_w = dict(tree_flatten(ref.parameters()))
    rng = np.random.default_rng(seed)
    updates = []
    for path, m in quantized_modules(qmodel).items():
        want = ref_w[path + ".weight"]
        err = np.array(dequantized(m).reshape(want.shape).astype(mx.float32)) - np.array(want)
        noise = rng.standard_normal(want.shape).astype(np.float32) * rms(err)
        updates.append((path + ".weight", want + mx.array(noise)))
    assert updates
    ref.load_weights(updates, strict=False)
    return logits(ref)


@pytest.mark.compat
@pytest.mark.parametrize("fmt,mode", [("mlx-affine4", "affine"), ("mxfp4", "mxfp4")])
def test_mlx_quantized_within_quantization_error(ckpts, mlx_ckpts, fmt, mode):
    cfg = json.loads((mlx_ckpts[fmt] / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"].get("mode", "affine") == mode
    qm = load(mlx_ckpts[fmt])
    assert qm.model.layers[0].attn.wq_a.mode == mode
    assert qm.model.layers[0].ffn.switch_mlp.down_proj.mode == mode
    base = logits(load(ckpts["bf16"]))
    got = logits(qm)
    noisy = _noise_reference(ckpts["bf16"], qm)
    err, noise_err = rms(got - base), rms(noisy - base)
    # A correct load deviates like unstructured weight noise of the same size
    # (measured, seed 7: affine4 0.97 vs 0.99-1.06, mxfp4 1.16 vs 1.14-1.19); a mis-mapped scale,
    # group or nibble order is a wrong model, as far off as a different seed
    # (3.48 rms). 1.5x the noise reference separates the two.
    assert 0 < err < 1.5 * noise_err, (err, noise_err)
    assert noise_err < 0.6 * rms(base), noise_err  # the reference itself is a small error


def test_different_seed_is_far(cfg, tmp_path, ckpts):
    """The yardstick above: another seed is another model."""
    other = tiny.make_tiny(tmp_path / "s8", "bf16", seed=8, cfg=cfg)
    assert rms(logits(load(other)) - logits(load(ckpts["bf16"]))) > 2.0


def test_logits_are_sane(ckpts):
    out = logits(load(ckpts["bf16"]))
    # like the golden fixtures: logits within about +-11, softmax neither peaked nor flat
    assert np.abs(out).max() < 20
    p = np.exp(out - out.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ent = -(p * np.log(p + 1e-30)).sum(-1)
    assert 0.3 < ent.mean() < np.log(out.shape[-1]) - 0.1, ent.mean()


CONVERSIONS = {
    "affine2": dict(q_bits=2, q_group_size=64),
    "affine3": dict(q_bits=3, q_group_size=64),
    "affine5": dict(q_bits=5, q_group_size=64),
    "affine6": dict(q_bits=6, q_group_size=64),
    "affine8": dict(q_bits=8, q_group_size=64),
    "affine4-g32": dict(q_bits=4, q_group_size=32),
    "mxfp8": dict(q_bits=8, q_group_size=32, q_mode="mxfp8"),
    "nvfp4": dict(q_bits=4, q_group_size=16, q_mode="nvfp4"),
    "mixed_3_6": dict(quant_predicate="mixed_3_6"),
}


@pytest.mark.compat
@pytest.mark.parametrize("name", sorted(CONVERSIONS))
def test_stock_conversions_load(ckpts, tmp_path, name):
    """bf16 tiny -> stock mlx_lm.convert -> reload: every layer gets the bits, group and
    mode its config entry (global or per layer) says, and the logits move by what
    that much unstructured weight noise moves them."""
    from mlx_lm.convert import convert

    out = tmp_path / name
    convert(str(ckpts["bf16"]), mlx_path=str(out), quantize=True, **CONVERSIONS[name])
    q = json.loads((out / "config.json").read_text())["quantization"]
    qm = load(out)
    mods = quantized_modules(qm)
    assert len(mods) > 30
    for path, m in mods.items():
        want = q.get(path, q)
        # a per-layer group_size of None (mixed recipes) means mlx's default, as the global one
        group = want.get("group_size") or q["group_size"]
        assert (m.bits, m.group_size or q["group_size"], getattr(m, "mode", "affine")) == (
            want["bits"],
            group,
            want.get("mode", "affine"),
        ), path
    if name.startswith("mixed"):
        assert {m.bits for m in mods.values()} == {3, 6}
    base = logits(load(ckpts["bf16"]))
    err, noise_err = rms(logits(qm) - base), rms(_noise_reference(ckpts["bf16"], qm) - base)
    # measured ratio err / noise_err: 0.73 (8 bit) to 1.17 (mxfp8). At >= 4 bits the
    # bound is far below a wrong model (3.5); at 2-3 bits noise is that large anyway.
    assert 0 < err < 1.5 * noise_err, (err, noise_err)
