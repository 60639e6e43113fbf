"""``mlx-arch-plugins doctor --selftest``: each registered architecture's own
self-check (DeepSeek-V4: a tiny shipped checkpoint against DeepSeek's reference
logits, compiled and eager) on the default device, CPU here."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from mlx_arch_plugins.deepseek_v4 import model as dsv4
from mlx_arch_plugins.deepseek_v4 import selftest as dsv4_selftest
from mlx_arch_plugins.host import doctor

pytestmark = pytest.mark.compat

CLI = Path(sys.executable).with_name("mlx-arch-plugins")


def _run(capsys, **kw):
    rc = doctor.main(selftest=True, **kw)
    return rc, capsys.readouterr().out


def test_cli_selftest_passes_on_cpu():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_ARCH_PLUGINS")}
    proc = subprocess.run(
        [str(CLI), "doctor", "--selftest", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = json.loads(proc.stdout)["selftest"]
    mine = {c["check"]: c for c in checks if c["architecture"] == "deepseek_v4"}
    for name in (
        "reference logits, compiled",
        "reference logits, eager",
        "compiled vs eager logits",
        "qat_round fp8, compiled vs eager",
    ):
        assert mine[name]["ok"], mine[name]
    assert "max" in mine["reference logits, compiled"]["detail"]


def test_text_report_says_pass_and_asks_for_reports(capsys):
    rc, out = _run(capsys)
    assert rc == 0, out
    assert "PASS  deepseek_v4: reference logits, compiled: max" in out
    assert "FAIL" not in out and "Please report" in out


def test_fails_when_the_model_computes_wrong(capsys, monkeypatch):
    # every RoPE position one off: a mistake of the kind a bad kernel makes
    real = dsv4.batch_offset
    monkeypatch.setattr(dsv4, "batch_offset", lambda off, b: real(off + 1, b))
    rc, out = _run(capsys)
    assert rc == 1
    assert "FAIL  deepseek_v4: reference logits, compiled" in out
    assert "FAIL  deepseek_v4: reference logits, eager" in out


def test_fails_when_the_reference_disagrees(capsys, monkeypatch):
    want, maxdev = dsv4_selftest._expected()
    shifted = want.copy()
    shifted[::10] += 0.2  # one position in ten beyond the 0.05 bound
    monkeypatch.setattr(dsv4_selftest, "_expected", lambda: (shifted, maxdev))
    rc, out = _run(capsys)
    assert rc == 1 and "90.0% of positions within bound" in out


def test_golden_checks_are_the_readme_tolerances():
    want = np.zeros((100, 8), np.float32)
    want[:, 0] = 1.0
    maxdev = np.zeros(100, np.float32)
    got = want.copy()
    got[:2, 1] += 0.06  # 2% of positions over the bound: still allowed
    assert dsv4_selftest.golden_checks(got, want, maxdev)[0]
    got[2, 1] += 0.06  # 3%: not
    assert not dsv4_selftest.golden_checks(got, want, maxdev)[0]
    assert not dsv4_selftest.golden_checks(want + 0.011, want, maxdev)[0]  # mean > 1e-2


def test_doctor_runs_whatever_architecture_declares_one(capsys, monkeypatch):
    """The host names no architecture: it finds selftest() on the registered
    model modules; an exception is a failed check."""
    fake = types.ModuleType("mlx_lm.models.fake_arch")

    def selftest(report):
        report("first", True, "fine")
        raise RuntimeError("boom")

    fake.selftest = selftest
    monkeypatch.setitem(sys.modules, "mlx_lm.models.fake_arch", fake)
    ep = types.SimpleNamespace(name="fake_arch", module=fake.__name__)
    monkeypatch.setattr(
        doctor._hook, "registered", lambda: {"mlx_arch_plugins.models": {"fake_arch": [ep]}}
    )
    results = doctor.run_selftests()
    assert [(r["check"], r["ok"]) for r in results] == [("first", True), ("selftest raised", False)]
    assert "boom" in results[1]["detail"]


def test_an_architecture_that_does_not_import_is_skipped_not_failed(capsys, monkeypatch):
    """Its import error is the entries' business; the exit status is about arithmetic."""
    ep = types.SimpleNamespace(name="gone_arch", module="mlx_arch_gone.model")
    monkeypatch.setattr(
        doctor._hook, "registered", lambda: {"mlx_arch_plugins.models": {"gone_arch": [ep]}}
    )

    def broken(name):
        raise ImportError("no such plugin module")

    monkeypatch.setattr(doctor._plugins, "module_for", broken)
    results = doctor.run_selftests()
    assert [(r["check"], r["ok"]) for r in results] == [("skipped, does not import", None)]
    assert not doctor.selftests_failed(results)
    source = Path(doctor.__file__).read_text().lower()
    assert "deepseek" not in source and "dsv4" not in source


def test_backend_without_quantized_kernels_checks_the_dequantized_model(capsys, monkeypatch):
    # MLX CUDA has no mxfp8 quantized matmul for the tiny checkpoint's shapes, seen on
    # the H200 as "[quantized_matmul] No implementation for problem shape: 40x128x128x1"
    import mlx.nn as nn

    real = dsv4_selftest._protocol

    def protocol(model):
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise RuntimeError("[quantized_matmul] No implementation for problem shape")
        return real(model)

    monkeypatch.setattr(dsv4_selftest, "_protocol", protocol)
    rc, out = _run(capsys)
    assert rc == 0, out
    assert "PASS  deepseek_v4: quantized kernels (compiled): dequantized instead" in out
    assert "PASS  deepseek_v4: reference logits, compiled: max" in out
    # a failure of another kind is still a failure
    monkeypatch.setattr(dsv4_selftest, "_protocol", lambda m: 1 / 0)
    rc, out = _run(capsys)
    assert rc == 1 and "FAIL" in out
