"""Speculative decoding of DeepSeek-V4: MTP drafting gives exactly the tokens of
plain greedy decoding (any k, any acceptance), the sampling rule keeps the
target distribution, and stock ``--draft-model`` now works (the caches trim)."""

import mlx.core as mx
import numpy as np
import pytest
from helpers.dsv4_golden import inputs, load_case
from mlx_lm.generate import generate_step, speculative_generate_step

from mlx_arch_plugins.deepseek_v4 import speculative as spec
from mlx_arch_plugins.deepseek_v4.speculative import MTPDraft, accept_sampled, mtp_generate_step

pytestmark = pytest.mark.compat

VOCAB = 64


def _random_model(seed, mtp=1, ratios=(0, 4, 128, 4)):
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
            "sliding_window": 8,
            "compress_ratios": list(ratios),
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 16,
            "index_n_heads": 2,
            "index_head_dim": 64,
            "index_topk": 3,
            "hc_sinkhorn_iters": 3,
            "num_nextn_predict_layers": mtp,
        }
    )
    model = Model(args)
    keys = iter(mx.random.split(mx.random.key(seed), 600))
    params = [
        (k, 0.3 * mx.random.normal(v.shape, key=next(keys)).astype(v.dtype))
        if mx.issubdtype(v.dtype, mx.floating)
        else (k, v)
        for k, v in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(params))
    mx.eval(model.parameters())
    return model


TINY = _random_model(11)


def _plain(model, prompt, n):
    out = []
    for (tok, _), _ in zip(generate_step(mx.array(prompt), model, max_tokens=n), range(n)):
        out.append(int(tok))
    return out


def _mtp(model, prompt, n, k, **kw):
    got = list(
        mtp_generate_step(
            mx.array(prompt), model, MTPDraft(model), num_draft_tokens=k, max_tokens=n, **kw
        )
    )
    return [int(t) for t, _, _ in got], [d for _, _, d in got]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_greedy_identical_golden(k, fmt):
    model = load_case("a_swa_csa_hash_mtp", fmt)
    prompt = inputs("a_swa_csa_hash_mtp")[0][:30]  # ends inside a ratio-4 block
    want = _plain(model, prompt, 40)
    got, _ = _mtp(model, prompt, 40, k)
    assert got == want


def test_first_drafts_are_the_mtp_blocks_predictions(monkeypatch):
    """Each step's first draft is what the MTP block predicts, run over the
    whole final sequence at once (real main-model states, right positions)."""
    monkeypatch.setenv(spec.ADAPT_SWITCH, "0")  # draft k every step
    model = load_case("a_swa_csa_hash_mtp", "bf16")
    prompt = inputs("a_swa_csa_hash_mtp")[0][:30]
    made = []
    real = spec._draft

    def spy(model_, mtp, feed_h, feed, k, *a):
        t = mtp.offset + feed.size - 1  # MTP position of the last real pair
        out = real(model_, mtp, feed_h, feed, k, *a)
        made.append((t, int(out[0][0].item())))
        return out

    undo = spec._undo_ahead

    def undone(*a):  # drafts of an iteration built on a wrong guess are never used
        made.pop()
        return undo(*a)

    monkeypatch.setattr(spec, "_draft", spy)
    monkeypatch.setattr(spec, "_undo_ahead", undone)
    got, _ = _mtp(model, prompt, 30, 2)
    seq = mx.array([prompt + got])
    h = model.model.hidden(seq[:, :-1])
    want = np.array(mx.argmax(model.mtp_logits(h[:, :-1], seq[:, 1:-1]), -1)[0])
    assert len(made) > 10
    assert all(d == want[t] for t, d in made)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("plen", [5, 126, 131])
def test_greedy_identical_tiny(k, plen):
    """Window, ratio-4 (indexer selecting) and ratio-128 main layers, a
    ratio-4 MTP layer; prompts ending inside blocks, generations crossing
    several ratio-4 blocks and the ratio-128 block end."""
    prompt = mx.random.randint(0, VOCAB, (plen,), key=mx.random.key(plen)).tolist()
    want = _plain(TINY, prompt, 30)
    got, _ = _mtp(TINY, prompt, 30, k, prefill_step_size=64)
    assert got == want


