"""Where a prefill chunk's time goes, per layer kind, at Flash width (issue 16).

Builds perf.py's random model (by default 3 layers: window, CSA, HCA; ``--experts``
routed experts), prefills ``--context`` tokens, then times one more chunk of
``--chunk`` tokens through each layer and through its parts, each built and
evaluated alone (median of ``--runs`` after one warm-up):

  layer      the whole block
  attn_in    attention-side hyper-connection collapse and norm
  project    query / KV / compressor / indexer projections
  compress   the compressors' pooling and the cache's entry writes
  attend     cache work and attention (on a copy of the cache)
  index_scores, index_scores_topk   CSA once the indexer selects: its scores over the
             cached entries in the sparse branch's query blocks, without / with top-k
  output     grouped output projection
  ffn        the MoE half: collapse, norm, gate, routed and shared experts, expand
  experts    routed experts alone (the backend's default path)
  experts_qmm, experts_chunks   the same through gather_qmm, and through dequantized
             chunks and gather_mm
  shared     shared expert alone
  project_qmm, output_qmm, shared_qmm   the dense linears through the quantized kernels
             (the rows above take the backend's default: dequantized at prefill sizes where
             DENSE_DEQUANT_ROWS says so)

and a candidate lever on the same inputs:

  project_bf16, output_bf16, shared_bf16   the dense quantized linears dequantized
                                           to bf16 once (a matmul floor for them)

    python benchmarks/prefill_parts.py --format affine4 --experts 64 --context 2048

One JSON line per figure (``{"part": ..., "kind": ratio, "ms": ...}``). Figures are for
reading, not asserted anywhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import perf  # noqa: E402

EXTRA = {}  # fields added to every figure's line (e.g. the block bound under test)


def emit(**kw):
    print("JSON " + json.dumps({**kw, **EXTRA}), flush=True)


def median_ms(fn, runs):
    """ms of ``fn()`` (graph building included) evaluated alone, median of ``runs``."""
    mx.eval(fn())
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def dequantized_copy(module):
    """A copy of ``module`` whose ``nn.QuantizedLinear`` children are bf16 ``nn.Linear``
    (routed experts stay quantized)."""
    out = copy.deepcopy(module)
    for path, m in list(out.named_modules()):
        for name, child in list(m.children().items()):
            if not isinstance(child, nn.QuantizedLinear):
                continue
            w = mx.dequantize(
                child.weight,
                child.scales,
                child.get("biases"),
                group_size=child.group_size,
                bits=child.bits,
                mode=getattr(child, "mode", "affine"),
            ).astype(mx.bfloat16)
            lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in child)
            lin.weight = w
            if "bias" in child:
                lin.bias = child.bias
            setattr(m, name, lin)
    mx.eval(out.parameters())
    return out


# the routed experts through each path, whatever the backend's table says
EXPERT_PATHS = {
    "experts_qmm": {"MLX_ARCH_PLUGINS_DEQUANT_ROWS": "0"},
    "experts_chunks": {"MLX_ARCH_PLUGINS_DEQUANT_ROWS": "1"},
}


def with_env(env, fn):
    """``fn`` run with the environment variables ``env`` set (restored after)."""

    def wrapped():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return wrapped


def parts(layer, cache, h, ids, runs, kind):
    """Time ``layer`` and its parts on hidden states ``h`` [1, L, hc, D]."""
    attn = layer.attn

    def row(part, fn):
        emit(part=part, kind=kind, tokens=h.shape[1], ms=round(median_ms(fn, runs), 3))

    x, _post, _comb = layer.attn_hc.collapse(h)
    xn = layer.attn_norm(x)
    index = attn.index_flag(cache, h.shape[1])
    q, kv, proj = attn.project(xn, index)
    mx.eval(xn, q, kv, proj)
    o = attn.attend(q, kv, proj, cache.copy())
    mx.eval(o)

    row("layer", lambda: layer(h, cache.copy(), ids))
    row("attn_in", lambda: layer.attn_norm(layer.attn_hc.collapse(h)[0]))
    row("project", lambda: attn.project(xn, index))
    if attn.ratio:
        T = cache.offset

        def compress():
            c = cache.copy()
            c.checkpoint(h.shape[1])
            attn._update_compressed(proj, T, c)
            return [a for a in c.state[1:] if a is not None]

        row("compress", compress)
    row("attend", lambda: attn.attend(q, kv, proj, cache.copy()))
    if attn.ratio == 4 and index and cache.n_comp > attn.indexer.topk:
        index_parts(row, attn, proj, cache, h.shape[1])
    row("output", lambda: attn.output(o))
    row("ffn", lambda: layer._ffn_half(h, ids))
    xf = layer.ffn_norm(layer.ffn_hc.collapse(h)[0])
    mx.eval(xf)
    ffn = layer.ffn
    inds, scores = ffn.gate(xf, ids)
    mx.eval(inds, scores)
    row("experts", lambda: ffn.switch_mlp(xf, inds, scores))
    for path, env in EXPERT_PATHS.items():
        row(path, with_env(env, lambda: ffn.switch_mlp(xf, inds, scores)))
    row("shared", lambda: ffn.shared_experts(xf))
    # the dense linears through the quantized kernels, whatever the backend's table says
    qmm = {"MLX_ARCH_PLUGINS_DEQUANT_ROWS": "0"}
    row("project_qmm", with_env(qmm, lambda: attn.project(xn, index)))
    row("output_qmm", with_env(qmm, lambda: attn.output(o)))
    row("shared_qmm", with_env(qmm, lambda: ffn.shared_experts(xf)))

    flat = dequantized_copy(layer)
    row("project_bf16", lambda: flat.attn.project(xn, index))
    row("output_bf16", lambda: flat.attn.output(o))
    row("shared_bf16", lambda: flat.ffn.shared_experts(xf))


def index_parts(row, attn, proj, cache, L):
    """The CSA indexer's share of ``attend`` (over the entries already cached), in the
    query blocks the sparse branch uses: scores alone, then scores and top-k."""
    from mlx_arch_plugins.deepseek_v4.model import topk_indices

    ix, T, N = attn.indexer, cache.offset, cache.n_comp
    if hasattr(attn, "_index_block"):
        iq = ix.queries(proj["iq"], T)
        bq = attn._index_block(L, N, getattr(ix, "fused", lambda *a: False)(iq, cache.index))
    else:  # a tree before the thirteenth session: one bound for both of the branch's loops
        bq = attn._sparse_block(L, N)
    keys = cache.index

    def blocks(topk):
        iq = ix.queries(proj["iq"], T)
        out = []
        for a in range(0, L, bq):
            score = ix.scores(iq[:, a : a + bq], proj["iw"][:, a : a + bq], keys)
            out.append(topk_indices(score, ix.topk) if topk else score)
        return out

    row("index_scores", lambda: blocks(False))
    row("index_scores_topk", lambda: blocks(True))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--format", choices=["official", "affine4"], default="affine4")
    p.add_argument("--width", choices=["flash", "small"], default="flash")
    p.add_argument("--kinds", default="0,4,128", help="compress ratio per layer")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--context", type=int, default=2048, help="tokens already in the cache")
    p.add_argument("--chunk", type=int, default=2048, help="tokens of the timed chunk")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config")
    p.add_argument(
        "--block-elems",
        default="",
        help="comma list: time every layer once per value of the attention's query-block "
        "element bounds (DeepseekV4Attention._BLOCK_ELEMS and _INDEX_BLOCK_ELEMS, both set "
        "to the value; default: the model's)",
    )
    o = p.parse_args(argv)
    kinds = o.kinds.split(",")
    over = {"n_routed_experts": o.experts} if o.experts else {}
    for kv in o.set:  # e.g. index_topk=64 (JSON values)
        key, value = kv.split("=", 1)
        over[key] = json.loads(value)
    model, _, args = perf.build_random(o.width, len(kinds), o.format, o.kinds, overrides=over)
    emit(part="env", **perf.env_info(), format=o.format, experts=o.experts, context=o.context)
    cache = perf.make_cache(model, 1)
    if o.context:
        toks = mx.random.randint(0, args.vocab_size, (1, o.context))
        perf.prefill(model, cache, toks, 2048)
    ids = mx.random.randint(0, args.vocab_size, (1, o.chunk))
    h = (mx.random.normal((1, o.chunk, args.hc_mult, args.hidden_size)) * 0.5).astype(mx.bfloat16)
    mx.eval(ids, h)
    attention = type(model.layers[0].attn)
    for elems in [int(v) for v in o.block_elems.split(",") if v] or [None]:
        if elems is not None:
            attention._BLOCK_ELEMS = attention._INDEX_BLOCK_ELEMS = elems
            EXTRA["block_elems"] = elems
        for layer, c in zip(model.layers, cache):
            parts(layer, c, h, ids, o.runs, layer.attn.ratio)


if __name__ == "__main__":
    main()
