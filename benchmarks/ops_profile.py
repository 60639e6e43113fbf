"""Where a DeepSeek-V4 decode step's time goes (issue 7): kernel counts per
layer and the cost of its hot primitives at full Flash width.

  python benchmarks/ops_profile.py [--format official|affine4] [--contexts 1024,131072]

Prints one JSON line per figure (prefix ``JSON ``):
  nodes     graph nodes of one layer's decode step that launch work (views
            such as reshape/slice/broadcast excluded), by primitive
  micro     time of one primitive at decode shapes, from R independent
            copies evaluated together (amortises the synchronisation)
  layer     a layer's decode step alone (pipelined, as perf.py times it)
  ablate    (--ablate) the CSA layer's step with the indexer's queries,
            scores and top-k replaced one after another by constants
  batch_nodes  (--batch-nodes B) nodes per layer of a packed decode step of
            B per-sequence caches vs one aligned batch-B cache

The model is perf.py's in-memory random Flash-width model (3 layers, one per
kind). Figures are for reading, not asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import perf  # noqa: E402


def emit(kind, **kw):
    print("JSON " + json.dumps({"kind": kind, **kw}), flush=True)


kernel_nodes = perf.kernel_nodes  # primitive counts of a graph, views excluded


def micro(name, fn, make_inputs, reps=64, runs=5):
    """ms per call of ``fn`` from ``reps`` independent calls in one graph."""
    inputs = [make_inputs(i) for i in range(reps)]
    inputs = [x if isinstance(x, tuple) else (x,) for x in inputs]
    mx.eval(inputs)
    mx.eval([fn(*x) for x in inputs[:4]])
    per = []
    for _ in range(runs):
        t0 = time.perf_counter()
        mx.eval([fn(*x) for x in inputs])
        per.append((time.perf_counter() - t0) * 1e3 / reps)
    ms = statistics.median(per)
    emit("micro", name=name, ms=round(ms, 5), us=round(ms * 1e3, 2))
    return ms


def chain(name, fn, x0, n=200, runs=5):
    """ms per call of ``fn`` applied ``n`` times in sequence (dependent)."""
    mx.eval(x0)
    per = []
    for _ in range(runs + 1):
        x = x0
        t0 = time.perf_counter()
        for _ in range(n):
            x = fn(x)
        mx.eval(x)
        per.append((time.perf_counter() - t0) * 1e3 / n)
    ms = statistics.median(per[1:])
    emit("chain", name=name, ms=round(ms, 5), us=round(ms * 1e3, 2))
    return ms


def csa_parts(model, cache, T):
    """The pieces of a CSA layer's decode step at context T, each timed alone
    on the layer's real cache (R copies per graph)."""
    idx = [i for i, layer in enumerate(model.model.layers) if layer.attn.ratio == 4]
    if not idx:
        return
    attn, c = model.model.layers[idx[0]].attn, cache[idx[0]]
    ind = attn.indexer
    x = (mx.random.normal((1, 1, model.args.hidden_size)) * 0.1).astype(mx.bfloat16)
    qr = (mx.random.normal((1, 1, model.args.q_lora_rank)) * 0.1).astype(mx.bfloat16)
    mx.eval(x, qr)
    N = c.n_comp
    if N <= ind.topk:  # the indexer does not select yet
        return
    iq = ind.queries(ind.wq_b(qr), T)
    iw = ind.weights_proj(x)
    mx.eval(iq, iw)
    score = ind.scores(iq, iw, c.index)[:, 0]
    mx.eval(score)
    top = mx.argpartition(-score, kth=ind.topk - 1, axis=-1)[:, : ind.topk]
    mx.eval(top)
    tag = f"CSA T={T} N={N}"
    micro(
        f"{tag} projections (all)",
        lambda x, qr: list(attn._project(x, qr, True).values()),
        lambda i: (x + i * 1e-3, qr),
        reps=16,
    )
    micro(
        f"{tag} index queries",
        lambda a: ind.queries(a, T),
        lambda i: ind.wq_b(qr) + i * 1e-3,
        reps=16,
    )
    micro(
        f"{tag} index scores",
        lambda a: ind.scores(a, iw, c.index),
        lambda i: iq + i * 1e-3,
        reps=16,
    )
    micro(
        f"{tag} argpartition",
        lambda s: mx.argpartition(-s, kth=ind.topk - 1, axis=-1),
        lambda i: score + i * 1e-3,
        reps=16,
    )
    hd = attn.head_dim
    cap = c._comp.shape[1]
    micro(
        f"{tag} gather entries",
        lambda t: c._comp.reshape(-1, hd)[t.reshape(-1)],
        lambda i: (top + i) % N,
        reps=16,
    )
    # one compressor step: 4 tokens so that one block completes
    x4 = (mx.random.normal((1, 4, model.args.hidden_size)) * 0.1).astype(mx.bfloat16)
    mx.eval(x4)
    pr = attn._project(x4, qr, False)
    mx.eval(list(pr.values()))

    def compress(off):
        cc = c.copy()
        cc.offset = off
        cc.comp_kv = cc.comp_score = cc.index_kv = cc.index_score = None
        n = attn._update_compressed(pr, off, cc)
        return [cc._comp, cc._index, mx.array(n)]

    start = (T // 4) * 4
    micro(f"{tag} compress+append one block (cap {cap})", compress, lambda i: (start,), reps=8)


def _layer_ms(layer, h, c, ids, steps, runs):
    for _ in range(2):
        mx.eval(layer(h, c, ids))
    per = []
    for _ in range(runs):
        t0 = time.perf_counter()
        prev = None
        for _ in range(steps):
            o = layer(h, c, ids)
            mx.async_eval(o)
            if prev is not None:
                mx.eval(prev)
            prev = o
        mx.eval(prev)
        per.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(per)


def csa_ablate(model, cache, T, steps, runs):
    """The CSA layer's pipelined decode step with the indexer's pieces
    replaced, cumulatively, by precomputed constants: what each piece costs
    inside the real step (differences between rows). Only meaningful once
    the indexer selects (T/4 > top-k)."""
    dsv4, _, _ = perf._dsv4()
    idx = [i for i, layer in enumerate(model.model.layers) if layer.attn.ratio == 4]
    if not idx:
        return
    layer, c = model.model.layers[idx[0]], cache[idx[0]]
    ind = layer.attn.indexer
    h = mx.random.normal((1, 1, model.args.hc_mult, model.args.hidden_size)) * 0.1
    h = h.astype(mx.bfloat16)
    ids = mx.zeros((1, 1), dtype=mx.int32)
    mx.eval(h)
    N = c.n_comp
    if N <= ind.topk:
        return
    iq = mx.random.normal((1, 1, ind.n_heads, ind.head_dim)).astype(mx.bfloat16)
    score = mx.random.normal((1, 1, N + 64))
    top = mx.random.randint(0, N, (1, N + 64)).astype(mx.uint32)
    mx.eval(iq, score, top)
    orig = (dsv4.Indexer.queries, dsv4.Indexer.scores, mx.argpartition)

    def argp(a, kth, axis=-1):
        if a.shape[-1] >= N:  # the indexer's selection, not the router's
            return top[..., : a.shape[-1]]
        return orig[2](a, kth=kth, axis=axis)

    steps_ = [
        ("as is", None),
        ("index queries constant", lambda: setattr(dsv4.Indexer, "queries", lambda self, q, o: iq)),
        (
            "+ index scores constant",
            lambda: setattr(
                dsv4.Indexer, "scores", lambda self, q, w, k: score[:, None, : k.shape[1]]
            ),
        ),
        ("+ top-k constant", lambda: setattr(mx, "argpartition", argp)),
    ]
    try:
        for name, patch in steps_:
            if patch:
                patch()
            c2 = c.copy()
            ms = _layer_ms(layer, h, c2, ids, steps, runs)
            emit("ablate", context=T, N=N, variant=name, ms=round(ms, 4))
    finally:
        dsv4.Indexer.queries, dsv4.Indexer.scores, mx.argpartition = orig


def batch_nodes(model, args, T, B):
    """Kernel nodes per layer of a packed decode step (per-sequence caches,
    mlx-lm's batch generator form) next to the same batch as one aligned
    cache."""
    singles = [perf.fill_fast(model, 1, T, 256, args.vocab_size, 8) for _ in range(B)]
    packed = perf.batch_cache(singles)
    aligned = perf.fill_fast(model, B, T, 256, args.vocab_size, 8)
    h = (mx.random.normal((B, 1, args.hc_mult, args.hidden_size)) * 0.1).astype(mx.bfloat16)
    ids = mx.zeros((B, 1), dtype=mx.int32)
    mx.eval(h)
    for form, cache in (("packed", packed), ("aligned", aligned)):
        for i, layer in enumerate(model.model.layers):
            mx.eval(layer(h, cache[i], ids))
            outs = [layer(h, cache[i], ids)]
            st = getattr(cache[i], "_packed", None)
            if st is not None:
                outs += [a for a in (st.window, st.comp, st.index) if a is not None]
                outs += [a for pair in st.rings.values() for a in pair]
            n, by = kernel_nodes(outs)
            emit(
                "batch_nodes",
                form=form,
                context=T,
                batch=B,
                layer=i,
                ratio=layer.attn.ratio,
                kernels=n,
                by=by,
            )
            mx.eval(outs)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--format", default="official")
    p.add_argument("--contexts", default="1024,131072")
    p.add_argument("--width", default="flash")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-micro", action="store_true")
    p.add_argument("--layers-only", action="store_true", help="skip node counts")
    p.add_argument(
        "--ablate", action="store_true", help="CSA step with indexer pieces replaced by constants"
    )
    p.add_argument(
        "--batch-nodes",
        type=int,
        default=0,
        help="node counts of a packed vs aligned decode step at this batch",
    )
    opts = p.parse_args(argv)
    dsv4, _, _ = perf._dsv4()
    emit("env", device=str(mx.default_device()), mlx=mx.__version__)

    bf = mx.bfloat16
    if not opts.no_micro:
        # per-kernel floor: a dependent chain of tiny elementwise kernels
        chain(
            "tiny elementwise (dependent)",
            lambda x: x * 1.0001 + 1.0,
            mx.zeros((1, 4096), dtype=bf),
        )
        micro(
            "tiny elementwise (independent)",
            lambda x: x * 1.0001 + 1.0,
            lambda i: mx.full((1, 4096), float(i), dtype=bf),
        )
        micro(
            "qat_round fp8 [1,1,448]",
            lambda x: dsv4.qat_round(x, 64, "fp8"),
            lambda i: mx.random.normal((1, 1, 448)).astype(bf),
        )
        micro(
            "qat_round fp4 [1,1,64,128]",
            lambda x: dsv4.qat_round(x, 32, "fp4"),
            lambda i: mx.random.normal((1, 1, 64, 128)).astype(bf),
        )
        rope = dsv4.DeepseekV4RoPE(64, 10000.0)
        micro(
            "rope q [1,64,1,512]",
            lambda x: rope(x, 1000),
            lambda i: mx.random.normal((1, 64, 1, 512)).astype(bf),
        )
        micro(
            "rms_norm [1,1,64,512]",
            lambda x: mx.fast.rms_norm(x, None, 1e-6),
            lambda i: mx.random.normal((1, 1, 64, 512)).astype(bf),
        )
        sinks = mx.zeros((64,), dtype=bf)
        for nk, masked in ((128, False), (384, True), (640, True)):

            def sd(q, k, m, masked=masked):
                return mx.fast.scaled_dot_product_attention(
                    q, k, k, scale=0.04, mask=m if masked else None, sinks=sinks
                )

            micro(
                f"sdpa H64 keys {nk} mask {masked}",
                sd,
                lambda i, nk=nk: (
                    mx.random.normal((1, 64, 1, 512)).astype(bf),
                    mx.random.normal((1, 1, nk, 512)).astype(bf),
                    mx.ones((1, 1, 1, nk), dtype=mx.bool_),
                ),
            )
        for n in (256, 8192, 32768):
            micro(
                f"argpartition top512 of {n}" if n > 512 else f"argpartition top6 of {n}",
                lambda s, n=n: mx.argpartition(-s, kth=(511 if n > 512 else 5), axis=-1),
                lambda i, n=n: mx.random.normal((1, 1, n)),
            )
            micro(
                f"indexer scores N={n}",
                lambda q, w, k: (
                    mx.maximum((q @ k[:, None].swapaxes(-1, -2)).astype(mx.float32), 0)
                    * w[..., None]
                ).sum(2),
                lambda i, n=n: (
                    mx.random.normal((1, 1, 64, 128)).astype(bf),
                    mx.random.normal((1, 1, 64)),
                    mx.random.normal((1, n, 128)).astype(bf),
                ),
            )
        micro(
            "gather 512 of 32768 entries x512",
            lambda f, t: f[t],
            lambda i: (
                mx.random.normal((32768, 512)).astype(bf),
                mx.random.randint(0, 32768, (512,)),
            ),
            reps=16,
        )

    model, _, args = perf.build_random(opts.width, 3, opts.format)
    for T in [int(t) for t in opts.contexts.split(",")]:
        cache = perf.fill_fast(model, 1, T, 256, args.vocab_size, 8)
        h = (mx.random.normal((1, 1, args.hc_mult, args.hidden_size)) * 0.1).astype(bf)
        ids = mx.zeros((1, 1), dtype=mx.int32)
        mx.eval(h)
        for i, layer in enumerate([] if opts.layers_only else model.model.layers):
            mx.eval(layer(h, cache[i], ids))
            n, by = kernel_nodes([layer(h, cache[i], ids)])
            emit("nodes", context=T, layer=i, ratio=layer.attn.ratio, kernels=n, by=by)
        if opts.ablate:
            csa_ablate(model, cache, T, opts.steps, opts.runs)
        if opts.batch_nodes:
            batch_nodes(model, args, T, opts.batch_nodes)
        csa_parts(model, cache, T)
        times = perf.layer_times(model, args, cache, 1, opts.steps, opts.runs)
        for i, (r, ms) in enumerate(times):
            emit("layer", context=T, layer=i, ratio=r, ms=round(ms, 4))
        del cache
        mx.clear_cache()


if __name__ == "__main__":
    main()
