"""Speculative decoding of DeepSeek-V4 with the checkpoint's own MTP block.

The MTP block at position t reads the main model's final hyper-connection
state h_t and the token x_{t+1} and predicts x_{t+2}. A decode step:

1. draft k tokens with the MTP block: the first from the real h of the last
   accepted position, the next ones chained on the MTP block's own output
   state (no second model, no copy of any weight);
2. verify them with one main-model forward of k+1 tokens;
3. accept by the standard rule (greedy: exact match; sampling: accept d with
   probability min(1, p(d)/q(d)), else draw from the residual max(0, p-q)),
   so the output distribution is the main model's;
4. undo the rejected tokens in the main cache and the chained (approximate)
   positions in the MTP cache (``DeepseekV4Cache.trim``), then feed the MTP
   block the accepted positions with their real h at the next draft.

``MTPDraft`` is the object ``--draft-model mtp`` gives stock mlx-lm; stock
``speculative_generate_step`` hands it the work through its
``speculative_generate_step`` method (see host/patches/speculative.py).
``MLX_ARCH_PLUGINS_MTP=0`` turns drafting off (plain decode, same tokens).

Drafting pays only when enough drafts are accepted: a (k+1)-token verify costs more
than a one-token step (1.1-1.7x on the H200). A verify's drafts are not read before it
is built (they stay lazy), but the acceptance must be: with greedy decoding, while most
iterations keep every draft, the next iteration is built while the current verify runs,
on the guess that all its drafts are kept, and dropped unevaluated when they are not
(``_build_ahead``; ``MLX_ARCH_PLUGINS_MTP_AHEAD=0`` turns that off). ``DraftLength`` times
the loop itself and drafts only while that yields more tokens per second than single
steps, trying the other choice again now and then (single steps leave the MTP block
behind; it catches up on those positions in a few passes when drafting resumes);
``MLX_ARCH_PLUGINS_MTP_ADAPT=0`` always drafts k. The choice never changes the tokens,
only how fast they come.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

import mlx.core as mx

from .cache import TRIM_BOUND, DeepseekV4Cache

ENV_SWITCH = "MLX_ARCH_PLUGINS_MTP"
KEYWORD = "mtp"
MAX_DRAFT = TRIM_BOUND - 1  # the caches undo at most TRIM_BOUND tokens


ADAPT_SWITCH = "MLX_ARCH_PLUGINS_MTP_ADAPT"
AHEAD_SWITCH = "MLX_ARCH_PLUGINS_MTP_AHEAD"
# An ahead iteration undone after a rejection trims 2k+1 tokens of the main cache.
MAX_AHEAD_DRAFT = (TRIM_BOUND - 1) // 2
# Build ahead while at least this share of recent iterations kept every draft (an
# exponential average with this weight on the newest). On the H200 (whole Flash,
# 2-bit) an iteration whose guess came true took 72-80 ms instead of 105-133, and one
# whose guess failed 150-210 ms instead of 83-113: building ahead paid at 100%
# acceptance and lost at 60-80% (benchmarks/RESULTS.md), hence a high bar.
AHEAD_MIN_RATE = 0.75
AHEAD_RATE_WEIGHT = 0.2
# While not drafting, the MTP block catches up at most this many positions late.
MAX_DEFERRED = 64


def drafting_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def ahead_enabled() -> bool:
    """``MLX_ARCH_PLUGINS_MTP_AHEAD=0``: build each verify only after the previous
    one is read (for timing the difference; the tokens are the same)."""
    return os.environ.get(AHEAD_SWITCH, "1") != "0"


class DraftLength:
    """How many tokens to draft next: ``k`` while drafting yields more tokens per
    second than single steps (``0``), measured over windows of loop iterations, with
    the losing choice measured again after ``probe_every`` windows. Each probe that
    loses again doubles that gap (up to ``MAX_PROBE_GAP`` windows), so a choice that
    keeps losing (drafts never accepted) costs less and less; a probe that wins
    switches and resets it. An iteration that took over ``OUTLIER`` times the
    window's median is left out of the window's rate: a one-off stall (a kernel
    compiled on first use, a collection) must not decide the next windows."""

    OUTLIER = 4.0
    MAX_PROBE_GAP = 64

    def __init__(self, k: int, adaptive: bool, window: int = 8, probe_every: int = 8):
        self.choices = (k, 0)
        self.adaptive = adaptive and k > 0
        self.window, self.probe_every = window, probe_every
        self.rate = {k: None, 0: None}  # tokens per second of the last window
        self.current = k
        self._iters = []  # (tokens, seconds) of the current window's iterations
        self._gap = probe_every  # windows between probes of the losing choice
        self._since_probe = 0
        self._probing = False

    def next(self) -> int:
        return self.current if self.adaptive else self.choices[0]

    def iterations_left(self) -> int:
        """Iterations until the current window's choice is reviewed."""
        return self.window - len(self._iters) if self.adaptive else 1

    def record(self, tokens: int, seconds: float) -> None:
        if not self.adaptive:
            return
        self._iters.append((tokens, seconds))
        if len(self._iters) < self.window and not self._hopeless():
            return
        self.rate[self.current] = self._window_rate()
        self._iters = []
        unmeasured = [c for c in self.choices if self.rate[c] is None]
        best = max(self.choices, key=lambda c: self.rate[c] or 0.0)
        if self._probing:  # back off while the probed choice keeps losing
            lost = best != self.current
            self._gap = min(2 * self._gap, self.MAX_PROBE_GAP) if lost else self.probe_every
            self._probing, self._since_probe = False, 0
        else:
            self._since_probe += 1
        if unmeasured:
            self.current = unmeasured[0]
        elif self._since_probe >= self._gap:
            self.current = self.choices[1] if best == self.choices[0] else self.choices[0]
            self._probing = True
        else:
            self.current = best

    def _hopeless(self) -> bool:
        """A drafting window whose first half kept no draft ends there: each of those
        iterations gave one token for a verify and k drafts, more work than a single
        step, so the window cannot come out ahead."""
        half = max(1, self.window // 2)
        drafting = self.current != self.choices[1]
        return drafting and len(self._iters) >= half and all(t == 1 for t, _ in self._iters)

    def _window_rate(self) -> float:
        times = sorted(s for _, s in self._iters)
        limit = self.OUTLIER * times[len(times) // 2]
        kept = [(t, s) for t, s in self._iters if s <= limit or limit <= 0]
        return sum(t for t, _ in kept) / max(sum(s for _, s in kept), 1e-9)


class MTPDraft:
    """A draft 'model' that is the main model's MTP block: it holds the main
    model (shared weights) and makes the MTP block's cache."""

    def __init__(self, model, index: int = 0):
        if not getattr(model.model, "mtp", None):
            raise ValueError(
                "this DeepSeek-V4 checkpoint has no MTP block (num_nextn_predict_layers: 0); "
                "use a separate --draft-model"
            )
        self.model = model
        self.index = index

    @property
    def layers(self):
        return [self.model.model.mtp[self.index]]

    def make_cache(self):
        a = self.model.args
        ratio = a.compress_ratios[a.num_hidden_layers + self.index]
        return [DeepseekV4Cache(a.sliding_window, ratio)]

    def speculative_generate_step(self, prompt, model, draft_model=None, stream=None, **kw):
        """What stock ``speculative_generate_step`` runs for this draft."""
        if model is not self.model:
            raise ValueError("an MTP draft drafts only for the model it was made from")
        gen = mtp_generate_step(prompt, model, self, **kw)
        if stream is None:
            return gen
        return _on_stream(gen, stream)


def _on_stream(gen, stream):
    # each step of the generator runs on ``stream`` (as stock's does)
    while True:
        with mx.stream(stream):
            try:
                item = next(gen)
            except StopIteration:
                return
        yield item


def make_mtp_draft(model, name: str, main_path: str | None = None):
    """The draft object for ``--draft-model name``: the MTP block for the keyword
    ``mtp``; None otherwise. (Not the main model's own path: stock mlx-lm loads the
    main model again by that path, e.g. the server's default model, and must get it.)"""
    if name != KEYWORD:
        return None
    return MTPDraft(model)


# -- sampling -------------------------------------------------------------------


def _is_greedy(sampler) -> bool:
    return sampler is None or getattr(sampler, "__name__", "") == "greedy_sampler"


def target_probs(sampler) -> Callable[[mx.array], mx.array] | None:
    """logprobs -> the distribution ``sampler`` draws from, for mlx-lm's
    ``make_sampler`` samplers with fixed filters (temperature, top-p, min-p,
    top-k); None when that is not known (XTC is random; custom samplers)."""
    code = getattr(sampler, "__code__", None)
    if code is None or set(code.co_freevars) != {"sampling_methods", "temp"}:
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in sampler.__closure__)))
    methods, temp = cells["sampling_methods"], cells["temp"]
    if any("apply_xtc" in getattr(m, "__code__", code).co_names for m in methods):
        return None

    def probs(logprobs):
        for m in methods:
            logprobs = m(logprobs)
        return mx.softmax(logprobs / temp, axis=-1, precise=True)

    return probs


