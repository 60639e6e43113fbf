"""DeepSeek-V4 sharded over several local processes (``mlx.launch``, ring
backend on 127.0.0.1), tensor-parallel (``Model.shard``) and pipelined
(``model.model.pipeline``), against the reference logits of the golden
cases and against the same model in this (single) process.

One launch per process count runs every job (tests/dsv4_shard_worker.py);
the tests below read what each rank wrote.
"""

import json
import random
import socket
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers.dsv4_golden import CASES, expected, fp32_checks, load_case, run_protocol

HERE = Path(__file__).parent
WORKER = HERE / "helpers" / "dsv4_shard_worker.py"
MODES = ("tensor", "pipeline")
PROMPT = "The quick brown fox jumps over the lazy dog, then"
MAX_TOKENS = 6

# A model every split of 4 ranks can take: 4 heads in 4 output groups,
# 4 layers (window, CSA, HCA, window) + MTP, expert width 128 (32 per rank:
# one mxfp4/mxfp8 scale group).
TINY4 = {
    "num_attention_heads": 4,
    "o_groups": 4,
    "num_hidden_layers": 4,
    "num_hash_layers": 1,
    "compress_ratios": [0, 4, 128, 0, 0],
}


def _free_base(n):
    """A starting port with ``n`` free ports after it (the ring backend
    listens on base, base+1, ...)."""
    for _ in range(50):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range for the ring backend")


