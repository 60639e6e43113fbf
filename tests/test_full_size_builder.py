"""benchmarks/full_size.py's builder at DeepSeek-V4-Flash's true shapes, on CPU.

The builder's graph is lazy, so the real sizes (256 experts: one stacked expert
projection is 2^31 elements) are checked here through shapes alone, without making
the weights: every quantized layer gets arrays of exactly its own shapes and dtypes,
made from random tensors no larger than the chunk bound (MLX CUDA fails on a random
tensor above 2^31 elements)."""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import full_size  # noqa: E402  (after the path insert above)


def _lazy_flash_layer(fmt):
    """One Flash layer (a CSA one, hash-routed) and the MTP block, nothing evaluated."""
    import mlx.nn as nn

    from mlx_arch_plugins.deepseek_v4 import model as dsv4

    cfg = full_size.config(layers=1, experts=None, small=False)
    args = dsv4.ModelArgs.from_dict(dict(cfg, compress_ratios=[4, 0]))
    model = dsv4.Model(args)
    own = model.quant_predicate

    def pred(path, m):
        q = full_size.quant_spec(fmt, path, m, own)
        return {"group_size": q[0], "bits": q[1], "mode": q[2]} if q else False

    nn.quantize(model, class_predicate=pred)
    return model, args


@pytest.mark.parametrize("fmt", ["affine2", "official"])
def test_every_layer_gets_its_own_shapes_from_bounded_chunks(monkeypatch, fmt):
    model, args = _lazy_flash_layer(fmt)
    assert args.n_routed_experts == 256 and args.vocab_size == 129280
    sizes = []
    uniform = mx.random.uniform

    def recorded(*a, **k):
        out = uniform(*a, **k)
        sizes.append(out.size)
        return out

    monkeypatch.setattr(full_size.mx.random, "uniform", recorded)
    modules = full_size._quantized_modules(model)
    largest = 0
    for name, m in modules:
        made = full_size.true_weights(m, name, seed=0)
        want = [m.weight, m.scales] + ([m.biases] if "biases" in m else [])
        assert [a.shape for a in made] == [a.shape for a in want], name
        # as a conversion of BF16 weights: BF16 affine scales, E8M0 (uint8) mx scales
        scale_dtype = mx.bfloat16 if len(made) == 3 else mx.uint8
        assert [a.dtype for a in made] == [mx.uint32] + [scale_dtype] * (len(made) - 1), name
        largest = max(largest, m.weight.size * 32 // m.bits)
    assert largest == 2**31  # a stacked expert projection: 256 x 2048 x 4096
    assert max(sizes) <= full_size.CHUNK_ELEMENTS < 2**31
    kinds = {(m.bits, getattr(m, "mode", "affine")) for _, m in modules}
    if fmt == "official":
        assert kinds == {(4, "mxfp4"), (8, "mxfp8")}
    else:
        assert kinds == {(2, "affine")}


def test_weights_are_keyed_by_name():
    """A rank that builds only its slice gets the values one process builds: the
    random stream depends on the tensor's name and seed alone, not on the order."""
    model, _ = full_size.build("affine4", layers=2, experts=8, small=True)
    (name, m), (other, _) = full_size._quantized_modules(model)[:2]
    first = full_size.true_weights(m, name, seed=0)
    again = full_size.true_weights(m, name, seed=0)
    renamed = full_size.true_weights(m, other, seed=0)
    reseeded = full_size.true_weights(m, name, seed=1)
    np.testing.assert_array_equal(np.array(first[0]), np.array(again[0]))
    np.testing.assert_array_equal(np.array(first[0]), np.array(m.weight))
    assert not np.array_equal(np.array(first[0]), np.array(renamed[0]))
    assert not np.array_equal(np.array(first[0]), np.array(reseeded[0]))
