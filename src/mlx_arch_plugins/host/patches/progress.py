"""Progress lines on stderr while a big checkpoint of a plugin architecture loads.

Stock mlx-lm is silent between "start" and "loaded" apart from downloads
(``huggingface_hub.snapshot_download`` already draws its own per-file progress
bars). For a checkpoint of 150+ GB that silence lasts minutes: stock ``load_model``
reads every shard (eagerly where the safetensors shim has to decode dtypes the
installed mlx rejects), then ``sanitize`` may re-pack tensors lazily and
everything is read in one final ``mx.eval(model.parameters())``.

The ``load_model`` patch (``host.patches.utils``) calls ``load(...)`` here for
model types served by a plugin (others go through untouched). It loads lazily,
then evaluates the parameters layer by layer, which computes exactly the same
arrays, and reports:

    [mlx-arch-plugins] loading MODEL_TYPE from DIR: 46 shards, 158.3 GB
    [mlx-arch-plugins] shard 3/46 read: model-00003-of-00046.safetensors (3.4 GB) [12s]
    [mlx-arch-plugins] layer 7/43 read and re-packed [40s]
    [mlx-arch-plugins] loaded in 95s

Nothing is printed for loads faster than ``MLX_ARCH_PLUGINS_PROGRESS_AFTER``
seconds (default 2), at most one line a second is printed after that, and
``MLX_ARCH_PLUGINS_PROGRESS=0`` turns it off. Lazy loads (``lazy=True``, used
by ``mlx_lm.convert`` and sharded loading) are not touched.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from pathlib import Path

ENV_SWITCH = "MLX_ARCH_PLUGINS_PROGRESS"
ENV_AFTER = "MLX_ARCH_PLUGINS_PROGRESS_AFTER"
PREFIX = "[mlx-arch-plugins]"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in (
        "0",
        "false",
        "no",
        "off",
    )


def _after() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV_AFTER, "2")))
    except ValueError:
        return 2.0


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


def _shard_counter(shards, reporter):
    index = {os.path.abspath(p): i for i, p in enumerate(shards)}

    def observe(path):
        i = index.get(os.path.abspath(path))
        if i is not None:
            reporter.event(
                f"shard {i + 1}/{len(shards)} read: {os.path.basename(shards[i])} "
                f"({_gb(os.path.getsize(shards[i]))})",
                final=i + 1 == len(shards),
            )

    return observe


def load(original, bound, model_type):
    """Run ``original`` (stock ``load_model``) with ``bound`` arguments lazily, then
    evaluate the model layer by layer, printing progress lines."""
    import mlx.core as mx

    from . import safetensors_shim

    path = bound.arguments.get("model_path")
    shards = sorted(glob.glob(str(Path(path) / "model*.safetensors")))
    total = sum(os.path.getsize(s) for s in shards)
    rep = Reporter(
        f"loading {model_type} from {path}: {len(shards)} shard(s), {_gb(total)}",
        _after(),
    )
    bound.arguments["lazy"] = True
    with safetensors_shim.observing(_shard_counter(shards, rep)):
        model, config = original(*bound.args, **bound.kwargs)
    layers = list(getattr(model, "layers", []) or [])
    for i, layer in enumerate(layers):
        mx.eval(layer.parameters())
        rep.event(
            f"layer {i + 1}/{len(layers)} read and re-packed",
            final=i + 1 == len(layers),
        )
    mx.eval(model.parameters())
    rep.done()
    return model, config