def accept_sampled(p: mx.array, q: mx.array, drafts: list[int], key=None):
    """Speculative-sampling acceptance. ``p`` [k+1, V]: target distributions
    after the accepted prefix, ``q`` [k, V]: the draft distributions the
    ``drafts`` were drawn from. Returns (accepted count n, next token): draft
    i is kept with probability min(1, p_i(d)/q_i(d)); the first rejected one
    is replaced by a draw from max(0, p_i - q_i) (normalised); when all are
    kept the next token is drawn from p_k."""
    k = len(drafts)
    keys = mx.random.split(key, 2) if key is not None else (None, None)
    if k:
        idx = mx.array(drafts)[:, None]
        pd = mx.take_along_axis(p[:k], idx, axis=-1)[:, 0]
        qd = mx.take_along_axis(q, idx, axis=-1)[:, 0]
        u = mx.random.uniform(shape=(k,), key=keys[0])
        ok = (u * qd <= pd).tolist()
        n = ok.index(False) if False in ok else k
    else:
        n = 0
    if n < k:
        rest = mx.maximum(p[n] - q[n], 0)
        dist = rest / rest.sum()
    else:
        dist = p[k]
    tok = mx.random.categorical(mx.log(dist), key=keys[1])
    return n, int(tok.item())


# -- the decode loop --------------------------------------------------------------


