"""43-layer prefill in one process: routed experts through gather_qmm vs dequantized chunks.

Builds the random Flash-width model of ``perf.py`` once (``--experts`` routed experts so
that 43 layers fit one GPU), then alternates the two expert paths
(``MLX_ARCH_PLUGINS_DEQUANT_ROWS=0`` forces gather_qmm; unset, the model's per-backend
threshold decides) over mlx-lm's chunked prefill, one JSON line per run.

    python benchmarks/prefill_ab.py --format affine4 --contexts 4096,32768
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import perf  # noqa: E402

SWITCH = "MLX_ARCH_PLUGINS_DEQUANT_ROWS"


def run(model, vocab, T, mode, fmt, step, weights):
    if mode == "qmm":
        os.environ[SWITCH] = "0"
    else:
        os.environ.pop(SWITCH, None)
    toks = mx.random.randint(0, vocab, (1, T))
    mx.eval(toks)
    cache = perf.make_cache(model, 1)
    mx.clear_cache()
    mx.reset_peak_memory()
    t = time.perf_counter()
    perf.prefill(model, cache, toks, step)
    dt = time.perf_counter() - t
    peak, kv = mx.get_peak_memory(), perf.cache_bytes(cache)
    rec = dict(
        bench="prefill_ab",
        format=fmt,
        mode=mode,
        tokens=T,
        s=round(dt, 3),
        tok_s=round(T / dt, 1),
        peak_gb=round(peak / 1e9, 2),
        kv_gb=round(kv / 1e9, 3),
        # what the peak held besides the weights and the kept cache: a chunk's
        # activations, buffers queued on the device and the allocator's reuse cache
        beyond_weights_kv_gb=round((peak - weights - kv) / 1e9, 2),
    )
    print(json.dumps(rec), flush=True)
    del cache
    gc.collect()
    mx.clear_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", choices=["official", "affine4"], default="affine4")
    p.add_argument("--width", choices=["flash", "small"], default="flash")
    p.add_argument("--layers", type=int, default=43)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--contexts", default="4096,32768")
    p.add_argument("--step", type=int, default=2048, help="prefill chunk (mlx-lm's default)")
    p.add_argument(
        "--ab-up-to",
        type=int,
        default=4096,
        help="contexts up to this run both paths twice; longer ones the default once",
    )
    p.add_argument(
        "--modes",
        default="qmm,chunked",
        help="expert paths to run (chunked alone: time the rest of the model)",
    )
    o = p.parse_args(argv)
    wanted = [m for m in o.modes.split(",") if m]
    shapes = perf.FLASH if o.width == "flash" else perf.SMALL
    shapes.update(n_routed_experts=o.experts, num_experts_per_tok=min(6, o.experts))
    t0 = time.perf_counter()
    model, _, args = perf.build_random(o.width, o.layers, o.format)
    weights = sum(a.nbytes for _, a in perf._flat(model.parameters()))
    print(
        json.dumps(
            dict(
                bench="build",
                format=o.format,
                s=round(time.perf_counter() - t0, 1),
                weights_gb=round(weights / 1e9, 2),
            )
        ),
        flush=True,
    )
    for mode in wanted:  # warm each path (kernel compilation)
        run(model, args.vocab_size, 512, mode, o.format, o.step, weights)
    for T in [int(x) for x in o.contexts.split(",") if x]:
        modes = 2 * wanted if T <= o.ab_up_to else ["chunked"]
        for mode in modes:
            run(model, args.vocab_size, T, mode, o.format, o.step, weights)


if __name__ == "__main__":
    main()