def _launch(n, out, jobs, timeout=900):
    launcher = Path(sys.executable).parent / "mlx.launch"
    # --python + a script path: run as `python WORKER ...` by both the
    # launcher of mlx 0.31 (prepends python to a script) and of 0.32
    cmd = [
        str(launcher), "--backend", "ring", "--hosts", "127.0.0.1", "-n", str(n),
        "-p", str(_free_base(n)), "--python", sys.executable, "--",
        str(WORKER), str(out), json.dumps(jobs),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    # mlx.launch exits 0 even when a rank fails: keep the log for _results
    (out / "launch.log").write_text(proc.stdout + proc.stderr)
    return proc


def _results(out, name, n):
    res = []
    for r in range(n):
        f = out / f"{name}.rank{r}.npz"
        if not f.exists():
            log = "\n".join(
                ln
                for ln in (out / "launch.log").read_text().splitlines()
                if not ln.startswith("[ring]")
            )
            pytest.fail(f"rank {r} wrote nothing for {name}; launch log:\n{log[-4000:]}")
        d = dict(np.load(f))
        assert "error" not in d, f"rank {r} failed {name}: {d['error']}"
        assert int(d["size"]) == n
        res.append(d)
    return res


def _make_tiny(dst, fmt, cfg=None):
    cmd = [sys.executable, "-m", "mlx_arch_plugins", "make-tiny", str(dst), "--format", fmt]
    # several weight files and an index: what sharded_load's pipeline mode reads
    cmd += ["--max-shard-size", "20MB"]
    if cfg:
        f = dst.parent / f"{dst.name}.json"
        f.write_text(json.dumps(cfg))
        cmd += ["--config", str(f)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    return dst


def _golden_jobs():
    jobs = []
    for case in CASES:
        for mode in MODES:
            for fmt in ("bf16", "fp8"):
                jobs.append(dict(kind="golden", name=f"{case}-{fmt}-{mode}", case=case,
                                 fmt=fmt, mode=mode, mtp=case.startswith("a_")))  # fmt: skip
        # (pipelined runs are checked bit-for-bit against one process)
        jobs.append(dict(kind="golden", name=f"{case}-noqat-tensor", case=case,
                         fmt="bf16", mode="tensor", qat=False))  # fmt: skip
        # the stages' hand-over MLX's CUDA backend gets (it has no send / receive)
        jobs.append(dict(kind="golden", name=f"{case}-bf16-pipeline-allreduce", case=case,
                         fmt="bf16", mode="pipeline", transport="allreduce"))  # fmt: skip
    return jobs


def _gen_jobs(paths, modes):
    return [
        dict(
            kind="generate",
            name=f"gen-{key}-{mode}",
            path=str(path),
            mode=mode,
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            dtype="float32",
        )  # fmt: skip
        for key, path in paths.items()
        for mode in modes
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsv4_tiny")
    return {
        "affine": _make_tiny(root / "affine", "mlx-affine4"),
        "tiny4": _make_tiny(root / "tiny4", "official", TINY4),
    }


@pytest.fixture(scope="module")
def two(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("dsv4_shard2")
    jobs = _golden_jobs()
    jobs += _gen_jobs({"affine": tiny["affine"]}, MODES)
    proc = _launch(2, out, jobs)
    if proc.returncode:
        pytest.fail(f"mlx.launch -n 2 failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


@pytest.fixture(scope="module")
def four(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("dsv4_shard4")
    jobs = _gen_jobs({"tiny4": tiny["tiny4"]}, MODES)
    # stock generate through the stages' all-reduce hand-over (MLX on CUDA)
    jobs.append(dict(jobs[-1], name="gen-tiny4-pipeline-allreduce", transport="allreduce"))
    proc = _launch(4, out, jobs)
    if proc.returncode:
        pytest.fail(f"mlx.launch -n 4 failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


def _cat(exp, suffix=""):
    return np.concatenate(
        [np.array(exp["prefill_logits" + suffix]), np.array(exp["decode_logits" + suffix])]
    )


def _maxdev(exp):
    return np.concatenate(
        [np.array(exp["perturbation_maxdev_prefill"]), np.array(exp["perturbation_maxdev_decode"])]
    )


def _assert_checks(got, want, maxdev, what):
    within, mean, top1 = fp32_checks(got, want, maxdev)
    assert within >= 0.98, f"{what}: check 1: only {within:.1%} of positions within bound"
    assert mean <= 1e-2, f"{what}: check 2: mean |diff| {mean:.3g}"
    assert top1 >= 0.97, f"{what}: check 3: top-1 agreement {top1:.1%}"


_single_cache = {}


def _single(case, fmt, **cfg):
    key = (case, fmt, tuple(sorted(cfg.items())))
    if key not in _single_cache:
        model = load_case(case, fmt, **cfg)
        _single_cache[key] = run_protocol(model, case, mtp=case.startswith("a_") and not cfg)
    return _single_cache[key]


@pytest.mark.compat
@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES)
def test_sharded_golden_matches_reference_and_single_process(two, case, mode, fmt):
    ranks = _results(two, f"{case}-{fmt}-{mode}", 2)
    exp = expected(case, fmt)
    want, maxdev = _cat(exp), _maxdev(exp)
    pre, dec, mtp = _single(case, fmt)
    single = np.concatenate([pre, dec])
    for r, d in enumerate(ranks):
        got = np.concatenate([d["prefill"], d["decode"]])
        # the fixture README's checks, as in test_dsv4_golden
        _assert_checks(got, want, maxdev, f"rank {r} vs reference")
        # and the same checks with the single-process run as the target
        _assert_checks(got, single, maxdev, f"rank {r} vs single process")
        if case.startswith("a_") and (mode == "tensor" or r == 0):
            _assert_checks(d["mtp"], np.array(exp["mtp_prefill_logits"]), 0, f"rank {r} MTP")
        if mode == "pipeline" and r > 0:
            assert int(d["n_mtp"]) == 0  # MTP weights live on rank 0 only
    # every rank ends with the same logits (all-reduce / final all-gather)
    np.testing.assert_array_equal(ranks[0]["prefill"], ranks[1]["prefill"])
    np.testing.assert_array_equal(ranks[0]["decode"], ranks[1]["decode"])
    if mode == "pipeline":
        # same operations in the same order: bit-identical to one process
        np.testing.assert_array_equal(ranks[0]["prefill"], pre)
        np.testing.assert_array_equal(ranks[0]["decode"], dec)


@pytest.mark.compat
@pytest.mark.parametrize("case", CASES)
def test_pipeline_by_allreduce_is_bit_identical_to_one_process(two, case):
    """The hand-over through all-sums (MLX on CUDA has no send / receive) adds only
    zeros: every rank ends with exactly the single-process logits."""
    pre, dec, _ = _single(case, "bf16")
    for d in _results(two, f"{case}-bf16-pipeline-allreduce", 2):
        np.testing.assert_array_equal(d["prefill"], pre)
        np.testing.assert_array_equal(d["decode"], dec)


def test_pipeline_transport_choice(monkeypatch):
    import mlx.core as mx

    from mlx_arch_plugins.deepseek_v4 import shard

    monkeypatch.delenv(shard.TRANSPORT_ENV, raising=False)
    assert shard.pipeline_transport() == "p2p"  # the CPU backend here has send / receive
    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert shard.pipeline_transport() == "allreduce"  # MLX's CUDA backend has none
    monkeypatch.setenv(shard.TRANSPORT_ENV, "p2p")
    assert shard.pipeline_transport() == "p2p"
    monkeypatch.setenv(shard.TRANSPORT_ENV, "nccl")
    with pytest.raises(ValueError, match="MLX_ARCH_PLUGINS_PIPELINE_TRANSPORT='nccl'"):
        shard.pipeline_transport()


@pytest.mark.compat
@pytest.mark.parametrize("case", CASES)
def test_tensor_sharded_without_qat_rounding_matches_noqat_targets(two, case):
    # Without the FP8/FP4 rounding the model is smooth: the single-process
    # test holds it to 1e-3 of the reference; so does the sharded run.
    want = _cat(expected(case, "bf16"), "_noqat")
    for d in _results(two, f"{case}-noqat-tensor", 2):
        got = np.concatenate([d["prefill"], d["decode"]])
        assert np.abs(got - want).max() <= 1e-3


@pytest.mark.compat  # 0.31's stock split would skip a layer of 3 over 2 ranks
@pytest.mark.parametrize("case", CASES)
def test_pipeline_splits_layers_evenly_low_ranks_get_extra(two, case):
    n = json.loads(
        (Path(__file__).parent / "data/golden/cases" / case / "bf16/config.json").read_text()
    )["num_hidden_layers"]
    got = [int(d["n_layers"]) for d in _results(two, f"{case}-bf16-pipeline", 2)]
    assert got == [n - n // 2, n // 2]
    got = [int(d["n_layers"]) for d in _results(two, f"{case}-bf16-tensor", 2)]
    assert got == [n, n]


def _single_generate(path):
    from mlx_lm import generate, load

    model, tok = load(str(path))
    # float32 as in the workers: a random tiny model has exact bf16 ties
    model.set_dtype(mx.float32)
    text = generate(model, tok, PROMPT, max_tokens=MAX_TOKENS)
    logits = model(mx.array([tok.encode(PROMPT)]))[0].astype(mx.float32)
    return text, np.array(logits)


def _check_generate(out, key, path, modes, n):
    text, logits = _single_generate(path)
    for mode in modes:
        ranks = _results(out, f"gen-{key}-{mode}", n)
        for r, d in enumerate(ranks):
            got = d["logits"]
            if mode.startswith("pipeline"):
                np.testing.assert_array_equal(got, logits, err_msg=f"rank {r}")
            else:  # the golden checks, with one process as the target
                _assert_checks(got, logits, 0, f"{mode} rank {r}")
            assert str(d["text"]) == text, f"{mode} rank {r}: {d['text']!r} != {text!r}"


@pytest.mark.compat
def test_sharded_generate_two_processes_mlx_affine(two, tiny):
    """Stock ``sharded_load`` + ``mlx_lm.generate`` on an ``mlx_lm.convert``
    4-bit affine conversion (group size 64) with its tokenizer, both modes."""
    _check_generate(two, "affine", tiny["affine"], MODES, 2)


def test_sharded_generate_four_processes_official(four, tiny):
    """The same over 4 ranks on DeepSeek's FP8/FP4 layout (mxfp8 / mxfp4
    layers; several weight files and an index, which pipelined
    ``sharded_load`` reads). Not on mlx-lm 0.31: its pipelined
    ``sharded_load`` takes only checkpoints named like the model."""
    _check_generate(four, "tiny4", tiny["tiny4"], MODES, 4)
    _check_generate(four, "tiny4", tiny["tiny4"], ["pipeline-allreduce"], 4)
    got = [int(d["n_layers"]) for d in _results(four, "gen-tiny4-pipeline", 4)]
    assert got == [1, 1, 1, 1]


# -- refusals (no processes needed: the checks run before any split) ----------


class _Group:
    """Stand-in for a group of ``n`` ranks: shard() reads only its size and
    rank before refusing."""

    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n

    def rank(self):
        return 0


def _tiny_model(quantize=None, **over):
    from mlx_lm.models.deepseek_v4 import Model, ModelArgs

    cfg = json.loads((HERE / "data/golden/cases" / CASES[0] / "bf16/config.json").read_text())
    cfg.update(over)
    model = Model(ModelArgs.from_dict(cfg))
    if quantize:
        nn.quantize(model, **quantize)
    return model


def _params(model):
    from mlx.utils import tree_flatten

    return {k: v.shape for k, v in tree_flatten(model.parameters())}


@pytest.mark.compat
@pytest.mark.parametrize(
    "over,n,needles",
    [
        ({}, 3, ["num_attention_heads=2", "o_groups=2", "moe_intermediate_size=128", "3"]),
        ({"num_attention_heads": 4, "o_groups": 2}, 4, ["o_groups=2", "group size 4"]),
        (
            {"num_attention_heads": 4, "o_groups": 4, "moe_intermediate_size": 102},
            4,
            ["moe_intermediate_size=102", "shared expert width=102"],
        ),  # fmt: skip
    ],
)
def test_refuses_configs_that_do_not_split(over, n, needles):
    model = _tiny_model(**over)
    before = _params(model)
    with pytest.raises(ValueError) as e:
        model.shard(_Group(n))
    for s in needles:
        assert s in str(e.value)
    assert _params(model) == before  # nothing was split


@pytest.mark.compat
def test_refuses_quantized_split_inside_a_scale_group():
    # affine group 64 over expert width 128: 4 ranks would get 32 inputs of
    # down_proj each, half a scale group; 2 ranks get exactly one group.
    model = _tiny_model(
        quantize={"group_size": 64, "bits": 4},
        num_attention_heads=4,
        o_groups=4,
        o_lora_rank=64,
    )
    with pytest.raises(ValueError, match=r"down_proj \(affine, group size 64\).*32 per rank"):
        model.shard(_Group(4))
    from mlx_arch_plugins.deepseek_v4.shard import check_shardable

    check_shardable(model, 2)  # the same model splits over 2


@pytest.mark.compat
def test_uneven_pipeline_split_covers_every_layer():
    from mlx_arch_plugins.deepseek_v4.shard import even_split

    for n_layers, size in [(61, 2), (61, 4), (43, 8), (3, 2), (4, 4)]:
        split = even_split(n_layers, size)
        assert sum(split) == n_layers and max(split) - min(split) <= 1
        assert split == sorted(split, reverse=True)


# -- benchmarks/memory_per_host.py against real loaded models ------------------


def _memory_model():
    import importlib.util

    path = HERE.parent / "benchmarks" / "memory_per_host.py"
    spec = importlib.util.spec_from_file_location("memory_per_host", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "fixture,key,fmt,n",
    [
        pytest.param("two", "affine", "mlx4", 2, marks=pytest.mark.compat),
        ("four", "tiny4", "official", 4),
    ],
)
def test_memory_table_counts_match_loaded_shards(request, tiny, fixture, key, fmt, n):
    """The README's memory table comes from benchmarks/memory_per_host.py;
    its byte count must equal what each rank really holds after
    sharded_load (tensor: every rank; pipeline: the heaviest rank)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    mph = _memory_model()
    out = request.getfixturevalue(fixture)
    cfg = json.loads((tiny[key] / "config.json").read_text())
    model, _ = load_model(tiny[key], lazy=True)
    whole = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert whole == mph.weights_per_host(cfg, fmt, 1, "tensor")
    tp = [int(d["weight_bytes"]) for d in _results(out, f"gen-{key}-tensor", n)]
    assert tp == [mph.weights_per_host(cfg, fmt, n, "tensor")] * n
    pp = [int(d["weight_bytes"]) for d in _results(out, f"gen-{key}-pipeline", n)]
    assert max(pp) == mph.weights_per_host(cfg, fmt, n, "pipeline")
    assert sum(pp) > whole  # embedding, head and norms on every rank
