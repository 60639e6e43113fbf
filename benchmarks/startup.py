"""Start-up cost of the plugin host.

Medians over N runs of `python -c pass` and `python -c "import mlx_lm"`, with the hook
installed (the normal case) and with MLX_ARCH_PLUGINS_DISABLE=1, runs interleaved so that
drift hits both alike. Also the import time of the hook itself from `-X importtime`, which
is all a disabled hook still costs. Prints one JSON line per measurement, then a table.

    python benchmarks/startup.py [--runs 30] [--python PATH]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {"pass": "pass", "import mlx_lm": "import mlx_lm"}
TARGET_MS = 5.0


def _env(disabled):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_ARCH_PLUGINS")}
    if disabled:
        env["MLX_ARCH_PLUGINS_DISABLE"] = "1"
    return env


def _time_once(python, code, env):
    t0 = time.perf_counter()
    subprocess.run([python, "-c", code], env=env, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - t0) * 1e3


def _hook_import_us(python):
    """Cumulative -X importtime of mlx_arch_plugins (package + hook) at start-up."""
    proc = subprocess.run(
        [python, "-X", "importtime", "-c", "pass"], env=_env(False), capture_output=True,
        text=True, check=True,
    )
    for line in proc.stderr.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == "mlx_arch_plugins":
            return int(parts[1])
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs per measurement (>= 20)")
    parser.add_argument("--python", default=sys.executable, help="interpreter to measure")
    args = parser.parse_args(argv)
    if args.runs < 20:
        parser.error("--runs must be at least 20")

    rows = []
    for label, code in COMMANDS.items():
        runs = {False: [], True: []}
        for disabled in (False, True):  # warm the file cache first
            _time_once(args.python, code, _env(disabled))
        for _ in range(args.runs):
            for disabled in (False, True):
                runs[disabled].append(_time_once(args.python, code, _env(disabled)))
        for disabled in (False, True):
            result = {
                "bench": "startup",
                "command": f"python -c {code!r}",
                "hook": "disabled" if disabled else "installed",
                "runs": args.runs,
                "median_ms": round(statistics.median(runs[disabled]), 2),
                "min_ms": round(min(runs[disabled]), 2),
            }
            print(json.dumps(result))
            rows.append(result)

    hook_us = [_hook_import_us(args.python) for _ in range(args.runs)]
    hook_us = [u for u in hook_us if u is not None]
    hook_ms = round(statistics.median(hook_us) / 1e3, 3) if hook_us else None
    print(json.dumps({"bench": "startup", "command": "-X importtime mlx_arch_plugins",
                      "runs": len(hook_us), "median_ms": hook_ms}))

    print(f"\n{'command':<28} {'hook installed':>15} {'disabled':>10} {'added':>8}")
    for i in range(0, len(rows), 2):
        on, off = rows[i], rows[i + 1]
        added = on["median_ms"] - off["median_ms"]
        print(f"{on['command']:<28} {on['median_ms']:>12.2f} ms {off['median_ms']:>7.2f} ms "
              f"{added:>+6.2f} ms")
    if hook_ms is not None:
        verdict = "meets" if hook_ms < TARGET_MS else "MISSES"
        print(f"importing the hook itself at start-up: {hook_ms:.3f} ms (median); "
              f"{verdict} the < {TARGET_MS:.0f} ms target")
    else:
        print("the hook was not imported at start-up: is mlx-arch-plugins installed?")


if __name__ == "__main__":
    main()
