"""DeepSeek-V4-Flash at its true shapes (issue 18): one GPU at 2-bit, two GPUs sharded.

The whole model (43 layers + MTP, 256 routed experts, 129,280-token vocabulary, Flash
widths) is built in memory with random weights; no checkpoint of that size fits the
disks here. Every quantized weight is made as a float tensor of its true shape, chunk
by chunk along its first axis (a single random tensor above 2^31 elements fails on MLX
CUDA; one stacked expert projection is exactly 2^31), and quantized the way a
conversion would (affine 2/4-bit group 64, or mxfp8 dense + mxfp4 experts as sanitize
makes of the official checkpoint). Each tensor's random stream is keyed by its name,
so a sharded run holds exactly the slices of the weights a single process builds, and
a rank never holds more than its own shard plus one tensor in the making.

Subcommands (each prints ``JSON {...}`` lines, then nothing else to parse):

  single   one process: build, decode through stock ``generate_step`` (portable
           path and CUDA kernel, alternated), prefill of --prefills tokens
           (time to first token, peak memory), ``mlx_lm.server`` in-process
           (one request, then --clients concurrent), MTP drafting through
           ``mtp_generate_step`` next to plain decode, verify-step costs
  dist     under ``mlx.launch``: --mode tp (``Model.shard``) or pp
           (``model.model.pipeline``); every rank builds only its own part;
           logits of a fixed prompt (rank 0 writes --logits-out), decode,
           prefill, memory per rank
  logits   one process, logits of the same fixed prompt (the reference for dist
           at a depth that fits one GPU)
  compare  max |a-b| and argmax agreement of two --logits-out files

  python benchmarks/full_size.py single --format affine2
  mlx.launch -n 2 --backend nccl benchmarks/full_size.py dist --format official --mode tp
  python benchmarks/full_size.py logits --format official --layers 6 --logits-out ref.npy
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import perf  # noqa: E402  (after the path insert above)

# At most this many elements of float weight exist at once per tensor in the making.
CHUNK_ELEMENTS = 1 << 28
PROMPT_SEED = 1234


def emit(kind, **kw):
    if _rank() == 0 or kw.get("per_rank"):
        print("JSON " + json.dumps({"kind": kind, **kw}), flush=True)


def _rank():
    try:
        return mx.distributed.init().rank()
    except Exception:
        return 0


def gib(n):
    return round(n / 2**30, 3)


# ----------------------------------------------------------------------------
# the model at its true shapes
# ----------------------------------------------------------------------------


def config(layers, experts, small):
    from mlx_arch_plugins.deepseek_v4 import tiny

    cfg = tiny.resolve_config(preset="flash", layers=layers, experts=experts)
    if small:  # same structure, CPU-sized widths (smoke runs of this script)
        keep = ("n_routed_experts",) if experts else ()
        cfg.update({k: v for k, v in perf.SMALL.items() if k in cfg and k not in keep})
        cfg["num_hash_layers"] = min(3, layers)
    cfg["num_experts_per_tok"] = min(cfg["num_experts_per_tok"], cfg["n_routed_experts"])
    return cfg


def quant_spec(fmt, path, module, own_predicate):
    """(group_size, bits, mode) a conversion gives the layer at ``path``, or None."""
    if not hasattr(module, "to_quantized"):
        return None
    if fmt == "official":
        if ".switch_mlp." in path:
            return 32, 4, "mxfp4"
        dense = (".wq_a", ".wq_b", ".wkv", ".wo_a", ".wo_b", "shared_experts.", "e_proj", "h_proj")
        if any(s in path for s in dense) and ".compressor." not in path:
            return 32, 8, "mxfp8"
        return None
    if module.weight.shape[-1] % 64 or not own_predicate(path, module):
        return None
    return 64, int(fmt[len("affine") :]), "affine"


def _key(seed, name, part):
    return mx.random.key((seed * 1_000_003 + zlib.crc32(f"{name}#{part}".encode())) % 2**32)


def true_weights(module, name, seed):
    """(weight, scales[, biases]) of a quantized layer: a uniform(±1/sqrt(in)) float
    tensor of the layer's true shape, made and quantized in chunks of its first axis."""
    bits, gs = module.bits, module.group_size
    mode = getattr(module, "mode", "affine")
    packed = module.weight.shape
    shape = (*packed[:-1], packed[-1] * 32 // bits)
    inner = int(np.prod(shape[1:]))
    step = max(1, CHUNK_ELEMENTS // inner)
    bound = shape[-1] ** -0.5
    parts = []
    for i, a in enumerate(range(0, shape[0], step)):
        rows = (min(step, shape[0] - a), *shape[1:])
        w = mx.random.uniform(-bound, bound, rows, dtype=mx.bfloat16, key=_key(seed, name, i))
        parts.append(mx.quantize(w, gs, bits, mode=mode))
    return [mx.concatenate(p, axis=0) if len(p) > 1 else p[0] for p in zip(*parts)]


def _quantized_modules(model):
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Module) and "scales" in m and "weight" in m
    ]


