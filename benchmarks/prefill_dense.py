"""Dense quantized linears at prefill sizes: quantized kernels vs the dequantized weight.

Flash-width dense projections (the attention's, the grouped output's, the shared
expert's), one at a time, for several row counts. Times, per format and row count
(median of ``--runs``):

* ``qmm``: the layer's own call (``quantized_matmul``),
* ``dequant``: the model's ``linear`` with the dequantization forced (the weight
  dequantized to bf16 on every call, then a plain matmul),
* ``bf16``: a matmul on a weight already in bf16 (the floor),

summed over the projections of one layer, and the ratio ``DENSE_DEQUANT_ROWS`` is set
from (qmm / dequant above 1: dequantizing pays at that row count).

    python benchmarks/prefill_dense.py --rows 256,512,1024,2048,4096
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.mla import MultiLinear

# (name, in, out, groups): Flash's dense projections of one layer
SHAPES = [
    ("wq_a", 4096, 1024, 0),
    ("wq_b", 1024, 32768, 0),
    ("wkv", 4096, 512, 0),
    ("wo_a", 4096, 1024, 8),
    ("wo_b", 8192, 4096, 0),
    ("shared_gate", 4096, 2048, 0),
    ("shared_up", 4096, 2048, 0),
    ("shared_down", 2048, 4096, 0),
]
FORMATS = {"affine4": dict(group_size=64, bits=4), "mxfp8": dict(group_size=32, bits=8)}


def median_ms(fn, runs):
    mx.eval(fn())
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def make(n_in, n_out, groups, fmt):
    layer = MultiLinear(n_in, n_out, groups) if groups else nn.Linear(n_in, n_out, bias=False)
    layer.weight = (layer.weight * 0.5).astype(mx.bfloat16)
    mode = "affine" if fmt == "affine4" else fmt
    quantized = layer.to_quantized(mode=mode, **FORMATS[fmt])
    mx.eval(layer.parameters(), quantized.parameters())
    return layer, quantized


def main(argv=None):
    from mlx_arch_plugins.deepseek_v4.model import linear

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="256,512,1024,2048,4096")
    p.add_argument("--formats", default="affine4,mxfp8")
    p.add_argument("--runs", type=int, default=5)
    o = p.parse_args(argv)
    rows = [int(r) for r in o.rows.split(",")]
    for fmt in o.formats.split(","):
        total = {R: {"qmm": 0.0, "dequant": 0.0, "bf16": 0.0} for R in rows}
        for name, n_in, n_out, groups in SHAPES:
            dense, quantized = make(n_in, n_out, groups, fmt)
            for R in rows:
                shape = (1, groups, R, n_in) if groups else (1, R, n_in)
                x = mx.random.normal(shape).astype(mx.bfloat16)
                mx.eval(x)
                os.environ["MLX_ARCH_PLUGINS_DEQUANT_ROWS"] = "1"
                ms = {
                    "qmm": median_ms(lambda: quantized(x), o.runs),
                    "dequant": median_ms(lambda: linear(quantized, x), o.runs),
                    "bf16": median_ms(lambda: dense(x), o.runs),
                }
                for k, v in ms.items():
                    total[R][k] += v
                rec = {"format": fmt, "linear": name, "rows": R}
                print("JSON", json.dumps({**rec, **{k: round(v, 3) for k, v in ms.items()}}))
        for R in rows:
            t = total[R]
            ratio = t["qmm"] / t["dequant"]
            rec = {
                "format": fmt,
                "linear": "all",
                "rows": R,
                **{k: round(v, 3) for k, v in t.items()},
            }
            print("JSON", json.dumps({**rec, "qmm_over_dequant": round(ratio, 2)}), flush=True)


if __name__ == "__main__":
    main()
