"""Progress lines on stderr while a big checkpoint of a plugin architecture loads.

Stock mlx-lm is silent between "start" and "loaded" apart from downloads
(``huggingface_hub.snapshot_download`` already draws its own per-file progress
bars). For a DeepSeek-V4 checkpoint of 150+ GB that silence lasts minutes:
stock ``load_model`` reads every shard (eagerly where the safetensors shim has
to decode dtypes the installed mlx rejects), then the official FP8/FP4 tensors
are re-packed lazily and everything is read and re-packed in one final
``mx.eval(model.parameters())``.

``install(mlx_lm.utils)`` wraps ``load_model`` for model types served by this
package (others go through untouched). The wrapper loads lazily, then
evaluates the parameters layer by layer, which computes exactly the same
arrays, and reports:

    [mlx-arch-plugins] loading deepseek_v4 from DIR: 46 shards, 158.3 GB
    [mlx-arch-plugins] shard 3/46 read: model-00003-of-00046.safetensors (3.4 GB) [12s]
    [mlx-arch-plugins] layer 7/43 read and re-packed [40s]
    [mlx-arch-plugins] loaded in 95s

Nothing is printed for loads faster than ``MLX_ARCH_PLUGINS_PROGRESS_AFTER``
seconds (default 2), at most one line a second is printed after that, and
``MLX_ARCH_PLUGINS_PROGRESS=0`` turns it off. Lazy loads (``lazy=True``, used
by ``mlx_lm.convert`` and sharded loading) are not touched.
"""

from __future__ import annotations

import functools
import glob
import inspect
import json
import os
import sys
import threading
import time
from pathlib import Path

ENV_SWITCH = "MLX_ARCH_PLUGINS_PROGRESS"
ENV_AFTER = "MLX_ARCH_PLUGINS_PROGRESS_AFTER"
PREFIX = "[mlx-arch-plugins]"
_MARK = "__mlx_arch_plugins_progress__"
_lock = threading.Lock()


def _enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _after() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV_AFTER, "2")))
    except ValueError:
        return 2.0


def _served_model_types() -> set:
    try:
        from importlib.metadata import entry_points

        return {ep.name for ep in entry_points(group="mlx_arch_plugins.models")}
    except Exception:
        return set()


def _model_type(model_path) -> str | None:
    try:
        with open(Path(model_path) / "config.json", encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


class Reporter:
    """Prints a line per event once ``after`` seconds have passed, at most one a second."""

    def __init__(self, header: str, after: float, stream=None):
        self.header = header
        self.after = after
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.last = None
        self.shown = False

    def _print(self, text):
        print(f"{PREFIX} {text}", file=self.stream, flush=True)

    def event(self, text: str, final: bool = False):
        now = time.monotonic()
        elapsed = now - self.t0
        if elapsed < self.after:
            return
        if not final and self.last is not None and now - self.last < 1.0:
            return
        if not self.shown:
            self._print(self.header)
            self.shown = True
        self.last = now
        self._print(f"{text} [{elapsed:.0f}s]")

    def done(self):
        if self.shown:
            self._print(f"loaded in {time.monotonic() - self.t0:.0f}s")


def _counting_load(original, shards, reporter):
    index = {os.path.abspath(p): i for i, p in enumerate(shards)}

    @functools.wraps(original)
    def load(file, *args, **kwargs):
        out = original(file, *args, **kwargs)
        i = index.get(os.path.abspath(os.fspath(file))) if isinstance(file, (str, os.PathLike)) else None
        if i is not None:
            size = os.path.getsize(shards[i])
            reporter.event(f"shard {i + 1}/{len(shards)} read: {os.path.basename(shards[i])} ({_gb(size)})",
                           final=i + 1 == len(shards))
        return out

    return load


def _wrap(original):
    sig = inspect.signature(original)

    @functools.wraps(original)
    def load_model(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        path = bound.arguments.get("model_path")
        lazy = bound.arguments.get("lazy", False)
        if lazy or not _enabled() or _model_type(path) not in _served_model_types():
            return original(*args, **kwargs)

        import mlx.core as mx

        shards = sorted(glob.glob(str(Path(path) / "model*.safetensors")))
        total = sum(os.path.getsize(s) for s in shards)
        rep = Reporter(
            f"loading {_model_type(path)} from {path}: {len(shards)} shard(s), {_gb(total)}", _after()
        )
        bound.arguments["lazy"] = True
        with _lock:  # mx.load is module state; two loads at once share one wrapper
            previous = mx.load
            mx.load = _counting_load(previous, shards, rep)
            try:
                model, config = original(*bound.args, **bound.kwargs)
            finally:
                if getattr(mx.load, "__wrapped__", None) is previous:
                    mx.load = previous
        layers = list(getattr(model, "layers", []) or [])
        for i, layer in enumerate(layers):
            mx.eval(layer.parameters())
            rep.event(f"layer {i + 1}/{len(layers)} read and re-packed", final=i + 1 == len(layers))
        mx.eval(model.parameters())
        rep.done()
        return model, config

    setattr(load_model, _MARK, original)
    return load_model


_module = None


def install(utils_module) -> bool:
    """Wrap ``utils_module.load_model``; idempotent. True if it changed anything."""
    global _module
    current = getattr(utils_module, "load_model", None)
    if current is None or hasattr(current, _MARK):
        return False
    utils_module.load_model = _wrap(current)
    _module = utils_module
    return True


def uninstall() -> bool:
    global _module
    if _module is None:
        return False
    current = getattr(_module, "load_model", None)
    original = getattr(current, _MARK, None)
    if original is not None:
        _module.load_model = original
    _module = None
    return original is not None