def build(fmt, layers, experts=None, seed=0, small=False, group=None, mode=None):
    """The model, every weight made (rank's own part only when ``group``)."""
    # the copy of the package already imported (main() points it at this tree's src)
    from mlx_arch_plugins.deepseek_v4 import model as dsv4

    args = dsv4.ModelArgs.from_dict(config(layers, experts, small))
    mx.random.seed(seed)
    model = dsv4.Model(args)  # lazy: nothing below is made until evaluated
    own = model.quant_predicate

    def pred(path, m):
        q = quant_spec(fmt, path, m, own)
        return {"group_size": q[0], "bits": q[1], "mode": q[2]} if q else False

    nn.quantize(model, class_predicate=pred)
    cast = model.cast_predicate
    for name, p in perf._flat(model.parameters()):
        if name.endswith("ffn.gate.weight"):
            perf._set(model, name, mx.random.normal(p.shape, key=_key(seed, name, 0)) * 0.02)
        elif name.endswith("tid2eid"):
            ids = mx.random.randint(0, args.n_routed_experts, p.shape, key=_key(seed, name, 0))
            perf._set(model, name, ids.astype(p.dtype))
        elif p.dtype == mx.float32 and cast(name):
            perf._set(model, name, p.astype(mx.bfloat16))
    for name, m in _quantized_modules(model):
        made = true_weights(m, name, seed)
        m.weight, m.scales = made[0], made[1]
        if len(made) > 2:
            m.biases = made[2]
    if group is not None and group.size() > 1:
        if mode == "pp":
            model.model.pipeline(group)
        else:
            model.shard(group)
    _materialize(model)
    model.eval()
    return model, args


def _materialize(model):
    """Evaluate one quantized layer at a time, then the rest, so only one tensor's
    float chunks exist at once."""
    for _, m in _quantized_modules(model):
        mx.eval(m.parameters())
        mx.clear_cache()
    mx.eval(model.parameters())
    gc.collect()
    mx.clear_cache()


def weight_bytes(model):
    return sum(p.nbytes for _, p in perf._flat(model.parameters()))


def prompt_ids(n, vocab, seed=PROMPT_SEED):
    return mx.random.randint(16, vocab, (n,), key=mx.random.key(seed)).astype(mx.uint32)


# ----------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------


def set_portable(model, portable):
    """Switch the CUDA kernel off (portable path) or on, and drop the compiled
    graphs traced under the other setting."""
    os.environ["MLX_ARCH_PLUGINS_FUSED"] = "0" if portable else "1"
    for blk in list(model.layers) + list(model.model.mtp):
        if blk is not None:
            blk.__dict__.pop("_compiled", None)
    model.__dict__.pop("_tail_memo", None)


def generate_run(model, prompt, tokens, prefill_step=2048, progress=None):
    """Stock generate_step: seconds to the first token, then ms per later token.
    With ``progress`` (a label), one line per token as it comes, so a slow
    first step (kernel compilation) can be told from a stall."""
    from mlx_lm.generate import generate_step

    t0 = time.perf_counter()
    times = []
    for _ in zip(range(tokens), generate_step(prompt, model, prefill_step_size=prefill_step)):
        times.append(time.perf_counter())
        if progress:
            emit("token", what=progress, index=len(times) - 1, seconds=times[-1] - t0)
    first = times[0] - t0
    per = (times[-1] - times[0]) * 1e3 / max(1, len(times) - 1)
    return first, per


def phase_decode(model, args, o):
    prompt = prompt_ids(o.decode_prompt, args.vocab_size)
    generate_run(model, prompt, 8)  # warm: compiles, allocates
    rows = {}
    for portable in [False, True] * o.decode_runs:
        set_portable(model, portable)
        generate_run(model, prompt, 4)  # re-trace under this setting
        first, per = generate_run(model, prompt, o.decode_tokens)
        rows.setdefault(portable, []).append(per)
        emit("decode", fused=int(not portable), prompt=o.decode_prompt, ms_per_token=per)
    set_portable(model, False)
    for portable, per in rows.items():
        med = float(np.median(per))
        emit(
            "decode_median",
            fused=int(not portable),
            ms_per_token=med,
            tokens_per_s=1e3 / med,
            runs=per,
        )


