"""Decode, prefill, weight-read floor and memory of an mlx-lm model (issue 7).

Model sources:
  --model DIR            any mlx-lm model directory (mlx_lm.load, or
                         mlx_lm.utils.load_model when it has no tokenizer)
  --random flash|small   DeepSeek-V4 built in memory with random weights:
                         Flash width (or a reduced width for slow CPUs),
                         --layers N, --format official (mxfp8 dense + mxfp4
                         experts, BF16 elsewhere, as sanitize makes of an
                         official checkpoint) or affine4 (every quantizable
                         layer affine 4-bit group 64, as mlx_lm.convert -q).

Subcommands (``all`` runs them in one process, sharing the model):
  decode    ms/step and tokens/s at batch 1 and 8 after --contexts, warm,
            median of --runs runs of --steps steps, pipelined the way
            mlx_lm.generate runs (async_eval of step n+1 before reading n)
  prefill   chunked prefill tokens/s (--prefill-step, mlx-lm's default 2048)
  floor     the quantized matmuls of one decode step alone (same modules:
            attention projections, router, chosen experts via gather_qmm,
            shared expert, compressor/indexer projections, hyper-connection
            mixes, head) and step / floor
  memory    KV-cache bytes per context next to the window + compression
            formula, and peak memory of a decode step at that context

DeepSeek-V4 caches for long contexts are filled by a fast path: a real
prefill of --seed-prompt tokens sets up every cache (window, pending
compressor rows), then the compressed entries are replaced by random ones of
the count, shape and dtype a T-token prompt leaves. A decode step's work
depends only on those shapes, so decode and memory figures match a real
prompt of T tokens (`prefill` measures real prompts).

Each measurement prints one JSON line (prefix ``JSON ``), then a table.

A/B against another revision: set MLX_ARCH_PLUGINS_SRC to that revision's
``src`` directory (e.g. from ``git archive REV src``) and run the same command
in the same session; machines differ too much for comparisons across them.

  python benchmarks/perf.py all --random flash --layers 3 --format official
  python benchmarks/perf.py decode --model path/to/model --contexts 1024,8192
"""

from __future__ import annotations

import argparse
import collections
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import mlx.core as mx
import mlx.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
# MLX_ARCH_PLUGINS_SRC: another source tree (e.g. an older revision) to time
SRC = os.environ.get("MLX_ARCH_PLUGINS_SRC") or os.path.join(os.path.dirname(HERE), "src")

