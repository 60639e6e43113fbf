"""Does the CSA indexer's two-stage top-k pay on this machine?

The indexer keeps the top ``index_topk`` (512) of n/4 compressed entries per
query; ``mx.argpartition`` is a full sort on Metal and CUDA, so at 128K context
it sorts 32K scores per layer per token. ``topk_indices(score, k, chunk)`` of
the model takes each chunk's top k, then the top k of those candidates (same
set). This times both on the shapes the model uses and checks the sets agree:

* decode: [B, n] for B = 1 and 8 (one query per sequence);
* prefill: [1, q, n], q = the query block of the indexer at that n (without the CUDA
  kernel), or each of ``--prefill-rows``.

    python benchmarks/topk_probe.py                         # 128K context
    python benchmarks/topk_probe.py --contexts 131072,1048576 --chunks 1024,2048,4096,8192

Prints one ``JSON {...}`` line per measurement, a table, and the chunk to set
as ``MLX_ARCH_PLUGINS_TOPK_CHUNK`` (or that it should stay off, the default).
"""

import argparse
import json
import statistics
import time

import mlx.core as mx

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", default="131072", help="context lengths (tokens), comma-separated")
    p.add_argument("--chunks", default="1024,2048,4096,8192")
    p.add_argument("--k", type=int, default=512, help="index_topk")
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--prefill-rows", default="", help="query blocks to time (comma list)")
    args = p.parse_args(argv)
    k = args.k
    print(f"# device {mx.default_device()}, mlx {mx.__version__}")
    rows, best = [], {}
    for ctx in (int(c) for c in args.contexts.split(",")):
        n = ctx // args.ratio
        shapes = {"decode B=1": (1, n), "decode B=8": (8, n)}
        for q in [int(v) for v in args.prefill_rows.split(",") if v] or [prefill_rows(n, k)]:
            shapes[f"prefill q={q}"] = (1, q, n)
        for name, shape in shapes.items():
            score = mx.random.normal(shape, key=mx.random.key(0))
            mx.eval(score)
            ref = topk_indices(score, k, chunk=0)
            base = time_ms(lambda: topk_indices(score, k, chunk=0), args.runs, args.warm)
            for chunk in [0] + [int(c) for c in args.chunks.split(",")]:
                if chunk and (chunk <= k or chunk >= n):
                    continue
                got = topk_indices(score, k, chunk=chunk)
                ms = (
                    base
                    if chunk == 0
                    else time_ms(
                        lambda c=chunk: topk_indices(score, k, chunk=c), args.runs, args.warm
                    )
                )
                rec = {
                    "context": ctx,
                    "entries": n,
                    "shape": name,
                    "chunk": chunk,
                    "ms": round(ms, 4),
                    "speedup": round(base / ms, 3),
                    "same_set": same_sets(got, ref),
                }
                print("JSON " + json.dumps(rec))
                rows.append(rec)
                if chunk and rec["same_set"]:
                    best.setdefault(chunk, []).append(base / ms)
    print(f"\n{'context':>8} {'shape':<16} {'chunk':>6} {'ms':>9} {'x':>6} same")
    for r in rows:
        print(
            f"{r['context']:>8} {r['shape']:<16} {r['chunk'] or 'off':>6} {r['ms']:>9.3f} "
            f"{r['speedup']:>6.2f} {'yes' if r['same_set'] else 'NO'}"
        )
    if any(not r["same_set"] for r in rows):
        print("\nSETS DIFFER: do not switch it on; report this.")
        return 1
    # the chunk whose worst case over every measured shape is best
    worst = {c: min(v) for c, v in best.items()}
    if worst and max(worst.values()) > 1.1:
        c = max(worst, key=worst.get)
        print(
            f"\nrecommend: MLX_ARCH_PLUGINS_TOPK_CHUNK={c} (at least {worst[c]:.2f}x on every shape)"
        )
    else:
        print("\nrecommend: keep the two-stage top-k off (no chunk is >1.1x faster on every shape)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
