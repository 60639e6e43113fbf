"""What the CSA indexer's scores cost per prefill chunk, in two matmul layouts (issue 16).

At a context of T tokens the indexer scores n = T/4 compressed entries for every query:
64 heads of 128 dims against the entries' 128-dim keys, then the float32 sum over heads of
w * relu(dot). ``_sparse`` does it in query blocks (the rows of ``topk_probe.py``). Timed
here, per chunk of ``--chunk`` queries (median of ``--runs``), on random data:

* ``per_token``: the products batched over the block's tokens, keys broadcast
  (``q @ keys[:, None].T``, the model's layout);
* ``folded``: the block's tokens and heads as the rows of one matmul;
* ``*_dots``: the products alone; ``*_scores``: with the head sum; ``*_topk``: with
  the top-k of the model (``topk_indices``) too;
* ``fused_*`` (CUDA only): ``kernels.indexer_scores``, in query blocks of
  ``--fused-blocks`` and tiles ``--fused-tiles`` (keys per thread block x queries per
  warp, then ``sN`` to stage N keys at a time in shared memory); ``fused_rel_diff`` is
  its largest difference from the portable scores.

On the H200 (ninth session) both layouts took the same time, and the head sum took four
times the products: MLX fuses no elementwise work into a reduction, so the float32
``w * relu(dot)`` is written out in full and read back by the sum.

    python benchmarks/indexer_probe.py --contexts 4096,32768,131072

One ``JSON {...}`` line per figure; for reading, not asserted anywhere.
"""

import argparse
import json
import statistics
import time

import mlx.core as mx

from mlx_arch_plugins.deepseek_v4 import kernels
from mlx_arch_plugins.deepseek_v4.model import DeepseekV4Attention as Attention
from mlx_arch_plugins.deepseek_v4.model import _relu_weighted_sum, topk_indices

FLASH = {"window": 128, "head_dim": 512, "heads": 64, "dim": 128, "topk": 512}


def block_rows(n, chunk):
    """Queries per block of the indexer's scores at Flash sizes (``_index_block``'s
    bound)."""
    return max(1, min(chunk, Attention._INDEX_BLOCK_ELEMS // (FLASH["heads"] * n)))


def per_token_dots(q, keys):
    return q @ keys[:, None].swapaxes(-1, -2)


def folded_dots(q, keys):
    B, L, H, D = q.shape
    return (q.reshape(B, L * H, D) @ keys.swapaxes(-1, -2)).reshape(B, L, H, -1)


def chunk_fn(dots, q, w, keys, bq, what):
    """The chunk's outputs, block by block, as the model builds them."""

    def run():
        out = []
        for a in range(0, q.shape[1], bq):
            d = dots(q[:, a : a + bq], keys)
            if what != "dots":
                d = _relu_weighted_sum(d, w[:, a : a + bq, :, None])
            if what == "topk":
                d = topk_indices(d, FLASH["topk"])
            out.append(d)
        return out

    return run


def fused_fn(q, w, keys, bq, what, kt, qw, st):
    def run():
        out = []
        for a in range(0, q.shape[1], bq):
            s = kernels.indexer_scores(q[:, a : a + bq], w[:, a : a + bq], keys, kt, qw, st)
            out.append(topk_indices(s, FLASH["topk"]) if what == "topk" else s)
        return out

    return run


def fused_rows(o, q, w, keys, T, n, kept):
    if not kernels.indexer_kernel_enabled(q, keys):
        return
    for tile in o.fused_tiles.split(","):
        kt, rest = tile.split("x")
        qw, st = rest.split("s") if "s" in rest else (rest, 0)
        kt, qw, st = int(kt), int(qw), int(st)
        for bq in [int(v) for v in o.fused_blocks.split(",")]:
            for what in kept[1:]:
                fn = fused_fn(q, w, keys, min(bq, o.chunk), what, kt, qw, st)
                ms = median_ms(fn, o.runs)
                rec = {"context": T, "entries": n, "block": bq, "tile": tile}
                print("JSON", json.dumps({**rec, "part": f"fused_{what}", "ms": round(ms, 2)}))
    bq = block_rows(n, o.chunk)
    plain = _relu_weighted_sum(per_token_dots(q[:, :bq], keys), w[:, :bq, :, None])
    for st in (0, 32):
        diff = mx.abs(kernels.indexer_scores(q[:, :bq], w[:, :bq], keys, stage=st) - plain).max()
        rel = (diff / mx.abs(plain).max()).item()
        print("JSON", json.dumps({"context": T, "stage": st, "fused_rel_diff": rel}), flush=True)


def median_ms(fn, runs):
    mx.eval(fn())
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="4096,32768,131072")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--fused-blocks", default="32,128,512")
    p.add_argument("--fused-tiles", default="128x2")
    o = p.parse_args(argv)
    H, D = FLASH["heads"], FLASH["dim"]
    q = mx.random.normal((1, o.chunk, H, D)).astype(mx.bfloat16)
    w = mx.random.normal((1, o.chunk, H)).astype(mx.float32) * (H * D) ** -0.5
    for T in (int(t) for t in o.contexts.split(",")):
        n = T // 4
        keys = mx.random.normal((1, n, D)).astype(mx.bfloat16)
        mx.eval(q, w, keys)
        bq = block_rows(n, o.chunk)
        rows = [("per_token", per_token_dots, "dots"), ("per_token", per_token_dots, "scores")]
        kept = ("dots", "scores", "topk") if n > FLASH["topk"] else ("dots", "scores")
        rows += [("folded", folded_dots, what) for what in kept]
        for name, dots, what in rows:
            ms = median_ms(chunk_fn(dots, q, w, keys, bq, what), o.runs)
            rec = {"context": T, "entries": n, "block": bq, "part": f"{name}_{what}"}
            print("JSON", json.dumps({**rec, "ms": round(ms, 2)}), flush=True)
        fused_rows(o, q, w, keys, T, n, kept)
        same = mx.array_equal(per_token_dots(q[:, :bq], keys), folded_dots(q[:, :bq], keys))
        print("JSON", json.dumps({"context": T, "layouts_bit_equal": bool(same.item())}))


if __name__ == "__main__":
    main()
