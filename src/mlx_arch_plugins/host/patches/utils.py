"""``mlx_lm.utils``: loading and converting plugin checkpoints.

* ``mx.load`` gets the safetensors dtype shim: stock ``load_model`` reads every shard
  before it knows the model, so this is the earliest place.
* ``load_model``: a ``CheckpointError`` raised by a plugin's ``sanitize`` (which sees
  tensors, not files) gets the shard file that holds the tensor; the plugin's cache
  classes become known to ``load_prompt_cache``; big loads print progress
  (``host.patches.progress``).
* ``quantize_model`` / ``dequantize_model`` (``mlx_lm.convert``) call the plugin's
  ``convert_quantize`` / ``convert_dequantize`` declarations.
"""

import functools
import glob
import inspect
import json
import sys
from pathlib import Path

from .. import plugins
from ..errors import CheckpointError
from . import patching, progress, safetensors_shim


def file_of(model_path, tensor):
    """The shard of ``model_path`` that holds ``tensor`` (None if unknown)."""
    index = Path(model_path) / "model.safetensors.index.json"
    try:
        if index.exists():
            name = json.loads(index.read_text()).get("weight_map", {}).get(tensor)
            if name:
                return str(Path(model_path) / name)
        for f in sorted(glob.glob(str(Path(model_path) / "model*.safetensors"))):
            if any(t.name == tensor for t in safetensors_shim.read_header(f)[0]):
                return f
    except Exception:
        return None
    return None


def _after_load(model) -> None:
    cache_module = sys.modules.get("mlx_lm.models.cache")
    module = plugins.module_of_model(model)
    if cache_module is not None and module is not None:
        from . import cache

        cache.register(cache_module, module)


def _make_load_model(original):
    signature = inspect.signature(original)

    @functools.wraps(original)
    def load_model(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # let stock report the bad call
        path = bound.arguments.get("model_path")
        model_type = plugins.model_type_of(path)
        try:
            if (
                model_type in plugins.model_types()
                and progress.enabled()
                and not bound.arguments.get("lazy", False)
            ):
                model, config = progress.load(original, bound, model_type)
            else:
                model, config = original(*bound.args, **bound.kwargs)
        except CheckpointError as e:
            raise e.in_file(file_of(path, e.tensor) or f"the checkpoint in {path}") from None
        _after_load(model)
        return model, config

    return load_model


def _make_dequantize(original):
    @functools.wraps(original)
    def dequantize_model(model):
        model = original(model)
        hook = plugins.declared(plugins.module_of_model(model), "convert_dequantize")
        return hook(model) if hook is not None else model

    return dequantize_model


def _make_quantize(original):
    @functools.wraps(original)
    def quantize_model(model, config, *args, **kwargs):
        hook = plugins.declared(plugins.module_of_model(model), "convert_quantize")
        if hook is not None:
            model, config = hook(model, config)
        return original(model, config, *args, **kwargs)

    return quantize_model


def apply(utils_module) -> None:
    tokenizer_utils = sys.modules.get("mlx_lm.tokenizer_utils")
    if tokenizer_utils is not None:
        from . import tokenizer

        tokenizer.follow(utils_module, tokenizer_utils)
    safetensors_shim.install()
    patching.replace(utils_module, "load_model", _make_load_model)
    patching.replace(utils_module, "quantize_model", _make_quantize)
    patching.replace(utils_module, "dequantize_model", _make_dequantize)


def undo() -> None:
    patching.undo(__name__)
    safetensors_shim.uninstall()
