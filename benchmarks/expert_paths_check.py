"""Do the routed experts' paths agree on this backend? A check, not a timing (issue 16).

At prefill sizes the model may run the routed experts through dequantized chunks and
``gather_mm`` instead of ``gather_qmm`` (``DEQUANT_ROWS``). This script checks, on the
default device:

  glu         the model's routed SwiGLU (Flash width, 64 experts, top-6) with the
              dequantized path forced against gather_qmm, affine 4-bit and mxfp4, for
              several prompt lengths: relative max error
  model       logits of the last 16 positions of a 2048-token prompt through 3 random
              Flash-width layers, default paths against gather_qmm everywhere
  gather_mm   ``mx.gather_mm(..., sorted_indices=True)`` against one matmul per expert,
              with the rows as a contiguous [R, 1, K] array (as the model passes them)
              and as an expand-dims view of a [R, K] array: on MLX CUDA 0.32.4 the view
              gave wrong products (relative error above 1) in every size tried

    python benchmarks/expert_paths_check.py [--tokens 256,2048] [--skip-model]

One JSON line per figure. Errors of bf16 rounding are ~1e-2 or below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import perf  # noqa: E402

SWITCH = "MLX_ARCH_PLUGINS_DEQUANT_ROWS"


def rel(a, b) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return round((mx.abs(a - b).max() / mx.abs(b).max()).item(), 5)


def with_rows(value, fn):
    """``fn()``, evaluated, with the expert-path switch set to ``value`` (unset after:
    the path is chosen while the graph is built)."""
    os.environ[SWITCH] = value
    try:
        out = fn()
        mx.eval(out)
        return out
    finally:
        del os.environ[SWITCH]


def emit(**kw):
    print(json.dumps(kw), flush=True)


def check_glu(dsv4, tokens, dims=4096, hidden=2048, experts=64, top_k=6):
    formats = {
        "affine4": {"group_size": 64, "bits": 4},
        "mxfp4": {"group_size": 32, "bits": 4, "mode": "mxfp4"},
    }
    for fmt, kw in formats.items():
        mlp = dsv4.SwitchClippedGLU(dims, hidden, experts, limit=10.0)
        for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            p.weight = (mx.random.normal(p.weight.shape) * 0.02).astype(mx.bfloat16)
        nn.quantize(mlp, **kw)
        mx.eval(mlp.parameters())
        for T in tokens:
            x = (mx.random.normal((1, T, dims)) * 0.5).astype(mx.bfloat16)
            inds = mx.argsort(mx.random.normal((1, T, experts)), -1)[..., :top_k]
            w = mx.softmax(mx.random.normal((1, T, top_k)), -1)
            args = (x, inds.astype(mx.uint32), w)
            stock = with_rows("0", lambda: mlp(*args))
            chunks = with_rows("1", lambda: mlp(*args))
            emit(check="glu", format=fmt, tokens=T, rel_err=rel(chunks, stock))


def check_model(prompt=2048):
    model, _, args = perf.build_random("flash", 3, "affine4", "0,4,128")
    toks = mx.random.randint(0, args.vocab_size, (1, prompt))

    def logits():
        return model(toks, cache=perf.make_cache(model, 1))[0, -16:]

    stock = with_rows("0", logits)
    default = logits()
    agree = (mx.argmax(default, -1) == mx.argmax(stock, -1)).mean().item()
    emit(check="model", tokens=prompt, rel_err=rel(default, stock), top1_agree=agree)


def check_gather_mm(rows=(384, 3072, 12288), experts=64, n=2048, k=4096):
    dtype = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16  # CPU: fp32 only
    w = (mx.random.normal((experts, n, k)) * 0.02).astype(dtype)
    for R in rows:
        idx = np.sort(np.random.randint(0, experts, R))
        counts = np.bincount(idx, minlength=experts)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        flat = (mx.random.normal((R, k)) * 0.1).astype(dtype)
        want = mx.concatenate(
            [flat[s : s + c] @ w[e].T for e, (s, c) in enumerate(zip(starts, counts)) if c]
        )
        # the model's rows come out of a gather (a new array); the view shares flat's
        gathered = flat.reshape(R, 1, k)[mx.arange(R)]
        for layout, x in (("gathered", gathered), ("view", flat[:, None])):
            got = mx.gather_mm(
                x,
                w.swapaxes(-1, -2),
                rhs_indices=mx.array(idx.astype(np.uint32)),
                sorted_indices=True,
            )
            emit(check="gather_mm", rows=R, left=layout, rel_err=rel(got[:, 0], want))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="256,1024,2048,4096", help="GLU prompt lengths")
    p.add_argument("--skip-model", action="store_true")
    o = p.parse_args(argv)
    dsv4 = perf._dsv4()[0]
    perf.FLASH.update(n_routed_experts=64)
    emit(check="env", **perf.env_info())
    check_glu(dsv4, [int(t) for t in o.tokens.split(",")])
    if not o.skip_model:
        check_model()
    check_gather_mm()


if __name__ == "__main__":
    main()
