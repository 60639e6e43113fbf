"""`pip install -e .` installs the start-up hook too, and the hook then serves plugins.

Builds an editable wheel of this checkout with the project's own build backend (as pip
does for `pip install -e .`, here without build isolation, so setuptools comes from the
test extra), installs it and the toy plugin into a fresh, dependency-free virtual
environment, and checks a plugin is served there. A stand-in `mlx_lm` package gives the
finder a parent to serve into, so real mlx-lm is not needed.
"""

import json
import os
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

try:
    _setuptools = tuple(int(p) for p in metadata.version("setuptools").split(".")[:2])
except (metadata.PackageNotFoundError, ValueError):
    _setuptools = (0, 0)
if _setuptools < (70, 1) and not os.environ.get("CI"):
    pytest.skip("needs setuptools >= 70.1 (the test extra)", allow_module_level=True)

STAND_IN = {"mlx_lm/__init__.py": "", "mlx_lm/chat_templates/__init__.py": ""}

CHECK = """
import json, sys, sysconfig
from pathlib import Path
import mlx_arch_plugins
from mlx_arch_plugins.host import hook as _hook
import mlx_lm.chat_templates.toy_chat as served, mlx_arch_toy.chat_template as real
site = Path(sysconfig.get_paths()["purelib"])
print(json.dumps({
    "package": mlx_arch_plugins.__file__,
    "installed": _hook.is_installed(),
    "same": served is real,
    "files": sorted(p.name for p in [*site.glob("*.pth"), *site.glob("*.start")]),
}))
"""


def check_run(*cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_editable_install_serves_plugins(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # the PEP 660 hook pip calls for `pip install -e .`
    check_run(
        sys.executable,
        "-c",
        "import sys; sys.path.insert(0, '_build_backend'); import mlx_arch_plugins_backend as b;"
        " b.build_editable(sys.argv[1])",
        str(wheels),
        cwd=REPO,
    )
    pip = [sys.executable, "-m", "pip"]
    check_run(
        *pip,
        "wheel",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(wheels),
        str(REPO / "tests/toy_plugin/good"),
    )
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = str(env_dir / "bin" / "python")
    check_run(
        *pip, "--python", python, "install", "-q", "--no-deps", *map(str, wheels.glob("*.whl"))
    )
    for name, text in STAND_IN.items():
        (tmp_path / "stand_in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "stand_in" / name).write_text(text)
    proc = subprocess.run(
        [python, "-c", CHECK],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "stand_in")},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert Path(out["package"]).is_relative_to(REPO / "src")  # the checkout, not a copy
    assert out["installed"] is True
    assert out["same"] is True
    assert "mlx_arch_plugins.pth" in out["files"] and "mlx_arch_plugins.start" in out["files"]
    assert any(f.startswith("__editable__") for f in out["files"])
