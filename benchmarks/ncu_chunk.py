"""Every GPU kernel of one 2048-token prefill chunk, per layer kind, through Nsight Compute
(issue 16).

Builds perf.py's random Flash-width model (KINDS, default "0,4,128"; 64 experts; FMT
affine4 or official), prefills CTX tokens (default 2048), runs each layer once more to
compile its kernels, then runs it under the profiler on a copy of its cache. Each
profiled range starts with a marker kernel (a float32 arange) that ncu_summary.py splits
on. MLX's CUDA graphs hide their kernels from ncu, hence MLX_USE_CUDA_GRAPHS=0:

    MLX_USE_CUDA_GRAPHS=0 ncu --profile-from-start off --clock-control none \
        --metrics gpu__time_duration.sum --csv --page raw \
        python benchmarks/ncu_chunk.py > kernels.csv
    python benchmarks/ncu_summary.py kernels.csv

Times are per kernel, run alone (serialised by the profiler): launch gaps are not in them.
"""

import ctypes
import glob
import os
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import perf  # noqa: E402


def profiler():
    for pat in ("libcudart.so*", "**/libcudart.so*"):
        for d in sys.path + ["/usr/local/cuda/lib64"]:
            for f in glob.glob(os.path.join(d, "nvidia", "**", pat), recursive=True) + glob.glob(
                os.path.join(d, pat)
            ):
                try:
                    lib = ctypes.CDLL(f)
                    return lib.cudaProfilerStart, lib.cudaProfilerStop, f
                except OSError:
                    pass
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:  # a CPU dry run
        return (lambda: -1), (lambda: -1), "none"
    return lib.cuProfilerStart, lib.cuProfilerStop, "libcuda"


def main():
    fmt = os.environ.get("FMT", "affine4")
    kinds = os.environ.get("KINDS", "0,4,128")
    ctx = int(os.environ.get("CTX", "2048"))
    start, stop, where = profiler()
    print("profiler from", where, file=sys.stderr)
    model, _, args = perf.build_random(
        os.environ.get("WIDTH", "flash"),
        len(kinds.split(",")),
        fmt,
        kinds,
        overrides={"n_routed_experts": 64},
    )
    cache = perf.make_cache(model, 1)
    perf.prefill(model, cache, mx.random.randint(0, args.vocab_size, (1, ctx)), 2048)
    ids = mx.random.randint(0, args.vocab_size, (1, 2048))
    h = (mx.random.normal((1, 2048, args.hc_mult, args.hidden_size)) * 0.5).astype(mx.bfloat16)
    mx.eval(ids, h)
    for i, (layer, c) in enumerate(zip(model.layers, cache)):
        for _ in range(2):  # kernels compiled outside the profiled range
            mx.eval(layer(h, c.copy(), ids))
        c2 = c.copy()
        mx.eval([a for a in c2.state if a is not None])
        mx.synchronize()
        print("rc start", start(), file=sys.stderr)
        mx.eval(mx.arange(1000 + i, dtype=mx.float32))
        mx.eval(layer(h, c2, ids))
        mx.synchronize()
        stop()
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
