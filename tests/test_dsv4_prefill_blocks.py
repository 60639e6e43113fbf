"""Prefill attention in query blocks: the same logits bit for bit, bounded score buffers.

The dense branches (window, HCA, CSA before the indexer selects) score each query block
against the window rows it can see plus the visible entries; the sparse branch already
blocked its queries. Changing the block size must not change a single bit on CPU, and
the widest score buffer must not grow with the prompt.
"""

import mlx.core as mx
import numpy as np
import pytest
from helpers.dsv4_golden import CASES, inputs, load_case
from mlx_lm.models.cache import make_prompt_cache

from mlx_arch_plugins.deepseek_v4.model import DeepseekV4Attention

pytestmark = pytest.mark.compat


def _prefill(case, block_elems, chunk=None, monkeypatch=None):
    monkeypatch.setattr(DeepseekV4Attention, "_BLOCK_ELEMS", block_elems)
    model = load_case(case)
    prompt, _ = inputs(case)
    cache = make_prompt_cache(model)
    step = chunk or len(prompt)
    out = [
        model(mx.array([prompt[a : a + step]]), cache=cache)[0] for a in range(0, len(prompt), step)
    ]
    return np.array(mx.concatenate(out, 0))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk", [None, 7])
def test_block_size_changes_no_bit(case, chunk, monkeypatch):
    whole = _prefill(case, 1 << 40, chunk, monkeypatch)
    one_query = _prefill(case, 1, chunk, monkeypatch)
    assert np.array_equal(whole, one_query)


@pytest.mark.parametrize("chunk", [None, 7])
def test_indexer_block_size_changes_no_bit(chunk, monkeypatch):
    """The sparse branch's own bound on a block's indexer products: one query per block
    gives the logits of one block for the whole prompt."""
    case = "a_swa_csa_hash_mtp"
    sizes = []
    real = DeepseekV4Attention._index_block

    def spy(self, L, N, fused=False):
        sizes.append(real(self, L, N, fused))
        return sizes[-1]

    monkeypatch.setattr(DeepseekV4Attention, "_index_block", spy)
    monkeypatch.setattr(DeepseekV4Attention, "_INDEX_BLOCK_ELEMS", 1 << 40)
    whole = _prefill(case, 1 << 40, chunk, monkeypatch)
    assert sizes and max(sizes) > 1, "the indexer never selected"
    sizes.clear()
    monkeypatch.setattr(DeepseekV4Attention, "_INDEX_BLOCK_ELEMS", 1)
    one_query = _prefill(case, 1 << 40, chunk, monkeypatch)
    assert sizes and max(sizes) == 1
    assert np.array_equal(whole, one_query)