def _logprobs(logits, toks, history, processors):
    """Logprobs of the positions of ``logits`` [L, V], whose inputs end with
    ``toks``; each position's processors see the tokens before it (``history``
    holds those up to the first position's input)."""
    if not processors:
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    out, hist = [], history
    for i in range(logits.shape[0]):
        if i:
            hist = mx.concatenate([hist, toks[i - 1 : i]])
        lg = logits[i : i + 1]
        for proc in processors:
            lg = proc(hist, lg)
        out.append(lg - mx.logsumexp(lg, axis=-1, keepdims=True))
    return mx.concatenate(out, 0)


def _main_forward(model, ids, cache):
    """Logits and final hyper-connection states of the main model."""
    h = model.model.hidden(ids, cache)
    return (_tail(model, h) if ids.shape == (1, 1) else model._tail(h)), h


def _tail(model, h):
    from .model import _compile_enabled

    return model._compiled_tail()(h) if _compile_enabled() else model._tail(h)


def _align(cache: DeepseekV4Cache, start: int, like: DeepseekV4Cache) -> DeepseekV4Cache:
    """The MTP cache for positions from ``start``: the given one when it
    lines up, else an empty one placed there (its positions before ``start``
    had no main-model states to pair with; only draft quality suffers)."""
    if cache.offset == start:
        return cache
    fresh = DeepseekV4Cache(like.sliding_window, like.compress_ratio)
    fresh.offset = start
    return fresh


