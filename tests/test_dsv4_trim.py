"""Exact rollback of DeepSeek-V4 caches (``trim``): after feeding tokens in
any chunking and undoing the last n, every layer kind (window only, ratio 4
with its indexer, ratio 128) holds exactly what a cache that never saw the
undone tokens holds, and continues with the same logits."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from mlx_arch_plugins.deepseek_v4.cache import TRIM_BOUND, DeepseekV4Cache

pytestmark = pytest.mark.compat

VOCAB = 64
WINDOW = 8


def _tiny_model():
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_arch_plugins.deepseek_v4.model import Model, ModelArgs

    args = ModelArgs.from_dict(
        {
            "model_type": "deepseek_v4",
            "vocab_size": VOCAB,
            "hidden_size": 32,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "head_dim": 64,
            "qk_rope_head_dim": 64,
            "q_lora_rank": 16,
            "o_lora_rank": 16,
            "o_groups": 2,
            "sliding_window": WINDOW,
            "compress_ratios": [0, 4, 128],
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "index_n_heads": 2,
            "index_head_dim": 64,
            "index_topk": 3,
            "hc_sinkhorn_iters": 3,
        }
    )
    model = Model(args)
    # random everything (zeros in hc/ape/sinks would hide mistakes)
    keys = iter(mx.random.split(mx.random.key(7), 500))
    params = [
        (k, 0.3 * mx.random.normal(v.shape, key=next(keys)).astype(v.dtype))
        if mx.issubdtype(v.dtype, mx.floating)
        else (k, v)
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


MODEL = _tiny_model()
TOKENS = mx.random.randint(0, VOCAB, (400,), key=mx.random.key(3)).tolist()
OTHER = mx.random.randint(0, VOCAB, (400,), key=mx.random.key(4)).tolist()


def _feed(cache, toks, chunks):
    """Feed ``toks`` cut into ``chunks`` (sizes; the rest as one chunk)."""
    out, i = [], 0
    for n in list(chunks) + [len(toks)]:
        part = toks[i : i + n]
        if part:
            out.append(np.array(MODEL(mx.array([part]), cache=cache)[0]))
        i += len(part)
        if i >= len(toks):
            break
    return np.concatenate(out) if out else np.zeros((0, VOCAB))


def _fields(c: DeepseekV4Cache):
    names = ("window", "comp", "index", "comp_kv", "comp_score", "index_kv", "index_score")
    return {k: None if getattr(c, k) is None else np.array(getattr(c, k)) for k in names}


def assert_same_cache(got, want):
    for g, w in zip(got, want):
        assert (g.offset, g.n_comp) == (w.offset, w.n_comp)
        fg, fw = _fields(g), _fields(w)
        for k in fg:
            if fw[k] is None or fw[k].shape[1] == 0:
                assert fg[k] is None or fg[k].shape[1] == 0, k
            else:
                assert fg[k] is not None and fg[k].shape == fw[k].shape, k
                np.testing.assert_allclose(fg[k], fw[k], atol=2e-5, rtol=1e-5, err_msg=k)


def check_trim(base, chunks, extra, n, cont, cont_chunks):
    """Feed base (one chunk), then ``extra`` new tokens in ``chunks``; trim n;
    continue with ``cont`` in ``cont_chunks``. Compare with a cache fed only
    the kept tokens, then ``cont``."""
    seq = TOKENS[: base + extra]
    cache = make_prompt_cache(MODEL)
    _feed(cache, seq[:base], [])
    _feed(cache, seq[base:], chunks)
    assert trim_prompt_cache(cache, n) == n
    keep = seq[: base + extra - n]
    ref = make_prompt_cache(MODEL)
    _feed(ref, keep, [])
    assert_same_cache(cache, ref)
    more = OTHER[:cont]
    got = _feed(cache, more, cont_chunks)
    want = _feed(ref, more, [])
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    assert_same_cache(cache, ref)


chunk_sizes = st.lists(st.integers(1, 7), max_size=8)


@settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    base=st.sampled_from([0, 3, 12, 120, 125, 131, 250]),
    chunks=chunk_sizes,
    extra=st.integers(1, 24),
    n=st.integers(1, TRIM_BOUND),
    cont=st.integers(1, 10),
    cont_chunks=chunk_sizes,
)
def test_trim_equals_never_seen(base, chunks, extra, n, cont, cont_chunks):
    """Any chunking, across window fills, ratio-4 and ratio-128 block ends
    (base + extra passes 128 and 256), and the point where the indexer
    starts selecting; n never more than the tokens the cache can undo."""
    probe = make_prompt_cache(MODEL)
    _feed(probe, TOKENS[:base], [])
    _feed(probe, TOKENS[base : base + extra], chunks)
    n = min(n, probe[0].max_trim())
    if n == 0:
        return
    check_trim(base, chunks, extra, n, cont, cont_chunks)


@pytest.mark.parametrize(
    "base,chunks,extra,n",
    [
        (126, [1, 1, 1, 1], 4, 3),  # single steps back across a ratio-128 end
        (125, [5], 5, 4),  # one verify-sized chunk that completes block 31/0
        (120, [], 20, TRIM_BOUND),  # into a long prefill chunk
        (0, [], 200, TRIM_BOUND),  # into a long first chunk
        (254, [4], 4, 4),  # whole chunk back over 256
    ],
)
def test_trim_edge_cases(base, chunks, extra, n):
    check_trim(base, chunks, extra, n, 9, [1, 3])


def test_repeated_draft_verify_cycles():
    """What speculative decoding does: k+1 tokens, undo the rejected tail,
    repeat; ends equal to feeding the accepted tokens once."""
    cache = make_prompt_cache(MODEL)
    _feed(cache, TOKENS[:100], [])
    accepted = list(TOKENS[:100])
    rng = np.random.default_rng(0)
    for step in range(40):
        k = int(rng.integers(1, 5))
        block = [int(t) for t in rng.integers(0, VOCAB, k + 1)]
        MODEL(mx.array([block]), cache=cache)
        a = int(rng.integers(0, k + 1))  # tokens of the block kept
        trim_prompt_cache(cache, k + 1 - a)
        accepted += block[:a]
    ref = make_prompt_cache(MODEL)
    _feed(ref, accepted, [])
    assert_same_cache(cache, ref)


def test_refuses_more_than_it_can_undo():
    cache = make_prompt_cache(MODEL)
    _feed(cache, TOKENS[:30], [])
    with pytest.raises(ValueError, match="at most its last"):
        cache[1].trim(TRIM_BOUND + 1)
    assert cache[1].offset == 30
    # a cache loaded from a file has no history
    loaded = [type(c).from_state(c.state) for c in cache]
    assert loaded[0].max_trim() == 0 and loaded[0].trim(0) == 0
    with pytest.raises(ValueError):
        loaded[0].trim(1)


def test_copy_has_its_own_history():
    cache = make_prompt_cache(MODEL)
    _feed(cache, TOKENS[:40], [1] * 40)
    twin = [c.copy() for c in cache]
    trim_prompt_cache(twin, 5)
    assert all(c.offset == 40 for c in cache)
    MODEL(mx.array([OTHER[:3]]), cache=twin)
    assert trim_prompt_cache(cache, 7) == 7
    ref = make_prompt_cache(MODEL)
    _feed(ref, TOKENS[:33], [])
    assert_same_cache(cache, ref)


def _batch(hists):
    per_seq = []
    for h in hists:
        c = make_prompt_cache(MODEL)
        _feed(c, h, [])
        per_seq.append(c)
    return [c.merge([s[i] for s in per_seq]) for i, c in enumerate(per_seq[0])]


def test_packed_batch_trim_per_sequence():
    """Packed decode steps of sequences at different positions, undo the
    last n steps of each (stock batch-cache semantics), continue; each row
    equals its own run; extracted caches can still undo."""
    hists = [TOKENS[:5], TOKENS[10:137], TOKENS[:126]]
    batch = _batch(hists)
    steps = [[OTHER[3 * i + b] for b in range(3)] for i in range(6)]
    for s in steps:
        MODEL(mx.array([[t] for t in s]), cache=batch)
    assert batch[1]._packed is not None
    assert trim_prompt_cache(batch, 4) == 4
    after = [[OTHER[100 + 3 * i + b] for b in range(3)] for i in range(3)]
    got = [np.array(MODEL(mx.array([[t] for t in s]), cache=batch)[:, 0]) for s in after]
    for b, h in enumerate(hists):
        ref = make_prompt_cache(MODEL)
        seq = h + [s[b] for s in steps[:2]]
        _feed(ref, seq, [])
        want = _feed(ref, [s[b] for s in after], [1, 1, 1])
        np.testing.assert_allclose(np.stack([g[b] for g in got]), want, atol=2e-4, rtol=0)
    # a cache taken out of the packed batch keeps copies of its own last steps (not
    # the batch's snapshots): still undoable
    single = [c.extract(1) for c in batch]
    assert single[0].max_trim() == 3 + 2
    trim_prompt_cache(single, 5)
    ref = make_prompt_cache(MODEL)
    _feed(ref, hists[1], [])
    assert_same_cache(single, ref)
    with pytest.raises(ValueError):
        trim_prompt_cache(batch, TRIM_BOUND + 1)


def test_prompt_cache_reuse_within_and_beyond_the_bound():
    from mlx_lm.models import cache as cache_module

    from mlx_arch_plugins.host.patches import prompt_cache as pc

    lru = cache_module.LRUPromptCache()
    fetch = pc._wrap_fetch(cache_module.LRUPromptCache.fetch_nearest_cache)
    c = make_prompt_cache(MODEL)
    _feed(c, TOKENS[:60], [])
    lru.insert_cache("m", TOKENS[:60], c)
    # within the bound: the longer entry, trimmed exactly
    got, rest = fetch(lru, "m", TOKENS[:52] + OTHER[:5])
    assert rest == OTHER[:5] and got[0].offset == 52
    ref = make_prompt_cache(MODEL)
    _feed(ref, TOKENS[:52], [])
    assert_same_cache(got, ref)
    # beyond it: computed in full rather than an error
    got, rest = fetch(lru, "m", TOKENS[:20] + OTHER[:5])
    assert got is None and rest == TOKENS[:20] + OTHER[:5]


def test_prompt_cache_beyond_the_bound_falls_back_to_a_shorter_prefix():
    from mlx_lm.models import cache as cache_module

    lru = cache_module.LRUPromptCache()
    long, short = make_prompt_cache(MODEL), make_prompt_cache(MODEL)
    _feed(long, TOKENS[:60], [])
    _feed(short, TOKENS[:10], [])
    lru.insert_cache("m", TOKENS[:60], long)
    lru.insert_cache("m", TOKENS[:10], short)
    # the longer entry would need a 40-token trim (beyond the bound): stock's answer for
    # caches that cannot trim, the shorter cached prefix
    got, rest = lru.fetch_nearest_cache("m", TOKENS[:20] + OTHER[:5])
    assert got is not None and got[0].offset == 10
    assert rest == TOKENS[10:20] + OTHER[:5]


def test_prompt_cache_keeps_a_shared_prefix_for_the_next_request():
    # a system prompt cached, then one user's longer prompt: the shared prefix stays
    # cached (the longer cache cannot be trimmed back to it beyond the bound)
    from mlx_lm.models import cache as cache_module

    lru = cache_module.LRUPromptCache()
    shared, longer = make_prompt_cache(MODEL), make_prompt_cache(MODEL)
    _feed(shared, TOKENS[:10], [])
    _feed(longer, TOKENS[:60], [])
    lru.insert_cache("m", TOKENS[:10], shared)
    lru.insert_cache("m", TOKENS[:60], longer)
    got, rest = lru.fetch_nearest_cache("m", TOKENS[:10] + OTHER[:30])
    assert got is not None and got[0].offset == 10 and rest == OTHER[:30]