def _oracle(monkeypatch, future, plen, wrong=False):
    """Drafts that are always right (the plain run's next tokens) or always
    wrong; counts the drafts. A draft's place in the output follows from the MTP
    block's position (drafts may be made before the tokens before them are read)."""
    seen = {"drafts": 0}
    draft = spec._draft

    def fake(model, mtp, feed_h, feed, k, probs, pick):
        # first draft: output token at sequence position (last real pair's) + 2
        pos = mtp.offset + feed.size + 1 - plen
        # the MTP block still runs (its cache must stay right); its tokens are replaced
        real = draft(model, mtp, feed_h, feed, k, probs, pick)
        want = future[pos : pos + k]
        want += [0] * (k - len(want))
        if wrong:
            want = [(t + 1) % VOCAB for t in want]
        seen["drafts"] += k
        return mx.array(want, mx.uint32), real[1]

    monkeypatch.setattr(spec, "_draft", fake)
    return fake, seen


@pytest.mark.parametrize("wrong", [False, True])
def test_oracle_and_always_wrong_drafts(monkeypatch, wrong):
    monkeypatch.setenv(spec.ADAPT_SWITCH, "0")  # draft k every step
    prompt = mx.random.randint(0, VOCAB, (37,), key=mx.random.key(5)).tolist()
    want = _plain(TINY, prompt, 25)
    fake, _seen = _oracle(monkeypatch, want, len(prompt), wrong)
    got = []
    drafted = []
    for t, _, d in mtp_generate_step(
        mx.array(prompt), TINY, MTPDraft(TINY), num_draft_tokens=3, max_tokens=25
    ):
        got.append(int(t))
        drafted.append(d)
    assert got == want
    if wrong:
        assert not any(drafted)
    else:  # every draft accepted: 3 of every 4 tokens after the first
        assert sum(drafted) == sum(1 for i in range(1, 25) if i % 4 != 0)


def _graph_nodes(arrays):
    """Unevaluated graph nodes behind ``arrays`` (0: all of them are computed)."""
    import re
    import tempfile

    arrays = [a for a in arrays if a is not None]
    if not arrays:
        return 0
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *arrays)
        return len(re.findall(r"label", f.read()))


def _count_ahead(monkeypatch):
    """Counts the iterations built ahead and those undone; after each undo, checks
    that the entry buffers carry no more graph than before the ahead was built (a
    buffer still tied to the dropped graph would compute it after all)."""
    seen = {"built": 0, "undone": 0, "tied": 0}
    build, undo = spec._build_ahead, spec._undo_ahead

    def pending(main_cache, mtp):
        return _graph_nodes([a for c in (*main_cache, mtp) for a in (c._comp, c._index)])

    def built(model, main_cache, mtp, *a):
        seen["built"] += 1
        seen["before"] = pending(main_cache, mtp)
        return build(model, main_cache, mtp, *a)

    def undone(main_cache, mtp, ahead):
        seen["undone"] += 1
        out = undo(main_cache, mtp, ahead)
        seen["tied"] += pending(main_cache, mtp) != seen["before"]
        return out

    monkeypatch.setattr(spec, "_build_ahead", built)
    monkeypatch.setattr(spec, "_undo_ahead", undone)
    return seen


@pytest.mark.parametrize("wrong", [False, True])
def test_verify_built_ahead_is_used_or_undone_exactly(monkeypatch, wrong):
    """Each verify is built while the previous one runs, on the guess that every
    draft is kept: used when the guess came true, else undone unevaluated. Either
    way the tokens are plain decoding's, and a consumer that stops early leaves
    both caches where an unpipelined loop would (and they continue exactly)."""
    monkeypatch.setenv(spec.ADAPT_SWITCH, "0")
    prompt = mx.random.randint(0, VOCAB, (33,), key=mx.random.key(7)).tolist()
    want = _plain(TINY, prompt, 40)
    _oracle(monkeypatch, want, len(prompt), wrong)
    seen = _count_ahead(monkeypatch)
    cache = TINY.make_cache() + MTPDraft(TINY).make_cache()
    gen = mtp_generate_step(
        mx.array(prompt),
        TINY,
        MTPDraft(TINY),
        num_draft_tokens=3,
        max_tokens=40,
        prompt_cache=cache,
    )
    got = [int(next(gen)[0]) for _ in range(18)]
    gen.close()
    assert got == want[:18]
    # right drafts: only the one pending at the close is undone; wrong: every one,
    # and building ahead stops once few iterations keep all their drafts
    assert seen["undone"] == (seen["built"] if wrong else 1)
    assert seen["built"] <= 8 if wrong else seen["built"] >= 4
    assert seen["tied"] == 0
    # the caches hold the sequence up to an iteration's kept drafts (with wrong
    # drafts: all but the last token yielded), the MTP block lined up with them
    fed = cache[0].offset - len(prompt)
    assert fed == len(got) - 1 or not wrong
    assert cache[-1].offset == cache[0].offset
    nxt = mx.array(want[fed : fed + 1])
    rest = [
        int(t) for (t, _), _ in zip(generate_step(nxt, TINY, prompt_cache=cache[:-1]), range(6))
    ]
    assert rest == want[fed + 1 : fed + 7]


