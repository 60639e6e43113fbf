"""The few changes stock mlx-lm needs beyond its seams, applied after import.

The start-up hook calls ``on_import(name, module)`` once a listed stock module
has executed. Each step here is idempotent, leaves a way back (``undo_all``),
and is the smallest change that works on every supported mlx-lm version:

* ``mlx_lm.models.cache``: ``load_prompt_cache`` looks cache classes up by name
  in that module, so the DeepSeek-V4 cache classes are added to it.
* ``mlx_lm.utils``: stock ``load_model`` reads every shard with ``mx.load``
  before it knows the model, so the safetensors dtype shim goes in here.
* ``mlx_lm.tokenizer_utils``: DeepSeek-V4's official chat encoding and the
  tokenizer.json fallback (see ``_tokenizer_patch``).
"""

import warnings

_undo = []  # callables that revert what was done, newest last
_done = set()


def _register_caches(cache_module):
    from .models import deepseek_v4_cache as dsc

    added = []
    for cls in (dsc.DeepseekV4Cache, dsc.BatchDeepseekV4Cache):
        if getattr(cache_module, cls.__name__, None) is None:
            setattr(cache_module, cls.__name__, cls)
            added.append(cls.__name__)

    def undo():
        for name in added:
            if hasattr(cache_module, name):
                delattr(cache_module, name)

    _undo.append(undo)


def _install_shim(_utils_module):
    from .formats import safetensors_shim

    if safetensors_shim.install():
        _undo.append(safetensors_shim.uninstall)


def _patch_tokenizer(module):
    from . import _tokenizer_patch

    _tokenizer_patch.apply(module)
    _undo.append(_tokenizer_patch.undo)


_STEPS = {
    "mlx_lm.models.cache": _register_caches,
    "mlx_lm.utils": _install_shim,
    "mlx_lm.tokenizer_utils": _patch_tokenizer,
}


def on_import(name, module):
    step = _STEPS.get(name)
    if step is None or name in _done:
        return
    _done.add(name)
    try:
        step(module)
    except Exception as e:  # never break the user's import
        warnings.warn(f"mlx-arch-plugins: could not prepare {name}: {e}")


def undo_all():
    while _undo:
        try:
            _undo.pop()()
        except Exception as e:
            warnings.warn(f"mlx-arch-plugins: undo failed: {e}")
    _done.clear()