def phase_prefill(model, args, o):
    for n in o.prefills:
        prompt = prompt_ids(n, args.vocab_size, seed=PROMPT_SEED + n)
        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        first, _ = generate_run(model, prompt, 1, o.prefill_step)
        emit(
            "prefill",
            tokens=n,
            prefill_step=o.prefill_step,
            seconds_to_first_token=first,
            tokens_per_s=n / first,
            peak_gib=gib(mx.get_peak_memory()),
            active_before_gib=gib(base),
            activation_peak_gib=gib(mx.get_peak_memory() - base),
        )
        if o.budget_left() < 60:
            emit("skipped", what="rest of prefill (time budget)")
            return


def _tokenizer(vocab):
    from mlx_lm.tokenizer_utils import load as load_tokenizer_wrapper

    from mlx_arch_plugins.deepseek_v4 import tiny

    d = Path(tempfile.mkdtemp())
    kind = tiny.write_tokenizer(d, vocab)
    return load_tokenizer_wrapper(d), kind


def phase_server(model, args, o):
    """mlx_lm.server in this process, serving the in-memory model (its loader is
    pointed at it: no file of this size fits the disk)."""
    import mlx_lm.server as server
    import server_throughput as st

    tokenizer, kind = _tokenizer(args.vocab_size)
    config_dict = {"model_type": "deepseek_v4"}
    server.load = lambda *a, **k: (model, tokenizer, config_dict)
    port = st.free_port()
    argv = ["mlx_lm.server", "--model", "in-memory", "--port", str(port), "--log-level", "ERROR"]
    sys.argv = argv
    threading.Thread(target=server.main, daemon=True).start()
    for _ in range(600):
        try:
            st.ask(port, "warm up", 4)
            break
        except Exception:
            time.sleep(1)
    t, counts = st.run_sequential(port, st.prompts(1, 1, o.server_words), o.server_tokens)
    toks = sum(c[1] for c in counts)
    emit("server", clients=1, seconds=t, completion_tokens=toks, tokens_per_s=toks / t)
    ps = st.prompts(o.clients, 2, o.server_words)
    t, counts = st.run_concurrent(port, ps, o.server_tokens)
    toks = sum(c[1] for c in counts)
    emit(
        "server",
        clients=o.clients,
        seconds=t,
        completion_tokens=toks,
        tokens_per_s=toks / t,
        tokenizer=kind,
    )
    for target in o.server_long:
        server_first_token(port, target, st)


def server_first_token(port, target, st):
    """Time to the first token of one chat request whose prompt is about ``target``
    tokens, through the server's own chunked prefill: a 1-token completion, timed
    from the request to the reply. A first request of known words calibrates words
    to tokens (it starts differently, so the server's prompt cache cannot reuse it)."""
    words = 1024
    calibrated, _ = st.ask(port, st.prompts(1, 3, words)[0], 1)
    words = max(1, round(words * target / max(1, calibrated)))
    t = time.perf_counter()
    prompt_tokens, completion = st.ask(port, st.prompts(1, 4, words)[0], 1)
    seconds = time.perf_counter() - t
    emit(
        "server_first_token",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        seconds=seconds,
        prompt_tokens_per_s=prompt_tokens / seconds,
    )


