"""Routed-expert matmul forms on one Flash projection (issue 16).

One projection (64 experts, 4096 -> 2048, 12288 routed rows sorted by expert, even and
skewed routing) as: one-row products through gather_mm (MLX CUDA's grouped kernel for
sorted one-row gathers; the model's path before the eleventh session), gather_mm over
tiles of T rows of one expert (the model's path now, T = 64), one batched matmul with
every expert padded to the busiest, and a plain matmul of all rows (a floor). Tiled
results are checked against the one-row products (max_abs_err). Last, mx.dequantize of
16 experts against a compiled unpack of the same bits (not kept: no faster).

    python benchmarks/expert_tiles.py            # Flash shapes (a GPU)
    SHAPE=8,256,128,768 python benchmarks/expert_tiles.py   # E,K,N,R: a CPU dry run

One JSON line per figure, ms medians of RUNS (default 10).
"""

import json
import os
import time

import mlx.core as mx
import numpy as np

E, K, N, R = (int(v) for v in os.environ.get("SHAPE", "64,4096,2048,12288").split(","))
DT = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
RUNS = int(os.environ.get("RUNS", "10"))


def ms(fn):
    mx.eval(fn())
    mx.synchronize()
    out = []
    for _ in range(RUNS):
        t = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        out.append(time.perf_counter() - t)
    return round(1e3 * float(np.median(out)), 3)


def emit(**kw):
    print(json.dumps(kw), flush=True)


def routing(skew, rng):
    if skew:
        p = 1.0 / np.arange(1, E + 1) ** 1.1
        p /= p.sum()
        e = rng.choice(E, size=R, p=rng.permutation(p))
    else:
        e = rng.integers(0, E, size=R)
    return np.sort(e)


def tile_plan(experts, T):
    counts = np.bincount(experts, minlength=E)
    tiles = -(-counts // T)
    tile_expert = np.repeat(np.arange(E), tiles)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    tile_first = np.concatenate([[0], np.cumsum(tiles)[:-1]])
    # slot s of tile j of expert e reads sorted row starts[e] + j*T + s (clamped into e)
    rank = np.arange(len(tile_expert)) - np.repeat(tile_first, tiles)
    lane = np.arange(T)
    pos = rank[:, None] * T + lane[None]
    ce = counts[tile_expert][:, None]
    src = starts[tile_expert][:, None] + np.minimum(pos, ce - 1)
    valid = pos < ce
    return tile_expert.astype(np.uint32), src.reshape(-1).astype(np.uint32), valid.reshape(-1)


def _unpack_impl(wq, scales, biases):
    shifts = mx.arange(0, 32, 4, dtype=mx.uint32)
    q = (wq[..., None] >> shifts) & 15
    return q.astype(mx.bfloat16) * scales[..., None, None] + biases[..., None, None]


unpack = mx.compile(_unpack_impl)


def dequant_custom(wq, scales, biases):
    lead = wq.shape[:-1]
    g = scales.shape[-1]
    y = unpack(wq.reshape(*lead, g, 8), scales, biases)
    return y.reshape(*lead, g * 64)


def main():
    rng = np.random.default_rng(0)
    mx.random.seed(0)
    W = (mx.random.normal((E, N, K)) * 0.02).astype(DT)
    x = (mx.random.normal((R, K))).astype(DT)
    mx.eval(W, x)
    Wt = W.swapaxes(-1, -2)
    emit(part="dense_floor", ms=ms(lambda: x @ Wt[0]), rows=R)
    for skew in (False, True):
        experts = routing(skew, rng)
        counts = np.bincount(experts, minlength=E)
        idx = mx.array(experts.astype(np.uint32))
        x3 = x[:, None, :][mx.arange(R)]  # fresh [R,1,K] (not a view)
        mx.eval(x3, idx)
        base = lambda: mx.gather_mm(x3, Wt, rhs_indices=idx, sorted_indices=True)  # noqa: E731
        ref = base()
        mx.eval(ref)
        emit(
            part="grouped_m1",
            skew=skew,
            ms=ms(base),
            max_over_mean=round(counts.max() / counts.mean(), 2),
        )
        for T in (16, 32, 64, 128, 256):
            te, src, valid = tile_plan(experts, T)
            te_a, src_a = mx.array(te), mx.array(src)
            xt = x[src_a].reshape(-1, T, K)
            mx.eval(xt, te_a)
            f = lambda: mx.gather_mm(xt, Wt, rhs_indices=te_a)  # noqa: E731
            y = f().reshape(-1, N)
            keep = mx.array(np.nonzero(valid)[0].astype(np.uint32))
            err = mx.abs(y[keep].astype(mx.float32) - ref.reshape(R, N).astype(mx.float32)).max()
            emit(
                part="tiles",
                skew=skew,
                T=T,
                tiles=len(te),
                padded_rows=int(len(src)),
                ms=ms(f),
                ms_with_gather=ms(
                    lambda: mx.gather_mm(x[src_a].reshape(-1, T, K), Wt, rhs_indices=te_a)
                ),
                max_abs_err=float(err.item()),
            )
        C = int(-(-counts.max() // 16) * 16)
        xb = mx.zeros((E, C, K), dtype=DT)
        mx.eval(xb)
        emit(part="batched_padded", skew=skew, C=C, ms=ms(lambda: xb @ Wt))
    # dequantization of 16 experts, one projection
    wq, s, b = mx.quantize(W[:16].astype(mx.bfloat16), group_size=64, bits=4)
    mx.eval(wq, s, b)
    d0 = mx.dequantize(wq, s, b, group_size=64, bits=4, dtype=mx.bfloat16)
    d1 = dequant_custom(wq, s, b)
    eq = mx.array_equal(d0, d1).item()
    diff = mx.abs(d0.astype(mx.float32) - d1.astype(mx.float32)).max().item()
    emit(
        part="dequant",
        mx_ms=ms(lambda: mx.dequantize(wq, s, b, group_size=64, bits=4, dtype=mx.bfloat16)),
        custom_ms=ms(lambda: dequant_custom(wq, s, b)),
        equal=bool(eq),
        max_abs_diff=diff,
    )


if __name__ == "__main__":
    main()
