"""Routed-expert projections at prefill sizes: gather_qmm vs dequantized chunks + gather_mm.

One Flash-width expert projection (E experts, 4096 -> 2048 by default), rows sorted by
expert as the model sorts them, for several routed-row counts (tokens x top-k). Times, per
row count and format:

* ``qmm``: ``mx.gather_qmm`` on the quantized experts (what the model does by default),
* ``chunked``: the model's dequantized path (``_ExpertTiles`` and ``_tiles_matmul``:
  dequantize a chunk of experts, then ``gather_mm`` in bf16 over tiles of one expert's
  rows; the rows' gather into tiles is timed with it),
* ``bf16``: ``gather_mm`` on experts already in bf16 (the floor),

and prints the ratios the per-backend threshold ``DEQUANT_ROWS`` is set from.

    python benchmarks/prefill_experts.py --rows 512,2048,8192,24576 --json-out out.json
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
import numpy as np


def _time(fn, runs):
    mx.eval(fn())
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _experts(E, out_dims, in_dims, fmt):
    from mlx_lm.models.switch_layers import SwitchLinear

    layer = SwitchLinear(in_dims, out_dims, E, bias=False)
    layer.weight = (mx.random.normal((E, out_dims, in_dims)) * 0.02).astype(mx.bfloat16)
    mx.eval(layer.weight)
    dense = layer.weight
    if fmt == "affine4":
        q = layer.to_quantized(group_size=64, bits=4)
    else:
        q = layer.to_quantized(group_size=32, bits=4, mode="mxfp4")
    mx.eval(q.parameters())
    return q, dense


def bench(E, out_dims, in_dims, rows, fmt, runs, top_k=6):
    from mlx_arch_plugins.deepseek_v4 import model as dsv4

    q, dense = _experts(E, out_dims, in_dims, fmt)
    out = []
    for R in rows:
        idx = mx.array(np.sort(np.random.randint(0, E, size=R)).astype(np.uint32))
        x = (mx.random.normal((R, 1, in_dims)) * 0.1).astype(mx.bfloat16)
        plan = dsv4._ExpertTiles(np.array(idx), E, dsv4._TILE_ROWS)
        row_of_slot = mx.array(plan.row)
        mx.eval(idx, x, row_of_slot)
        t_qmm = _time(lambda: dsv4._experts(q, x, idx, True), runs)

        dt = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16  # CPU gather_mm

        def tiled():
            xs = dsv4.take_rows(x.reshape(R, in_dims), row_of_slot).astype(dt)
            xs = xs.reshape(-1, plan.rows, in_dims)
            return dsv4._tiles_matmul(q, xs, plan, dt)

        t_chunk = _time(tiled, runs)
        # the floor in bf16 (float32 on the CPU, whose gather_mm takes nothing else)
        xf, wf = x.astype(dt), dense.astype(dt).swapaxes(-1, -2)
        t_bf16 = _time(lambda: mx.gather_mm(xf, wf, rhs_indices=idx, sorted_indices=True), runs)
        flops = 2 * R * out_dims * in_dims
        row = dict(
            format=fmt,
            experts=E,
            rows=R,
            tokens=R // top_k,
            qmm_ms=t_qmm * 1e3,
            chunked_ms=t_chunk * 1e3,
            bf16_ms=t_bf16 * 1e3,
            qmm_tflops=flops / t_qmm / 1e12,
            chunked_tflops=flops / t_chunk / 1e12,
            qmm_over_chunked=t_qmm / t_chunk,
            chunked_over_bf16=t_chunk / t_bf16,
        )
        print(
            f"{fmt:8s} E={E:3d} rows={R:6d}  qmm {row['qmm_ms']:8.2f} ms  chunked "
            f"{row['chunked_ms']:8.2f} ms  bf16 {row['bf16_ms']:8.2f} ms  "
            f"qmm/chunked {row['qmm_over_chunked']:5.2f}  chunked/bf16 {row['chunked_over_bf16']:5.2f}",
            flush=True,
        )
        out.append(row)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--out-dims", type=int, default=2048)
    p.add_argument("--in-dims", type=int, default=4096)
    p.add_argument("--rows", default="96,384,1536,6144,24576")
    p.add_argument("--formats", default="affine4,mxfp4")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    print(f"mlx {mx.__version__} on {mx.default_device()}", flush=True)
    rows = [int(r) for r in a.rows.split(",")]
    results = []
    for fmt in a.formats.split(","):
        results += bench(a.experts, a.out_dims, a.in_dims, rows, fmt, a.runs)
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
