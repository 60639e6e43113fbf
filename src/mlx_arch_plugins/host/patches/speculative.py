"""Draft models that an architecture brings itself (e.g. a multi-token-prediction
block inside the checkpoint), in the unchanged ``--draft-model`` options.

Two patches, both generic (no architecture is named here):

* ``load`` as ``mlx_lm.generate`` and ``mlx_lm.server`` bound it: when a model was
  loaded before and its model module defines
  ``make_draft_model(model, name, main_path) -> draft or None``, a draft path that
  module accepts (a keyword such as `mtp`) gives that draft object
  and the main model's tokenizer, with no second copy of the weights; any other
  path loads as before.
* ``mlx_lm.generate.speculative_generate_step``: a draft object with its own
  ``speculative_generate_step(prompt, model, draft_model, stream, **kwargs)`` runs
  that; every other draft model runs stock's loop (now also for caches that trim).
"""

from __future__ import annotations

import weakref

from .. import plugins
from . import patching

_last = {}  # "model" -> weakref to the last model loaded, "tokenizer", "path"


def _draft_for(name):
    ref = _last.get("model")
    model = ref() if ref is not None else None
    if model is None:
        return None
    maker = plugins.declared(plugins.module_of_model(model), "make_draft_model")
    if maker is None:
        return None
    draft = maker(model, str(name), _last.get("path"))
    return None if draft is None else (draft, _last["tokenizer"])


def _wrap_load(load):
    def patched_load(path_or_hf_repo, *args, **kwargs):
        if not args and not kwargs.get("return_config"):
            got = _draft_for(path_or_hf_repo)
            if got is not None:
                return got
        out = load(path_or_hf_repo, *args, **kwargs)
        try:
            _last["model"] = weakref.ref(out[0])
            _last["tokenizer"] = out[1]
            _last["path"] = str(path_or_hf_repo)
        except TypeError:  # not weak-referenceable: no draft from it
            pass
        return out

    return patched_load


def _wrap_speculative(stock):
    def speculative_generate_step(prompt, model, draft_model, *args, **kwargs):
        own = getattr(draft_model, "speculative_generate_step", None)
        if own is not None:
            return own(prompt, model, draft_model, *args, **kwargs)
        return stock(prompt, model, draft_model, *args, **kwargs)

    return speculative_generate_step


def apply(module):
    """Patch ``module``: ``mlx_lm.generate`` (load and speculative_generate_step) or
    ``mlx_lm.server`` (load)."""
    if hasattr(module, "load"):
        patching.replace(module, "load", _wrap_load)
    if hasattr(module, "speculative_generate_step"):
        patching.replace(module, "speculative_generate_step", _wrap_speculative)
