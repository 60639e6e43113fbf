"""43-layer prefill in one process: routed experts through gather_qmm vs dequantized chunks.

Builds the random Flash-width model of ``perf.py`` once (``--experts`` routed experts so
that 43 layers fit one GPU), then alternates the two expert paths
(``MLX_ARCH_PLUGINS_DEQUANT_ROWS=0`` forces gather_qmm; unset, the model's per-backend
threshold decides) over mlx-lm's chunked prefill, one JSON line per run.

Before the runs, per context, the bf16 matmul floor (issue 16's goal: a prefill within
2x of it): every weight's product over the prompt's chunks, as plain half-precision
matmuls in the same process (the routed experts as one matmul of all routed rows, as if
perfectly grouped; attention scores and the hyper-connections' small mixes are not
counted), one ``matmul_floor`` line; each run then prints ``over_floor``. ``--no-floor``
skips it.

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


def layer_products(layer, rows: int, top_k: int):
    """(groups, rows, in, out) of every weight's product in ``layer`` over a chunk of
    ``rows`` tokens: the routed experts' as all routed rows through one matrix."""
    products = []
    for name, module in layer.named_modules():
        if "weight" not in module or module["weight"].ndim == 1:
            continue
        w = module["weight"]
        bits = getattr(module, "bits", None)
        cols = w.shape[-1] * 32 // bits if bits else w.shape[-1]
        if ".switch_mlp." in f".{name}.":
            products.append((1, rows * top_k, cols, w.shape[-2]))
        elif w.ndim == 3:  # one matrix per group (MultiLinear)
            products.append((w.shape[0], rows, cols, w.shape[-2]))
        else:
            products.append((1, rows, cols, w.shape[0]))
    return tuple(products)


def time_products(products, runs=5):
    """Median seconds of all ``products`` as half-precision matmuls (float32 on the
    CPU), evaluated together."""
    dt = mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    weights, inputs = {}, {}
    for g, r, i, o in products:
        if (g, i, o) not in weights:
            weights[(g, i, o)] = (mx.random.normal((g, o, i)) * 0.02).astype(dt)
        if (g, r, i) not in inputs:
            inputs[(g, r, i)] = mx.random.normal((g, r, i)).astype(dt)
    mx.eval(list(weights.values()), list(inputs.values()))
    pairs = [(inputs[(g, r, i)], weights[(g, i, o)]) for g, r, i, o in products]

    def products_once():
        mx.eval([x @ w.swapaxes(-1, -2) for x, w in pairs])

    products_once()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        products_once()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def matmul_floor(model, T, step, top_k):
    """Seconds of the floor for a ``T``-token prompt prefilled ``step`` tokens at a time:
    each layer's products timed once per distinct set of shapes."""
    chunks = [step] * (T // step) + ([T % step] if T % step else [])
    timed, total = {}, 0.0
    for rows in chunks:
        for layer in model.layers:
            products = layer_products(layer, rows, top_k)
            if products not in timed:
                timed[products] = time_products(products)
            total += timed[products]
    mx.clear_cache()
    return total


# A threshold the caller set for the default path (e.g. to try another one): "chunked"
# runs keep it rather than fall back to the model's table.
CALLER_SWITCH = os.environ.get(SWITCH)


def run(model, vocab, T, mode, fmt, step, weights, floor=None, warmup=False):
    if mode == "qmm":
        os.environ[SWITCH] = "0"
    elif CALLER_SWITCH is not None:
        os.environ[SWITCH] = CALLER_SWITCH
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
    if warmup:
        rec["warmup"] = True
    if floor:
        rec["over_floor"] = round(dt / floor, 2)
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
    p.add_argument("--no-floor", action="store_true", help="skip the bf16 matmul floor")
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
    contexts = [int(x) for x in o.contexts.split(",") if x]
    # warm each path: MLX compiles each custom CUDA kernel once per process (~1.4 s), and
    # the indexer's only runs once a CSA layer has more entries than its top-k (4K does)
    warm = min(4096, max(contexts))
    for mode in wanted:
        run(model, args.vocab_size, warm, mode, o.format, o.step, weights, warmup=True)
    top_k = args.num_experts_per_tok
    floors = {}
    for T in contexts:
        if not o.no_floor and T not in floors:
            t0 = time.perf_counter()
            floors[T] = matmul_floor(model, T, o.step, top_k)
            rec = dict(bench="matmul_floor", tokens=T, s=round(floors[T], 3))
            rec["tok_s"] = round(T / floors[T], 1)
            rec["measured_in_s"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(rec), flush=True)
        modes = 2 * wanted if T <= o.ab_up_to else ["chunked"]
        for mode in modes:
            run(model, args.vocab_size, T, mode, o.format, o.step, weights, floors.get(T))


if __name__ == "__main__":
    main()
