"""Which primitives make up one layer's decode graph, by nodes and edges (issue 14).

Builds perf.py's random model (window, CSA and HCA layer), fills its caches as a
``--context``-token prompt leaves them, then runs one batch-1 decode step a layer at a
time and prints, per layer, the graph behind the layer's output and cache arrays (views
included, the ``mx.fast`` ops as one node each, as on a GPU): every primitive's node
count and edges (arrays it reads and writes), largest first.

    MLX_ARCH_PLUGINS_FUSED=0 python benchmarks/graph_breakdown.py --width small

A graph count, not a timing: the host cost of a step follows its edges (RESULTS.md,
eighth session).
"""

import argparse
import collections
import os
import re
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import perf  # noqa: E402


def breakdown(outputs):
    """{primitive: [nodes, edges]} of the graph behind ``outputs``, and the totals."""
    dot = perf._dot(outputs)
    labels = dict(re.findall(r'(\S+) \[label ?= ?"([^"]*)"', dot))
    table = collections.defaultdict(lambda: [0, 0])
    for label in labels.values():
        table[label.split()[0]][0] += 1
    for src, dst in re.findall(r"(\S+) -> (\S+)", dot):
        for end in (src, dst):
            if end in labels:
                table[labels[end].split()[0]][1] += 1
    return table, len(labels), dot.count("->")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", choices=["flash", "small"], default="small")
    p.add_argument("--format", choices=["official", "affine4"], default="affine4")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--top", type=int, default=12, help="primitives listed per layer")
    o = p.parse_args(argv)
    perf.emulate_gpu_graph()
    over = {"n_routed_experts": o.experts}
    model, _, args = perf.build_random(o.width, 3, o.format, "0,4,128", overrides=over)
    cache = perf.fill_fast(model, 1, o.context, 256, args.vocab_size, 256)
    y = mx.array([[5]])
    h = model.model.embed_tokens(y)
    h = mx.broadcast_to(h[:, :, None], (1, 1, args.hc_mult, h.shape[-1]))
    mx.eval(h)
    for layer, c in zip(model.layers, cache):
        h = layer(h, c, y)
        outs = [h] + perf._cache_arrays(c)
        table, nodes, edges = breakdown(outs)
        print(f"layer ratio {layer.attn.ratio}: {nodes} nodes, {edges} edges")
        for name, (n, e) in sorted(table.items(), key=lambda kv: -kv[1][1])[: o.top]:
            print(f"  {name[:60]:60s} nodes {n:4d}  edges {e:5d}")
        mx.eval(outs)


if __name__ == "__main__":
    main()
