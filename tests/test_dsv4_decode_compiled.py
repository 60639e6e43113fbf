"""Single-sequence decode steps run the cache-free parts of each block (and
the output head) as compiled graphs; ``MLX_ARCH_PLUGINS_COMPILE=0`` runs them
eagerly. Both must give the same logits (batches stay eager; the packed batch
test in test_dsv4_cache.py compares them with compiled single runs), and the
routed experts' cached row indices must give what mlx-lm's layer gives.

Runs on the default device (also on the H200: ``PYTHONPATH=src python3 -m
pytest tests/test_dsv4_decode_compiled.py``)."""

import os

import mlx.core as mx
import numpy as np
import pytest
from helpers.dsv4_golden import inputs, load_case
from mlx_lm.models.cache import make_prompt_cache

from mlx_arch_plugins.deepseek_v4 import model as dsv4

pytestmark = pytest.mark.compat


def _decode(model, prompt, steps, compiled):
    old = os.environ.get("MLX_ARCH_PLUGINS_COMPILE")
    os.environ["MLX_ARCH_PLUGINS_COMPILE"] = "1" if compiled else "0"
    try:
        cache = make_prompt_cache(model)
        model(mx.array([prompt]), cache=cache)
        return np.stack(
            [np.array(model(mx.array([[t]]), cache=cache)[0, 0].astype(mx.float32)) for t in steps]
        )
    finally:
        if old is None:
            os.environ.pop("MLX_ARCH_PLUGINS_COMPILE")
        else:
            os.environ["MLX_ARCH_PLUGINS_COMPILE"] = old


@pytest.mark.parametrize("case,fmt", [("a_swa_csa_hash_mtp", "fp8"), ("b_hca_long", "bf16")])
def test_compiled_decode_equals_eager(case, fmt):
    model = load_case(case, fmt)
    prompt, decode = inputs(case)
    # long enough to cross compressor block ends (and CSA selection in b)
    steps = (decode * 12)[:12]
    eager = _decode(model, prompt, steps, compiled=False)
    comp = _decode(model, prompt, steps, compiled=True)
    assert "_compiled" in model.model.layers[0].__dict__  # the compiled path ran
    np.testing.assert_allclose(comp, eager, atol=1e-4, rtol=0)


def test_expert_row_indices_match_the_layer():
    model = load_case("a_swa_csa_hash_mtp", "fp8")
    mlp = model.model.layers[-1].ffn.switch_mlp
    assert "scales" in mlp.gate_proj  # quantized: the cached-index path
    mx.random.seed(0)
    D = mlp.gate_proj.weight.shape[-1] * 32 // mlp.gate_proj.bits
    n_exp = mlp.gate_proj.weight.shape[0]
    for shape in ((1, 1), (3, 1), (2, 5)):
        x = mx.random.normal((*shape, 1, 1, D)).astype(mx.bfloat16)
        idx = mx.random.randint(0, n_exp, (*shape, 2)).astype(mx.uint32)
        want = mlp.gate_proj(x, idx)
        got = dsv4._experts(mlp.gate_proj, x, idx, False)
        assert got.shape == want.shape
        assert mx.array_equal(got, want)


def test_indexer_head_sum_compiled_shapeless_equals_eager():
    """The compiled (shapeless) indexer head sum is reused as the entry count grows
    and for prefill blocks: bit-equal to the eager expression at every shape."""
    from mlx_arch_plugins.deepseek_v4.model import _relu_weighted_sum

    keys = iter(mx.random.split(mx.random.key(7), 12))
    for shape in [(1, 1, 4, 5), (1, 1, 4, 6), (1, 7, 4, 9), (2, 3, 4, 33), (1, 1, 4, 5)]:
        dots = mx.random.normal(shape, key=next(keys)).astype(mx.bfloat16)
        w = mx.random.normal((*shape[:3], 1), key=next(keys))
        eager = (mx.maximum(dots.astype(mx.float32), 0) * w).sum(2)
        got = _relu_weighted_sum(dots, w)
        assert got.shape == shape[:2] + shape[3:] and mx.array_equal(got, eager).item()
