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
