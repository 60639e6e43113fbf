"""Speculative decoding of DeepSeek-V4 with its MTP block: the parts and the whole.

Random Flash-width weights (benchmarks/perf.py's builder, plus a quantized MTP
block), caches filled to --context tokens. Prints one JSON line per figure
(prefix ``JSON ``):

  verify      ms of one main-model forward of k+1 tokens (k = 0..4; k = 0 is
              the plain 1-token decode step), each followed by the trim that
              undoes it, so the context stays the same
  draft       ms of one chained MTP draft step (1 token)
  e2e         tokens/s of the whole draft/verify/accept/trim loop with an
              oracle that accepts each draft with probability --rates
              (independent per draft, up to the first rejection), per k,
              next to plain decode tokens/s

  python benchmarks/spec_decode.py --layers 43 --experts 64 --context 4096
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import mlx.core as mx
from mlx import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import perf  # noqa: E402  (after the path insert above)


def build(layers, experts, width="flash", seed=0):
    cfg = perf.FLASH if width == "flash" else perf.SMALL
    cfg.update(n_routed_experts=experts, num_nextn_predict_layers=1)
    cfg["num_experts_per_tok"] = min(cfg["num_experts_per_tok"], experts)
    model, _, args = perf.build_random(width, layers, "official", seed=seed)
    blk = model.model.mtp[0]
    cast = model.cast_predicate
    for name, p in perf._flat(blk.parameters()):
        if p.dtype == mx.float32 and cast(f"model.mtp.0.{name}"):
            perf._set(blk, name, p.astype(mx.bfloat16))

    def pred(path, m):  # as build_random's "official": mxfp4 experts, mxfp8 dense
        if not hasattr(m, "to_quantized") or ".compressor." in path:
            return False
        if ".switch_mlp." in path:
            return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
        dense = (".wq_a", ".wq_b", ".wkv", ".wo_a", ".wo_b", "shared_experts.", "_proj")
        if any(s in path for s in dense) and "weights_proj" not in path:
            return {"group_size": 32, "bits": 8, "mode": "mxfp8"}
        return False

    nn.quantize(blk, class_predicate=lambda path, m: pred(f".{path}", m))
    mx.eval(model.parameters())
    return model, args


def emit(kind, **kw):
    print("JSON " + json.dumps({"kind": kind, **kw}), flush=True)


def timed(fn, runs):
    fn()  # warm (compiles, allocates)
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    out.sort()
    return out[len(out) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=43)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--width", choices=["flash", "small"], default="flash")
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--ks", default="1,2,3,4")
    p.add_argument("--rates", default="1.0,0.8,0.6,0.0")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--tokens", type=int, default=128, help="tokens per e2e run")
    o = p.parse_args(argv)
    from mlx_arch_plugins.deepseek_v4 import speculative as spec

    model, args = build(o.layers, o.experts, o.width)
    V = args.vocab_size
    cache = perf.fill_fast(model, 1, o.context, min(1024, o.context), V, 2048)
    mtp = spec.MTPDraft(model).make_cache()[0]
    mtp.offset = o.context - 1
    h = model.model.hidden(mx.array([[1]]), cache)  # one real state to start from
    for c in cache:
        c.trim(1)
    mx.eval(h)
    ks = [int(k) for k in o.ks.split(",")]

    # -- parts ------------------------------------------------------------------
    for k in [0] + ks:
        ids = mx.random.randint(0, V, (1, k + 1)).astype(mx.uint32)

        def verify(ids=ids, k=k):
            logits, hs = spec._main_forward(model, ids, cache)
            mx.eval(logits, hs)
            for c in cache:
                c.trim(k + 1)

        emit("verify", k=k, tokens=k + 1, ms=1e3 * timed(verify, o.runs))

    def draft_step():
        logits, g = model.mtp_forward(h[:, -1:], mx.array([[3]]), mtp)
        mx.eval(mx.argmax(logits[0, -1]), g)
        mtp.trim(1)

    emit("draft", ms=1e3 * timed(draft_step, o.runs))

    # -- end to end ---------------------------------------------------------------
    start = [c.offset for c in cache]

    def plain_run():
        y = mx.array([[5]], mx.uint32)
        for _ in range(o.tokens):
            logits, _ = spec._main_forward(model, y, cache)
            y = mx.argmax(logits[:, -1:], axis=-1).astype(mx.uint32)
            mx.eval(y)
        for c, s in zip(cache, start):
            _rewind(c, s)  # back to --context

    t = timed(plain_run, 3)
    plain_tps = o.tokens / t
    plain_ms = 1e3 * t / o.tokens
    emit("e2e", k=0, rate=None, tokens_per_s=plain_tps, ms_per_token=plain_ms)
    rng = random.Random(0)
    for rate in [float(r) for r in o.rates.split(",")]:
        for k in ks:

            def spec_run(k=k, rate=rate):
                pend_h, pend_t, made = h[:, -1:], [5], 0
                start = [c.offset for c in cache], mtp.offset
                while made < o.tokens:
                    feed = mx.array(pend_t, mx.uint32)
                    argmax = lambda lp: mx.argmax(lp, axis=-1)  # noqa: E731
                    drafts = spec._draft(model, mtp, pend_h, feed, k, None, argmax)[0].tolist()
                    y = mx.array([[pend_t[-1]] + drafts], mx.uint32)
                    logits, hs = spec._main_forward(model, y, cache)
                    picks = mx.argmax(logits[0], axis=-1)
                    mx.eval(picks, hs)
                    n = 0
                    while n < k and rng.random() < rate:
                        n += 1
                    if k - n:
                        for c in cache:
                            c.trim(k - n)
                    if k > 1:
                        mtp.trim(k - 1)
                    pend_h, pend_t = hs[:, : n + 1], drafts[:n] + [int(picks[n].item())]
                    made += n + 1
                # back to the starting context (undo in steps of the bound)
                for c, s in zip(cache, start[0]):
                    _rewind(c, s)
                _rewind(mtp, start[1])
                return made

            t = timed(spec_run, 3)
            tps = o.tokens / t
            emit("e2e", k=k, rate=rate, tokens_per_s=tps, speedup=tps / plain_tps)


def _rewind(c, offset):
    # benchmark only: drop positions past ``offset`` without undo history
    # (the decode work does not depend on their contents)
    c.offset = offset
    c.n_comp = offset // c.compress_ratio if c.compress_ratio else 0
    c._undo = []


if __name__ == "__main__":
    main()