# DeepSeek-V4-Flash shapes (config.json of the released model).
FLASH = dict(
    model_type="deepseek_v4",
    vocab_size=129280,
    hidden_size=4096,
    num_attention_heads=64,
    head_dim=512,
    qk_rope_head_dim=64,
    q_lora_rank=1024,
    o_lora_rank=1024,
    o_groups=8,
    sliding_window=128,
    n_routed_experts=256,
    num_experts_per_tok=6,
    moe_intermediate_size=2048,
    n_shared_experts=1,
    num_hash_layers=3,
    scoring_func="sqrtsoftplus",
    routed_scaling_factor=1.5,
    swiglu_limit=10.0,
    index_n_heads=64,
    index_head_dim=128,
    index_topk=512,
    hc_mult=4,
    hc_sinkhorn_iters=20,
    rope_theta=10000.0,
    compress_rope_theta=160000.0,
    rope_scaling={
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
)
FLASH_LAYERS = 43
# Flash: layers 0-1 window only, then CSA (4) / HCA (128) alternating, last CSA.
FLASH_RATIOS = [0, 0] + [4, 128] * 20 + [4]

# Same structure, every width cut so a 2-core CPU finishes in minutes.
SMALL = dict(
    FLASH,
    vocab_size=8192,
    hidden_size=512,
    num_attention_heads=8,
    head_dim=128,
    q_lora_rank=256,
    o_lora_rank=256,
    o_groups=2,
    n_routed_experts=32,
    moe_intermediate_size=256,
    index_n_heads=8,
    index_head_dim=64,
    index_topk=64,
    num_hash_layers=1,
)


# ----------------------------------------------------------------------------
# imports: work where mlx_lm's package __init__ cannot import (no transformers)
# ----------------------------------------------------------------------------


def _mlx_lm_models_only():
    """Make ``mlx_lm.models.*`` importable without running mlx_lm/__init__."""
    try:
        import mlx_lm  # noqa: F401

        return True
    except Exception:
        for k in [k for k in sys.modules if k == "mlx_lm" or k.startswith("mlx_lm.")]:
            del sys.modules[k]
        spec = importlib.util.find_spec("mlx_lm")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("mlx_lm is not installed")
        mod = importlib.util.module_from_spec(
            importlib.machinery.ModuleSpec("mlx_lm", None, is_package=True)
        )
        mod.__path__ = list(spec.submodule_search_locations)
        sys.modules["mlx_lm"] = mod
        return False


def _use_src():
    """Import mlx_arch_plugins from SRC, also where a start-up file (the
    plugin host's .pth) already imported another copy: that copy is dropped."""
    if SRC not in sys.path:
        sys.path.insert(0, SRC)
    mod = sys.modules.get("mlx_arch_plugins")
    want = os.path.realpath(os.path.join(SRC, "mlx_arch_plugins"))
    if mod is not None and os.path.realpath(os.path.dirname(mod.__file__)) != want:
        for k in [k for k in sys.modules if k.split(".")[0] == "mlx_arch_plugins"]:
            del sys.modules[k]


def _dsv4():
    _use_src()
    full = _mlx_lm_models_only()
    from mlx_arch_plugins.deepseek_v4 import cache as deepseek_v4_cache
    from mlx_arch_plugins.deepseek_v4 import model as deepseek_v4

    return deepseek_v4, deepseek_v4_cache, full


# ----------------------------------------------------------------------------
# model sources
# ----------------------------------------------------------------------------


def _ratios(n_layers, kinds):
    if kinds:
        return [int(r) for r in kinds.split(",")][:n_layers]
    if n_layers >= FLASH_LAYERS:
        return FLASH_RATIOS[:n_layers]
    # one layer of each kind first, then the Flash mix
    base = [0, 4, 128]
    return (base + [4, 128] * n_layers)[:n_layers]


def build_random(width, n_layers, fmt, kinds=None, seed=0, overrides=None):
    dsv4, _, _ = _dsv4()
    cfg = dict(FLASH if width == "flash" else SMALL)
    ratios = _ratios(n_layers, kinds)
    cfg.update(num_hidden_layers=n_layers, compress_ratios=ratios)
    cfg["num_hash_layers"] = min(cfg["num_hash_layers"], 1)  # layer 0 only
    cfg.update(overrides or {})  # e.g. --experts 64
    args = dsv4.ModelArgs.from_dict(cfg)
    mx.random.seed(seed)
    model = dsv4.Model(args)
    cast = model.cast_predicate  # True: goes to the model dtype (bf16)

    def predicate_official(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if ".switch_mlp." in path:
            return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
        dense = (".wq_a", ".wq_b", ".wkv", ".wo_a", ".wo_b", "shared_experts.")
        if any(s in path for s in dense) and ".compressor." not in path:
            return {"group_size": 32, "bits": 8, "mode": "mxfp8"}
        return False

    own = getattr(model, "quant_predicate", None)

    def predicate_affine(path, module):
        # what mlx_lm.convert -q does: the model's quant_predicate, then shape
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % 64:
            return False
        if own is not None and not own(path, module):
            return False
        return {"group_size": 64, "bits": 4}

    pred = predicate_official if fmt == "official" else predicate_affine
    # Build, cast and quantize one part at a time so that only one layer's
    # float weights exist at once.
    parts = [("model.embed_tokens", model.model.embed_tokens), ("lm_head", model.lm_head)]
    parts += [(f"model.layers.{i}", layer) for i, layer in enumerate(model.model.layers)]
    for prefix, mod in parts:
        for name, p in _flat(mod.parameters()):
            full = f"{prefix}.{name}"
            if name.endswith("ffn.gate.weight"):
                new = mx.random.normal(p.shape) * 0.02
            elif name.endswith("tid2eid"):
                new = mx.random.randint(0, args.n_routed_experts, p.shape).astype(mx.int32)
            elif cast(full) and p.dtype == mx.float32:
                new = p.astype(mx.bfloat16)
            else:
                new = p
            if new is not p:
                _set(mod, name, new)
        if "." not in prefix:  # embed_tokens / lm_head are leaves
            q = pred(prefix, mod)
            if q:
                q = q if isinstance(q, dict) else {"group_size": 64, "bits": 4}
                setattr(
                    model if prefix == "lm_head" else model.model,
                    prefix.split(".")[-1],
                    mod.to_quantized(**q),
                )
        else:
            nn.quantize(
                mod,
                class_predicate=lambda path, m, prefix=prefix: pred(f"{prefix}.{path}", m),
            )
        mx.eval(mod.parameters())
        gc.collect()
    # norms etc.
    rest = [
        (n, p)
        for n, p in _flat(model.parameters())
        if not n.startswith(("model.layers.", "model.embed_tokens", "lm_head"))
    ]
    for n, p in rest:
        if not cast(n) or p.dtype != mx.float32:
            continue
        _set(model, n, p.astype(mx.bfloat16))
    mx.eval(model.parameters())
    model.eval()
    return model, None, args


def _flat(tree, prefix=""):
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _set(module, dotted, value):
    *path, last = dotted.split(".")
    obj = module
    for p in path:
        obj = obj[int(p)] if isinstance(obj, list) else getattr(obj, p)
    if isinstance(obj, dict):
        obj[last] = value
    else:
        setattr(obj, last, value)


def load_dir(path):
    _use_src()
    try:  # make the plugin's architectures visible to mlx_lm
        import mlx_arch_plugins

        mlx_arch_plugins.install()
    except Exception as e:  # pragma: no cover
        print(f"# plugin host not installed: {e}", file=sys.stderr)
    import mlx_lm
    from mlx_lm.utils import load_model

    try:
        model, tok = mlx_lm.load(path)
    except Exception as e:
        print(f"# mlx_lm.load failed ({e}); loading weights only", file=sys.stderr)
        model, _ = load_model(__import__("pathlib").Path(path))
        tok = None
    return model, tok, getattr(model, "args", None)


# ----------------------------------------------------------------------------
# caches
# ----------------------------------------------------------------------------


def is_dsv4(model):
    return getattr(model, "model_type", None) == "deepseek_v4"


def make_cache(model, batch):
    if hasattr(model, "make_cache"):
        return model.make_cache()
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model)


def prefill(model, cache, tokens, step):
    """mlx-lm's chunked prefill: feed ``step`` tokens at a time, evaluating
    the caches (not the logits) after each chunk."""
    n = tokens.shape[1]
    i = 0
    while i < n:
        model(tokens[:, i : i + step], cache=cache)
        mx.eval([c.state for c in cache])
        i += step
    mx.clear_cache()


def fill_fast(model, batch, T, seed_prompt, vocab, step):
    """Caches as a T-token prompt leaves them (DeepSeek-V4 only; see top)."""
    assert T % 256 == 0 and seed_prompt % 256 == 0 and seed_prompt <= T
    cache = make_cache(model, batch)
    toks = mx.random.randint(0, vocab, (batch, seed_prompt))
    prefill(model, cache, toks, step)
    if T == seed_prompt:
        return cache
    grow = 256
    for c in cache:
        c.offset = T
        m = c.compress_ratio
        if not m:
            continue
        n = T // m
        cap = ((n + grow - 1) // grow) * grow + grow
        comp = c.comp
        c._comp = (mx.random.normal((batch, cap, comp.shape[2])) * 0.05).astype(comp.dtype)
        if c._index is not None:
            idx = c.index
            c._index = (mx.random.normal((batch, cap, idx.shape[2])) * 0.05).astype(idx.dtype)
        c.n_comp = n
        # every array, the new entries included (state[0] is the header)
        mx.eval([a for a in c.state[1:] if a is not None])
    return cache


def fill_cache(model, batch, T, opts, vocab):
    if is_dsv4(model):
        return fill_fast(
            model, batch, T, min(opts.seed_prompt, T), vocab, opts.seed_step or opts.prefill_step
        )
    cache = make_cache(model, batch)
    prefill(model, cache, mx.random.randint(0, vocab, (batch, T)), opts.prefill_step)
    return cache


def batch_cache(cache_list):
    """mlx-lm's batch generator form: one BatchDeepseekV4Cache per layer
    holding the sequences' own caches."""
    _, cmod, _ = _dsv4()
    n_layers = len(cache_list[0])
    return [cmod.BatchDeepseekV4Cache([cl[i] for cl in cache_list]) for i in range(n_layers)]


def cache_bytes(cache):
    return sum(c.nbytes for c in cache)


def cache_alloc_bytes(cache):
    """Bytes the caches hold, growth-buffer capacity included."""
    fields = ("window", "_comp", "_index", "comp_kv", "comp_score", "index_kv", "index_score")
    tot = 0
    for c in cache:
        arrays = [getattr(c, f, None) for f in fields] if is_dsv4_cache(c) else c.state
        tot += sum(a.nbytes for a in arrays if isinstance(a, mx.array))
    return tot


def is_dsv4_cache(c):
    return type(c).__name__ == "DeepseekV4Cache"


def formula_bytes(args, T, batch=1, dtype_bytes=2):
    """Window + compressed entries (+ indexer keys) per the config, plus the
    float32 rows of unfinished compressor blocks at T (T % 128 == 0)."""
    hd, ihd, W = args.head_dim, args.index_head_dim, args.sliding_window
    tot = 0
    for r in args.compress_ratios[: args.num_hidden_layers]:
        tot += min(T, W) * hd * dtype_bytes
        if r:
            tot += (T // r) * hd * dtype_bytes
            # pending rows: overlap (ratio 4) keeps the last full block
            if r == 4:
                tot += 2 * 4 * (2 * hd) * 4  # kv + score rows, fp32
                tot += (T // r) * ihd * dtype_bytes
                tot += 2 * 4 * (2 * ihd) * 4
    return tot * batch


# ----------------------------------------------------------------------------
# decode
# ----------------------------------------------------------------------------


def decode_runs(model, cache, batch, vocab, steps, runs, warm):
    """ms/step of mlx_lm.generate's loop: build step n+1, async_eval it, then
    read token n. Returns (median ms/step, all runs, host ms/step spent
    building the graph, host ms/step inside ``async_eval``, which is where
    a GPU backend encodes/launches the kernels)."""
    y = mx.random.randint(0, vocab, (batch,))

    def step(y):
        logits = model(y[:, None], cache=cache)
        return mx.argmax(logits[:, -1], axis=-1)

    y = step(y)
    mx.async_eval(y)
    mx.eval(y)
    log("first step done")
    for _ in range(warm):
        nxt = step(y)
        mx.async_eval(nxt)
        y.tolist()
        y = nxt
    mx.eval(y)
    per, host, launch = [], [], []
    for _ in range(runs):
        mx.eval(y)
        t0 = time.perf_counter()
        h = a = 0.0
        for _ in range(steps):
            th = time.perf_counter()
            nxt = step(y)
            ta = time.perf_counter()
            mx.async_eval(nxt)
            a += time.perf_counter() - ta
            h += ta - th
            y.tolist()
            y = nxt
        mx.eval(y)
        per.append((time.perf_counter() - t0) * 1e3 / steps)
        host.append(h * 1e3 / steps)
        launch.append(a * 1e3 / steps)
    return statistics.median(per), per, statistics.median(host), statistics.median(launch)


def peak_during(fn):
    mx.reset_peak_memory()
    out = fn()
    return out, mx.get_peak_memory()


# ----------------------------------------------------------------------------
# weight-read floor
# ----------------------------------------------------------------------------


def _leaves(model):
    """(path, module) of every weight-carrying matmul module a step uses."""
    out = []
    for path, m in model.named_modules():
        name = type(m).__name__
        if name in ("Linear", "QuantizedLinear", "MultiLinear", "QuantizedMultiLinear"):
            out.append((path, m, "dense"))
        elif "SwitchLinear" in name:
            out.append((path, m, "switch"))
        elif name in ("HyperConnection", "HyperHead", "MoEGate"):
            out.append((path, m, name))
    return out


def _in_dims(m):
    w = m.weight
    if isinstance(m.get("scales"), mx.array):
        # packed uint32: input dims = last dim * 32 / bits (mlx_lm's
        # QuantizedMultiLinear may hold bits=None: the mode's default)
        bits = getattr(m, "bits", None) or {"mxfp8": 8}.get(getattr(m, "mode", None), 4)
        return w.shape[-1] * 32 // bits
    return w.shape[-1]


def _module_bytes(m, experts=None):
    tot = 0
    for name in ("weight", "scales", "biases"):
        a = m.get(name) if isinstance(m, dict) else getattr(m, name, None)
        if not isinstance(a, mx.array):
            continue
        if experts is not None:
            tot += a.nbytes // a.shape[0] * experts
        else:
            tot += a.nbytes
    return tot


def floor_graph(model, args, batch, mtp=False):
    """Callable building one step's matmuls on fixed inputs; and the bytes of
    weights it reads."""
    dt = mx.bfloat16
    ops = []
    nbytes = 0
    topk = getattr(args, "num_experts_per_tok", 1)
    n_exp = getattr(args, "n_routed_experts", 1)
    # chosen experts per token (distinct within a token), shared by the three
    # expert projections of a layer as in the model
    idx_cache = {}
    for path, m, kind in _leaves(model):
        if ".mtp." in path and not mtp:
            continue
        if kind == "dense":
            if "embed_tokens" in path:
                continue  # a gather, not a matmul
            d_in = _in_dims(m)
            if "MultiLinear" in type(m).__name__:
                G = m.weight.shape[0]
                x = mx.random.normal((batch, G, 1, d_in)).astype(dt)
            else:
                x = mx.random.normal((batch, 1, d_in)).astype(dt)
            ops.append((m, (x,)))
            nbytes += _module_bytes(m)
        elif kind == "switch":
            layer = path.rsplit(".", 1)[0]
            if layer not in idx_cache:
                sc = mx.random.uniform(shape=(batch, 1, n_exp))
                idx_cache[layer] = mx.argpartition(-sc, kth=topk - 1, axis=-1)[..., :topk]
            idx = idx_cache[layer]
            d_in = _in_dims(m)
            x = mx.random.normal((batch, 1, 1, 1, d_in)).astype(dt)
            if path.endswith("down_proj"):
                x = mx.random.normal((batch, 1, topk, 1, d_in)).astype(dt)
            ops.append((lambda x, i, m=m: m(x, i), (x, idx)))
            mx.eval(idx)
            used = len(set(idx.flatten().tolist()))
            nbytes += _module_bytes(m, experts=used)
        elif kind in ("HyperConnection", "HyperHead"):
            w = m.fn
            x = mx.random.normal((batch, 1, w.shape[1])).astype(w.dtype)
            ops.append((lambda x, w=w: x @ w.T, (x,)))
            nbytes += w.nbytes
        elif kind == "MoEGate":
            w = m.weight
            x = mx.random.normal((batch, 1, w.shape[1])).astype(mx.float32)
            ops.append((lambda x, w=w: x @ w.astype(mx.float32).T, (x,)))
            nbytes += w.nbytes
    mx.eval([a for _, xs in ops for a in xs])

    def run():
        return [f(*xs) for f, xs in ops]

    return run, nbytes, len(ops)


def time_floor(run, steps, runs, warm):
    outs = run()
    mx.eval(outs)
    for _ in range(warm):
        mx.eval(run())
    per = []
    for _ in range(runs):
        t0 = time.perf_counter()
        prev = None
        for _ in range(steps):
            o = run()
            mx.async_eval(o)
            if prev is not None:
                mx.eval(prev)
            prev = o
        mx.eval(prev)
        per.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(per), per


# ----------------------------------------------------------------------------
# per-layer split (for the projection to the full depth)
# ----------------------------------------------------------------------------


def layer_times(model, args, cache, batch, steps, runs):
    """Median ms of each decoder layer's decode step alone (own graph)."""
    D = args.hidden_size
    hc = args.hc_mult
    h = (mx.random.normal((batch, 1, hc, D)) * 0.1).astype(mx.bfloat16)
    ids = mx.zeros((batch, 1), dtype=mx.int32)
    mx.eval(h)
    out = []
    for i, layer in enumerate(model.model.layers):
        c = cache[i]
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
        out.append(
            (c.compress_ratio if hasattr(c, "compress_ratio") else None, statistics.median(per))
        )
    return out


# ----------------------------------------------------------------------------
# kernels per decode step (graph node counts)
# ----------------------------------------------------------------------------

# Primitives that are views (no kernel of their own in the count).
VIEWS = {
    "Slice",
    "Broadcast",
    "Reshape",
    "ExpandDims",
    "Squeeze",
    "Transpose",
    "Flatten",
    "Unflatten",
    "View",
    "Split",
}


def _dot(outputs):
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as f:
        mx.export_to_dot(f.name, *outputs)
        return f.read()


def _primitive_names(outputs):
    """One name per primitive of the (unevaluated) graph behind ``outputs``; a
    multi-output primitive is one node."""
    labels = re.findall(r'label ?= ?"([^"]*)"', _dot(outputs))
    return [lab.split()[0] for lab in labels]


def kernel_nodes(outputs):
    """Primitive counts of the (unevaluated) graph behind ``outputs``, views
    excluded; a multi-output primitive is one node."""
    counts = {}
    for name in _primitive_names(outputs):
        if name not in VIEWS:
            counts[name] = counts.get(name, 0) + 1
    return sum(counts.values()), dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def graph_nodes(outputs):
    """(primitives, edges) of the graph behind ``outputs``, views included: a
    view launches no kernel, but every node costs host time when the graph is
    built and run, and more so the more arrays it reads and writes (edges:
    array -> primitive and primitive -> array)."""
    dot = _dot(outputs)
    labels = re.findall(r'label ?= ?"([^"]*)"', dot)
    return len(labels), dot.count("->")


_PAD = mx.array([0], dtype=mx.uint8)  # data: no node of its own


def _opaque(shape, dtype, *inputs):
    """One Concatenate node (views around it) of the given shape and dtype
    that depends on every array input: stands for a fused GPU op in a CPU
    graph. A Concatenate is no elementwise op, so compile fuses nothing
    through it, as with the real op. Values are garbage: counting only."""
    parts = [a.reshape(-1).view(mx.uint8) for a in inputs if isinstance(a, mx.array)]
    need = math.prod(shape) * dtype.size
    # at least two parts, or concatenate returns its input (no node)
    parts.append(mx.broadcast_to(_PAD, (max(1, need - sum(p.size for p in parts)),)))
    return mx.concatenate(parts)[:need].view(dtype).reshape(shape)


def emulate_gpu_graph():
    """Make the mx.fast ops one node each, as they are in a GPU graph (on
    the CPU they expand into their fallbacks). Call before anything is traced
    by mx.compile: compiled traces keep the ops they saw. Counting only."""

    def rms_norm(x, weight, eps, *, stream=None):
        dt = x.dtype if weight is None else mx.result_type(x, weight)
        return _opaque(x.shape, dt, x, weight)

    def layer_norm(x, weight, bias, eps, *, stream=None):
        return _opaque(x.shape, x.dtype, x, weight, bias)

    def rope(x, dims, *, traditional, base, scale, offset, freqs=None, stream=None):
        return _opaque(x.shape, x.dtype, x, offset, freqs)

    def sdpa(q, k, v, *, scale, mask=None, sinks=None, stream=None, **kw):
        return _opaque((*q.shape[:-1], v.shape[-1]), q.dtype, q, k, v, mask, sinks)

    mx.fast.rms_norm, mx.fast.layer_norm, mx.fast.rope = rms_norm, layer_norm, rope
    mx.fast.scaled_dot_product_attention = sdpa


def emulate_fused_kernels():
    """Take the model's CUDA-kernel paths (``MLX_ARCH_PLUGINS_FUSED``) on
    any device, each kernel one opaque node: the FUSED=1 GPU graph."""
    _dsv4()  # the source tree under test on sys.path
    from mlx_arch_plugins.deepseek_v4 import kernels

    def sinkhorn_split(mixes, scale, base, hc, iters, eps):
        lead = mixes.shape[:-1]
        n = math.prod(lead)
        out = _opaque((n * hc * (hc + 2),), mx.float32, mixes, scale, base)
        pre = out[: n * hc].reshape(*lead, hc)
        post = out[n * hc : 2 * n * hc].reshape(*lead, hc)
        return pre, post, out[2 * n * hc :].reshape(*lead, hc, hc)

    kernels.cuda_enabled = lambda: True
    kernels.use_sinkhorn_kernel = lambda rows: rows <= kernels.MAX_ROWS
    kernels.sinkhorn_split = sinkhorn_split


def _cache_arrays(c):
    return [a for a in c.state if isinstance(a, mx.array)]


def step_kernels(model, cache, steps, vocab):
    """Kernels of ``steps`` batch-1 decode steps (graph of the outputs and
    every cache array, views excluded), all graph nodes and their edges: per layer, from steps run one layer
    at a time (its input evaluated); then per whole step (logits + all
    caches, as mlx-lm builds it) over the next ``steps`` positions. A
    multiple of 4 steps covers every CSA block phase. Advances the caches
    by 2 * steps."""
    inner, layers = model.model, model.layers
    per = [[] for _ in layers]
    per_nodes = [[] for _ in layers]
    per_edges = [[] for _ in layers]
    ids = [mx.random.randint(0, vocab, (1, 1)) for _ in range(2 * steps)]
    mx.eval(ids)
    for y in ids[:steps]:
        h = inner.embed_tokens(y)
        h = mx.broadcast_to(h[:, :, None], (1, 1, model.args.hc_mult, h.shape[-1]))
        mx.eval(h)
        for i, (layer, c) in enumerate(zip(layers, cache)):
            h = layer(h, c, y)
            outs = [h] + _cache_arrays(c)
            per[i].append(kernel_nodes(outs)[0])
            nodes, edges = graph_nodes(outs)
            per_nodes[i].append(nodes)
            per_edges[i].append(edges)
            mx.eval(outs)
    whole, whole_nodes, whole_edges = [], [], []
    for y in ids[steps:]:
        outs = [model(y, cache=cache)] + [a for c in cache for a in _cache_arrays(c)]
        whole.append(kernel_nodes(outs)[0])
        nodes, edges = graph_nodes(outs)
        whole_nodes.append(nodes)
        whole_edges.append(edges)
        mx.eval(outs)
    return (per, whole), (per_nodes, whole_nodes), (per_edges, whole_edges)


def _kind(layer):
    """(compress ratio, hash-routed) of a decoder layer."""
    return layer.attn.ratio, bool(getattr(layer.ffn.gate, "hash", False))


# The Flash layer mix by kind: layers 0-2 are hash-routed (window, window, CSA).
FLASH_KINDS = collections.Counter((r, i < 3) for i, r in enumerate(FLASH_RATIOS))


def kernel_summary(model, per, whole):
    """Mean kernels per layer by ratio, and their mean over the Flash layer
    mix (2 window, 21 CSA, 20 HCA; hash-routed layers apart when the model
    has them, else by ratio alone), and the whole step per layer."""
    by, by_kind = {}, {}
    for layer, counts in zip(model.layers, per):
        by.setdefault(layer.attn.ratio, []).extend(counts)
        by_kind.setdefault(_kind(layer), []).extend(counts)
    kinds = {
        str(r): {"mean": round(statistics.mean(v), 2), "min": min(v), "max": max(v)}
        for r, v in sorted(by.items())
    }
    out = {
        "per_kind": kinds,
        "whole_step_mean": round(statistics.mean(whole), 1),
        "whole_per_layer": round(statistics.mean(whole) / len(per), 2),
    }
    means = {k: statistics.mean(v) for k, v in by_kind.items()}
    if all(k in means for k in FLASH_KINDS):
        mix = sum(n * means[k] for k, n in FLASH_KINDS.items())
    elif all(str(r) in kinds for r, _ in FLASH_KINDS):
        mix = sum(n * kinds[str(r)]["mean"] for (r, _), n in FLASH_KINDS.items())
    else:
        return out
    out["flash_mix_per_layer"] = round(mix / len(FLASH_RATIOS), 2)
    return out


RESULTS = []


_T0 = time.perf_counter()


def log(msg):
    print(f"# {time.perf_counter() - _T0:7.1f}s {msg}", file=sys.stderr, flush=True)


def emit(kind, **kw):
    rec = {"bench": kind, **kw, "t_s": round(time.perf_counter() - _T0, 1)}
    RESULTS.append(rec)
    print("JSON " + json.dumps(rec), flush=True)


def env_info():
    info = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "machine": platform.machine(),
    }
    try:
        info["device_info"] = {
            k: v for k, v in mx.device_info().items() if isinstance(v, (int, str, float))
        }
    except Exception:
        pass
    try:
        import mlx_lm

        info["mlx_lm"] = getattr(mlx_lm, "__version__", "?")
    except Exception:
        try:
            from importlib.metadata import version

            info["mlx_lm"] = version("mlx-lm")
        except Exception:
            info["mlx_lm"] = "?"
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["all", "decode", "prefill", "floor", "memory", "kernels"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="mlx-lm model directory")
    src.add_argument("--random", choices=["flash", "small"])
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--experts", type=int, help="routed experts (Flash: 256; 64 fits 43 layers)")
    p.add_argument("--kinds", help="compress ratio per layer, e.g. 0,4,128")
    p.add_argument("--format", choices=["official", "affine4"], default="official")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override of --random, e.g. index_topk=512 (repeatable)",
    )
    p.add_argument(
        "--kernel-steps",
        type=int,
        default=8,
        help="batch-1 decode steps whose kernels are counted at each "
        "context, per layer kind (0: none)",
    )
    p.add_argument(
        "--graph",
        choices=["device", "gpu", "both"],
        default="device",
        help="kernels: count the graph of this device (device); on a CPU, "
        "gpu = mx.fast ops as one node each, as on a GPU (counting only, "
        "the values are garbage); both = device and gpu, one process each",
    )
    p.add_argument("--contexts", default="1024,8192,32768,131072")
    p.add_argument("--prefill-contexts", default="1024,8192,32768")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warm", type=int, default=4)
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--prefill-runs", type=int, default=2)
    p.add_argument("--seed-prompt", type=int, default=256)
    p.add_argument(
        "--seed-step",
        type=int,
        default=0,
        help="prefill chunk for the seed prompt (small chunks avoid "
        "compiling the matrix-matrix kernels; default --prefill-step)",
    )
    p.add_argument("--full-layers", type=int, default=FLASH_LAYERS)
    p.add_argument("--per-layer", action="store_true", help="also time each layer alone")
    p.add_argument(
        "--no-batch-cache",
        action="store_true",
        help="skip the per-sequence BatchDeepseekV4Cache batch-8 run",
    )
    p.add_argument("--budget-s", type=float, default=1e9, help="skip the rest after this")
    p.add_argument("--json-out")
    o = p.parse_args(argv)
    t_start = time.perf_counter()
    if o.experts:  # same bytes per token as Flash (6 routed of any number), fewer in memory
        shapes = FLASH if o.random == "flash" else SMALL
        shapes.update(n_routed_experts=o.experts, num_experts_per_tok=min(6, o.experts))
    if o.graph == "both":
        return _both_graphs(argv if argv is not None else sys.argv[1:])
    if o.graph == "gpu":
        if mx.default_device() == mx.gpu:
            raise SystemExit("--graph gpu emulates a GPU graph on a CPU; use --graph device")
        emulate_gpu_graph()
    if o.graph == "gpu" and os.environ.get("MLX_ARCH_PLUGINS_FUSED", "1") != "0":
        emulate_fused_kernels()
    graph = {"device": "cpu" if mx.default_device() == mx.cpu else "gpu", "gpu": "gpu-emulated"}[
        o.graph
    ]

    info = env_info()
    t0 = time.perf_counter()
    if o.model:
        model, tok, args = load_dir(o.model)
        label = os.path.basename(os.path.normpath(o.model))
    else:
        sets = dict(kv.split("=", 1) for kv in o.set)
        sets = {k: json.loads(v) for k, v in sets.items()}
        model, tok, args = build_random(o.random, o.layers, o.format, o.kinds, overrides=sets)
        label = f"random-{o.random}-{o.format}-{o.layers}L"
        label += f"-{o.experts}E" if o.experts else ""
    info.update(
        model=label,
        build_s=round(time.perf_counter() - t0, 2),
        src=os.path.dirname(sys.modules["mlx_arch_plugins"].__file__)
        if "mlx_arch_plugins" in sys.modules
        else None,
        weights_bytes=sum(a.nbytes for _, a in _flat(model.parameters())),
        layers=len(model.layers),
        ratios=list(getattr(args, "compress_ratios", []) or [])[: len(model.layers)],
    )
    emit("env", **info)
    vocab = getattr(args, "vocab_size", 32000)
    ctxs = [int(x) for x in o.contexts.split(",") if x]
    batches = [int(x) for x in o.batches.split(",") if x]

    def do(what):
        return o.what in ("all", what)

    def over_budget():
        return time.perf_counter() - t_start > o.budget_s

    floors = {}
    if do("floor") or do("decode"):
        for b in batches:
            run, nbytes, nops = floor_graph(model, args, b)
            ms, per = time_floor(run, o.steps, o.runs, o.warm)
            floors[b] = ms
            emit(
                "floor",
                batch=b,
                ms=round(ms, 4),
                runs=[round(x, 4) for x in per],
                weight_bytes=nbytes,
                matmuls=nops,
                gbps=round(nbytes / ms / 1e6, 1),
            )

    if o.what == "kernels":
        for T in ctxs:
            cache = fill_cache(model, 1, T, o, vocab)
            count_kernels(model, cache, T, o.kernel_steps, vocab, graph)
            cache = None
            gc.collect()

    steps_at = {}
    if do("decode") or do("memory"):
        for T in ctxs:
            for b in batches:
                if over_budget():
                    emit("skipped", what="decode", context=T, batch=b, reason="budget")
                    continue
                try:
                    mx.clear_cache()
                    log(f"fill context {T} batch {b}")
                    cache = fill_cache(model, b, T, o, vocab)
                    log("decode")
                    kv = cache_bytes(cache)
                    alloc = cache_alloc_bytes(cache)
                    (ms, per, host, launch), peak = peak_during(
                        lambda: decode_runs(model, cache, b, vocab, o.steps, o.runs, o.warm)
                    )
                except Exception as e:  # out of memory and such: report, go on
                    emit("error", what="decode", context=T, batch=b, error=str(e)[:300])
                    cache = None
                    gc.collect()
                    mx.clear_cache()
                    continue
                steps_at[(T, b)] = ms
                rec = dict(
                    context=T,
                    batch=b,
                    ms_step=round(ms, 3),
                    tok_s=round(b * 1e3 / ms, 2),
                    host_ms_step=round(host, 3),
                    launch_ms_step=round(launch, 3),
                    runs=[round(x, 3) for x in per],
                    kv_bytes=kv,
                    kv_alloc_bytes=alloc,
                    peak_bytes=peak,
                    fast_fill=is_dsv4(model) and T > o.seed_prompt,
                )
                if is_dsv4(model):
                    rec["kv_formula_bytes"] = formula_bytes(args, T, b)
                if b in floors:
                    rec["floor_ms"] = round(floors[b], 4)
                    rec["step_over_floor"] = round(ms / floors[b], 3)
                emit("decode", **rec)
                if o.kernel_steps and b == 1 and is_dsv4(model) and not over_budget():
                    count_kernels(model, cache, T, o.kernel_steps, vocab, graph)
                if o.per_layer and b == 1 and is_dsv4(model):
                    lt = layer_times(model, args, cache, b, o.steps, o.runs)
                    emit(
                        "layers",
                        context=T,
                        batch=b,
                        layers=[{"ratio": r, "ms": round(t, 4)} for r, t in lt],
                    )
                    if hasattr(args, "compress_ratios"):
                        proj = project(ms, lt, o.full_layers)
                        if proj:
                            emit("projection", context=T, batch=b, **proj)
                if b > 1 and is_dsv4(model) and not o.no_batch_cache:
                    # mlx_lm.batch_generate's form: per-sequence caches
                    try:
                        singles = [fill_cache(model, 1, T, o, vocab) for _ in range(b)]
                        bc = batch_cache(singles)
                        ms2, per2, host2, launch2 = decode_runs(
                            model, bc, b, vocab, o.steps, o.runs, o.warm
                        )
                        emit(
                            "decode_batchcache",
                            context=T,
                            batch=b,
                            ms_step=round(ms2, 3),
                            tok_s=round(b * 1e3 / ms2, 2),
                            host_ms_step=round(host2, 3),
                            launch_ms_step=round(launch2, 3),
                            runs=[round(x, 3) for x in per2],
                        )
                    except Exception as e:
                        emit(
                            "error",
                            what="decode_batchcache",
                            context=T,
                            batch=b,
                            error=str(e)[:300],
                        )
                    singles = bc = None
                cache = None
                gc.collect()

    if do("prefill"):
        for T in [int(x) for x in o.prefill_contexts.split(",") if x]:
            if over_budget():
                emit("skipped", what="prefill", context=T, reason="budget")
                continue
            per = []
            try:
                for r in range(o.prefill_runs if T <= 8192 else 1):
                    toks = mx.random.randint(0, vocab, (1, T))
                    mx.eval(toks)
                    cache = make_cache(model, 1)
                    mx.clear_cache()
                    mx.reset_peak_memory()
                    t0 = time.perf_counter()
                    prefill(model, cache, toks, o.prefill_step)
                    per.append(time.perf_counter() - t0)
                    peak = mx.get_peak_memory()
                rec = dict(
                    context=T,
                    s=round(statistics.median(per), 3),
                    tok_s=round(T / statistics.median(per), 1),
                    runs=[round(x, 3) for x in per],
                    peak_bytes=peak,
                    kv_bytes=cache_bytes(cache),
                    step=o.prefill_step,
                )
                if is_dsv4(model):
                    rec["kv_formula_bytes"] = formula_bytes(args, T)
                emit("prefill", **rec)
            except Exception as e:
                emit("error", what="prefill", context=T, error=str(e)[:300])
            cache = None
            gc.collect()
            mx.clear_cache()

    table(RESULTS)
    if o.json_out:
        with open(o.json_out, "w") as f:
            json.dump(RESULTS, f, indent=1)


def count_kernels(model, cache, T, steps, vocab, graph):
    fused = os.environ.get("MLX_ARCH_PLUGINS_FUSED", "1") != "0"
    kernels, nodes, edges = step_kernels(model, cache, steps, vocab)
    emit(
        "kernels",
        context=T,
        graph=graph,
        fused=fused,
        steps=steps,
        **kernel_summary(model, *kernels),
        nodes=kernel_summary(model, *nodes),
        edges=kernel_summary(model, *edges),
    )


def _both_graphs(argv):
    """``--graph both``: the same command with --graph device, then gpu, in
    fresh processes (compiled traces cannot be redone in one process)."""
    rest, skip = [], False
    for a in argv:
        if not skip and not a.startswith("--graph"):
            rest.append(a)
        skip = a == "--graph"
    for g in ("device", "gpu"):
        rc = subprocess.call([sys.executable, __file__, *rest, "--graph", g])
        if rc:
            raise SystemExit(rc)


def project(step_ms, layer_ms, n_full):
    """Step time of an ``n_full``-layer Flash model from this model's step:
    the non-layer part (embedding, head collapse, lm_head, sampling) plus the
    per-kind median layer time times the Flash count of that kind."""
    by = {}
    for r, t in layer_ms:
        by.setdefault(r, []).append(t)
    ratios = (FLASH_RATIOS + [4, 128] * n_full)[:n_full]
    if any(r not in by for r in set(ratios)):
        return None
    rest = step_ms - sum(t for _, t in layer_ms)
    full = rest + sum(statistics.median(by[r]) for r in ratios)
    return {
        "layers_full": n_full,
        "nonlayer_ms": round(rest, 3),
        "per_kind_ms": {str(r): round(statistics.median(v), 4) for r, v in by.items()},
        "projected_ms_step": round(full, 2),
        "projected_tok_s": round(1e3 / full, 2),
    }


def table(res):
    print()
    env = next((r for r in res if r["bench"] == "env"), {})
    print(
        f"# {env.get('model')} on {env.get('device')} (mlx {env.get('mlx')}), "
        f"weights {env.get('weights_bytes', 0) / 2**30:.2f} GiB"
    )
    fl = {r["batch"]: r for r in res if r["bench"] == "floor"}
    for b, r in fl.items():
        print(
            f"floor  batch {b}: {r['ms']:.3f} ms  ({r['weight_bytes'] / 2**20:.1f} MiB read, "
            f"{r['gbps']} GB/s, {r['matmuls']} matmuls)"
        )
    rows = [r for r in res if r["bench"] == "decode"]
    if rows:
        print(
            f"\n{'context':>8} {'batch':>5} {'ms/step':>9} {'tok/s':>9} {'host ms':>8} "
            f"{'launch ms':>9} {'step/floor':>10} {'KV MiB':>9} {'formula':>9} {'peak GiB':>9}"
        )
        for r in rows:
            print(
                f"{r['context']:>8} {r['batch']:>5} {r['ms_step']:>9.3f} {r['tok_s']:>9.1f} "
                f"{r['host_ms_step']:>8.3f} {r.get('launch_ms_step', float('nan')):>9.3f} "
                f"{r.get('step_over_floor', float('nan')):>10.2f} "
                f"{r['kv_bytes'] / 2**20:>9.2f} "
                f"{r.get('kv_formula_bytes', 0) / 2**20:>9.2f} {r['peak_bytes'] / 2**30:>9.2f}"
            )
    for r in res:
        if r["bench"] == "decode_batchcache":
            print(
                f"batch-cache (mlx_lm batch generator form) context {r['context']} batch "
                f"{r['batch']}: {r['ms_step']:.3f} ms/step, {r['tok_s']:.1f} tok/s "
                f"(host {r['host_ms_step']:.3f} + launch {r.get('launch_ms_step', 0):.3f} ms)"
            )
    for r in res:
        if r["bench"] == "kernels":
            kinds = ", ".join(f"{k}: {v['mean']}" for k, v in r["per_kind"].items())
            print(
                f"kernels/layer ({r['graph']} graph, fused {r['fused']}) context "
                f"{r['context']}: by ratio {kinds}; Flash mix "
                f"{r.get('flash_mix_per_layer', '-')}; whole step "
                f"{r['whole_step_mean']} = {r['whole_per_layer']}/layer"
            )
            for what in ("nodes", "edges"):
                n = r.get(what)
                if n:
                    print(
                        f"  graph {what}/layer (views included): Flash mix "
                        f"{n.get('flash_mix_per_layer', '-')}; "
                        f"whole step {n['whole_per_layer']}/layer"
                    )
    for r in res:
        if r["bench"] == "projection":
            print(
                f"PROJECTION to {r['layers_full']} layers at context {r['context']}: "
                f"{r['projected_ms_step']} ms/step ({r['projected_tok_s']} tok/s); "
                f"per kind {r['per_kind_ms']}, non-layer {r['nonlayer_ms']} ms"
            )
    pre = [r for r in res if r["bench"] == "prefill"]
    if pre:
        print(
            f"\n{'prefill':>8} {'s':>8} {'tok/s':>9} {'KV MiB':>9} {'formula':>9} {'peak GiB':>9}"
        )
        for r in pre:
            print(
                f"{r['context']:>8} {r['s']:>8.3f} {r['tok_s']:>9.1f} "
                f"{r['kv_bytes'] / 2**20:>9.2f} {r.get('kv_formula_bytes', 0) / 2**20:>9.2f} "
                f"{r['peak_bytes'] / 2**30:>9.2f}"
            )
    for r in res:
        if r["bench"] in ("error", "skipped"):
            print(f"{r['bench']}: {r}")


if __name__ == "__main__":
    main()
