"""Where a speculative verify's extra time goes: one layer of each kind, 1 to k+1 tokens
(issue 15).

A verify of k drafts is one forward of k+1 tokens. On the H200 a 3-token verify took
20-30 ms more than a 1-token one over 43 layers, while its graph has 13-20% more nodes.
This script prints, per layer kind and token count L (after ``--context`` cached tokens,
Flash width, random weights):

  verify_layer   the block as a verify runs it (single-sequence compiled halves plus
                 the eager cache work), built and evaluated alone; ``build_ms`` is the
                 Python part (graph building), ``ms`` the whole
  graph          nodes and edges behind the layer's output and cache arrays (views
                 included)
  layer ... shared_bf16   (--parts) prefill_parts.py's rows at L tokens (eager)
  micro_linear   (--micro) each dense quantized linear of the CSA layer on L rows, as
                 one [1, L, D] product and as L one-row products, 20 copies per
                 evaluation (the synchronisation amortised)
  tail           final hyper-connection head, norm and the vocabulary projection
                 (compiled for L = 1, as ``Model.__call__`` runs it)

    python benchmarks/verify_parts.py --format affine4 --tokens 1,2,3,4 --parts --micro

One JSON line per figure; for reading, not asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import perf  # noqa: E402
import prefill_parts  # noqa: E402


def build_and_run_ms(fn, runs):
    """(median ms of building ``fn()``'s graph, median ms of build + evaluation)."""
    mx.eval(fn())
    builds, totals = [], []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        b = time.perf_counter()
        mx.eval(out)
        builds.append(b - t)
        totals.append(time.perf_counter() - t)
    return 1e3 * statistics.median(builds), 1e3 * statistics.median(totals)


def layer_rows(layer, cache, h, ids, runs):
    kind, L = layer.attn.ratio, h.shape[1]

    def step():
        c = cache.copy()
        return [layer(h, c, ids)] + perf._cache_arrays(c)

    build, total = build_and_run_ms(step, runs)
    c = cache.copy()
    nodes, edges = perf.graph_nodes([layer(h, c, ids)] + perf._cache_arrays(c))
    prefill_parts.emit(
        part="verify_layer", kind=kind, tokens=L, ms=round(total, 3), build_ms=round(build, 3)
    )
    prefill_parts.emit(part="graph", kind=kind, tokens=L, nodes=nodes, edges=edges)


def tail_row(model, h, runs):
    L = h.shape[1]
    fn = model._compiled_tail() if L == 1 else model._tail
    build, total = build_and_run_ms(lambda: fn(h), runs)
    prefill_parts.emit(part="tail", tokens=L, ms=round(total, 3), build_ms=round(build, 3))


def micro_rows(layer, tokens, runs):
    """Each dense quantized linear of ``layer`` on L rows, as one [1, L, D] product and
    as L one-row products batched [L, 1, D], 20 independent copies per evaluation (the
    synchronisation amortised)."""
    for name, m in layer.named_modules():
        if not isinstance(m, nn.QuantizedLinear) or "switch_mlp" in name:
            continue
        d = m.weight.shape[1] * 32 // m.bits
        for L in tokens:
            xs = [mx.random.normal((1, L, d)).astype(mx.bfloat16) for _ in range(20)]
            mx.eval(xs)
            for shape, how in (((1, L, d), "rows"), ((L, 1, d), "batched")):
                if how == "batched" and L == 1:
                    continue
                ms = prefill_parts.median_ms(lambda: [m(x.reshape(shape)) for x in xs], runs)
                prefill_parts.emit(
                    part="micro_linear",
                    name=name,
                    mode=m.mode,
                    tokens=L,
                    how=how,
                    ms=round(ms / 20, 4),
                )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", choices=["official", "affine4"], default="affine4")
    p.add_argument("--width", choices=["flash", "small"], default="flash")
    p.add_argument("--kinds", default="0,4,128", help="compress ratio per layer")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--context", type=int, default=4096, help="tokens already in the cache")
    p.add_argument("--tokens", default="1,2,3,4", help="comma list of verify lengths")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--parts", action="store_true", help="also prefill_parts.py's parts")
    p.add_argument("--micro", action="store_true", help="dense linears by row layout")
    o = p.parse_args(argv)
    over = {"n_routed_experts": o.experts} if o.experts else {}
    model, _, args = perf.build_random(
        o.width, len(o.kinds.split(",")), o.format, o.kinds, overrides=over
    )
    prefill_parts.emit(part="env", **perf.env_info(), format=o.format, context=o.context)
    cache = perf.make_cache(model, 1)
    if o.context:
        toks = mx.random.randint(0, args.vocab_size, (1, o.context))
        perf.prefill(model, cache, toks, 2048)
    tokens = [int(v) for v in o.tokens.split(",")]
    if o.micro:
        csa = [layer for layer in model.layers if layer.attn.ratio == 4]
        micro_rows((csa or model.layers)[0], tokens, o.runs)
    for L in tokens:
        ids = mx.random.randint(0, args.vocab_size, (1, L))
        h = (mx.random.normal((1, L, args.hc_mult, args.hidden_size)) * 0.5).astype(mx.bfloat16)
        mx.eval(ids, h)
        for layer, c in zip(model.layers, cache):
            layer_rows(layer, c, h, ids, o.runs)
            if o.parts:
                prefill_parts.parts(layer, c, h, ids, o.runs, layer.attn.ratio)
        tail_row(model, h, o.runs)


if __name__ == "__main__":
    main()
