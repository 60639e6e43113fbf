"""Tokenizer wiring for the model types this package serves.

``apply(module)`` wraps ``mlx_lm.tokenizer_utils.load`` (the one function every
mlx-lm entry point loads tokenizers through). For a checkpoint whose
``config.json`` has a served ``model_type`` (``deepseek_v4``) the wrapper:

1. asks mlx-lm for this package's chat template and tool parser by passing
   ``chat_template_type`` / ``tool_parser_type`` as tokenizer config, which mlx-lm
   0.31 and 0.32 both honour, and which (unlike 0.32's ``TOKENIZER_DEFAULTS``) also
   replaces a Jinja template shipped in the checkpoint;
2. leaves the template alone when the user chose one: a ``chat_template`` passed
   by the caller (``mlx_lm.server --chat-template``, ``load(tokenizer_config=…)``)
   or a ``chat_template_type`` from the caller or the checkpoint's
   ``tokenizer_config.json``;
3. falls back to ``tokenizer_fallback.load_tokenizer`` when transformers'
   ``AutoTokenizer`` cannot build the tokenizer, and takes EOS ids from
   ``generation_config.json`` when the caller gives none.

Other checkpoints go through mlx-lm untouched. ``apply`` is idempotent and
``undo`` restores the original function.
"""

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from . import tokenizer_fallback

__all__ = ["SERVED", "apply", "undo", "served_settings"]

logger = logging.getLogger(__name__)

# model_type -> tokenizer settings (module names under mlx_lm.chat_templates /
# mlx_lm.tool_parsers, provided by this package).
SERVED: Dict[str, Dict[str, str]] = {
    "deepseek_v4": {"chat_template_type": "deepseek_v4", "tool_parser_type": "deepseek_v4"},
}

_MARK = "_mlx_arch_plugins_original"
_patched: Dict[str, Any] = {}


def served_settings(model_path: Any) -> Optional[Dict[str, str]]:
    """This package's tokenizer settings for the checkpoint, or None if not served."""
    try:
        path = Path(model_path)
        config = tokenizer_fallback.read_json(path / "config.json")
    except (TypeError, OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return SERVED.get(config.get("model_type"))


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


def _bind_release(wrapper, model_path) -> None:
    """Default the encoder release to the one the checkpoint's own encoder has.

    Call-time keywords still override it (``chat_template_kwargs`` etc.).
    """
    from ...deepseek_v4 import chat_template as deepseek_v4

    template = getattr(wrapper, "_chat_template", None)
    if template is not deepseek_v4.apply_chat_template:
        return
    release = deepseek_v4.detect_release(model_path)
    if release is not None:
        wrapper._chat_template = functools.partial(template, encoder_release=release)


def _wrap(original, module):
    @functools.wraps(original)
    def load(model_path, tokenizer_config_extra=None, *args, **kwargs):
        settings = served_settings(model_path)
        if settings is None:
            return original(model_path, tokenizer_config_extra, *args, **kwargs)

        extra = dict(tokenizer_config_extra or {})
        file_config = tokenizer_fallback.read_json(Path(model_path) / "tokenizer_config.json") or {}
        user_template = "chat_template" in extra or "chat_template_type" in extra
        if not user_template and "chat_template_type" not in file_config:
            extra["chat_template_type"] = settings["chat_template_type"]
        if "tool_parser_type" not in extra and "tool_parser_type" not in file_config:
            extra["tool_parser_type"] = settings["tool_parser_type"]

        # eos_token_ids is the third positional parameter in 0.31 and 0.32.
        if not args and kwargs.get("eos_token_ids") is None:
            kwargs["eos_token_ids"] = tokenizer_fallback.eos_token_ids(model_path)

        real = module.AutoTokenizer
        module.AutoTokenizer = _FallbackAutoTokenizer(real)
        try:
            wrapper = original(Path(model_path), extra, *args, **kwargs)
        finally:
            module.AutoTokenizer = real
        _bind_release(wrapper, model_path)
        return wrapper

    setattr(load, _MARK, original)
    return load


def apply(module) -> None:
    """Wrap ``module.load`` (``module`` is ``mlx_lm.tokenizer_utils``). Idempotent."""
    if hasattr(module.load, _MARK):
        return
    original = module.load
    wrapped = _wrap(original, module)
    module.load = wrapped
    _patched.update(module=module, original=original, wrapped=wrapped)
    # mlx_lm.utils binds the function at import; rebind it if it already did.
    utils = sys.modules.get("mlx_lm.utils")
    if utils is not None and getattr(utils, "_load_tokenizer", None) is original:
        utils._load_tokenizer = wrapped


def undo() -> None:
    """Restore the original ``load`` (and ``mlx_lm.utils``' reference to it)."""
    module = _patched.pop("module", None)
    original = _patched.pop("original", None)
    wrapped = _patched.pop("wrapped", None)
    if module is None:
        return
    if module.load is wrapped:
        module.load = original
    # mlx_lm.utils may have bound the wrapper, at its import or in apply().
    utils = sys.modules.get("mlx_lm.utils")
    if utils is not None and getattr(utils, "_load_tokenizer", None) is wrapped:
        utils._load_tokenizer = original