def mtp_generate_step(
    prompt: mx.array,
    model,
    draft: MTPDraft,
    *,
    num_draft_tokens: int = 2,
    max_tokens: int = 256,
    sampler=None,
    logits_processors=None,
    prompt_cache=None,
    prefill_step_size: int = 512,
    **_unused,  # kv_bits etc.: DeepSeek-V4 caches are not quantized
):
    """Yields (token, logprobs, from_draft) like stock
    ``speculative_generate_step``, drafting with the MTP block."""
    n_main = len(model.layers)
    if prompt_cache is None:
        prompt_cache = model.make_cache() + draft.make_cache()
    main_cache = prompt_cache[:n_main]
    if not drafting_enabled() or num_draft_tokens <= 0:
        yield from _plain(
            prompt, model, main_cache, max_tokens, sampler, logits_processors, prefill_step_size
        )
        return
    k_max = min(int(num_draft_tokens), MAX_DRAFT)
    mtp_model = draft.make_cache()[0]
    if len(prompt_cache) > n_main:
        mtp_model = prompt_cache[n_main]
    greedy = _is_greedy(sampler)
    probs = None if greedy else target_probs(sampler)
    pick = (lambda lp: mx.argmax(lp, axis=-1)) if greedy else sampler
    history = prompt.astype(mx.uint32) if logits_processors else None
    # build the next verify while this one runs (see _build_ahead): greedy only,
    # where the token after all-kept drafts is known before it is read
    guessing = greedy and not logits_processors and ahead_enabled() and k_max <= MAX_AHEAD_DRAFT
    ahead = None
    all_kept = 1.0  # running share of iterations that kept every draft

    def process(logits, toks, hist=None):
        # logits [L, V] of positions whose inputs end with ``toks``; returns
        # logprobs per position (processors see the tokens before each)
        return _logprobs(logits, toks, history if hist is None else hist, logits_processors)

    def draw(feed_h, feed, k):
        # k drafts (lazy) and, sampling with known distributions, theirs
        return _draft(model, mtp, feed_h, feed, k, probs, pick)

    # prefill: main model in chunks; the MTP block gets (h_t, x_{t+1}) pairs
    y = prompt.astype(mx.uint32)
    P = y.size
    start = main_cache[0].offset
    mtp = _align(mtp_model, start, mtp_model)
    hs = None
    for a in range(0, P, prefill_step_size):
        ids = y[a : a + prefill_step_size]
        hs = model.model.hidden(ids[None], main_cache)
        pairs = y[a + 1 : a + 1 + ids.size]  # next tokens known in the prompt
        if pairs.size:
            model.mtp_logits(hs[:, : pairs.size], pairs[None], mtp)
        mx.eval([c.state for c in main_cache] + [mtp.state])
    lp = process(model._tail(hs[:, -1:])[0], y[-1:])
    tok = pick(lp)[0]
    mx.eval(tok)
    pending_h, pending_t = hs[:, -1:], [int(tok.item())]
    ntoks = 0
    if len(prompt_cache) > n_main:
        prompt_cache[n_main] = mtp  # a reused prompt cache keeps the lined-up one
    try:
        ntoks += 1
        if history is not None:
            history = mx.concatenate([history, mx.array(pending_t, mx.uint32)])
        yield pending_t[0], lp[0], False
        length = DraftLength(k_max, os.environ.get(ADAPT_SWITCH, "1") != "0")
        deferred = []  # (h, tokens) pairs the MTP block has not seen yet
        while ntoks < max_tokens or max_tokens < 0:
            t0 = time.perf_counter()
            left = max_tokens - ntoks if max_tokens >= 0 else k_max + 1
            k = max(0, min(length.next(), left - 1))
            if not k:
                if ahead is not None:
                    ahead = _undo_ahead(main_cache, mtp, ahead)
                # not drafting: single steps, each built while the previous one runs;
                # the MTP block catches up on their positions when drafting resumes
                # (a few multi-token passes cost far less than one step each)
                n = length.iterations_left()
                if max_tokens >= 0:
                    n = min(n, left)
                steps = _single_steps(model, main_cache, pending_t[-1], n, process, pick, history)
                with contextlib.closing(steps):
                    for t, lp_t, h in steps:
                        deferred.append((pending_h, pending_t))
                        if len(deferred) >= MAX_DEFERRED:
                            _feed_mtp(model, mtp, deferred)
                        pending_h, pending_t = h, [t]
                        ntoks += 1
                        if history is not None:
                            history = mx.concatenate([history, mx.array([t], mx.uint32)])
                        yield t, lp_t, False
                        now = time.perf_counter()
                        length.record(1, now - t0)
                        t0 = now
                continue
            if ahead is not None and ahead.k != k:
                ahead = _undo_ahead(main_cache, mtp, ahead)
            if ahead is None:
                _feed_mtp(model, mtp, deferred)
                feed = mx.array(pending_t, mx.uint32)
                cur = _build_verify(model, main_cache, pending_h, feed, k, draw, process)
            else:  # built during the previous verify, on the guess that came true
                cur, ahead = _keep_ahead(main_cache, mtp, ahead), None
            mx.async_eval(cur.drafts, cur.lp)
            if k > 1:
                mtp.trim(k - 1)  # the chained draft positions (approximate states)
            worth = all_kept >= AHEAD_MIN_RATE
            if guessing and worth and (max_tokens < 0 or ntoks + k + 1 < max_tokens):
                ahead = _build_ahead(model, main_cache, mtp, cur, draw, process)
            drafts = cur.drafts.tolist()
            n, nxt = _accept(cur.lp, cur.q, drafts, greedy, probs, pick)
            all_kept += AHEAD_RATE_WEIGHT * ((n == k) - all_kept)
            if ahead is not None and not (n == k and nxt == ahead.guess.item()):
                ahead = _undo_ahead(main_cache, mtp, ahead)
            if k - n:  # undo the rejected drafts
                for c in main_cache:
                    c.trim(k - n)
            pending_h, pending_t = cur.hs[:, : n + 1], drafts[:n] + [nxt]
            out = drafts[:n] + [nxt]
            length.record(len(out), time.perf_counter() - t0)
            for i, t in enumerate(out):
                ntoks += 1
                if history is not None:
                    history = mx.concatenate([history, mx.array([t], mx.uint32)])
                yield t, cur.lp[i], i < n
                if ntoks == max_tokens:
                    return
    finally:
        if ahead is not None:  # built on a guess nobody will read
            _undo_ahead(main_cache, mtp, ahead)
        # the MTP block catches up with the accepted positions, so a reused
        # prompt cache continues with both caches lined up
        if pending_t:
            deferred.append((pending_h, pending_t))
        _feed_mtp(model, mtp, deferred)


