"""Stock ``mlx_lm.convert`` on an official-format (FP8/FP4) checkpoint, then reload
and generate through stock ``mlx_lm.load`` / ``stream_generate``."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_arch_plugins.deepseek_v4 import tiny

CFG_FILE = Path(__file__).parent / "data" / "formats" / "golden_a_fp8_config.json"
PROMPT = [0, 17, 42, 99, 3, 250, 7, 128, 64, 5]


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    cfg = tiny.resolve_config(str(CFG_FILE))
    root = tmp_path_factory.mktemp("conv")
    return {f: tiny.make_tiny(root / f, f, seed=5, cfg=cfg) for f in ("official", "bf16")}


def convert(src, dst, **kw):
    from mlx_lm.convert import convert as stock_convert

    stock_convert(str(src), mlx_path=str(dst), **kw)
    return dst


def greedy(path, n=4):
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = load(str(path))
    out = [
        r.token
        for r in stream_generate(model, tok, PROMPT, max_tokens=n, sampler=make_sampler(0.0))
    ]
    return model, out


def fp32_logits(path):
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    model.set_dtype(mx.float32)
    return np.array(model(mx.array([PROMPT])).astype(mx.float32))[0]


@pytest.fixture(scope="module")
def affine4(official, tmp_path_factory):
    return convert(
        official["official"],
        tmp_path_factory.mktemp("a4") / "out",
        quantize=True,
        q_bits=4,
        q_group_size=64,
    )


@pytest.mark.compat
def test_official_to_affine4_reloads_and_generates(affine4):
    model, toks = greedy(affine4)
    assert 1 <= len(toks) <= 4 and all(0 <= t < 256 for t in toks)
    assert model.lm_head.mode == "affine" and model.lm_head.bits == 4


@pytest.mark.compat
def test_official_to_affine4_quantizes_every_linear(affine4):
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(affine4))
    modes = {
        (m.mode, m.bits)
        for _, m in model.named_modules()
        if hasattr(m, "bits") and hasattr(m, "scales")
    }
    assert modes == {("affine", 4)}


@pytest.mark.compat
def test_official_to_bf16_dequantized(official, tmp_path):
    out = convert(official["official"], tmp_path / "bf16", dequantize=True)
    model, toks = greedy(out)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    # dequantized official == the bf16 tiny of the same seed (exact), fp32 order noise only
    assert np.abs(fp32_logits(out) - fp32_logits(official["bf16"])).max() < 1e-3
    _, ref = greedy(official["bf16"])
    assert toks == ref


@pytest.mark.compat
def test_official_plain_convert_reloads(official, tmp_path):
    out = convert(official["official"], tmp_path / "plain", dtype="bfloat16")
    _, toks = greedy(out)
    _, ref = greedy(official["official"])
    assert toks == ref