def test_score_buffers_do_not_grow_with_the_prompt(monkeypatch):
    # b_hca_long: window 8-ish rows and HCA entries over a 250-token prompt
    case = "b_hca_long"
    widths = []
    real = mx.fast.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        widths.append(q.shape[-2] * k.shape[-2])  # queries x keys of one score buffer
        return real(q, k, v, **kw)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", spy)
    prompt, _ = inputs(case)
    model = load_case(case)
    heads = model.args.num_attention_heads
    limit = 4 * heads * 64  # room for a few queries per block only
    monkeypatch.setattr(DeepseekV4Attention, "_BLOCK_ELEMS", limit)
    model(mx.array([prompt]), cache=make_prompt_cache(model))
    win = model.args.sliding_window
    entries = len(prompt) // 128 + 1
    per_block = max(1, limit // (heads * win))  # queries per block can be no more
    assert widths and max(widths) <= per_block * (per_block + win + entries)
    assert max(widths) < len(prompt) * len(prompt) // 4  # far from the unblocked L x L


def test_heads_as_queries_with_sink_column_equal_per_head_sinks():
    """The sparse branch's layout (heads as the query axis of one KV head, the sink as a
    zero key/value row with its logit in an additive mask) gives what MLX's attention
    with per-head ``sinks`` gives on the usual layout."""
    from mlx_arch_plugins.deepseek_v4.model import _sink_bias

    R, H, S, hd = 5, 4, 9, 16
    keys = iter(mx.random.split(mx.random.key(3), 4))
    q = mx.random.normal((R, H, 1, hd), key=next(keys))
    kv = mx.random.normal((R, 1, S, hd), key=next(keys))
    ok = mx.random.uniform(shape=(R, 1, 1, S), key=next(keys)) < 0.7
    ok[..., 0] = True  # every query sees at least one key
    sinks = mx.random.normal((H,), key=next(keys))
    want = mx.fast.scaled_dot_product_attention(q, kv, kv, scale=0.3, mask=ok, sinks=sinks)
    zero = mx.zeros((R, 1, 1, hd))
    kk = mx.concatenate([kv, zero], 2)
    got = mx.fast.scaled_dot_product_attention(
        q.transpose(0, 2, 1, 3), kk, kk, scale=0.3, mask=_sink_bias(ok, sinks, q.dtype)
    )
    np.testing.assert_allclose(np.array(got.transpose(0, 2, 1, 3)), np.array(want), atol=1e-5)
    # and the sink matters: without its column the result differs
    plain = mx.fast.scaled_dot_product_attention(q, kv, kv, scale=0.3, mask=ok)
    assert not np.allclose(np.array(plain), np.array(want), atol=1e-3)


@pytest.mark.parametrize("B,L,N", [(1, 1, 9), (2, 5, 17)])
def test_indexer_scores_equal_the_formula_per_token_and_head(B, L, N):
    """score[b, t, n] = sum_h w[b,t,h] / sqrt(D H) * relu(q[b,t,h] . k[b,n]), computed
    here in float64 one token and head at a time."""
    model = load_case("a_swa_csa_hash_mtp")
    indexer = next(layer.attn.indexer for layer in model.layers if layer.attn.ratio == 4)
    H, D = indexer.n_heads, indexer.head_dim
    keys = iter(mx.random.split(mx.random.key(5), 3))
    q = mx.random.normal((B, L, H, D), key=next(keys))
    w = mx.random.normal((B, L, H), key=next(keys))
    k = mx.random.normal((B, N, D), key=next(keys))
    got = np.array(indexer.scores(q, w, k))
    qn, wn, kn = (np.array(a).astype(np.float64) for a in (q, w, k))
    want = np.zeros((B, L, N))
    for b in range(B):
        for t in range(L):
            for h in range(H):
                want[b, t] += wn[b, t, h] * np.maximum(kn[b] @ qn[b, t, h], 0)
    want /= np.sqrt(D * H)
    assert got.shape == (B, L, N)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_sparse_key_padding_changes_no_bit(monkeypatch):
    """The sparse branch pads each query's keys with masked zero rows to a multiple of
    ``_KEY_ALIGN``; without padding the logits are the same, bit for bit."""
    import mlx_arch_plugins.deepseek_v4.model as dsv4

    case = "a_swa_csa_hash_mtp"
    monkeypatch.setattr(dsv4, "_KEY_ALIGN", 1)
    plain = _prefill(case, 1 << 40, None, monkeypatch)
    monkeypatch.setattr(dsv4, "_KEY_ALIGN", 64)
    padded = _prefill(case, 1 << 40, None, monkeypatch)
    assert np.array_equal(plain, padded)
    assert dsv4._aligned_keys(640) == 704 and dsv4._aligned_keys(63) == 64


@pytest.mark.parametrize("dtype,width", [(mx.bfloat16, 512), (mx.float32, 6), (mx.bfloat16, 3)])
def test_take_rows_equals_indexing(dtype, width):
    from mlx_arch_plugins.deepseek_v4.model import take_rows

    rows = mx.random.normal((50, width), key=mx.random.key(1)).astype(dtype)
    pick = mx.random.randint(0, 50, (3, 4, 7), key=mx.random.key(2))
    got = take_rows(rows, pick)
    assert got.dtype == dtype and got.shape == (3, 4, 7, width)
    assert mx.array_equal(got, rows[pick.reshape(-1)].reshape(3, 4, 7, width)).item()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk", [None, 7])
def test_dense_key_alignment_changes_no_bit(case, chunk, monkeypatch):
    """The dense branches take earlier (masked) window rows, else masked zero rows, so a
    block's keys are a multiple of ``_KEY_ALIGN``; on the CPU the logits keep every bit.
    Small blocks (decode, verify) are left as they are."""
    import mlx_arch_plugins.deepseek_v4.model as dsv4

    widths = []
    real = mx.fast.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        widths.append(k.shape[-2])
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(dsv4, "_ALIGN_QUERIES", 1)
    monkeypatch.setattr(dsv4, "_KEY_ALIGN", 1)
    plain = _prefill(case, 1 << 40, chunk, monkeypatch)
    assert any(w % 16 for w in widths)  # otherwise this case shows nothing
    widths.clear()
    monkeypatch.setattr(dsv4, "_KEY_ALIGN", 16)
    aligned = _prefill(case, 1 << 40, chunk, monkeypatch)
    assert widths and all(w % 16 == 0 for w in widths)
    assert np.array_equal(plain, aligned)
    widths.clear()
    monkeypatch.setattr(dsv4, "_ALIGN_QUERIES", 1 << 20)  # every block below it
    small = _prefill(case, 1 << 40, chunk, monkeypatch)
    assert any(w % 16 for w in widths)
    assert np.array_equal(plain, small)


def test_indexer_kernel_guard(monkeypatch):
    """The CUDA indexer kernel is off on this CPU; on CUDA from sm_80 (bf16 mma) it
    takes bf16 queries and keys with heads and head dim in multiples of 16 (the mma
    tile) up to 64 x 128, nothing else."""
    from mlx_arch_plugins.deepseek_v4 import kernels

    q = mx.zeros((1, 16, 64, 128), mx.bfloat16)
    keys = mx.zeros((1, 100, 128), mx.bfloat16)
    assert not kernels.indexer_kernel_enabled(q, keys)
    assert not kernels.bf16_mma_available()  # no compute capability on a CPU
    monkeypatch.setattr(kernels, "cuda_enabled", lambda: True)
    assert not kernels.indexer_kernel_enabled(q, keys)  # a GPU before sm_80
    monkeypatch.setattr(kernels, "bf16_mma_available", lambda: True)
    assert kernels.indexer_kernel_enabled(q, keys)
    assert not kernels.indexer_kernel_enabled(q.astype(mx.float32), keys)
    assert not kernels.indexer_kernel_enabled(q, keys.astype(mx.float16))
    assert not kernels.indexer_kernel_enabled(mx.zeros((1, 16, 12, 128), mx.bfloat16), keys)
    assert not kernels.indexer_kernel_enabled(q[..., :40], keys[..., :40])
    assert not kernels.indexer_kernel_enabled(mx.zeros((1, 16, 128, 128), mx.bfloat16), keys)
    assert not kernels.indexer_kernel_enabled(q, keys[:, :0])


def test_indexer_kernel_takes_prefill_blocks_only(monkeypatch):
    """With the kernel enabled (here a stand-in computing the portable scores), the
    indexer hands it blocks of >= FUSED_INDEX_QUERIES queries, its blocks are bounded by
    the [n, N] scores alone (larger), and the logits do not change by a bit."""
    import mlx_arch_plugins.deepseek_v4.model as dsv4

    case = "a_swa_csa_hash_mtp"
    plain = _prefill(case, 1 << 40, None, monkeypatch)
    calls, blocks = [], []

    def stand_in(q, w, keys):
        calls.append(q.shape[1])
        return dsv4._relu_weighted_sum(q @ keys[:, None].swapaxes(-1, -2), w[..., None])

    real_block = DeepseekV4Attention._index_block

    def block_spy(self, L, N, fused=False):
        blocks.append((real_block(self, L, N, fused), real_block(self, L, N, False)))
        return blocks[-1][0]

    monkeypatch.setattr(dsv4._kernels, "indexer_kernel_enabled", lambda q, keys: True)
    monkeypatch.setattr(dsv4._kernels, "indexer_scores", stand_in)
    monkeypatch.setattr(DeepseekV4Attention, "_index_block", block_spy)
    monkeypatch.setattr(DeepseekV4Attention, "_INDEX_BLOCK_ELEMS", 64 * 16)
    fused = _prefill(case, 1 << 40, None, monkeypatch)
    assert calls and min(calls) >= dsv4.FUSED_INDEX_QUERIES
    assert any(got > without for got, without in blocks)
    assert np.array_equal(plain, fused)
    # decode and verify blocks (fewer queries) keep the portable sum
    indexer = next(x.attn.indexer for x in load_case(case).layers if x.attn.ratio == 4)
    keys = mx.zeros((1, 20, indexer.head_dim))
    for L in (1, dsv4.FUSED_INDEX_QUERIES - 1, dsv4.FUSED_INDEX_QUERIES):
        q = mx.zeros((1, L, indexer.n_heads, indexer.head_dim))
        assert indexer.fused(q, keys) == (L >= dsv4.FUSED_INDEX_QUERIES)


def test_sinkhorn_kernel_is_one_variant_for_every_row_count(monkeypatch):
    """MLX compiles each custom CUDA kernel variant (name and template values) with NVRTC
    once per process and keeps none on disk (~1.4 s on the H200): the decode Sinkhorn
    kernel's variant must not depend on the batch's row count, so that a new batch size
    or verify length does not compile again. Checked with a stand-in for
    ``mx.fast.cuda_kernel`` that records what each call would compile."""
    from mlx_arch_plugins.deepseek_v4 import kernels

    variants = []

    def fake_cuda_kernel(name, input_names, output_names, source):
        def launch(inputs, template, grid, threadgroup, output_shapes, output_dtypes):
            variants.append((name, source, tuple(template)))
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

        return launch

    monkeypatch.setattr(mx.fast, "cuda_kernel", fake_cuda_kernel)
    monkeypatch.setattr(kernels, "_KERNEL", None)
    hc = 4
    scale, base = mx.ones((3,)), mx.zeros(((2 + hc) * hc,))
    for rows in (1, 2, 3, 8, kernels.MAX_ROWS):
        mixes = mx.zeros((rows, 1, (2 + hc) * hc))
        pre, post, comb = kernels.sinkhorn_split(mixes, scale, base, hc, 20, 1e-6)
        assert comb.shape == (rows, 1, hc, hc)
    assert len(variants) == 5 and len(set(variants)) == 1
