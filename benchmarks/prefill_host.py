"""Host cost of one prefill chunk, per layer kind: the time to build its graph and the
graph's size (issue 16).

On MLX CUDA the routed experts' tiled path reads the routing on the host, so each layer
waits for its gate; from then on the GPU runs the layer's experts (started at once) while
the host builds the next layer. The prefill is bound by the host wherever building a
layer takes longer than running it. This builds each layer of perf.py's random model
over one ``--chunk``-token chunk (after ``--context`` tokens, prefilled and evaluated
first; CSA selects with its indexer once more entries than its top-k are cached) with the dequantized paths forced as on
CUDA and a fixed random routing in place of the gate (so the plan needs no evaluation),
evaluates nothing, and prints per layer kind the median build time, the kernel nodes
(views excluded) and all nodes and edges.

    python benchmarks/prefill_host.py --width flash --experts 64

One JSON line per layer kind. Host times are this machine's, not the device's host.
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "512")  # the CUDA prefill paths
os.environ["MLX_ARCH_PLUGINS_OVERLAP"] = "0"  # build only: start nothing

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import perf  # noqa: E402


def fixed_gate(tokens: int, experts: int, top_k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    inds = mx.array(rng.integers(0, experts, (1, tokens, top_k)).astype(np.uint32))
    weights = mx.array(rng.random((1, tokens, top_k)).astype(np.float32))
    mx.eval(inds, weights)
    return lambda x, input_ids: (inds, weights)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", choices=["flash", "small"], default="flash")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--context", type=int, default=0)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--format", choices=["official", "affine4"], default="affine4")
    a = p.parse_args(argv)
    model, _, args = perf.build_random(
        a.width, 3, a.format, "0,4,128", overrides={"n_routed_experts": a.experts}
    )
    cache = perf.make_cache(model, 1)
    if a.context:
        perf.prefill(model, cache, mx.random.randint(0, args.vocab_size, (1, a.context)), a.chunk)
    ids = mx.random.randint(0, args.vocab_size, (1, a.chunk))
    h = (mx.random.normal((1, a.chunk, args.hc_mult, args.hidden_size)) * 0.5).astype(mx.bfloat16)
    mx.eval(ids, h)
    top_k = args.num_experts_per_tok
    for layer, c in zip(model.layers, cache):
        layer.ffn.gate = fixed_gate(a.chunk, a.experts, top_k)
        times = []
        for _ in range(a.runs):
            fresh = c.copy()
            t = time.perf_counter()
            out = layer(h, fresh, ids)
            times.append(time.perf_counter() - t)
        arrays = [out] + [s for s in fresh.state if s is not None]
        kernels, _ = perf.kernel_nodes(arrays)
        nodes, edges = perf.graph_nodes(arrays)
        row = dict(
            bench="prefill_host",
            format=a.format,
            kind=layer.attn.ratio,
            context=a.context,
            tokens=a.chunk,
            build_ms=round(1e3 * statistics.median(times), 2),
            kernel_nodes=kernels,
            nodes=nodes,
            edges=edges,
        )
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
