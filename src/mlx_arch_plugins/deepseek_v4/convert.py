"""``mlx_lm.convert`` of a DeepSeek-V4 checkpoint: the hooks the host calls.

* ``convert_dequantize``: stock ``dequantize_model`` leaves ``QuantizedMultiLinear``
  (the grouped ``wo_a``) quantized; ``-d`` must give a fully dense model.
* ``convert_quantize``: layers that came packed from the official FP8/FP4 format are
  re-quantized to what ``-q`` asks for instead of being kept as they are. Each weight goes
  through one lazy dequantize -> quantize, never a dequantized copy of the whole model.
"""

import mlx.core as mx
from mlx.utils import tree_unflatten
from mlx_lm.models.mla import MultiLinear, QuantizedMultiLinear

# Keys of config.json that describe the official FP8/FP4 packing; gone after -q.
_OFFICIAL_QUANT_KEYS = ("quantization_config", "expert_dtype")


def _dense_multilinear(layer: QuantizedMultiLinear) -> MultiLinear:
    w = mx.dequantize(
        layer.weight,
        layer.scales,
        layer.get("biases"),
        layer.group_size,
        layer.bits,
        mode=layer.mode,
    )
    dense = MultiLinear(w.shape[2], w.shape[1], w.shape[0])
    dense.weight = w
    return dense


def convert_dequantize(model):
    layers = [
        (name, _dense_multilinear(m))
        for name, m in model.named_modules()
        if isinstance(m, QuantizedMultiLinear)
    ]
    if layers:
        model.update_modules(tree_unflatten(layers))
    return model


def convert_quantize(model, config):
    if not getattr(model, "_official_packed", False):
        return model, config
    import mlx_lm.utils

    # The installed dequantize_model: stock, then convert_dequantize above.
    model = mlx_lm.utils.dequantize_model(model)
    model._official_packed = False
    config = {k: v for k, v in config.items() if k not in _OFFICIAL_QUANT_KEYS}
    return model, config