def _single_steps(model, cache, first, n, process, pick, history):
    """``n`` one-token main-model steps from the token ``first``, pipelined as
    stock ``generate_step`` does: each step's graph is built and queued before
    the previous step's token is read. Yields (token, logprobs, h) per step."""

    def step(tok, hist):
        logits, h = _main_forward(model, tok[None], cache)
        lp = process(logits[0], tok, hist)
        nxt = pick(lp).astype(mx.uint32)
        mx.async_eval(nxt, lp, h)
        return nxt, lp, h

    hist = history
    cur = step(mx.array([first], mx.uint32), hist)
    ahead = False
    try:
        for i in range(n):
            nxt = None
            if i + 1 < n:
                if hist is not None:  # the processors of the next step see this token
                    hist = mx.concatenate([hist, cur[0]])
                nxt = step(cur[0], hist)
            ahead = nxt is not None
            yield int(cur[0].item()), cur[1][0], cur[2]
            ahead = False
            cur = nxt
    finally:
        if ahead:
            # closed early with the next step queued: undo it, so the cache ends
            # where an unpipelined loop leaves it (the last token not yet fed)
            for c in cache:
                c.trim(1)


def _catch_up_lengths(n: int) -> list[int]:
    """``n`` positions as passes of power-of-two lengths up to the compiled step's
    limit, longest first: a handful of distinct shapes, so a backend that compiles
    per shape (MLX CUDA's fused kernels) compiles each once, not once per count."""
    from .model import COMPILED_MAX_TOKENS

    out = []
    while n:
        piece = min(COMPILED_MAX_TOKENS, 1 << (n.bit_length() - 1))
        out.append(piece)
        n -= piece
    return out


def _feed_mtp(model, mtp, pairs):
    """Feed the MTP block the real (h, next token) pairs of positions it has not
    seen, in a few multi-token passes (``_catch_up_lengths``); empties ``pairs``."""
    if not pairs:
        return
    h = mx.concatenate([p[0] for p in pairs], axis=1) if len(pairs) > 1 else pairs[0][0]
    ids = mx.array([[t for p in pairs for t in p[1]]], mx.uint32)
    at = 0
    for n in _catch_up_lengths(ids.shape[1]):
        model.mtp_logits(h[:, at : at + n], ids[:, at : at + n], mtp)
        at += n
    mx.eval(mtp.state)
    pairs.clear()


