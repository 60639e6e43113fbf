"""Guards for what Metal computes differently from the CPU these tests run on
(facts from MLX's source, 0.31.2 vs 0.32.x), each bit-identical on CPU:

* ``mx.fast.rope`` with an int offset and one position ignores the batch on
  Metal in mlx 0.31: with B > 1 the offset must be an array of size B;
* the FP8/FP4 power-of-two scales are built from exponent bits, not ``pow``;
* the CSA indexer's optional two-stage top-k selects the same entries."""

import mlx.core as mx
import numpy as np
import pytest
from helpers.dsv4_golden import inputs, load_case, run_protocol
from mlx_lm.models.cache import make_prompt_cache

from mlx_arch_plugins.deepseek_v4 import model as dsv4

pytestmark = pytest.mark.compat


# -- RoPE offsets ------------------------------------------------------------------


def test_no_int_offset_reaches_rope_with_a_batch(monkeypatch):
    """Batch of two through prefill and single-token decode, across completed
    compressor blocks: every rope call with B > 1 gets an array offset."""
    model = load_case("a_swa_csa_hash_mtp")
    real = mx.fast.rope
    calls = []

    def spy(x, *args, **kw):
        calls.append((x.shape[0], kw.get("offset")))
        return real(x, *args, **kw)

    monkeypatch.setattr(mx.fast, "rope", spy)
    prompt, decode = inputs("a_swa_csa_hash_mtp")
    cache = make_prompt_cache(model)
    model(mx.array([prompt[:21], prompt[1:22]]), cache=cache)
    for t in decode[:8]:  # positions 21..28: blocks complete at 23 and 27
        mx.eval(model(mx.array([[t], [t]]), cache=cache))
    batched = [off for b, off in calls if b > 1]
    assert batched, "no batched rope call seen"
    bad = [off for off in batched if not isinstance(off, mx.array)]
    assert not bad, f"{len(bad)} of {len(batched)} batched rope calls got an int offset"
    assert all(off.size == 2 for off in batched)


@pytest.mark.parametrize("shape", [(3, 1, 64), (3, 4, 1, 64), (2, 5, 64), (3, 1, 1, 64)])
def test_array_offset_is_bit_identical_on_cpu(shape):
    rope = dsv4.DeepseekV4RoPE(32, 10000.0)
    x = mx.random.normal(shape, key=mx.random.key(1))
    freqs = rope.freqs(64)
    a = mx.fast.rope(x, 64, traditional=True, base=None, scale=1.0, offset=9, freqs=freqs)
    assert np.array_equal(np.array(rope(x, 9)), np.array(a))


# -- powers of two ---------------------------------------------------------------------


def test_exp2_is_exact_over_the_normal_range():
    e = np.arange(-126, 128, dtype=np.int32)
    got = np.array(dsv4._exp2(mx.array(e)))
    assert np.array_equal(got, np.ldexp(np.float32(1), e).astype(np.float32))
    assert np.isinf(np.array(dsv4._exp2(mx.array([128]))))[0]


def test_pow2_scale_is_the_smallest_power_of_two_above(monkeypatch):
    amax = np.abs(np.random.default_rng(0).standard_normal(4096)).astype(np.float32) * 100
    amax = np.concatenate([amax, np.float32([448.0, 1.0, 2.0**-20, 1e-4])])  # 1e-4: the FP8 floor
    recip = np.float32(1 / 448.0)
    s = amax * recip
    want = np.ldexp(np.float32(1), np.ceil(np.log2(s.astype(np.float64))).astype(np.int32))
    got = np.array(dsv4._pow2_scale(mx.array(amax), mx.array(recip)))
    assert np.array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("fmt, block", [("fp8", 64), ("fp4", 32)])
def test_qat_rounding_does_not_call_pow(monkeypatch, fmt, block):
    def no_pow(*a, **k):
        raise AssertionError("mx.power in the QAT rounding (not exact on Metal)")

    monkeypatch.setattr(mx, "power", no_pow)
    x = mx.random.normal((4, 128), key=mx.random.key(2))
    mx.eval(dsv4._qat_round(x, block, fmt, dsv4._RECIP[fmt]))


# -- two-stage top-k -------------------------------------------------------------------------


def _sets(idx):
    return [frozenset(r) for r in np.array(idx).reshape(-1, np.array(idx).shape[-1]).tolist()]


