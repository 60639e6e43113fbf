"""Per layer kind, GPU time by kernel name from ncu_chunk.py's ncu CSV (issue 16).

python benchmarks/ncu_summary.py kernels.csv [KINDS]
"""

import collections
import csv
import re
import sys

KINDS = sys.argv[2].split(",") if len(sys.argv) > 2 else ["0", "4", "128"]


def rows(path):
    lines = open(path, errors="replace").read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    reader = csv.reader(lines[start:])
    head = next(reader)
    units = next(reader)
    name_i = head.index("Kernel Name")
    t_i = head.index("gpu__time_duration.sum")
    grid_i = head.index("Grid Size") if "Grid Size" in head else None
    scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(units[t_i], 1e-6)
    for r in reader:
        if len(r) <= t_i:
            continue
        try:
            t = float(r[t_i].replace(",", "")) * scale
        except ValueError:
            continue
        yield r[name_i], t, (r[grid_i] if grid_i is not None else "")


def short(name):
    name = re.sub(r"\(.*", "", name)  # drop argument lists
    name = re.sub(r"<.*", "", name) if len(name) > 90 else name
    return name[:90]


def main():
    layers, cur = [], None
    for name, t, grid in rows(sys.argv[1]):
        if "arange<float" in name:
            cur = []
            layers.append(cur)
            continue
        if cur is not None:
            cur.append((name, t, grid))
    for kind, ks in zip(KINDS, layers):
        total = sum(t for _, t, _ in ks)
        print(f"=== layer kind {kind}: {len(ks)} kernels, {total:.2f} ms")
        agg = collections.defaultdict(lambda: [0.0, 0])
        for name, t, _ in ks:
            a = agg[short(name)]
            a[0] += t
            a[1] += 1
        for name, (t, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:30]:
            print(f"  {t:8.3f} ms {n:5d}x  {name}")
        big = sorted(ks, key=lambda x: -x[1])[:15]
        print("  largest single kernels:")
        for name, t, grid in big:
            print(f"  {t:8.3f} ms  grid {grid}  {short(name)}")


if __name__ == "__main__":
    main()