def phase_spec(model, args, o):
    """MTP drafting as users get it (``mtp_generate_step``, adaptive switch on) next
    to plain decode (stock ``generate_step``, same process): first at the natural
    acceptance of random weights (about none), whose tokens are compared with the
    plain run's; then with acceptance forced to --spec-rates (``_forced_accept``:
    the MTP block drafts and the main model verifies as always, only the number
    kept is drawn). Then the parts: one draft step, verify steps."""
    from mlx_arch_plugins.deepseek_v4 import speculative as spec

    prompt = prompt_ids(o.decode_prompt, args.vocab_size, seed=PROMPT_SEED + 7)
    draft = spec.MTPDraft(model)
    want, gaps, plain = greedy_run(model, prompt, o.spec_tokens)
    real_accept = spec._accept
    for rate in [None] + o.spec_rates:
        for k in o.spec_ks:
            for ahead in o.spec_ahead:  # interleaved: the machine drifts between processes
                if rate is not None:
                    spec._accept = _forced_accept(real_accept, rate)
                os.environ[spec.AHEAD_SWITCH] = ahead
                try:
                    spec_one(model, prompt, draft, k, rate, (want, gaps, plain), o)
                finally:
                    spec._accept = real_accept
                    os.environ.pop(spec.AHEAD_SWITCH)
    cache, mtp = model.make_cache(), draft.make_cache()[0]
    hs = model.model.hidden(prompt[None], cache)
    model.mtp_logits(hs[:, :-1], prompt[None, 1:], mtp)
    mx.eval(hs, [c.state for c in cache], mtp.state)

    def draft_step():
        logits, g = model.mtp_forward(hs[:, -1:], prompt[None, -1:], mtp)
        mx.eval(mx.argmax(logits[0, -1]), g)
        mtp.trim(1)

    emit("draft", tokens=1, ms=1e3 * _median_time(draft_step, 5))
    for k in [0] + o.spec_ks:
        ids = prompt_ids(k + 1, args.vocab_size, seed=PROMPT_SEED + 11)[None]

        def verify(ids=ids, k=k):
            logits, hs = spec._main_forward(model, ids, cache)
            mx.eval(logits, hs)
            for c in cache:
                c.trim(k + 1)

        emit("verify", k=k, tokens=k + 1, ms=1e3 * _median_time(verify, 5))


def greedy_run(model, prompt, n):
    """Stock generate_step's greedy tokens, the gap between the two best logprobs
    at each (untimed run), and its ms per token after the first (timed run)."""
    from mlx_lm.generate import generate_step

    toks, gaps = [], []
    for _, (tok, logprobs) in zip(range(n), generate_step(prompt, model)):
        toks.append(int(tok))
        top2 = mx.topk(logprobs.astype(mx.float32), 2)
        gaps.append(float(top2.max() - top2.min()))
    stamps = []
    for _, (tok, _logprobs) in zip(range(n), generate_step(prompt, model)):
        stamps.append(time.perf_counter())
    return toks, gaps, (stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1)


def _forced_accept(real, rate, seed=0):
    """A ``speculative._accept`` that keeps each draft with probability ``rate`` up
    to the first one dropped, whatever the verify picked; the token after the kept
    ones is the verify's own pick there. Random weights accept no draft, so this
    is how drafting is timed at a given acceptance: the MTP block drafts and the
    main model verifies and is rolled back exactly as in use; only the tokens
    are not a model's output."""
    import random

    rng = random.Random(seed)

    def accept(lp, q, drafts, greedy, probs, pick):
        picks = pick(lp).tolist()
        n = 0
        while n < len(drafts) and rng.random() < rate:
            n += 1
        return n, picks[n]

    return accept


class _LoopCounters:
    """Counts what the drafting loop did: iterations that drafted, tokens from
    single steps, MTP catch-up passes and their time."""

    def __init__(self, spec):
        self.spec = spec
        self.real_next, self.real_feed = spec.DraftLength.next, spec._feed_mtp
        self.drafting_iters = self.drafted_tokens = self.feeds = 0
        self.feed_s = 0.0
        self.ks = []  # the choice at each iteration (a run of single steps counts once)

    def choices(self):
        """The iterations' choices as runs, e.g. "2x8 0x3": k=2 eight times, then 0."""
        runs = []
        for k in self.ks:
            if runs and runs[-1][0] == k:
                runs[-1][1] += 1
            else:
                runs.append([k, 1])
        return " ".join(f"{k}x{n}" for k, n in runs)

    def __enter__(self):
        counters = self

        def next_k(length):
            k = counters.real_next(length)
            if k:
                counters.drafting_iters += 1
            counters.ks.append(k)
            return k

        def feed(model, mtp, pairs):
            if pairs:
                counters.feeds += 1
            t = time.perf_counter()
            counters.real_feed(model, mtp, pairs)
            counters.feed_s += time.perf_counter() - t

        self.spec.DraftLength.next, self.spec._feed_mtp = next_k, feed
        return self

    def __exit__(self, *exc):
        self.spec.DraftLength.next, self.spec._feed_mtp = self.real_next, self.real_feed


