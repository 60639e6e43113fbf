"""Load an official-format (FP8/FP4) DeepSeek-V4 checkpoint with stock mlx-lm and
report wall time and peak RSS relative to the checkpoint size (target <= 1.2).

    python benchmarks/load_official.py                  # builds a ~4.4 GB full-width checkpoint in a temp dir
    python benchmarks/load_official.py --model DIR      # measures an existing checkpoint
    python benchmarks/load_official.py --layers 1 --experts 16 --keep DIR

The checkpoint is written by ``mlx-arch-plugins make-tiny --preset flash`` (real
Flash widths, fewer layers/experts). The load runs in a fresh subprocess so its
peak RSS covers only the import and the load.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path

def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def peak():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux

import mlx.core as mx
import mlx_lm.utils
from mlx_lm.utils import load_model

base = rss_now() if sys.platform.startswith("linux") else peak()
t0 = time.perf_counter()
model, config = load_model(Path(sys.argv[1]))
mx.eval(model.parameters())
t1 = time.perf_counter()
layer = model.model.layers[0]
print(json.dumps({
    "load_s": t1 - t0,
    "peak_rss_bytes": peak(),
    "baseline_rss_bytes": base,
    "dense_mode": getattr(layer.attn.wq_a, "mode", None),
    "expert_mode": getattr(layer.ffn.switch_mlp.gate_proj, "mode", None),
    "mlx": mx.__version__,
}))
"""


def checkpoint_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def build(dst: Path, layers: int, experts: int, seed: int) -> float:
    t = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "mlx_arch_plugins.deepseek_v4.tiny",
        str(dst),
        "--format",
        "official",
        "--preset",
        "flash",
        "--layers",
        str(layers),
        "--experts",
        str(experts),
        "--seed",
        str(seed),
    ]
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def measure(d: Path, python: str) -> dict:
    t = time.perf_counter()
    r = subprocess.run([python, "-c", _CHILD, str(d)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"load failed (exit {r.returncode})")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["wall_s"] = wall
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", help="existing official-format checkpoint (skip building)")
    ap.add_argument(
        "--layers", type=int, default=3, help="Flash layers to build (default 3: ratios 0, 0, 4)"
    )
    ap.add_argument("--experts", type=int, default=32, help="routed experts per layer (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="build into this directory and keep it")
    ap.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter that loads the checkpoint (e.g. a venv with mlx 0.31)",
    )
    args = ap.parse_args(argv)

    tmp = None
    build_s = None
    if args.model:
        d = Path(args.model)
    else:
        if args.keep:
            d = Path(args.keep)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="dsv4-bench-", dir=os.environ.get("TMPDIR"))
            d = Path(tmp.name) / "ckpt"
        build_s = build(d, args.layers, args.experts, args.seed)
    try:
        size = checkpoint_bytes(d)
        if size < 2 * 10**9:
            print(f"note: checkpoint is {size / 1e9:.2f} GB (< 2 GB)", file=sys.stderr)
        r = measure(d, args.python)
        result = {
            "benchmark": "load_official",
            "checkpoint": str(d),
            "checkpoint_bytes": size,
            "build_s": build_s,
            **r,
            "peak_rss_over_checkpoint": r["peak_rss_bytes"] / size,
            "peak_minus_baseline_over_checkpoint": (r["peak_rss_bytes"] - r["baseline_rss_bytes"])
            / size,
            "target": 1.2,
        }
        print(json.dumps(result))
        print(
            f"loaded {size / 1e9:.2f} GB official checkpoint in {r['load_s']:.1f} s "
            f"(subprocess wall {r['wall_s']:.1f} s); peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB = "
            f"{result['peak_rss_over_checkpoint']:.3f} x checkpoint "
            f"({result['peak_minus_baseline_over_checkpoint']:.3f} x without the "
            f"{r['baseline_rss_bytes'] / 1e6:.0f} MB interpreter baseline); target <= 1.2; "
            f"layers: dense {r['dense_mode']}, experts {r['expert_mode']}; mlx {r['mlx']}"
        )
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
