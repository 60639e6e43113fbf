"""Helpers for the DeepSeek-V4 golden tests: load a case through stock mlx-lm,
run the reference protocol, apply the fixture README's checks."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

GOLDEN = Path(__file__).parent.parent / "data" / "golden" / "cases"
CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir())


def load_case(case, fmt="bf16", dtype=mx.float32, **model_config):
    """Model through stock ``mlx_lm.utils.load_model`` (the plugin serves
    ``mlx_lm.models.deepseek_v4``), cast to ``dtype``."""
    from mlx_lm.utils import load_model

    model, _ = load_model(GOLDEN / case / fmt, model_config=model_config or None)
    if dtype is not None:
        model.set_dtype(dtype)
    return model


def inputs(case):
    data = json.loads((GOLDEN / case / "inputs.json").read_text())
    return data["prompt_ids"], data["decode_ids"]


def expected(case, fmt="bf16"):
    name = "expected_bf16" if fmt == "bf16" else "expected_fp8"
    return mx.load(str(GOLDEN / case / f"{name}.safetensors"))


def run_protocol(model, case, mtp=False):
    """Prefill every prompt position, then teacher-forced single-token decode
    steps; returns (prefill [P, V], decode [N, V], mtp [P, V] or None)."""
    from mlx_lm.models.cache import make_prompt_cache

    prompt, decode = inputs(case)
    cache = make_prompt_cache(model)
    h = model.model.hidden(mx.array([prompt]), cache)
    pre = model.lm_head(model.model.norm(model.model.hc_head(h)))[0]
    steps = [model(mx.array([[t]]), cache=cache)[0, 0] for t in decode]
    mtp_logits = None
    if mtp:
        nxt = (prompt + decode)[1 : len(prompt) + 1]
        mtp_logits = model.mtp_logits(h, mx.array([nxt]))[0]
    as_np = lambda a: np.array(a.astype(mx.float32))  # noqa: E731
    return as_np(pre), as_np(mx.stack(steps)), None if mtp_logits is None else as_np(mtp_logits)


def fp32_checks(got, want, maxdev):
    """The fixture README's three checks for an fp32 run (per expected file):
    1. err[pos] <= max(0.05, 4 * perturbation_maxdev[pos]) for >= 98% of positions
    2. mean |logit - target| <= 1e-2
    3. top-1 agreement >= 97%"""
    err = np.abs(got - want).max(-1)
    within = float((err <= np.maximum(0.05, 4 * maxdev)).mean())
    mean = float(np.abs(got - want).mean())
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    return within, mean, top1