def _draft(model, mtp, feed_h, feed, k, probs, pick):
    """k draft tokens as a lazy uint32 array [k] (nothing is read: the verify can
    be built on them before they are computed) and, when sampling with known
    distributions, the draft distributions [k, V] they were drawn from. The MTP
    block is fed the real pairs (``feed_h``, ``feed``), then chains its own state."""
    drafts, qs = [], []
    h, ids = feed_h, feed[None]
    for _ in range(k):
        logits, g = _mtp_forward(model, h, ids, mtp)
        lg = logits[0, -1:]
        lg = lg - mx.logsumexp(lg, axis=-1, keepdims=True)
        if probs is not None:
            qd = probs(lg)
            d = mx.random.categorical(mx.log(qd))
            qs.append(qd)
        else:
            d = pick(lg)
        drafts.append(d.astype(mx.uint32))
        h, ids = g[:, -1:], drafts[-1][None]
    return mx.concatenate(drafts), (mx.concatenate(qs, 0) if qs else None)


class _Verify:
    """One drafting iteration, built lazily: ``k`` drafts, the verify input ``y``
    (the last real token, then the drafts), its logprobs ``lp`` and final states
    ``hs``; ``guess`` is the token it assumed before the drafts (ahead only)."""

    __slots__ = ("k", "drafts", "q", "y", "lp", "hs", "guess")

    def __init__(self, k, drafts, q, y, lp, hs, guess=None):
        self.k, self.drafts, self.q, self.y = k, drafts, q, y
        self.lp, self.hs, self.guess = lp, hs, guess


def _build_verify(model, main_cache, feed_h, feed, k, draw, process, guess=None):
    """Drafts from the real pairs (``feed_h``, ``feed``) and their verify, as a graph
    (nothing is evaluated). Advances the main cache by k+1 tokens and the MTP
    cache by ``feed``'s length plus k-1 chained positions."""
    drafts, q = draw(feed_h, feed, k)
    y = mx.concatenate([feed[-1:], drafts])
    logits, hs = _main_forward(model, y[None], main_cache)
    return _Verify(k, drafts, q, y, process(logits[0], y), hs, guess)


def _build_ahead(model, main_cache, mtp, cur: _Verify, draw, process) -> _Verify:
    """The iteration after ``cur`` on the guess that all its drafts are kept: its
    real pairs are then cur's k+1 states with cur's drafts and the token the verify
    picks after them (greedy: the argmax at the last position). Built while cur runs
    on the device, so a verify whose guess came true costs no graph building
    after its drafts are read; one that did not is undone (``_undo_ahead``)
    without ever being evaluated."""
    k = cur.k
    guess = mx.argmax(cur.lp[k:], axis=-1).astype(mx.uint32)
    feed = mx.concatenate([cur.y[1:], guess])
    for c in (*main_cache, mtp):
        c.start_guess()
    return _build_verify(model, main_cache, cur.hs[:, : k + 1], feed, k, draw, process, guess)


def _keep_ahead(main_cache, mtp, ahead: _Verify) -> _Verify:
    for c in (*main_cache, mtp):
        c.keep_guess()
    return ahead


def _undo_ahead(main_cache, mtp, ahead: _Verify) -> None:
    """Take an unevaluated ahead iteration out of the caches, so nothing of it is
    ever computed: its verify's k+1 tokens from the main cache, its k+1 fed and
    k-1 chained positions from the MTP block's."""
    for c in main_cache:
        c.drop_guess(ahead.k + 1)
    mtp.drop_guess(2 * ahead.k)
    return None


def _mtp_forward(model, hidden, ids, cache):
    """Logits and output state of the MTP block (its state chains drafts)."""
    return model.mtp_forward(hidden, ids, cache)


def _accept(lp, q, drafts, greedy, probs, pick):
    """(accepted count, next token) from the verify logprobs ``lp`` [k+1, V]."""
    k = len(drafts)
    if q is not None:  # sampling with known distributions
        return accept_sampled(probs(lp), q, drafts)
    # greedy, or a sampler whose distribution is unknown: the main model's
    # own pick at each position; a draft is kept where it agrees (exact in
    # distribution too: every output token is the main model's draw)
    picks = pick(lp).tolist()
    n = 0
    while n < k and picks[n] == drafts[n]:
        n += 1
    return n, picks[n]


def _plain(prompt, model, cache, max_tokens, sampler, processors, step):
    from mlx_lm.generate import generate_step

    for tok, lp in generate_step(
        prompt,
        model,
        max_tokens=max_tokens,
        sampler=sampler,
        logits_processors=processors,
        prompt_cache=cache,
        prefill_step_size=step,
    ):
        yield (tok.item() if hasattr(tok, "item") else tok), lp, False
