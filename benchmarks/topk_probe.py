"""How fast is the CSA indexer's top-k, by method, on the shapes the model uses?

The indexer keeps the top ``index_topk`` (512) of n/4 compressed entries per query;
``mx.argpartition`` is a full sort on Metal and CUDA, so at 128K context it sorts 32K
scores per query per CSA layer. Methods:

* ``argpartition`` (the portable path; prefill rows masked past each query's limit
  first, as the model does);
* ``kernel``: ``kernels.topk_rows``, radix select (MLX CUDA only), timed here at every
  row count (the model takes it from ``kernels.TOPK_MIN_ROWS`` rows);
* ``chunk N``: the portable two-stage top-k (each chunk's top k, then the top k of
  those; ``MLX_ARCH_PLUGINS_TOPK_CHUNK``), decode shapes only.

Shapes: decode [B, n] for B = 1 and 8; prefill [1, q, n] for q = the indexer's query
block at that n (2048 where the CUDA indexer kernel runs), or each of ``--prefill-rows``,
with the causal limits of the prompt's last chunk. Checks every method's set against
argpartition's (scores are distinct).

    python benchmarks/topk_probe.py --contexts 32768,131072,1048576 --prefill-rows 2048

Prints one ``JSON {...}`` line per measurement and a table. ``--per-eval 20`` evaluates
20 calls at once (ms per call), so that small shapes show device time, not the
evaluation's fixed cost.
"""

import argparse
import json
import statistics
import time

import mlx.core as mx

from mlx_arch_plugins.deepseek_v4 import kernels
from mlx_arch_plugins.deepseek_v4.model import DeepseekV4Attention as _Attention
from mlx_arch_plugins.deepseek_v4.model import topk_indices

FLASH = {"window": 128, "head_dim": 512, "index_heads": 64}


def prefill_rows(n, k):
    """Queries per block of the indexer's scores at Flash sizes (``_index_block``'s
    bound; ``k`` is unused since the attention's blocks became their own)."""
    return max(1, _Attention._INDEX_BLOCK_ELEMS // (FLASH["index_heads"] * n))


def time_ms(fn, runs, warm):
    for _ in range(warm):
        mx.eval(fn())
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def same_sets(a, b):
    a = mx.sort(a.astype(mx.int64), axis=-1)
    b = mx.sort(b.astype(mx.int64), axis=-1)
    return bool(mx.array_equal(a, b).item())


def methods(score, k, chunks, decode):
    """(name, function) of every method that applies to ``score``."""
    out = [("argpartition", None)]
    if kernels.topk_kernel_enabled(score, k):
        out.append(("kernel", None))
    n = score.shape[-1]
    out += [(f"chunk {c}", c) for c in chunks if decode and k < c < n]
    return out


def call(name, chunk, score, k, limit):
    kernels.USE_TOPK_KERNEL = name == "kernel"
    try:
        return topk_indices(score, k, chunk=chunk or 0, limit=limit)
    finally:
        kernels.USE_TOPK_KERNEL = True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="131072", help="context lengths (tokens), comma-separated")
    p.add_argument("--chunks", default="", help="two-stage chunks to time at decode shapes")
    p.add_argument("--k", type=int, default=512, help="index_topk")
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--prefill-rows", default="", help="query blocks to time (comma list)")
    p.add_argument(
        "--per-eval",
        type=int,
        default=1,
        help="calls evaluated together, the time divided among them (past the per-eval "
        "overhead that hides small shapes' device time)",
    )
    args = p.parse_args(argv)
    k, chunks = args.k, [int(c) for c in args.chunks.split(",") if c]
    kernels.TOPK_MIN_ROWS = 1  # time the kernel at every row count, decode's included
    print(f"# device {mx.default_device()}, mlx {mx.__version__}")
    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        n = ctx // args.ratio
        shapes = {"decode B=1": (1, n), "decode B=8": (8, n)}
        for q in [int(v) for v in args.prefill_rows.split(",") if v] or [prefill_rows(n, k)]:
            shapes[f"prefill q={q}"] = (1, q, n)
        for name, shape in shapes.items():
            score = mx.random.normal(shape, key=mx.random.key(0))
            decode = len(shape) == 2
            # prefill: the prompt's last queries, each seeing the entries complete by it
            limit = None if decode else (ctx - shape[1] + mx.arange(shape[1]) + 1) // args.ratio
            mx.eval(score)
            ref = call("argpartition", 0, score, k, limit)
            base = None
            for method, chunk in methods(score, k, chunks, decode):
                got = call(method, chunk, score, k, limit)
                ms = time_ms(
                    lambda: [call(method, chunk, score, k, limit) for _ in range(args.per_eval)],
                    args.runs,
                    args.warm,
                )
                ms /= args.per_eval
                base = base or ms
                rec = {
                    "context": ctx,
                    "entries": n,
                    "shape": name,
                    "method": method,
                    "ms": round(ms, 4),
                    "speedup": round(base / ms, 3),
                    "same_set": same_sets(got, ref),
                }
                print("JSON " + json.dumps(rec), flush=True)
                rows.append(rec)
    print(f"\n{'context':>8} {'shape':<16} {'method':<13} {'ms':>9} {'x':>6} same")
    for r in rows:
        print(
            f"{r['context']:>8} {r['shape']:<16} {r['method']:<13} {r['ms']:>9.3f} "
            f"{r['speedup']:>6.2f} {'yes' if r['same_set'] else 'NO'}"
        )
    if any(not r["same_set"] for r in rows):
        print("\nSETS DIFFER: report this.")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
