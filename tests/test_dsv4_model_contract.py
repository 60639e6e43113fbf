"""The contract stock mlx-lm holds every model to, for DeepSeek-V4 (issue 17, part 4).

mlx-lm runs each of its architectures through one model runner (float32 and
float16 forwards with and without a cache, a batch of two, ``copy.deepcopy``)
and checks ``generate_step`` with a prompt cache. These are the same checks in
our words, made stricter (outputs are compared, not only shaped), for every
attention kind (sliding window only, CSA ratio 4 with the indexer, HCA ratio
128) and checkpoint format (bf16, official FP8/FP4, MLX affine 4-bit).

Models are tiny (vocabulary 512) and cast like the stock runner does, but only
the floating parameters: the hash-routing table is integer.
"""

import copy
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

from mlx_arch_plugins.deepseek_v4 import tiny

pytestmark = pytest.mark.compat

VOCAB = 512
WINDOW = 16
# ratio -> prompt length that exercises it: past the window; for CSA more
# compressed entries than the indexer keeps (index_topk 4); for HCA past one
# 128-token block, with an unfinished block after it.
KINDS = {"window": (0, 40), "csa": (4, 72), "hca": (128, 140)}
FORMATS = ["bf16", "official", "mlx-affine4"]
# Largest |logit| difference allowed between two ways of computing the same
# logits (the logits are of order 10). Cached and uncached attention reduce in
# a different order, and the indexer's top-k may then pick differently.
ATOL = {mx.float32: 1e-2, mx.float16: 5e-2}

_built = {}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsv4_contract")

    def get(kind, fmt):
        if (kind, fmt) not in _built:
            ratio = KINDS[kind][0]
            cfg = tiny.resolve_config()
            # three layers of one kind (two hash-routed, one score-routed) + MTP
            cfg.update(compress_ratios=[ratio] * 4, sliding_window=WINDOW, vocab_size=VOCAB)
            _built[kind, fmt] = tiny.make_tiny(root / f"{kind}-{fmt}", fmt=fmt, cfg=cfg)
        return _built[kind, fmt]

    return get


def _load(path: Path, dtype=mx.float32):
    model, _ = load_model(path)
    floating = lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p  # noqa: E731
    model.update(tree_map(floating, model.parameters()))
    return model


def _tokens(n, batch=1, seed=0):
    return mx.random.randint(2, VOCAB, (batch, n), key=mx.random.key(seed))


def _cached(model, ids, chunks, steps, cache=None):
    """Logits for ``ids`` through a cache: prefill in ``chunks``, then ``steps``
    single-token decode steps."""
    cache = make_prompt_cache(model) if cache is None else cache
    out, start = [], 0
    for end in [*chunks, *range(ids.shape[1] - steps + 1, ids.shape[1] + 1)]:
        out.append(model(ids[:, start:end], cache=cache))
        start = end
    assert start == ids.shape[1]
    return mx.concatenate(out, axis=1), cache


def _max_diff(a, b):
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def _assert_close(got, want, dtype, what):
    assert got.shape == want.shape, what
    diff = _max_diff(got, want)
    assert diff <= ATOL[dtype], f"{what}: max |diff| {diff:.3g} > {ATOL[dtype]}"


CASES = [(k, f) for f in FORMATS for k in KINDS]
ids_of = [f"{k}-{f}" for k, f in CASES]