@pytest.mark.parametrize(
    "lead, n, k, chunk",
    [((2,), 1000, 16, 64), ((2, 3), 4096, 64, 1024), ((1,), 129, 32, 64), ((3,), 70, 8, 9)],
)
def test_two_stage_top_k_selects_the_same_set(lead, n, k, chunk):
    rng = np.random.default_rng(n)
    score = mx.array(rng.permutation(np.prod(lead) * n).reshape(*lead, n).astype(np.float32))
    want = mx.argpartition(-score, kth=k - 1, axis=-1)[..., :k]
    got = dsv4.topk_indices(score, k, chunk=chunk)
    assert got.shape == want.shape
    assert _sets(got) == _sets(want)


def test_two_stage_top_k_with_hidden_entries():
    """Invisible entries score -inf; with at least k visible ones the visible
    choice is the same and no index falls outside the row."""
    rng = np.random.default_rng(3)
    score = rng.standard_normal((4, 300)).astype(np.float32)
    score[:, 200:] = -np.inf
    want = mx.argpartition(-mx.array(score), kth=19, axis=-1)[..., :20]
    got = np.array(dsv4.topk_indices(mx.array(score), 20, chunk=64))
    assert got.max() < 300 and _sets(got) == _sets(want)


def test_two_stage_is_off_by_default(monkeypatch):
    monkeypatch.delenv(dsv4.TOPK_CHUNK_ENV, raising=False)
    used = []
    monkeypatch.setattr(dsv4, "_top_k_two_stage", lambda *a: used.append(a))
    dsv4.topk_indices(mx.zeros((1, 50000)), 512)
    assert not used


@pytest.mark.parametrize("case, chunk", [("b_hca_long", 40), ("c_mixed_hd256", 16)])
def test_two_stage_top_k_in_the_model_picks_the_same_scores(monkeypatch, case, chunk):
    """Every selection the model makes through the two-stage path has the scores
    one argpartition picks, and where no tie sits at the k-th score the same set.
    (The indexer's FP4-rounded scores do tie; a tied entry may be swapped.)"""
    real, two = dsv4.topk_indices, dsv4._top_k_two_stage
    used, calls = [], []

    def both(score, k, chunk=None, limit=None):
        got = real(score, k, chunk, limit)
        if limit is not None:  # the entries past a query's limit, as real() masks them
            score = mx.where(mx.arange(score.shape[-1]) < limit[:, None], score, -mx.inf)
        want = mx.argpartition(-score, kth=k - 1, axis=-1)[..., :k]
        got_s = np.sort(np.array(mx.take_along_axis(score, got, axis=-1)), axis=-1)
        want_s = np.sort(np.array(mx.take_along_axis(score, want, axis=-1)), axis=-1)
        np.testing.assert_array_equal(got_s, want_s)
        s = -np.sort(-np.array(score), axis=-1)
        untied = s[..., k - 1] != s[..., k] if s.shape[-1] > k else np.ones(s.shape[:-1], bool)
        got_sets, want_sets = _sets(got), _sets(want)
        for g, w, ok in zip(got_sets, want_sets, untied.reshape(-1)):
            assert g == w or not ok
        calls.append(1)
        return got

    monkeypatch.setattr(dsv4, "_top_k_two_stage", lambda *a: used.append(1) or two(*a))
    monkeypatch.setattr(dsv4, "topk_indices", both)
    monkeypatch.setenv(dsv4.TOPK_CHUNK_ENV, str(chunk))
    run_protocol(load_case(case), case)
    assert used and calls, "the two-stage path never ran"


@pytest.mark.parametrize("case, chunk", [("b_hca_long", 40), ("c_mixed_hd256", 16)])
def test_two_stage_top_k_in_the_model_changes_nothing(monkeypatch, case, chunk):
    """Without the indexer's FP4 rounding (which turns a last-bit difference into
    a different rounded score now and then), the logits move by fp32 noise only."""
    ref = run_protocol(load_case(case, qat_rounding=False), case)
    two = dsv4._top_k_two_stage
    used = []
    monkeypatch.setattr(dsv4, "_top_k_two_stage", lambda *a: used.append(1) or two(*a))
    monkeypatch.setenv(dsv4.TOPK_CHUNK_ENV, str(chunk))
    got = run_protocol(load_case(case, qat_rounding=False), case)
    assert used, "the two-stage path never ran"
    # same entries, picked in another order: only the attention's summation
    # order differs (fp32 noise); a different choice moves logits by >> 1e-3
    for a, b in zip(got[:2], ref[:2]):
        assert np.abs(a - b).max() <= 1e-4
        assert np.array_equal(a.argmax(-1), b.argmax(-1))