def spec_one(model, prompt, draft, k, rate, plain_run, o):
    """One drafting run as a JSON line, after one that warms: each setting takes
    its own paths over the same positions (kernels compiled on first use per
    shape, e.g. at the ratio-128 block end, would land in the timed run)."""
    from mlx_arch_plugins.deepseek_v4 import speculative as spec

    want, gaps, plain = plain_run
    for _ in range(2):
        stamps, got = [], []
        with _LoopCounters(spec) as counted:
            for g in spec.mtp_generate_step(
                prompt, model, draft, num_draft_tokens=k, max_tokens=o.spec_tokens
            ):
                stamps.append(time.perf_counter())
                got.append(g)
    per = (stamps[-1] - stamps[0]) * 1e3 / max(1, len(stamps) - 1)
    toks = [int(g[0]) for g in got]
    row = {}
    if rate is None:  # a real decode: its tokens against stock generate_step's
        diff = [i for i, (a, b) in enumerate(zip(toks, want)) if a != b]
        row = dict(same_tokens_as_plain=not diff, first_difference=diff[0] if diff else None)
        if diff:  # how close the plain run's two best tokens were there
            row["plain_top2_gap_there"] = gaps[diff[0]]
            row["plain_top2_gap_median"] = float(np.median(gaps))
    emit(
        "spec_mtp",
        k=k,
        ahead=spec.ahead_enabled(),
        rate="natural" if rate is None else rate,
        tokens=len(got),
        accepted=sum(1 for g in got if g[2]),
        drafting_iterations=counted.drafting_iters,
        mtp_catch_up_passes=counted.feeds,
        mtp_catch_up_ms=1e3 * counted.feed_s,
        ms_per_token=per,
        plain_ms_per_token=plain,
        speedup=plain / per,
        **row,
        choices=counted.choices(),
        token_gaps_ms=[round(1e3 * (b - a), 1) for a, b in zip(stamps, stamps[1:])],
    )


def _median_time(fn, runs):
    fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return float(np.median(out))


def fixed_logits(model, args, n=32):
    """float32 logits of the last 4 positions of a fixed prompt, and of one decode step."""
    cache = model.make_cache()
    ids = prompt_ids(n, args.vocab_size)[None]
    pre = model(ids, cache=cache)[0, -4:].astype(mx.float32)
    mx.eval(pre)  # pipelined models: one forward per graph
    step = model(mx.argmax(pre[-1:], axis=-1)[None].astype(mx.uint32), cache=cache)
    return np.array(mx.concatenate([pre, step[0].astype(mx.float32)], axis=0))


def memory_row(what, model, per_rank=False):
    emit(
        what,
        per_rank=per_rank,
        rank=_rank(),
        weights_gib=gib(weight_bytes(model)),
        active_gib=gib(mx.get_active_memory()),
        peak_gib=gib(mx.get_peak_memory()),
    )


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------


def run_single(o):
    t0 = time.perf_counter()
    model, args = build(o.format, o.layers, o.experts, o.seed, o.small)
    emit(
        "build",
        format=o.format,
        layers=args.num_hidden_layers,
        experts=args.n_routed_experts,
        mtp=args.num_nextn_predict_layers,
        vocab=args.vocab_size,
        seconds=time.perf_counter() - t0,
    )
    memory_row("memory_after_build", model)
    phases = {
        "decode": phase_decode,
        "prefill": phase_prefill,
        "server": phase_server,
        "spec": phase_spec,
    }
    for name in o.phases:
        if o.budget_left() < 30:
            emit("skipped", what=name)
            continue
        t = time.perf_counter()
        try:
            phases[name](model, args, o)
        except Exception as e:  # report it and go on: one call measures everything
            import traceback

            traceback.print_exc()
            emit("phase_failed", what=name, error=f"{type(e).__name__}: {e}"[:2000])
        emit("phase_done", what=name, seconds=time.perf_counter() - t)
    memory_row("memory_end", model)