@pytest.mark.parametrize("kind,fmt", CASES, ids=ids_of)
def test_float32_forward_with_and_without_cache(checkpoints, kind, fmt):
    model = _load(checkpoints(kind, fmt))
    n = KINDS[kind][1]
    ids = _tokens(n)
    full = model(ids)
    assert full.shape == (1, n, VOCAB) and full.dtype == mx.float32
    # uneven chunks: the compressors see blocks split across calls
    cached, _ = _cached(model, ids, chunks=[n // 2 + 3, n - 3], steps=3)
    _assert_close(cached, full, mx.float32, "cached vs uncached")


@pytest.mark.parametrize("kind,fmt", CASES, ids=ids_of)
def test_float16_forward_with_and_without_cache(checkpoints, kind, fmt):
    # Short (float16 runs slowly on CPU): past the window and one CSA block set.
    model = _load(checkpoints(kind, fmt), mx.float16)
    ids = _tokens(WINDOW + 8)
    full = model(ids)
    assert full.dtype == mx.float16 and mx.isfinite(full).all().item()
    cached, _ = _cached(model, ids, chunks=[WINDOW - 3, WINDOW + 5], steps=3)
    assert cached.dtype == mx.float16
    _assert_close(cached, full, mx.float16, "float16 cached vs uncached")


@pytest.mark.parametrize("kind,fmt", CASES, ids=ids_of)
def test_batch_of_two_equals_each_row_alone(checkpoints, kind, fmt):
    model = _load(checkpoints(kind, fmt))
    n = KINDS[kind][1]
    ids = _tokens(n, batch=2, seed=1)
    assert not mx.array_equal(ids[0], ids[1]).item()
    both = model(ids)
    assert both.shape == (2, n, VOCAB)
    both_cached, _ = _cached(model, ids, chunks=[n - 2], steps=2)
    for row in range(2):
        alone = model(ids[row : row + 1])
        _assert_close(both[row : row + 1], alone, mx.float32, f"row {row} in a batch")
        _assert_close(both_cached[row : row + 1], alone, mx.float32, f"row {row} cached")


def _decode_logits(model, ids, steps=2):
    return _cached(model, ids, chunks=[ids.shape[1] - steps], steps=steps)[0][:, -steps:]


@pytest.mark.parametrize("kind,fmt", CASES, ids=ids_of)
def test_deepcopy_before_and_after_use(checkpoints, kind, fmt, monkeypatch):
    """A copy made at any time (fresh, after a prefill, after decode steps that
    built the compiled graphs and memos) computes what the original computes, and
    is independent of it: its own weights, its own compiled graphs."""
    model = _load(checkpoints(kind, fmt))
    ids = _tokens(KINDS[kind][1], seed=2)
    fresh = copy.deepcopy(model)
    want = _decode_logits(model, ids)  # prefill + decode: memos and compiled graphs
    used = copy.deepcopy(model)
    for other in (fresh, used):
        assert mx.array_equal(_decode_logits(other, ids), want).item()

    # Change the copy's output projection: its decode (compiled, single sequence)
    # must use the new weights, matching its own eager decode, and the original
    # must not change.
    used.lm_head.update(
        tree_map(lambda p: p * 2 if p.dtype == mx.float32 else p, used.lm_head.parameters())
    )
    compiled = _decode_logits(used, ids)
    monkeypatch.setenv("MLX_ARCH_PLUGINS_COMPILE", "0")
    eager = _decode_logits(used, ids)
    monkeypatch.delenv("MLX_ARCH_PLUGINS_COMPILE")
    _assert_close(compiled, eager, mx.float32, "copy: compiled vs eager decode")
    assert _max_diff(compiled, want) > 1.0, "the copy still computes with the original's weights"
    assert mx.array_equal(_decode_logits(model, ids), want).item()
    # nothing is shared: every parameter array of the copy is its own
    mine = {id(v) for _, v in tree_flatten(model.parameters())}
    assert not mine & {id(v) for _, v in tree_flatten(fresh.parameters())}


@pytest.mark.parametrize("kind,fmt", CASES, ids=ids_of)
def test_generate_step_resumes_from_prompt_cache(checkpoints, kind, fmt):
    """Greedy generation in one go equals generation that stops, keeps its prompt
    cache and resumes with the next token (token ids and log-probabilities)."""
    model = _load(checkpoints(kind, fmt))
    prompt = _tokens(KINDS[kind][1], seed=3)[0]
    n = 6
    # a prefill step size that splits the prompt into uneven chunks
    step = 2 * WINDOW + 1
    whole = list(generate_step(prompt, model, max_tokens=n, prefill_step_size=step))
    tokens = [t for t, _ in whole]

    cache = make_prompt_cache(model)
    first = list(
        generate_step(prompt, model, max_tokens=2, prompt_cache=cache, prefill_step_size=step)
    )
    # the cache now holds the prompt and both tokens; feed the third to resume
    rest = list(
        generate_step(
            mx.array(tokens[2:3]),
            model,
            max_tokens=n - 3,
            prompt_cache=cache,
            prefill_step_size=step,
        )
    )
    resumed = first + [whole[2]] + rest
    assert [t for t, _ in resumed] == tokens
    for i, ((_, got), (_, want)) in enumerate(zip(resumed, whole)):
        _assert_close(got[None], want[None], mx.float32, f"log-probabilities of token {i}")


@pytest.mark.parametrize("kind,fmt", CASES, ids=ids_of)
def test_caches_taken_out_of_a_batch_deep_copy(checkpoints, kind, fmt):
    """mlx_lm.server keeps each finished sequence's cache (taken out of the batch
    after packed decode steps) and deep-copies it for the next request with the
    same prefix; the copy must decode like the cache it came from, and like the
    model without any cache."""
    model = _load(checkpoints(kind, fmt))
    n = KINDS[kind][1]
    ids = _tokens(n + 3, batch=2, seed=4)
    rows = [make_prompt_cache(model) for _ in range(2)]
    for b, cache in enumerate(rows):
        model(ids[b : b + 1, :n], cache=cache)
    batch = [type(a).merge([a, b]) for a, b in zip(*rows)]
    for t in (n, n + 1):  # batched single-token steps: the packed decode state
        model(ids[:, t : t + 1], cache=batch)
    taken = [c.extract(0) for c in batch]
    twin = copy.deepcopy(taken)
    last = ids[:1, n + 2 : n + 3]
    got, want = model(last, cache=twin), model(last, cache=taken)
    assert mx.array_equal(got, want).item()
    _assert_close(got, model(ids[:1])[:, -1:], mx.float32, "copied batch cache vs no cache")