def test_ahead_undone_when_the_loop_switches_to_single_steps(monkeypatch):
    """Right drafts (so every verify is built ahead) while the adaptive choice flips
    between drafting and runs of single steps: each switch undoes the pending ahead
    iteration, and the tokens are still plain decoding's."""
    prompt = mx.random.randint(0, VOCAB, (27,), key=mx.random.key(13)).tolist()
    want = _plain(TINY, prompt, 40)
    _oracle(monkeypatch, want, len(prompt))
    seen = _count_ahead(monkeypatch)
    pattern = iter([3, 3, 0, 3, 3, 3, 0, 2, 0] * 10)
    monkeypatch.setattr(spec.DraftLength, "next", lambda self: next(pattern))
    monkeypatch.setattr(spec.DraftLength, "iterations_left", lambda self: 2)
    got, drafted = _mtp(TINY, prompt, 40, 3)
    assert got == want and any(drafted) and not all(drafted[1:])
    assert seen["undone"] >= 3 and seen["tied"] == 0


def test_ahead_switch_off_gives_the_same_tokens(monkeypatch):
    monkeypatch.setenv(spec.ADAPT_SWITCH, "0")
    prompt = mx.random.randint(0, VOCAB, (29,), key=mx.random.key(8)).tolist()
    with_ahead, _ = _mtp(TINY, prompt, 20, 2)
    monkeypatch.setenv(spec.AHEAD_SWITCH, "0")
    seen = _count_ahead(monkeypatch)
    without, _ = _mtp(TINY, prompt, 20, 2)
    assert with_ahead == without == _plain(TINY, prompt, 20) and seen["built"] == 0


def test_switch_turns_drafting_off(monkeypatch):
    prompt = list(range(20))
    want = _plain(TINY, prompt, 12)
    monkeypatch.setenv(spec.ENV_SWITCH, "0")
    got, drafted = _mtp(TINY, prompt, 12, 3)
    assert got == want and not any(drafted)


def test_sampling_runs_and_caches_line_up():
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(0)
    prompt = list(range(30))
    cache = TINY.make_cache() + MTPDraft(TINY).make_cache()
    got = list(
        mtp_generate_step(
            mx.array(prompt),
            TINY,
            MTPDraft(TINY),
            num_draft_tokens=2,
            max_tokens=20,
            sampler=make_sampler(temp=0.8, top_p=0.9),
            prompt_cache=cache,
        )
    )
    assert len(got) == 20
    # after the run, the MTP cache sits where the next request continues
    assert cache[-1].offset == cache[0].offset


def test_stock_draft_model_works_now():
    """A separate (here: random tiny) draft model through stock's loop, which
    trims both caches: same tokens as plain decoding."""
    draft = _random_model(12, mtp=0, ratios=(4, 128, 0))
    prompt = mx.random.randint(0, VOCAB, (40,), key=mx.random.key(9)).tolist()
    want = _plain(TINY, prompt, 24)
    got = [
        int(t)
        for t, _, _ in speculative_generate_step(
            mx.array(prompt), TINY, draft, num_draft_tokens=3, max_tokens=24
        )
    ]
    assert got == want


def test_host_patches_route_mtp_and_load(monkeypatch):
    import types

    from mlx_arch_plugins.host.patches import speculative as hp

    calls = []

    def fake_load(path, **kw):
        calls.append(path)
        return TINY, "tokenizer"

    def stock_spec(prompt, model, draft_model, *a, **kw):
        return "stock"

    mod = types.SimpleNamespace(load=fake_load, speculative_generate_step=stock_spec)
    monkeypatch.setattr(hp, "_last", {})
    load = hp._wrap_load(mod.load)
    step = hp._wrap_speculative(mod.speculative_generate_step)
    assert load("main/path") == (TINY, "tokenizer")
    draft, tok = load("mtp")
    assert isinstance(draft, MTPDraft) and draft.model is TINY and tok == "tokenizer"
    assert calls == ["main/path"]  # no second load, no second copy
    # loading the main model again (mlx_lm.server reloads its default model with
    # keywords only) gives the model, never the draft
    assert load("main/path", adapter_path=None, tokenizer_config={}) == (TINY, "tokenizer")
    assert calls == ["main/path", "main/path"]
    assert load("other/draft") == (TINY, "tokenizer") and calls[-1] == "other/draft"
    assert step(None, TINY, object()) == "stock"
    out = step(mx.array(list(range(9))), TINY, MTPDraft(TINY), None, max_tokens=3)
    assert len(list(out)) == 3


