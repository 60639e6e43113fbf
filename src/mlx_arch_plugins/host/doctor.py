"""``mlx-arch-plugins doctor``: is the plugin host working here, and if not, why."""

import importlib
import json
import platform
import sys
from importlib import metadata

from . import hook as _hook
from . import plugins as _plugins

SCHEMA = 1
STARTUP_FILES = ("mlx_arch_plugins.pth", "mlx_arch_plugins.start")


def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _startup_files():
    try:
        files = metadata.distribution("mlx-arch-plugins").files or []
    except metadata.PackageNotFoundError:
        return []
    found = []
    for f in files:
        if f.name in STARTUP_FILES:
            path = f.locate()
            found.append({"path": str(path), "exists": path.exists()})
    return found


def _mlx_info():
    try:
        import mlx.core as mx
    except Exception as e:
        return {
            "backend": None,
            "default_device": None,
            "error": f"{type(e).__name__}: {e}",
        }
    if mx.metal.is_available():
        backend = "metal"
    elif getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        backend = "cuda"
    else:
        backend = "cpu"
    return {
        "backend": backend,
        "default_device": str(mx.default_device()),
        "error": None,
    }


def _stock_has(parent, name):
    """True when stock mlx-lm ships parent.name (found without the plugin finder)."""
    from importlib.machinery import PathFinder

    try:
        package = importlib.import_module(parent)
    except Exception:
        return False
    return PathFinder.find_spec(f"{parent}.{name}", package.__path__) is not None


def _check(parent, name, eps, host):
    alias = f"{parent}.{name}"
    if _stock_has(parent, name):
        return "stock", f"stock mlx-lm provides {alias}; this entry is never used"
    if len(eps) > 1:
        return "conflict", "registered by more than one distribution"
    if host["reason"].startswith("disabled"):
        return "disabled", host["reason"]
    if host["allowlist"] is not None and name not in host["allowlist"]:
        return "not-allowed", f"not in {_hook.ALLOW_ENV}={','.join(host['allowlist'])}"
    if not host["active"]:
        return "inactive", host["reason"]
    try:
        module = importlib.import_module(alias)
    except _hook.PluginImportError as e:
        return "error", str(e)
    except Exception as e:
        return "error", f"{type(e).__name__}: {e}"
    if sys.modules.get(eps[0].module) is not module:
        return "error", f"{alias} is not the module {eps[0].module}"
    return "ok", None


def collect():
    """Everything doctor reports, as a JSON-ready dict."""
    host = _hook.status()
    entries = []
    parents = {group: parent for parent, group in _hook.GROUPS.items()}
    for group, names in _hook.registered().items():
        for name in sorted(names):
            eps = names[name]
            status, detail = _check(parents[group], name, eps, host)
            for ep in eps:
                dist = getattr(ep, "dist", None)
                entries.append(
                    {
                        "group": group,
                        "name": name,
                        "module": ep.module,
                        "alias": f"{parents[group]}.{name}",
                        "distribution": dist.name if dist else None,
                        "version": dist.version if dist else None,
                        "status": status,
                        "detail": detail,
                    }
                )
    return {
        "schema": SCHEMA,
        "package": {
            "name": "mlx-arch-plugins",
            "version": _version("mlx-arch-plugins"),
        },
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "hook": dict(host, startup_files=_startup_files()),
        "versions": {d: _version(d) for d in ("mlx", "mlx-lm", "transformers")},
        "mlx": _mlx_info(),
        "entries": entries,
        "ok": host["active"] and all(e["status"] in ("ok", "stock") for e in entries),
    }


def _print_text(report):
    host = report["hook"]
    print(
        f"mlx-arch-plugins {report['package']['version']} on Python {report['python']['version']}"
    )
    print(f"hook: {'ACTIVE' if host['active'] else 'INACTIVE'}: {host['reason']}")
    if host["allowlist"] is not None:
        print(f"allowlist ({_hook.ALLOW_ENV}): {', '.join(host['allowlist'])}")
    for f in host["startup_files"]:
        print(f"start-up file: {f['path']}{'' if f['exists'] else ' (MISSING)'}")
    if not host["startup_files"]:
        print("start-up file: none found (package not installed with pip?)")
    versions = ", ".join(f"{k} {v or 'not installed'}" for k, v in report["versions"].items())
    print(f"versions: {versions}")
    mlx = report["mlx"]
    if mlx["error"]:
        print(f"mlx: cannot import: {mlx['error']}")
    else:
        print(f"mlx: backend {mlx['backend']}, default device {mlx['default_device']}")
    print("entries:" if report["entries"] else "entries: none registered")
    for e in report["entries"]:
        print(
            f"  {e['status']:<11} {e['alias']:<40} {e['module']} "
            f"[{e['distribution']} {e['version']}]"
        )
        if e["detail"] and e["status"] != "ok":
            print(f"              {e['detail']}")


def run_selftests():
    """Each registered architecture's own self-check, on the default device.

    An architecture declares one as a module-level ``selftest(report)`` in its model
    module (see ``host.plugins``); it calls ``report(check, ok, detail)`` once per check.
    Returns one dict per check; ``ok`` is False for a failed check or an exception, and
    None for an architecture whose module does not import (skipped here: the entries
    say why, and it is not this machine's arithmetic). Architectures this environment
    does not serve (host off, not allowed, stock name) are left out."""
    results = []
    for name in _plugins.model_types():

        def report(check, ok, detail="", _name=name):
            ok = None if ok is None else bool(ok)
            results.append(
                {"architecture": _name, "check": str(check), "ok": ok, "detail": str(detail)}
            )

        try:
            module = _plugins.module_for(name)
        except Exception as e:
            report("skipped, does not import", None, f"{type(e).__name__}: {e}")
            continue
        selftest = _plugins.declared(module, "selftest")
        if not callable(selftest):
            continue  # not served here, or declares none
        try:
            selftest(report)
        except Exception as e:
            report("selftest raised", False, f"{type(e).__name__}: {e}")
    return results


_VERDICT = {True: "PASS", False: "FAIL", None: "SKIP"}


def selftests_failed(results) -> bool:
    return any(r["ok"] is False for r in results)


def _print_selftests(results, mlx):
    print(f"selftest on {mlx.get('default_device')} ({mlx.get('backend')}):")
    ran = [r for r in results if r["ok"] is not None]
    if not ran:
        print("  no importable architecture declares a selftest")
    for r in results:
        print(f"  {_VERDICT[r['ok']]}  {r['architecture']}: {r['check']}: {r['detail']}")
    if ran:
        verdict = "FAILED" if selftests_failed(results) else "all passed"
        print(f"selftest: {verdict}. Please report the lines above (with the versions) at the")
        print("project's issue tracker, especially from a Mac: it is how we learn what Metal")
        print("computes.")


def main(as_json=False, selftest=False):
    report = collect()
    if selftest:
        report["selftest"] = run_selftests()
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report)
        if selftest:
            _print_selftests(report["selftest"], report["mlx"])
    if selftest and selftests_failed(report["selftest"]):
        return 1
    return 0
