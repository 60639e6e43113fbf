"""One rank of a sharded DeepSeek-V4 run, started by ``mlx.launch``
(see test_dsv4_shard.py). Every rank loads the model the way
``mlx_lm.utils.sharded_load`` does (lazy load, ``Model.shard`` or
``model.model.pipeline``, then evaluate), runs the jobs and writes its
logits to ``OUT/<job>.rank<r>.npz``.

Job kinds (a JSON list on the command line, each a dict):
* ``golden``: a golden case through the reference protocol of dsv4_golden
  (each forward pass evaluated in turn, see run_protocol below).
* ``generate``: ``mlx_lm.utils.sharded_load`` of a checkpoint directory with
  a tokenizer, then stock ``mlx_lm.generate`` (greedy).

A job's ``transport`` (``p2p`` / ``allreduce``) picks how pipeline stages hand
the state on (the all-reduce one is what MLX's CUDA backend gets).
"""

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path


def _mlx_version():
    from importlib.metadata import version

    return tuple(int(x) for x in version("mlx").split(".")[:2])


if "MLX_RANK" in os.environ and _mlx_version() < (0, 32):
    # MLX's CPU backend caches compiled kernels under TMPDIR; with mlx 0.31
    # ranks sharing it read each other's half-written files ("file too
    # short"). One lasting cache per rank: compiled once, then reused.
    import tempfile

    _jit = Path(tempfile.gettempdir()) / "mlx-arch-plugins-shard-jit" / os.environ["MLX_RANK"]
    _jit.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(_jit)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))


def _split(model, mode, group):
    if mode == "tensor":
        model.shard(group)
    elif mode == "pipeline":
        model.model.pipeline(group)
    else:
        raise ValueError(f"unknown mode {mode!r}")


def run_protocol(model, case, mtp=False):
    """dsv4_golden.run_protocol, but every forward pass is evaluated before
    the next one is built, as mlx-lm's generate does: a pipeline stage's
    receives have no inputs, so in one lazy graph of several passes they
    could run out of order (true of stock pipelined models too)."""
    from dsv4_golden import inputs
    from mlx_lm.models.cache import make_prompt_cache

    prompt, decode = inputs(case)
    cache = make_prompt_cache(model)
    h = model.model.hidden(mx.array([prompt]), cache)
    pre = model.lm_head(model.model.norm(model.model.hc_head(h)))[0]
    mx.eval(h, pre)
    steps = []
    for t in decode:
        steps.append(model(mx.array([[t]]), cache=cache)[0, 0])
        mx.eval(steps[-1])
    mtp_logits = None
    if mtp:
        nxt = (prompt + decode)[1 : len(prompt) + 1]
        mtp_logits = np.array(model.mtp_logits(h, mx.array([nxt]))[0].astype(mx.float32))
    as_np = lambda a: np.array(a.astype(mx.float32))  # noqa: E731
    return as_np(pre), as_np(mx.stack(steps)), mtp_logits


def run_golden(job, group):
    from dsv4_golden import GOLDEN
    from mlx_lm.utils import load_model

    cfg = {} if job.get("qat", True) else {"qat_rounding": False}
    model, _ = load_model(GOLDEN / job["case"] / job["fmt"], lazy=True, model_config=cfg or None)
    _split(model, job["mode"], group)
    model.set_dtype(getattr(mx, job.get("dtype", "float32")))
    mx.eval(model.parameters())
    # pipelined, only rank 0 (it runs the last layers) keeps the MTP block
    mtp = job.get("mtp", False) and len(model.model.mtp) > 0
    pre, dec, mtp = run_protocol(model, job["case"], mtp=mtp)
    out = {"prefill": pre, "decode": dec}
    if mtp is not None:
        out["mtp"] = mtp
    out["n_layers"] = np.array(len(model.layers))
    out["n_mtp"] = np.array(len(model.model.mtp))
    return out


def run_generate(job, group):
    from mlx_lm import generate
    from mlx_lm.utils import sharded_load

    pipe = group if job["mode"] == "pipeline" else None
    tens = group if job["mode"] == "tensor" else None
    model, tokenizer = sharded_load(job["path"], pipe, tens)
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    model.set_dtype(getattr(mx, job.get("dtype", "bfloat16")))
    ids = tokenizer.encode(job["prompt"])
    logits = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    # after the logits: generate returns with its last step's communication
    # still in flight on its own stream
    text = generate(model, tokenizer, job["prompt"], max_tokens=job["max_tokens"])
    return {
        "weight_bytes": np.array(weights),
        "text": np.array(text),
        "logits": logits,
        "n_layers": np.array(len(model.layers)),
    }


@contextlib.contextmanager
def _transport(name):
    """The job's pipeline transport (deepseek_v4 shard.TRANSPORT_ENV), if it names one."""
    from mlx_arch_plugins.deepseek_v4.shard import TRANSPORT_ENV

    before = os.environ.get(TRANSPORT_ENV)
    if name:
        os.environ[TRANSPORT_ENV] = name
    try:
        yield
    finally:
        os.environ.pop(TRANSPORT_ENV, None)
        if before is not None:
            os.environ[TRANSPORT_ENV] = before


def main():
    out_dir = Path(sys.argv[1])
    jobs = json.loads(sys.argv[2])
    group = mx.distributed.init(strict=True)
    for job in jobs:
        name = out_dir / f"{job['name']}.rank{group.rank()}.npz"
        try:
            fn = run_golden if job["kind"] == "golden" else run_generate
            with _transport(job.get("transport")):
                res = fn(job, group)
        except Exception as e:
            # Record it and stop: the other ranks would wait on this one's
            # collectives; mlx.launch ends them when a rank exits non-zero.
            traceback.print_exc()
            np.savez(name, error=np.array(f"{type(e).__name__}: {e}"))
            sys.exit(1)
        res["size"] = np.array(group.size())
        np.savez(name, **res)  # every rank writes: the test checks each view
        # stock generate returns with one step past the last token still in flight;
        # every rank finishes it before the next job (or exit) so no collective is cut
        mx.synchronize()
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))


if __name__ == "__main__":
    main()