# -- the sampling rule keeps the target distribution -------------------------------

P = np.array([0.05, 0.40, 0.25, 0.20, 0.10])
Q = np.array([0.30, 0.10, 0.40, 0.10, 0.10])
DRAWS = 6000


def _first_tokens(rule):
    """First output token of one speculative step (k=1), many times."""
    rng = np.random.default_rng(0)
    p = mx.array(np.stack([P, P]), dtype=mx.float32)
    q = mx.array(Q[None], dtype=mx.float32)
    counts = np.zeros(len(P))
    keys = mx.random.split(mx.random.key(1), DRAWS)
    for i in range(DRAWS):
        d = int(rng.choice(len(Q), p=Q))
        n, nxt = rule(p, q, [d], keys[i])
        counts[d if n == 1 else nxt] += 1
    return counts


def _chi2(counts):
    expect = P * counts.sum()
    return float(((counts - expect) ** 2 / expect).sum())


CHI2_99_4DOF = 13.28  # chi-square 99th percentile, 4 degrees of freedom


def _accept_all(p, q, drafts, key):
    return 1, 0


def _resample_from_p(p, q, drafts, key):
    # the right acceptance test, but the replacement drawn from p (wrong)
    n, _ = accept_sampled(p, q, drafts, key)
    tok = int(mx.random.categorical(mx.log(p[n]), key=mx.random.split(key, 3)[2]).item())
    return n, tok


def test_acceptance_rule_keeps_the_target_distribution():
    assert _chi2(_first_tokens(accept_sampled)) < CHI2_99_4DOF


@pytest.mark.parametrize("broken", [_accept_all, _resample_from_p])
def test_chi_square_catches_a_broken_rule(broken):
    assert _chi2(_first_tokens(broken)) > CHI2_99_4DOF


# -- drafting switches itself off where it does not pay -----------------------------


def _windows(length, per_token_seconds, n):
    """Feed ``n`` iterations timed at ``per_token_seconds[k]`` a token (a drafting
    iteration keeps one draft: two tokens); the k of every iteration."""
    ks = []
    for _ in range(n):
        k = length.next()
        ks.append(k)
        tokens = 2 if k else 1
        length.record(tokens, tokens * per_token_seconds[k])
    return ks


def test_draft_length_picks_what_yields_more_tokens_per_second():
    slow = spec.DraftLength(3, adaptive=True, window=4, probe_every=4)
    ks = _windows(slow, {3: 2.0, 0: 1.0}, 64)
    assert ks[:4] == [3] * 4 and ks[4:8] == [0] * 4  # each choice measured once
    later = ks[8:]
    assert later.count(0) >= 0.7 * len(later) and 3 in later  # mostly off, re-probed
    fast = spec.DraftLength(3, adaptive=True, window=4, probe_every=4)
    later = _windows(fast, {3: 1.0, 0: 2.0}, 64)[8:]
    assert later.count(3) >= 0.7 * len(later)
    fixed = spec.DraftLength(3, adaptive=False)
    assert set(_windows(fixed, {3: 9.0, 0: 1.0}, 32)) == {3}


def test_probes_of_a_losing_choice_back_off_and_a_win_resets_them():
    """Drafting that keeps losing is probed less and less often (gaps of 4, 8, 16,
    ... windows, at most MAX_PROBE_GAP); once it wins a probe it is chosen again."""
    length = spec.DraftLength(3, adaptive=True, window=4, probe_every=4)
    ks = _windows(length, {3: 2.0, 0: 1.0}, 4 * 100)
    probes = [w for w in range(2, 100) if ks[4 * w] == 3]  # after the two first windows
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert len(probes) <= 6 and gaps == sorted(gaps) and gaps[-1] > gaps[0]
    # drafting becomes the faster choice: picked again within one (backed-off) gap
    later = _windows(length, {3: 0.5, 0: 1.0}, 4 * (spec.DraftLength.MAX_PROBE_GAP + 8))
    assert later[-4 * 8 :].count(3) >= 0.7 * 4 * 8


