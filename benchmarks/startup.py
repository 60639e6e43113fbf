"""Start-up cost of the plugin host.

Medians over N runs of `python -c pass` and `python -c "import mlx_lm"`, with the hook
installed (the normal case) and with MLX_ARCH_PLUGINS_DISABLE=1, runs interleaved so that
drift hits both alike. With DISABLE=1 the start-up file still imports the (stdlib-only)
hook to read the switch, so the time spent importing mlx_arch_plugins modules is also
measured with `-X importtime`: at start-up, and inside `import mlx_lm` (post-import patches). Prints one JSON line per measurement, then a table.

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


def _own_import_us(python, code):
    """Microseconds spent importing mlx_arch_plugins modules (-X importtime, cumulative).

    Counts each outermost mlx_arch_plugins import once: at start-up that is the package
    and its hook; inside `import mlx_lm` also the post-import patches and what they load.
    """
    proc = subprocess.run(
        [python, "-X", "importtime", "-c", code],
        env=_env(False),
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []  # (depth, name, cumulative us), children listed before their parent
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        name = parts[2].rstrip()
        depth = len(name) - len(name.lstrip())
        rows.append((depth, name.strip(), int(parts[1])))
    total = 0
    for i, (depth, name, cum) in enumerate(rows):
        if not name.startswith("mlx_arch_plugins"):
            continue
        parent = next((n for d, n, _ in rows[i + 1 :] if d < depth), "")
        if not parent.startswith("mlx_arch_plugins"):
            total += cum
    return total


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

    own = {}
    for label, code in COMMANDS.items():
        us = statistics.median(_own_import_us(args.python, code) for _ in range(args.runs))
        own[label] = round(us / 1e3, 3)
        print(
            json.dumps(
                {
                    "bench": "startup",
                    "command": f"python -X importtime -c {code!r}",
                    "measure": "mlx_arch_plugins imports",
                    "runs": args.runs,
                    "median_ms": own[label],
                }
            )
        )

    print(f"\n{'command':<28} {'hook installed':>15} {'disabled':>10} {'added':>8}")
    for i in range(0, len(rows), 2):
        on, off = rows[i], rows[i + 1]
        added = on["median_ms"] - off["median_ms"]
        print(
            f"{on['command']:<28} {on['median_ms']:>12.2f} ms {off['median_ms']:>7.2f} ms "
            f"{added:>+6.2f} ms"
        )
    print(f"\n{'mlx_arch_plugins imports (-X importtime)':<44} {'median':>10}")
    for label, ms in own.items():
        print(f"{'  in python -c ' + repr(label):<44} {ms:>7.3f} ms")
    verdict = "meets" if own["pass"] < TARGET_MS else "MISSES"
    print(
        f"added to `python -c pass` by the hook: {own['pass']:.3f} ms "
        f"({verdict} the < {TARGET_MS:.0f} ms target)"
    )


if __name__ == "__main__":
    main()
