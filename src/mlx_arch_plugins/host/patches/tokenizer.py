"""Tokenizer wiring for the model types plugins serve.

``apply(module)`` wraps ``mlx_lm.tokenizer_utils.load`` (the one function every mlx-lm
entry point loads tokenizers through). For a checkpoint whose ``config.json`` has a
``model_type`` served by a plugin that declares ``TOKENIZER_DEFAULTS`` the wrapper:

1. asks mlx-lm for the plugin's chat template and tool parser by passing
   ``chat_template_type`` / ``tool_parser_type`` as tokenizer config, which mlx-lm 0.31
   and 0.32 both honour, and which (unlike 0.32's own reading of ``TOKENIZER_DEFAULTS``)
   also replaces a Jinja template shipped in the checkpoint;
2. leaves the template alone when the user chose one: a ``chat_template`` passed by the
   caller (``mlx_lm.server --chat-template``, ``load(tokenizer_config=...)``) or a
   ``chat_template_type`` from the caller or the checkpoint's ``tokenizer_config.json``;
3. binds the plugin's ``chat_template_defaults(model_path)`` to that template;
4. falls back to ``tokenizer_fallback.load_tokenizer`` when transformers'
   ``AutoTokenizer`` cannot build the tokenizer, and takes EOS ids from
   ``generation_config.json`` when the caller gives none.

Other checkpoints go through mlx-lm untouched. ``apply`` is idempotent and ``undo``
restores the original function.
"""

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from .. import plugins
from . import patching, tokenizer_fallback

__all__ = ["apply", "undo", "served_settings"]

logger = logging.getLogger(__name__)


def _plugin_for(model_path: Any):
    return plugins.module_for(plugins.model_type_of(model_path))


def served_settings(model_path: Any) -> Optional[Dict[str, str]]:
    """The plugin's tokenizer settings for the checkpoint, or None if not served."""
    defaults = plugins.declared(_plugin_for(model_path), "TOKENIZER_DEFAULTS")
    return dict(defaults) if isinstance(defaults, dict) else None


class _FallbackAutoTokenizer:
    """Stands in for AutoTokenizer during one load of a served checkpoint."""

    def __init__(self, real):
        self._real = real

    def from_pretrained(self, path, *args, **kwargs):
        try:
            return self._real.from_pretrained(path, *args, **kwargs)
        except Exception as e:
            logger.warning(
                "transformers could not build the tokenizer of %s (%s: %s); "
                "loading tokenizer.json directly",
                path,
                type(e).__name__,
                e,
            )
            try:
                return tokenizer_fallback.load_tokenizer(path, **kwargs)
            except Exception as fallback_error:
                raise fallback_error from e

    def __getattr__(self, name):
        return getattr(self._real, name)


def _bind_template_defaults(wrapper, model_path, template_type) -> None:
    """Bind the plugin's per-checkpoint keyword defaults to its own chat template
    (only when that template is the one in use; call-time keywords still override)."""
    defaults_for = plugins.declared(_plugin_for(model_path), "chat_template_defaults")
    template = getattr(wrapper, "_chat_template", None)
    served = sys.modules.get(f"mlx_lm.chat_templates.{template_type}")
    if defaults_for is None or template is None:
        return
    if template is not getattr(served, "apply_chat_template", None):
        return
    defaults = defaults_for(model_path)
    if defaults:
        wrapper._chat_template = functools.partial(template, **defaults)


def _wrap(original, module):
    @functools.wraps(original)
    def load(model_path, tokenizer_config_extra=None, *args, **kwargs):
        settings = served_settings(model_path)
        if settings is None:
            return original(model_path, tokenizer_config_extra, *args, **kwargs)

        extra = dict(tokenizer_config_extra or {})
        file_config = tokenizer_fallback.read_json(Path(model_path) / "tokenizer_config.json") or {}
        user_template = "chat_template" in extra or "chat_template_type" in extra
        for key in ("chat_template_type", "tool_parser_type"):
            chosen = user_template if key == "chat_template_type" else key in extra
            if key in settings and not chosen and key not in file_config:
                extra[key] = settings[key]

        # eos_token_ids is the third positional parameter in 0.31 and 0.32.
        if not args and kwargs.get("eos_token_ids") is None:
            kwargs["eos_token_ids"] = tokenizer_fallback.eos_token_ids(model_path)

        fallback = _FallbackAutoTokenizer(module.AutoTokenizer)
        with patching.temporarily(module, "AutoTokenizer", fallback):
            wrapper = original(Path(model_path), extra, *args, **kwargs)
        _bind_template_defaults(wrapper, model_path, settings.get("chat_template_type"))
        return wrapper

    return load


def apply(module) -> None:
    """Wrap ``module.load`` (``module`` is ``mlx_lm.tokenizer_utils``). Idempotent."""
    patching.replace(module, "load", lambda original: _wrap(original, module))
    utils = sys.modules.get("mlx_lm.utils")
    if utils is not None:
        follow(utils, module)


def follow(utils, module) -> None:
    """``mlx_lm.utils`` imports ``load`` by name as ``_load_tokenizer``, before or after
    the patch: make it follow the patch, and its undo."""
    wrapped = module.load
    if patching.is_patched(module, "load"):
        patching.rebind(utils, "_load_tokenizer", patching.original(wrapped), wrapped, __name__)


def undo(module=None) -> None:
    """Restore the original ``load`` (and ``mlx_lm.utils``' reference to it); only on
    ``module`` when given."""
    patching.undo(__name__, module)