def test_drafting_window_that_keeps_nothing_ends_at_half():
    """With no draft kept in the first half of a drafting window, the window ends
    there (it cannot win); one that keeps drafts runs its full length."""
    none_kept = spec.DraftLength(2, adaptive=True, window=8, probe_every=8)
    ks = []
    for _ in range(12):
        ks.append(none_kept.next())
        none_kept.record(1, 1.5 if ks[-1] else 1.0)  # drafting: one token, no draft kept
    assert ks[:4] == [2] * 4 and ks[4:12] == [0] * 8
    kept = spec.DraftLength(2, adaptive=True, window=8, probe_every=8)
    ks = []
    for _ in range(8):
        ks.append(kept.next())
        kept.record(2, 1.5)  # one draft kept each time
    assert ks == [2] * 8 and kept.next() == 0  # full window, then single steps measured


def test_one_stall_does_not_turn_drafting_on():
    """Single steps at 1 s a token, drafting at 2 s a token; one plain iteration
    stalls for 20 s (a kernel compiled on first use): single steps still win."""
    length = spec.DraftLength(2, adaptive=True, window=4, probe_every=4)
    ks = []
    for i in range(40):
        k = length.next()
        ks.append(k)
        stall = k == 0 and i == 5
        length.record(2 if k else 1, 20.0 if stall else (4.0 if k else 1.0))
    assert ks[:8] == [2] * 4 + [0] * 4  # each choice measured once, the stall in there
    later = ks[8:]
    assert later.count(0) >= 0.7 * len(later)


def test_never_accepted_drafts_turn_drafting_off_with_identical_output(monkeypatch):
    prompt = mx.random.randint(0, VOCAB, (21,), key=mx.random.key(9)).tolist()
    want = _plain(TINY, prompt, 60)
    fake, _ = _oracle(monkeypatch, want, len(prompt), wrong=True)
    clock = [0.0]
    ks = []
    forward = spec._main_forward

    def timed(model, y, cache):  # verifying k drafts costs (1 + k/2) steps of a fake clock
        k = y.shape[1] - 1
        ks.append(k)
        clock[0] += 1 + k / 2
        return forward(model, y, cache)

    monkeypatch.setattr(spec, "_main_forward", timed)
    monkeypatch.setattr(spec.time, "perf_counter", lambda: clock[0])
    cache = TINY.make_cache() + MTPDraft(TINY).make_cache()
    got = []
    for t, _, _ in mtp_generate_step(
        mx.array(prompt),
        TINY,
        MTPDraft(TINY),
        num_draft_tokens=3,
        max_tokens=60,
        prompt_cache=cache,
    ):
        got.append(int(t))
    assert got == want
    after_probe = ks[16:]  # the first two windows measure k=3 and k=0
    assert after_probe.count(0) >= 0.7 * len(after_probe)
    # the positions the MTP block skipped while not drafting were fed to it later
    assert cache[-1].offset == cache[0].offset


def _never_draft(monkeypatch, window=8):
    """The adaptive choice stuck on single steps, reviewed every ``window`` tokens."""
    monkeypatch.setattr(spec.DraftLength, "next", lambda self: 0)
    monkeypatch.setattr(spec.DraftLength, "iterations_left", lambda self: window)


def _greedy_with_processors(model, prompt, n, procs):
    """Greedy decoding one token at a time, each step's processors seeing the
    whole history (prompt and tokens so far). Stock ``generate_step`` of mlx-lm
    0.31 leaves the prefilled prompt out of that history, so it is no reference."""
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    history, out = mx.array(prompt), []
    for _ in range(n):
        for proc in procs:
            logits = proc(history, logits)
        out.append(int(mx.argmax(logits, axis=-1).item()))
        history = mx.concatenate([history, mx.array(out[-1:])])
        logits = model(mx.array([out[-1:]]), cache=cache)[:, -1]
    return out


def test_pipelined_single_steps_match_stepwise_decoding_with_processors(monkeypatch):
    """Single steps run pipelined (each built before the previous token is read):
    the tokens equal step-by-step decoding with a logits processor that reads the
    history (so each step must see the still-lazy token before it)."""
    from mlx_lm.sample_utils import make_logits_processors

    procs = make_logits_processors(repetition_penalty=3.0, repetition_context_size=20)
    prompt = mx.random.randint(0, VOCAB, (19,), key=mx.random.key(21)).tolist()
    want = _greedy_with_processors(TINY, prompt, 30, procs)
    assert want != _plain(TINY, prompt, 30)  # the penalty changes the tokens: the test can tell
    _never_draft(monkeypatch, window=8)
    got, drafted = _mtp(TINY, prompt, 30, 2, logits_processors=procs)
    assert got == want and not any(drafted)


