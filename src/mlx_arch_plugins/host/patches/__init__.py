"""Patches of stock mlx-lm, each applied right after its stock module has executed.

The start-up hook calls ``on_import(name, module)`` once for each module it watches
(``host.hook.PATCHED``). Each step lives in its own module here, named after what it
touches, and changes attributes only through ``patching`` (one record of what was
replaced; ``undo_all`` restores it all):

* ``cache``: ``mlx_lm.models.cache.load_prompt_cache`` finds plugin cache classes;
  ``prompt_cache``: the server's prompt-cache reuse copes with caches that trim a bounded
  tail only.
* ``utils``: ``mlx_lm.utils``: the ``mx.load`` shim (``safetensors_shim``), shard files in
  checkpoint errors, load progress (``progress``), convert hooks.
* ``tokenizer``: ``mlx_lm.tokenizer_utils.load``: plugin chat templates and tool parsers,
  the ``tokenizer.json`` fallback (``tokenizer_fallback``).
* ``server``: ``mlx_lm.server``: a bad request gets 400 naming the field (before it reaches
  the generation thread); malformed tool-call text is kept as content.
* ``speculative``: ``mlx_lm.generate`` / ``mlx_lm.server``: draft models an architecture
  brings itself (``--draft-model``), and its own speculative loop.

Every step is idempotent and a failing step only warns: a user's import never breaks.
"""

import importlib
import warnings

from . import patching

# stock module -> the modules here whose apply(stock_module) prepare it, in order
STEPS = {
    "mlx_lm.models.cache": ("cache", "prompt_cache"),
    "mlx_lm.utils": ("utils",),
    "mlx_lm.tokenizer_utils": ("tokenizer",),
    "mlx_lm.generate": ("speculative",),
    "mlx_lm.server": ("server", "speculative"),
}

_done = set()


def on_import(name, module):
    steps = STEPS.get(name)
    if steps is None or name in _done:
        return
    _done.add(name)
    for step in steps:
        try:
            importlib.import_module(f"{__name__}.{step}").apply(module)
        except Exception as e:  # never break the user's import
            warnings.warn(f"mlx-arch-plugins: could not prepare {name} ({step}): {e}")


def undo_all():
    for where in patching.undo_all():
        warnings.warn(f"mlx-arch-plugins: left {where} as it is: changed by someone else")
    _done.clear()
