"""DeepSeek-V4 generation caches: chunked prefill, decode, batching with
padding, prompt-cache files, memory, and mlx-lm's expectations for models."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from helpers.dsv4_golden import inputs, load_case
from mlx_lm.models.cache import (
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)

pytestmark = pytest.mark.compat

# b: window 32, HCA entries + CSA with top-32 of up to 65 entries (the
# indexer really selects), 250-token prompt.
CASE = "b_hca_long"


@pytest.fixture(scope="module")
def model():
    return load_case(CASE, "bf16")


@pytest.fixture(scope="module")
def tokens():
    prompt, decode = inputs(CASE)
    return prompt + decode


@pytest.fixture(scope="module")
def full_logits(model, tokens):
    return np.array(model(mx.array([tokens]))[0])


def _run_chunks(model, tokens, size, cache=None):
    cache = cache if cache is not None else make_prompt_cache(model)
    out = []
    for i in range(0, len(tokens), size):
        out.append(np.array(model(mx.array([tokens[i : i + size]]), cache=cache)[0]))
    return np.concatenate(out), cache


@pytest.mark.parametrize("size", [1, 3, 7, 64, 1000])
def test_chunked_prefill_equals_one_prefill(model, tokens, full_logits, size):
    got, _ = _run_chunks(model, tokens, size)
    np.testing.assert_allclose(got, full_logits, atol=2e-4, rtol=0)


def test_prefill_then_decode_equals_one_prefill(model, tokens, full_logits):
    prompt_len = 200
    cache = make_prompt_cache(model)
    first = np.array(model(mx.array([tokens[:prompt_len]]), cache=cache)[0])
    steps = [np.array(model(mx.array([[t]]), cache=cache)[0, 0]) for t in tokens[prompt_len:]]
    got = np.concatenate([first, np.stack(steps)])
    np.testing.assert_allclose(got, full_logits, atol=2e-4, rtol=0)


def test_prompt_cache_file_round_trip(model, tokens, full_logits, tmp_path):
    split = 131  # mid-block for both ratios: pending compressor rows are saved
    cache = make_prompt_cache(model)
    model(mx.array([tokens[:split]]), cache=cache)
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, cache, {"note": "dsv4"})
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta == {"note": "dsv4"}
    assert [type(c).__name__ for c in loaded] == ["DeepseekV4Cache"] * len(cache)
    got = np.array(model(mx.array([tokens[split:]]), cache=loaded)[0])
    np.testing.assert_allclose(got, full_logits[split:], atol=2e-4, rtol=0)


def test_batch_with_padding_matches_single_runs(model, tokens):
    """What mlx-lm's batch generator does: merge per-sequence caches (with
    different histories), right-pad new prompts, prepare/finalize, then
    decode all rows together; each row must equal its own single run."""
    histories = [tokens[:37], [], tokens[5:120]]
    prompts = [tokens[40:90], tokens[:13], tokens[120:121]]
    nexts = [tokens[200:204], tokens[210:214], tokens[220:224]]

    singles = []
    for hist, prompt, nxt in zip(histories, prompts, nexts):
        cache = make_prompt_cache(model)
        if hist:
            model(mx.array([hist]), cache=cache)
        p = np.array(model(mx.array([prompt]), cache=cache)[0, -1])
        d = [np.array(model(mx.array([[t]]), cache=cache)[0, 0]) for t in nxt]
        singles.append(np.stack([p] + d))

    per_seq = []
    for hist in histories:
        cache = make_prompt_cache(model)
        if hist:
            model(mx.array([hist]), cache=cache)
        per_seq.append(cache)
    batch = [c.merge([s[i] for s in per_seq]) for i, c in enumerate(per_seq[0])]

    lengths = [len(p) for p in prompts]
    width = max(lengths)
    padded = mx.array([p + [0] * (width - len(p)) for p in prompts])
    for c in batch:
        c.prepare(lengths=lengths, right_padding=[width - n for n in lengths])
    # chunked like mlx-lm's prefill, with a chunk boundary inside the prompts
    out = [model(padded[:, :16], cache=batch), model(padded[:, 16:], cache=batch)]
    logits = mx.concatenate(out, 1)
    for c in batch:
        c.finalize()
    last = [np.array(logits[b, n - 1]) for b, n in enumerate(lengths)]
    steps = [
        np.array(model(mx.array([[n[i]] for n in nexts]), cache=batch)[:, 0])
        for i in range(len(nexts[0]))
    ]
    for b in range(len(prompts)):
        got = np.stack([last[b]] + [s[b] for s in steps])
        np.testing.assert_allclose(got, singles[b], atol=2e-4, rtol=0)

    # filter / extract keep the sequences intact
    for c in batch:
        c.filter([2, 0])
    extracted = [c.extract(1) for c in batch]
    assert extracted[0].offset == len(histories[0]) + lengths[0] + len(nexts[0])
    nxt = np.array(model(mx.array([[tokens[230]]]), cache=extracted)[0, 0])
    ref_cache = make_prompt_cache(model)
    model(mx.array([histories[0] + prompts[0] + nexts[0]]), cache=ref_cache)
    ref = np.array(model(mx.array([[tokens[230]]]), cache=ref_cache)[0, 0])
    np.testing.assert_allclose(nxt, ref, atol=2e-4, rtol=0)


def test_left_padding_prepare(model, tokens):
    prompts = [tokens[:30], tokens[50:61]]
    width = 30
    padded = mx.array([[0] * (width - len(p)) + p for p in prompts])
    batch = [
        c.merge([make_prompt_cache(model)[i] for _ in prompts])
        for i, c in enumerate(make_prompt_cache(model))
    ]
    for c in batch:
        c.prepare(left_padding=[width - len(p) for p in prompts])
    logits = model(padded, cache=batch)
    for c in batch:
        c.finalize()
    for b, p in enumerate(prompts):
        want = np.array(model(mx.array([p]))[0, -1])
        np.testing.assert_allclose(np.array(logits[b, -1]), want, atol=2e-4, rtol=0)


def test_trim_beyond_the_bound_is_refused(model, tokens):
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    from mlx_arch_plugins.deepseek_v4.cache import TRIM_BOUND

    cache = make_prompt_cache(model)
    model(mx.array([tokens[:50]]), cache=cache)
    assert can_trim_prompt_cache(cache)
    assert all(c.max_trim() == TRIM_BOUND for c in cache)
    with pytest.raises(ValueError, match="at most its last 16 tokens"):
        trim_prompt_cache(cache, TRIM_BOUND + 1)
    assert all(c.offset == 50 for c in cache)
    assert trim_prompt_cache(cache, 5) == 5
    assert all(c.offset == 45 and c.max_trim() == TRIM_BOUND - 5 for c in cache)


def test_nbytes_is_window_plus_compressed():
    """KV memory at 4096 tokens: window + one entry per ratio tokens (+ the
    compressor's partial block), never the raw history."""
    from mlx_arch_plugins.deepseek_v4.model import Model, ModelArgs

    args = ModelArgs.from_dict(
        dict(
            model_type="deepseek_v4",
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            head_dim=128,
            qk_rope_head_dim=64,
            q_lora_rank=32,
            o_lora_rank=16,
            o_groups=2,
            sliding_window=16,
            compress_ratios=[0, 4, 128],
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=16,
            index_n_heads=2,
            index_head_dim=64,
            index_topk=8,
        )
    )
    model = Model(args)
    model.set_dtype(mx.float32)
    cache = make_prompt_cache(model)
    T = 4096
    toks = mx.random.randint(0, 64, (1, T), key=mx.random.key(0))
    for i in range(0, T, 512):
        model(toks[:, i : i + 512], cache=cache)
    mx.eval([c.state for c in cache])
    f32, hd, ihd, win = 4, args.head_dim, args.index_head_dim, args.sliding_window
    window = win * hd * f32
    expect = [
        window,
        window + (T // 4) * (hd + ihd) * f32 + 2 * (4 * 2 * hd + 4 * 2 * ihd) * f32,
        window + (T // 128) * hd * f32 + 2 * 0,  # 4096 = 32 full blocks: no rows
    ]
    assert [c.nbytes for c in cache] == expect
    raw = T * hd * f32
    assert sum(expect) < raw  # far below even one layer of full raw KV


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_precision_runs(dtype, tokens):
    model = load_case(CASE, "fp8", dtype=dtype)
    out = model(mx.array([tokens[:40]]))
    assert out.dtype == dtype
    assert np.isfinite(np.array(out.astype(mx.float32))).all()


def test_deepcopy_and_long_prompt():
    model = load_case("a_swa_csa_hash_mtp", "bf16")
    twin = copy.deepcopy(model)
    prompt = [(7 * i) % 256 for i in range(300)]  # > max_position_embeddings 128
    a = np.array(model(mx.array([prompt]))[0, -5:])
    b = np.array(twin(mx.array([prompt]))[0, -5:])
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_generate_greedy_is_stable():
    from mlx_lm.generate import generate_step

    model = load_case("a_swa_csa_hash_mtp", "fp8", dtype=mx.bfloat16)
    prompt = mx.array(inputs("a_swa_csa_hash_mtp")[0])

    def greedy():
        out = []
        for (tok, _), _ in zip(generate_step(prompt, model), range(24)):
            out.append(int(tok))
        return out

    first = greedy()
    assert first == greedy()
    assert len(set(first)) > 1


def test_sparse_attention_blocks_do_not_change_results(model, tokens, full_logits, monkeypatch):
    """CSA prefill processes queries in blocks; one query per block must give
    the same logits as the default blocking."""
    from mlx_arch_plugins.deepseek_v4.model import DeepseekV4Attention

    monkeypatch.setattr(DeepseekV4Attention, "_BLOCK_ELEMS", 1)
    got = np.array(model(mx.array([tokens]))[0])
    np.testing.assert_allclose(got, full_logits, atol=2e-4, rtol=0)


def test_kv_bits_leaves_caches_alone(model, tokens):
    """mlx-lm quantizes only caches with ``to_quantized``; ours stay exact."""
    from mlx_lm.generate import maybe_quantize_kv_cache

    cache = make_prompt_cache(model)
    model(mx.array([tokens[:20]]), cache=cache)
    before = [type(c) for c in cache]
    maybe_quantize_kv_cache(cache, quantized_kv_start=0, kv_group_size=64, kv_bits=4)
    assert [type(c) for c in cache] == before


def test_batch_cache_state_round_trip(model, tokens):
    """A batch cache rebuilt from its state continues every sequence."""
    from mlx_arch_plugins.deepseek_v4.cache import BatchDeepseekV4Cache

    per_seq = []
    for n in (9, 21):
        c = make_prompt_cache(model)
        model(mx.array([tokens[:n]]), cache=c)
        per_seq.append(c)
    batch = [c.merge([s[i] for s in per_seq]) for i, c in enumerate(per_seq[0])]
    rebuilt = [BatchDeepseekV4Cache.from_state(c.state) for c in batch]
    step = mx.array([[tokens[30]], [tokens[31]]])
    np.testing.assert_allclose(
        np.array(model(step, cache=rebuilt)), np.array(model(step, cache=batch)), atol=1e-6
    )


def _prefilled(model, history):
    cache = make_prompt_cache(model)
    if history:
        model(mx.array([history]), cache=cache)
    return cache


def test_packed_batch_decode_matches_single_runs(model, tokens):
    """Decode steps of a batch whose sequences sit at different positions run
    packed (one set of kernels for all); every row must equal its own run:
    across the window fill, compressor block ends, the point where CSA starts
    selecting top-k, a sequence leaving, one joining, extract and state."""
    lengths = [1, 5, 30, 127, 140, 200]
    starts = [0, 9, 3, 40, 20, 50]
    hists = [tokens[s : s + n] for s, n in zip(starts, lengths)]
    steps = 14
    feed = [
        [tokens[(7 * b + 3 * i) % len(tokens)] for i in range(steps + 2)] for b in range(len(hists))
    ]
    joiner = tokens[100:160]
    feed_j = [tokens[(11 * i) % len(tokens)] for i in range(steps)]

    def single(hist, toks):
        cache = _prefilled(model, hist)
        return [np.array(model(mx.array([[t]]), cache=cache)[0, 0]) for t in toks]

    want = [single(h, f) for h, f in zip(hists, feed)]
    want_j = single(joiner, feed_j)

    per_seq = [_prefilled(model, h) for h in hists]
    batch = [c.merge([s[i] for s in per_seq]) for i, c in enumerate(per_seq[0])]
    rows = list(range(len(hists)))  # sequence of each batch row
    got = {b: [] for b in rows}
    got_j = []
    for i in range(steps):
        if i == 6:  # sequence 2 finishes; a new one joins
            for c in batch:
                c.filter([r for r in range(len(rows)) if rows[r] != 2])
            rows = [r for r in rows if r != 2]
            extra = _prefilled(model, joiner)
            for c, e in zip(batch, extra):
                c.extend(c.merge([e]))
            rows.append("j")
        ids = [[feed_j[i - 6] if r == "j" else feed[r][i]] for r in rows]
        out = model(mx.array(ids), cache=batch)
        assert batch[1]._packed is not None  # the packed path ran
        for r, logits in zip(rows, np.array(out[:, 0])):
            (got_j if r == "j" else got[r]).append(logits)

    for b in range(len(hists)):
        n = 6 if b == 2 else steps
        np.testing.assert_allclose(np.stack(got[b]), np.stack(want[b][:n]), atol=2e-4, rtol=0)
    np.testing.assert_allclose(np.stack(got_j), np.stack(want_j[: steps - 6]), atol=2e-4, rtol=0)

    # leaving the packed form: state round trip, extract, then one more step
    rebuilt = [type(c).from_state(c.state) for c in batch]
    b0 = rows.index(0)
    single0 = [c.extract(b0) for c in rebuilt]
    assert single0[0].offset == lengths[0] + steps
    nxt = np.array(model(mx.array([[feed[0][steps]]]), cache=single0)[0, 0])
    ref = single(hists[0], feed[0][: steps + 1])[-1]
    np.testing.assert_allclose(nxt, ref, atol=2e-4, rtol=0)
