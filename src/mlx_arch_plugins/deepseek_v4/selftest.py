"""DeepSeek-V4 self-check on this machine's default device (``doctor --selftest``).

Runs the tiny official-format checkpoint in ``selftest_data/`` (a golden case:
FP8/FP4 weights and the logits of DeepSeek's reference code, see SOURCE.md there)
through stock ``mlx_lm.utils.load_model`` in float32: prefill of every prompt
position, then teacher-forced single-token decode steps, once compiled (the
default path) and once eager (``mx.disable_compile()``). Each run must pass the
golden README's checks for an fp32 run; the compiled helpers must agree with
their eager selves. This is how a Mac learns whether Metal computes the right
thing: the tests only run on CPU here.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

DATA = Path(__file__).with_name("selftest_data")

# The golden README's "Tolerances" for an fp32 run, per expected file, with
# err[pos] = max over vocab |logit - target|:
BOUND_FLOOR = 0.05  # 1. err[pos] <= max(0.05, 4 * perturbation_maxdev[pos]) ...
BOUND_MAXDEV = 4.0
WITHIN_MIN = 0.98  #    ... for at least 98% of positions
MEAN_MAX = 1e-2  # 2. mean |logit - target| <= 1e-2
TOP1_MIN = 0.97  # 3. top-1 agreement >= 97% of positions


def _unsupported(error: Exception) -> bool:
    """True when the backend has no quantized-matmul kernel for a problem shape: MLX CUDA
    has none for the tiny checkpoint's mxfp8 layers (seen on the H200: "No implementation
    for problem shape: 40x128x128x1 ... mxfp8", in float32 and bfloat16 alike; the real
    Flash shapes run)."""
    return isinstance(error, (RuntimeError, ValueError)) and "No implementation" in str(error)


def selftest(report):
    """Call ``report(check, ok, detail)`` once per check."""
    want, maxdev = _expected()
    model = _load()
    logits = {}
    for mode in ("compiled", "eager"):
        try:
            with _compile_mode(mode == "compiled"):
                logits[mode] = _protocol(model)
        except Exception as e:
            if not _unsupported(e):
                raise
            # FP8/FP4 values times power-of-two scales are exact in float32, so the
            # dequantized model is the same model: everything but the quantized kernels
            # is still checked against the reference.
            report(f"quantized kernels ({mode})", True, f"dequantized instead: {e}")
            model = _dequantized(model)
            with _compile_mode(mode == "compiled"):
                logits[mode] = _protocol(model)
        report(f"reference logits, {mode}", *golden_checks(logits[mode], want, maxdev))
    diff = np.abs(logits["compiled"] - logits["eager"])
    same_top1 = bool((logits["compiled"].argmax(-1) == logits["eager"].argmax(-1)).all())
    within = float((diff.max(-1) <= np.maximum(BOUND_FLOOR, BOUND_MAXDEV * maxdev)).mean())
    report(
        "compiled vs eager logits",
        same_top1 and within >= WITHIN_MIN,
        f"max {diff.max():.3g}, mean {diff.mean():.3g}; top-1 "
        f"{'identical' if same_top1 else 'DIFFERS'}",
    )
    for name, ok, detail in _helpers():
        report(name, ok, detail)


def _dequantized(model):
    from mlx_lm.utils import dequantize_model  # the host's: the grouped wo_a too

    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    return model


def golden_checks(got, want, maxdev):
    """(ok, detail) of the three fp32 checks for logits [positions, vocab]."""
    diff = np.abs(got - want)
    err = diff.max(-1)
    within = float((err <= np.maximum(BOUND_FLOOR, BOUND_MAXDEV * maxdev)).mean())
    mean = float(diff.mean())
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    ok = within >= WITHIN_MIN and mean <= MEAN_MAX and top1 >= TOP1_MIN
    detail = (
        f"max {err.max():.3g}, mean {mean:.3g} (<= {MEAN_MAX:g}); "
        f"{within:.1%} of positions within bound (>= {WITHIN_MIN:.0%}); "
        f"top-1 {top1:.1%} (>= {TOP1_MIN:.0%})"
    )
    return ok, detail


def _expected():
    exp = mx.load(str(DATA / "expected_fp8.safetensors"))
    want = np.concatenate([np.array(exp["prefill_logits"]), np.array(exp["decode_logits"])])
    maxdev = np.concatenate(
        [np.array(exp["perturbation_maxdev_prefill"]), np.array(exp["perturbation_maxdev_decode"])]
    )
    return want, maxdev


def _load():
    from mlx_lm.utils import load_model

    model, _ = load_model(DATA / "checkpoint")
    model.set_dtype(mx.float32)
    return model


def _protocol(model):
    """Logits [prompt + decode, vocab]: every prompt position from one
    prefill, then one teacher-forced token at a time."""
    from mlx_lm.models.cache import make_prompt_cache

    data = json.loads((DATA / "inputs.json").read_text())
    cache = make_prompt_cache(model)
    h = model.model.hidden(mx.array([data["prompt_ids"]]), cache)
    rows = [model.lm_head(model.model.norm(model.model.hc_head(h)))[0]]
    rows += [model(mx.array([[t]]), cache=cache)[0] for t in data["decode_ids"]]
    return np.array(mx.concatenate(rows).astype(mx.float32))


@contextlib.contextmanager
def _compile_mode(compiled: bool):
    """Eager: every mx.compile'd function runs op by op, and the model's own
    compiled decode step is switched off too."""
    if compiled:
        yield
        return
    env = "MLX_ARCH_PLUGINS_COMPILE"
    before = os.environ.get(env)
    os.environ[env] = "0"
    mx.disable_compile()
    try:
        yield
    finally:
        mx.enable_compile()
        if before is None:
            del os.environ[env]
        else:
            os.environ[env] = before


def _helpers():
    """The compiled FP8/FP4 rounding against itself run eagerly: the grids are
    discrete, so anything but the same bits is a wrong kernel."""
    from . import model as dsv4

    x = mx.random.normal((8, 512), key=mx.random.key(7)) * 3
    cases = {
        "qat_round fp8": lambda: dsv4.qat_round(x, 64, "fp8"),
        "qat_round fp4": lambda: dsv4.qat_round(x, 32, "fp4"),
        "qat_round_head fp8": lambda: dsv4.qat_round_head(x, 64, "fp8", 64),
    }
    for name, fn in cases.items():
        got = np.array(fn())
        with _compile_mode(False):
            want = np.array(fn())
        diff = np.abs(got - want).max()
        yield (
            f"{name}, compiled vs eager",
            bool(np.array_equal(got, want)),
            f"max {diff:.3g} (must be bit-identical)",
        )
