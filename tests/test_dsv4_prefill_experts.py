"""Prefill through dequantized weights where a backend's quantized kernels are slow.

Routed experts: where a backend's quantized gather is slow for many rows (MLX CUDA), the
experts are dequantized a chunk at a time and the rows, in tiles of one expert each, go
through gather_mm. Dense linears (``linear``): from a row threshold on, the weight is dequantized
and a plain matmul runs. The CPU keeps the quantized kernels by default; these tests force
the other paths (``MLX_ARCH_PLUGINS_DEQUANT_ROWS``) and hold them to the same references.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers.dsv4_golden import CASES, expected, fp32_checks, inputs, load_case, run_protocol
from mlx_lm.models.cache import make_prompt_cache

from mlx_arch_plugins.deepseek_v4 import model as dsv4

pytestmark = pytest.mark.compat


@pytest.fixture
def dequant_calls(monkeypatch):
    """Counts mx.dequantize calls made by the chunked expert path."""
    calls = []
    real = mx.dequantize

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(mx, "dequantize", spy)
    return calls


def _prefill(model, case):
    prompt, _ = inputs(case)
    return np.array(model(mx.array([prompt]), cache=make_prompt_cache(model))[0])


@pytest.mark.parametrize("case", CASES)
def test_official_experts_meet_the_golden_checks(case, monkeypatch, dequant_calls):
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "1")
    model = load_case(case, "fp8")  # routed experts in mxfp4
    pre, dec, _ = run_protocol(model, case)
    assert dequant_calls, "the chunked path did not run"
    exp = expected(case, "fp8")
    want = np.concatenate([np.array(exp["prefill_logits"]), np.array(exp["decode_logits"])])
    maxdev = np.concatenate(
        [np.array(exp["perturbation_maxdev_prefill"]), np.array(exp["perturbation_maxdev_decode"])]
    )
    within, mean, top1 = fp32_checks(np.concatenate([pre, dec]), want, maxdev)
    assert within >= 0.98 and mean <= 1e-2 and top1 >= 0.97


@pytest.mark.parametrize("case", CASES[:2])
def test_affine_experts_equal_gather_qmm(case, monkeypatch, dequant_calls):
    model = load_case(case, "bf16")
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda path, m: "switch_mlp" in path and hasattr(m, "to_quantized"),
    )
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "0")  # never: gather_qmm
    stock = _prefill(model, case)
    assert not dequant_calls
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "1")
    chunked = _prefill(model, case)
    assert dequant_calls
    np.testing.assert_allclose(chunked, stock, atol=1e-4, rtol=0)
    # one expert per chunk: the same rows meet the same weights, bit for bit
    calls = len(dequant_calls)
    monkeypatch.setattr(dsv4, "_DEQUANT_CHUNK_BYTES", 1)
    assert np.array_equal(_prefill(model, case), chunked)
    assert len(dequant_calls) - calls > calls  # more, smaller chunks


def test_below_the_threshold_gather_qmm_stays(monkeypatch, dequant_calls):
    case = CASES[0]
    model = load_case(case, "fp8")
    rows = len(inputs(case)[0]) * model.args.num_experts_per_tok
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", str(rows + 1))
    _prefill(model, case)
    assert not dequant_calls


def test_threshold_table_is_per_backend_and_mode(monkeypatch):
    monkeypatch.delenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", raising=False)
    monkeypatch.setattr(dsv4, "_backend", lambda: "cuda")
    assert dsv4._dequant_rows("affine") == dsv4.DEQUANT_ROWS[("cuda", "affine")]
    assert dsv4._dequant_rows("mxfp4") == dsv4.DEQUANT_ROWS[("cuda", "mxfp4")]
    assert dsv4._dequant_rows("mxfp8") is None  # no routed experts in mxfp8 measured
    monkeypatch.setattr(dsv4, "_backend", lambda: "metal")
    assert dsv4._dequant_rows("affine") is None  # no measurement: stock kernels
    assert dsv4._dequant_rows("mxfp4") is None
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "7")
    assert dsv4._dequant_rows("mxfp4") == 7


def test_official_experts_take_tiles_on_cuda_from_the_threshold(monkeypatch):
    """The official format's mxfp4 experts: on MLX CUDA a prefill-sized chunk of routed
    rows takes the tiled path, a decode step or a short prompt keeps gather_qmm; on
    Metal and the CPU every size keeps it."""
    monkeypatch.delenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", raising=False)
    model = load_case(CASES[0], "fp8")
    experts = model.layers[0].ffn.switch_mlp
    assert experts.gate_proj.mode == "mxfp4"
    k = model.args.num_experts_per_tok
    threshold = dsv4.DEQUANT_ROWS[("cuda", "mxfp4")]
    at, below = -(-threshold // k), threshold // k - 1  # tokens on either side
    monkeypatch.setattr(dsv4, "_backend", lambda: "cuda")
    assert experts.tiled(mx.zeros((1, at, k), mx.uint32))
    assert not experts.tiled(mx.zeros((1, below, k), mx.uint32))
    assert not experts.tiled(mx.zeros((8, 1, k), mx.uint32))  # a batch-8 decode step
    for backend in ("metal", "cpu"):
        monkeypatch.setattr(dsv4, "_backend", lambda backend=backend: backend)
        assert not experts.tiled(mx.zeros((1, at, k), mx.uint32))


def _quantized_pair(mode="affine"):
    """A quantized Linear and a quantized mlx-lm MultiLinear (the two dense kinds)."""
    from mlx_lm.models.mla import MultiLinear

    dense, multi = nn.Linear(64, 48, bias=False), MultiLinear(32, 16, 3)
    kw = dict(group_size=32, bits=4) if mode == "affine" else dict(group_size=32, bits=8)
    return dense.to_quantized(mode=mode, **kw), multi.to_quantized(mode=mode, **kw)


@pytest.mark.parametrize("mode", ["affine", "mxfp8"])
def test_dense_linears_above_the_threshold_use_the_dequantized_weight(
    mode, monkeypatch, dequant_calls
):
    dense, multi = _quantized_pair(mode)
    x = mx.random.normal((1, 9, 64), key=mx.random.key(1))
    xm = mx.random.normal((1, 3, 9, 32), key=mx.random.key(2))
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "10")  # 9 rows: quantized kernels
    for layer, inp in ((dense, x), (multi, xm)):
        assert np.array_equal(np.array(dsv4.linear(layer, inp)), np.array(layer(inp)))
    assert not dequant_calls
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "9")
    for layer, inp in ((dense, x), (multi, xm)):
        got = dsv4.linear(layer, inp)
        assert got.shape == layer(inp).shape
        np.testing.assert_allclose(np.array(got), np.array(layer(inp)), atol=1e-4, rtol=1e-4)
    assert len(dequant_calls) == 2


def test_a_linear_subclass_keeps_its_own_call(monkeypatch, dequant_calls):
    """A subclass may do more than the product (a sharded linear sums across devices):
    only the exact quantized classes are taken apart."""
    dense, _ = _quantized_pair()

    class Doubled(nn.QuantizedLinear):
        def __call__(self, x):
            return 2 * super().__call__(x)

    doubled = Doubled(64, 48, bias=False, group_size=32, bits=4)
    doubled.update(dense.parameters())
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "1")
    x = mx.random.normal((5, 64), key=mx.random.key(3))
    assert np.array_equal(np.array(dsv4.linear(doubled, x)), np.array(2 * dense(x)))
    assert not dequant_calls


def test_dense_threshold_table_is_per_backend_and_mode(monkeypatch):
    monkeypatch.delenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", raising=False)
    monkeypatch.setattr(dsv4, "_backend", lambda: "cuda")
    for mode in ("affine", "mxfp8"):  # measured on the H200
        assert dsv4._dense_dequant_rows(mode) == dsv4.DENSE_DEQUANT_ROWS[("cuda", mode)]
    assert dsv4._dense_dequant_rows("mxfp4") is None  # not measured for dense linears
    for backend in ("metal", "cpu"):  # no measurement: stock kernels
        monkeypatch.setattr(dsv4, "_backend", lambda: backend)
        assert dsv4._dense_dequant_rows("affine") is None
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "0")  # never
    monkeypatch.setattr(dsv4, "_backend", lambda: "cuda")
    assert dsv4._dense_dequant_rows("affine") is None


@pytest.mark.parametrize("case", CASES[:1])
def test_whole_affine_model_with_dense_dequant_equals_quantized_kernels(
    case, monkeypatch, dequant_calls
):
    """Every linear quantized: the prefill through dequantized weights (dense and
    routed) gives the quantized kernels' logits."""
    model = load_case(case, "bf16")
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0,
    )
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "0")
    stock = _prefill(model, case)
    # 2-D weights: dense linears (the quantized embedding's rows come as [B, L, packed])
    assert not [shape for shape in dequant_calls if len(shape) == 2]
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "1")
    dequantized = _prefill(model, case)
    dense = [shape for shape in dequant_calls if len(shape) == 2]
    # per layer at least the attention's wq_a, wq_b, wkv, wo_b and the shared expert's 3
    assert len(dense) >= 7 * model.args.num_hidden_layers
    np.testing.assert_allclose(dequantized, stock, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rows", [1, 4, 64])
@pytest.mark.parametrize("skewed", [False, True])
def test_expert_tiles_put_every_row_once_in_a_tile_of_its_expert(rows, skewed):
    rng = np.random.default_rng(rows)
    E, R = 16, 600
    p = 1.0 / np.arange(1, E + 1) ** (2.0 if skewed else 0.0)
    flat = rng.choice(E, size=R, p=p / p.sum())  # skewed: some experts get no row
    plan = dsv4._ExpertTiles(flat.astype(np.uint32), E, rows)
    counts = np.bincount(flat, minlength=E)
    assert len(plan.expert) == int(np.sum(-(-counts // rows)))
    assert len(plan.row) == len(plan.expert) * rows
    # each flat row sits in exactly one slot, and that slot names it
    assert np.array_equal(plan.row[plan.back], np.arange(R))
    assert len(np.unique(plan.back)) == R
    # every slot, padding included, holds a row of its tile's expert
    assert np.array_equal(flat[plan.row], np.repeat(plan.expert, rows))
    # expert e's tiles are first_tile[e]:first_tile[e + 1], in expert order
    for e in range(E):
        t0, t1 = plan.first_tile[e], plan.first_tile[e + 1]
        assert np.all(plan.expert[t0:t1] == e) and t1 - t0 == -(-counts[e] // rows)


def test_tile_size_changes_nothing_but_rounding(monkeypatch):
    """Tiles of one row (every row its own product) and of 64 rows give the same output."""
    case = CASES[0]
    model = load_case(case, "bf16")
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda path, m: "switch_mlp" in path and hasattr(m, "to_quantized"),
    )
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", "1")
    monkeypatch.setattr(dsv4, "_TILE_ROWS", 1)
    one = _prefill(model, case)
    monkeypatch.setattr(dsv4, "_TILE_ROWS", 64)
    np.testing.assert_allclose(_prefill(model, case), one, atol=1e-5, rtol=0)


def test_dequantize_kernels_take_only_what_they_decode(monkeypatch):
    """The CUDA dequantize kernels' guards, checked on the CPU: off without MLX CUDA or
    with MLX_ARCH_PLUGINS_FUSED=0, and, on CUDA, only for the modes, widths, group sizes
    and output types they were checked bit for bit against mx.dequantize."""
    from mlx_arch_plugins.deepseek_v4 import kernels

    biases = mx.zeros((1,))
    assert not kernels.cuda_enabled()  # this machine's CPU backend
    assert not kernels.dequant_enabled("affine", 4, mx.bfloat16, biases)
    assert not kernels.mx_dequant_enabled("mxfp4", 4, 32, mx.bfloat16)
    monkeypatch.setattr(kernels, "cuda_enabled", lambda: True)
    assert kernels.dequant_enabled("affine", 4, mx.bfloat16, biases)
    assert kernels.dequant_enabled("affine", 2, mx.float16, biases)
    assert kernels.dequant_enabled("affine", 8, mx.bfloat16, biases)
    for bits in (3, 5, 6):  # packs that straddle 32-bit words
        assert not kernels.dequant_enabled("affine", bits, mx.bfloat16, biases)
    assert not kernels.dequant_enabled("affine", 4, mx.float32, biases)
    assert not kernels.dequant_enabled("affine", 4, mx.bfloat16, None)
    assert not kernels.dequant_enabled("mxfp4", 4, mx.bfloat16, None)
    assert kernels.mx_dequant_enabled("mxfp4", 4, 32, mx.bfloat16)
    assert kernels.mx_dequant_enabled("mxfp8", 8, 32, mx.float16)
    assert not kernels.mx_dequant_enabled("mxfp4", 8, 32, mx.bfloat16)
    assert not kernels.mx_dequant_enabled("nvfp4", 4, 16, mx.bfloat16)  # e4m3 scales
    assert not kernels.mx_dequant_enabled("mxfp4", 4, 32, mx.float32)
    assert not kernels.mx_dequant_enabled("affine", 4, 32, mx.bfloat16)
    monkeypatch.undo()
    monkeypatch.setenv("MLX_ARCH_PLUGINS_FUSED", "0")
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)  # as if on a GPU
    assert not kernels.cuda_enabled()


@pytest.mark.parametrize("mode", ["affine", "mxfp4", "mxfp8"])
def test_dequantize_falls_back_to_mlx_where_no_kernel_applies(mode, monkeypatch):
    from mlx_arch_plugins.deepseek_v4 import kernels

    def no_kernel(*args, **kwargs):
        raise AssertionError("a CUDA kernel was called on the CPU")

    monkeypatch.setattr(kernels, "affine_dequantize", no_kernel)
    monkeypatch.setattr(kernels, "mx_dequantize", no_kernel)
    bits, group = (4, 64) if mode == "affine" else (int(mode[-1]), 32)
    layer = nn.Linear(128, 16, bias=False).to_quantized(group_size=group, bits=bits, mode=mode)
    got = dsv4.dequantize(layer, layer["weight"], layer["scales"], layer.get("biases"), mx.bfloat16)
    want = mx.dequantize(
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        group,
        bits,
        mode=mode,
        dtype=mx.bfloat16,
    )
    assert mx.array_equal(got, want).item()


@pytest.mark.parametrize("rows", ["1", "0"])
def test_tiled_experts_start_early_without_changing_results(rows, monkeypatch):
    """With the tiled path the MoE starts its output's evaluation (mx.async_eval) as soon
    as it is built, and only then; the logits are those of the run without it."""
    case = CASES[0]
    model = load_case(case, "bf16")
    nn.quantize(
        model,
        group_size=32,
        bits=4,
        class_predicate=lambda path, m: "switch_mlp" in path and hasattr(m, "to_quantized"),
    )
    monkeypatch.setenv("MLX_ARCH_PLUGINS_DEQUANT_ROWS", rows)
    started = []
    real = mx.async_eval

    def spy(*arrays):
        started.append(len(arrays))
        return real(*arrays)

    monkeypatch.setattr(mx, "async_eval", spy)
    monkeypatch.setenv("MLX_ARCH_PLUGINS_OVERLAP", "0")
    waited = _prefill(model, case)
    assert started == []
    monkeypatch.setenv("MLX_ARCH_PLUGINS_OVERLAP", "1")
    early = _prefill(model, case)
    layers = model.args.num_hidden_layers
    assert len(started) == (layers if rows == "1" else 0)
    np.testing.assert_array_equal(early, waited)
