"""The few changes stock mlx-lm needs beyond its seams, applied after import.

The start-up hook calls ``on_import(name, module)`` once a listed stock module
has executed. Each step here is idempotent, leaves a way back (``undo_all``),
and is the smallest change that works on every supported mlx-lm version:

* ``mlx_lm.models.cache``: ``load_prompt_cache`` looks cache classes up by name
  in that module, so the DeepSeek-V4 cache classes are added to it.
* ``mlx_lm.utils``: stock ``load_model`` reads every shard with ``mx.load``
  before it knows the model, so the safetensors dtype shim goes in here; and
  checkpoint errors raised by ``sanitize`` get the shard file added; and
  ``mlx_lm.convert`` learns to (de)quantize official FP8/FP4 layers.
* ``mlx_lm.tokenizer_utils``: DeepSeek-V4's official chat encoding and the
  tokenizer.json fallback (see ``_tokenizer_patch``).
* ``mlx_lm.server``: a malformed or truncated DSML tool block comes back as
  content instead of being dropped (see ``_server_patch``).
"""

import warnings

_undo = []  # callables that revert what was done, newest last
_done = set()


def _register_caches(cache_module):
    from ...deepseek_v4 import cache as dsc

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
    from . import safetensors_shim

    if safetensors_shim.install():
        _undo.append(safetensors_shim.uninstall)


def _file_of(model_path, tensor):
    """The shard of ``model_path`` that holds ``tensor`` (None if unknown)."""
    import glob
    import json
    from pathlib import Path

    from .safetensors_shim import read_header

    index = Path(model_path) / "model.safetensors.index.json"
    try:
        if index.exists():
            name = json.loads(index.read_text()).get("weight_map", {}).get(tensor)
            if name:
                return str(Path(model_path) / name)
        for f in sorted(glob.glob(str(Path(model_path) / "model*.safetensors"))):
            if any(t.name == tensor for t in read_header(f)[0]):
                return f
    except Exception:
        return None
    return None


def _name_files_in_errors(utils_module):
    """``sanitize`` knows the tensor a problem is about, not its file:
    ``load_model`` adds the file to DeepSeek-V4 checkpoint errors."""
    from ...deepseek_v4.checkpoint import CheckpointError

    original = utils_module.load_model

    def load_model(model_path, *args, **kwargs):
        try:
            return original(model_path, *args, **kwargs)
        except CheckpointError as e:
            where = _file_of(model_path, e.tensor) or f"the checkpoint in {model_path}"
            raise CheckpointError(e.tensor, f"{e.args[0].split(': ', 1)[1]} (in {where})") from None

    load_model.__wrapped__ = original
    load_model.__doc__ = original.__doc__
    utils_module.load_model = load_model

    def undo():
        if utils_module.load_model is load_model:
            utils_module.load_model = original

    _undo.append(undo)


def _is_dsv4(model):
    return getattr(model, "model_type", None) == "deepseek_v4"


def _dequantize_multilinear(model):
    """Stock ``dequantize_model`` skips ``QuantizedMultiLinear`` (wo_a)."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear

    layers = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedMultiLinear):
            w = mx.dequantize(
                m.weight, m.scales, m.get("biases"), m.group_size, m.bits, mode=m.mode
            )
            dense = MultiLinear(w.shape[2], w.shape[1], w.shape[0])
            dense.weight = w
            layers.append((name, dense))
    if layers:
        model.update_modules(tree_unflatten(layers))
    return model


def _convert_support(utils_module):
    """``mlx_lm.convert`` of a DeepSeek-V4 checkpoint: ``--dequantize`` also
    dequantizes the grouped ``wo_a``; ``-q`` re-quantizes layers that came
    packed from the official FP8/FP4 format instead of keeping them as they
    are (each weight goes through one lazy dequantize -> quantize, never a
    dequantized copy of the model)."""
    orig_quantize = utils_module.quantize_model
    orig_dequantize = utils_module.dequantize_model

    def dequantize_model(model):
        model = orig_dequantize(model)
        return _dequantize_multilinear(model) if _is_dsv4(model) else model

    def quantize_model(model, config, *args, **kwargs):
        if _is_dsv4(model) and getattr(model, "_official_packed", False):
            model = dequantize_model(model)
            model._official_packed = False
            config = {
                k: v
                for k, v in config.items()
                if k not in ("quantization_config", "expert_dtype")
            }
        return orig_quantize(model, config, *args, **kwargs)

    for fn, orig in ((quantize_model, orig_quantize), (dequantize_model, orig_dequantize)):
        fn.__wrapped__ = orig
        fn.__doc__ = orig.__doc__
    utils_module.quantize_model = quantize_model
    utils_module.dequantize_model = dequantize_model

    def undo():
        if utils_module.quantize_model is quantize_model:
            utils_module.quantize_model = orig_quantize
        if utils_module.dequantize_model is dequantize_model:
            utils_module.dequantize_model = orig_dequantize

    _undo.append(undo)


def _prepare_utils(utils_module):
    _install_shim(utils_module)
    _name_files_in_errors(utils_module)
    _convert_support(utils_module)


def _patch_tokenizer(module):
    from . import tokenizer as _tokenizer_patch

    _tokenizer_patch.apply(module)
    _undo.append(_tokenizer_patch.undo)


def _patch_server(module):
    from . import server as _server_patch

    _server_patch.apply(module)
    _undo.append(_server_patch.undo)


def _show_load_progress():
    """Progress lines while a big checkpoint of ours loads (see progress.py)."""
    import mlx_lm.utils

    from . import progress

    if progress.install(mlx_lm.utils):
        _undo.append(progress.uninstall)


_STEPS = {
    "mlx_lm.models.cache": _register_caches,
    "mlx_lm.utils": _prepare_utils,
    "mlx_lm.tokenizer_utils": _patch_tokenizer,
    "mlx_lm.server": _patch_server,
    # mlx_lm/__init__ imports convert right after utils on every supported
    # version, so this runs once utils is complete (its key is taken above).
    "mlx_lm.convert": lambda _m: _show_load_progress(),
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