def test_closing_during_single_steps_undoes_the_queued_step(monkeypatch):
    """A consumer that stops early (e.g. at an end-of-sequence token) while a
    pipelined step is queued leaves the caches where an unpipelined loop would:
    the last token not yet fed, the MTP block lined up with the main model."""
    _never_draft(monkeypatch, window=8)
    prompt = mx.random.randint(0, VOCAB, (23,), key=mx.random.key(22))
    cache = TINY.make_cache() + MTPDraft(TINY).make_cache()
    gen = mtp_generate_step(
        prompt, TINY, MTPDraft(TINY), num_draft_tokens=2, max_tokens=50, prompt_cache=cache
    )
    got = [int(next(gen)[0]) for _ in range(5)]  # inside the first 8-step run
    gen.close()
    assert cache[0].offset == 23 + len(got) - 1
    assert cache[-1].offset == cache[0].offset
    # and it continues exactly: the rest of the greedy run from that cache
    rest = [
        int(t)
        for (t, _), _ in zip(
            generate_step(mx.array([got[-1]]), TINY, prompt_cache=cache[:-1], max_tokens=6),
            range(6),
        )
    ]
    assert got + rest == _plain(TINY, prompt.tolist(), 11)


@pytest.mark.parametrize("n", [1, 5, 16, 17, 63, 64, 100])
def test_catch_up_passes_cover_every_position_in_few_shapes(n):
    from mlx_arch_plugins.deepseek_v4.model import COMPILED_MAX_TOKENS

    pieces = spec._catch_up_lengths(n)
    assert sum(pieces) == n and pieces == sorted(pieces, reverse=True)
    assert all(p <= COMPILED_MAX_TOKENS and p & (p - 1) == 0 for p in pieces)
    # at most one pass of each length below the limit
    short = [p for p in pieces if p < COMPILED_MAX_TOKENS]
    assert len(short) == len(set(short))


def test_deferred_mtp_pairs_in_few_passes_match_one_by_one():
    """While not drafting, the MTP block catches up later in a few passes (here
    16 + 4 + 1 positions): its next prediction equals that after feeding the
    same pairs one position at a time."""
    ids = mx.random.randint(0, VOCAB, (1, 23), key=mx.random.key(4))
    h = TINY.model.hidden(ids, TINY.make_cache())
    pairs = [(h[:, i : i + 1], [int(ids[0, i + 1])]) for i in range(21)]
    one_by_one, in_passes = MTPDraft(TINY).make_cache()[0], MTPDraft(TINY).make_cache()[0]
    for p in pairs:
        spec._feed_mtp(TINY, one_by_one, [p])
    batch = list(pairs)
    spec._feed_mtp(TINY, in_passes, batch)
    assert batch == [] and one_by_one.offset == in_passes.offset == 21
    nxt = h[:, 21:22], ids[:, 22:23]
    a = TINY.mtp_logits(*nxt, one_by_one)
    b = TINY.mtp_logits(*nxt, in_passes)
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


# -- every make-tiny checkpoint format ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_formats(tmp_path_factory):
    from mlx_lm.utils import load_model

    from mlx_arch_plugins.deepseek_v4 import tiny

    cfg = tiny.resolve_config()
    # every layer kind (the MTP block's ratio last), a small vocabulary
    cfg.update(vocab_size=512, compress_ratios=[4, 128, 0, 4], index_topk=8)
    models = {}
    for fmt in tiny.FORMATS:
        path = tiny.make_tiny(tmp_path_factory.mktemp(fmt) / "ckpt", fmt=fmt, seed=3, cfg=cfg)
        models[fmt], _ = load_model(path)
    return models


@pytest.mark.parametrize("fmt", ["official", "bf16", "mlx-affine4", "mxfp4"])
def test_greedy_identical_every_tiny_format(tiny_formats, fmt):
    """A 131-token prompt (inside a ratio-4 block, past the ratio-128 block end),
    24 greedy tokens: drafting changes no token in any checkpoint format."""
    model = tiny_formats[fmt]
    prompt = mx.random.randint(0, 512, (131,), key=mx.random.key(17)).tolist()
    want = _plain(model, prompt, 24)
    got, _ = _mtp(model, prompt, 24, 2, prefill_step_size=64)
    assert got == want
