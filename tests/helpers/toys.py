"""The toy plugins of tests/toy_plugin/: installed into the test interpreter on demand.

The host tests look at installed distributions (entry points, start-up files), so the
toys must really be installed where pytest runs. A fresh checkout gets them the first
time a host test module is collected (the same pip command .ci/run used to run).
"""

import importlib
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

TOY_DIR = Path(__file__).resolve().parent.parent / "toy_plugin"
DISTRIBUTIONS = {"mlx-arch-toy": TOY_DIR / "good", "mlx-arch-toy-broken": TOY_DIR / "broken"}


def _missing():
    missing = []
    for name in DISTRIBUTIONS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def ensure_installed() -> None:
    """Install the missing toys with this interpreter's pip; fail (under CI) or skip
    with the reason when that is impossible."""
    try:
        metadata.distribution("mlx-arch-plugins")
    except metadata.PackageNotFoundError:
        pytest.skip("mlx-arch-plugins is not installed here", allow_module_level=True)
    missing = _missing()
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    cmd += [str(DISTRIBUTIONS[name]) for name in missing]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    importlib.invalidate_caches()
    if proc.returncode != 0 or _missing():
        pytest.fail(f"could not install the toy plugins ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