def run_dist(o):
    # a rank that waits too long shows where (a collective that never pairs up
    # waits in an eval; kernel compilation shows under the step's graph building)
    faulthandler.dump_traceback_later(o.stack_every_s, repeat=True)
    group = mx.distributed.init()
    t0 = time.perf_counter()
    model, args = build(o.format, o.layers, o.experts, o.seed, o.small, group, o.mode)
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
    emit("build", mode=o.mode, ranks=group.size(), seconds=time.perf_counter() - t0)
    memory_row("memory_after_build", model, per_rank=True)
    logits = fixed_logits(model, args)
    if o.logits_out and group.rank() == 0:
        np.save(o.logits_out, logits)
    emit("logits", mode=o.mode, shape=list(logits.shape), finite=bool(np.isfinite(logits).all()))
    prompt = prompt_ids(o.decode_prompt, args.vocab_size)
    generate_run(model, prompt, 8, progress="warm-up generate_step")
    pers = [generate_run(model, prompt, o.decode_tokens)[1] for _ in range(o.decode_runs)]
    emit("decode_median", mode=o.mode, ms_per_token=float(np.median(pers)), runs=pers)
    for n in o.prefills:
        mx.reset_peak_memory()
        first, _ = generate_run(model, prompt_ids(n, args.vocab_size, PROMPT_SEED + n), 1)
        emit("prefill", mode=o.mode, tokens=n, seconds_to_first_token=first, tokens_per_s=n / first)
        memory_row("memory_after_prefill", model, per_rank=True)
    # generate_step has launched one step past the last token read: let every rank
    # finish it before any exits (its sends and receives need the peer)
    mx.synchronize()
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


def run_logits(o):
    model, args = build(o.format, o.layers, o.experts, o.seed, o.small)
    logits = fixed_logits(model, args)
    np.save(o.logits_out, logits)
    emit("logits", mode="single", shape=list(logits.shape), weights_gib=gib(weight_bytes(model)))


def run_compare(o):
    a, b = np.load(o.files[0]), np.load(o.files[1])
    diff = np.abs(a - b)
    emit(
        "compare",
        files=o.files,
        max_abs=float(diff.max()),
        mean_abs=float(diff.mean()),
        logit_scale=float(np.abs(a).max()),
        argmax_equal=int((a.argmax(-1) == b.argmax(-1)).sum()),
        positions=int(a.shape[0]),
    )


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["single", "dist", "logits", "compare"])
    p.add_argument("files", nargs="*", help="compare: two .npy files")
    p.add_argument("--format", default="affine2", choices=["affine2", "affine4", "official"])
    p.add_argument("--layers", type=int, default=perf.FLASH_LAYERS)
    p.add_argument("--experts", type=int, help="routed experts (default: Flash's 256)")
    p.add_argument("--small", action="store_true", help="CPU-sized widths (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=["tp", "pp"], default="tp")
    p.add_argument("--phases", default="decode,prefill,server,spec")
    p.add_argument("--decode-prompt", type=int, default=256)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-runs", type=int, default=2)
    p.add_argument("--prefills", default="4096,32768")
    p.add_argument("--prefill-step", type=int, default=2048)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--server-words", type=int, default=48)
    p.add_argument("--server-tokens", type=int, default=32)
    p.add_argument(
        "--server-long",
        default="",
        help="server: time to first token of one request of about these many prompt tokens",
    )
    p.add_argument("--spec-ks", default="2")
    p.add_argument("--spec-rates", default="1.0,0.8,0.6,0.0", help="forced acceptance rates")
    p.add_argument("--spec-tokens", type=int, default=128)
    p.add_argument(
        "--spec-ahead",
        default="1",
        help="MLX_ARCH_PLUGINS_MTP_AHEAD values to run each setting with, e.g. 1,0",
    )
    p.add_argument("--logits-out")
    p.add_argument("--stack-every-s", type=float, default=90, help="dist: dump stacks this often")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip phases after this")
    o = p.parse_args(argv)
    o.phases = [s for s in o.phases.split(",") if s]
    o.prefills = [int(s) for s in o.prefills.split(",") if s]
    o.spec_ks = [int(s) for s in o.spec_ks.split(",") if s]
    o.spec_rates = [float(s) for s in o.spec_rates.split(",") if s]
    o.spec_ahead = [s.strip() for s in o.spec_ahead.split(",") if s.strip()]
    o.server_long = [int(s) for s in o.server_long.split(",") if s]
    start = time.perf_counter()
    o.budget_left = lambda: o.budget_s - (time.perf_counter() - start)
    return o


def main(argv=None):
    o = parse(argv)
    perf._use_src()
    try:
        import mlx_arch_plugins

        mlx_arch_plugins.install()  # what the start-up hook does in an installed env
    except Exception as e:  # pragma: no cover
        print(f"# plugin host not installed: {e}", file=sys.stderr)
    emit("env", **perf.env_info())
    runs = {"single": run_single, "dist": run_dist, "logits": run_logits, "compare": run_compare}
    runs[o.what](o)
    sys.stdout.flush()
    os._exit(0)  # the in-process server's threads would hold the exit


if __name__ == "__main__":
    main()
