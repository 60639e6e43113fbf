"""What the host may ask of an architecture, and where it finds the answers.

An architecture is the module registered in the ``mlx_arch_plugins.models`` entry-point
group (served as ``mlx_lm.models.<model_type>``). Besides stock mlx-lm's model-file
contract (``ModelArgs``, ``Model``) it may declare, at module level:

``TOKENIZER_DEFAULTS``
    ``{"chat_template_type": ..., "tool_parser_type": ...}``: the chat template and tool
    parser this architecture's checkpoints use. Applied by the tokenizer patch on every
    supported mlx-lm, also over a Jinja template shipped in the checkpoint, unless the
    user or the checkpoint's ``tokenizer_config.json`` chose one. Checkpoints of such an
    architecture also get the ``tokenizer.json`` fallback and EOS ids from
    ``generation_config.json``.
``chat_template_defaults(model_path) -> dict``
    Keyword defaults bound to that chat template for one checkpoint (call-time keywords
    still win).
``CACHE_CLASSES``
    Cache classes that ``mlx_lm.models.cache.load_prompt_cache`` must find by name.
``convert_dequantize(model) -> model``
    Run after stock ``dequantize_model`` (``mlx_lm.convert -d``) for layers stock does
    not know.
``convert_quantize(model, config) -> (model, config)``
    Run before stock ``quantize_model`` (``mlx_lm.convert -q``).
``make_draft_model(model, name, main_path) -> draft or None``
    A draft model the architecture brings itself (``--draft-model NAME``), e.g. a
    multi-token-prediction block sharing the main model's weights; the draft object may
    have its own ``speculative_generate_step``.
``TINY_BUILDER``
    Name of a module that writes tiny random checkpoints (``make-tiny``, ``demo``).
``selftest(report)``
    ``mlx-arch-plugins doctor --selftest``: checks this machine computes the right thing,
    calling ``report(check, ok, detail)`` once per check (an exception is a failed check).

Everything here is optional; a plugin that declares nothing gets stock behaviour.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

from . import hook

MODELS_GROUP = hook.GROUPS["mlx_lm.models"]


def model_type_of(model_path) -> Optional[str]:
    """``model_type`` of the checkpoint folder's config.json (None when unreadable)."""
    try:
        with open(Path(model_path) / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (TypeError, OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def model_types() -> list:
    """Model types registered by plugins (whether or not they import)."""
    return sorted(hook.registered()[MODELS_GROUP])


def registered_module_name(model_type: str) -> str:
    """The module a plugin registered for ``model_type`` (whether or not the host is on)."""
    eps = hook.registered()[MODELS_GROUP].get(model_type)
    if not eps:
        raise ModuleNotFoundError(f"no plugin registers the model type {model_type!r}")
    return eps[0].module


def module_for(model_type: Optional[str]):
    """The plugin module serving ``mlx_lm.models.<model_type>``, imported, or None when
    no plugin serves it (unregistered, stock, not allowed, host disabled)."""
    if not model_type or model_type not in hook.registered()[MODELS_GROUP]:
        return None
    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ModuleNotFoundError:
        return None  # host off or name not allowed: mlx-lm sees no such module either
    return module if is_plugin_module(module) else None


def is_plugin_module(module) -> bool:
    """True for a module registered in the models group (not a stock mlx-lm module)."""
    name = getattr(module, "__name__", None)
    return any(ep.module == name for eps in hook.registered()[MODELS_GROUP].values() for ep in eps)


def module_of_model(model) -> Any:
    """The plugin module that defines ``type(model)``, or None for stock models."""
    module = sys.modules.get(type(model).__module__)
    return module if module is not None and is_plugin_module(module) else None


def declared(module, name: str, default=None):
    return getattr(module, name, default) if module is not None else default


def imported_modules() -> Iterator[Any]:
    """Every plugin model module that imports (a broken one is skipped: its own import
    error reaches the user when mlx-lm asks for it)."""
    for model_type in model_types():
        try:
            module = module_for(model_type)
        except ImportError:
            continue
        if module is not None:
            yield module
