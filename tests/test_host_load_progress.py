"""Progress lines while a DeepSeek-V4 checkpoint loads (host/patches/progress.py)."""

import io

import pytest
from helpers import e2e_support as es

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    # about 72 MB of weights in shards of at most 30 MB
    return es.tiny_checkpoint(tmp_path_factory, max_shard_bytes=30 * 10**6)


def test_generate_prints_shard_and_layer_progress(sharded):
    """The unchanged CLI shows one line per shard and per layer on stderr when the
    load takes longer than the threshold (0 s here)."""
    shards = sorted(sharded.glob("model*.safetensors"))
    assert len(shards) >= 3
    args = ("generate", "--model", sharded, "--prompt", "Hi", "--max-tokens", 2)
    on = es.run_mlx_lm(*args, env=es.subprocess_env(MLX_ARCH_PLUGINS_PROGRESS_AFTER="0"))
    lines = [line for line in on.stderr.splitlines() if line.startswith("[mlx-arch-plugins]")]
    n = len(shards)
    assert lines[0].startswith(
        f"[mlx-arch-plugins] loading deepseek_v4 from {sharded}: {n} shard(s)"
    )
    # the last shard and the last layer are always reported (others at most once a second)
    assert any(f"shard {n}/{n} read: {shards[-1].name}" in line for line in lines), lines
    assert any("layer 3/3 read and re-packed" in line for line in lines), lines
    assert lines[-1].startswith("[mlx-arch-plugins] loaded in ")

    assert es.generated_text(on.stdout)  # and generation went on as usual
    # (that progress loads exactly the same arrays is checked in-process below)


def test_progress_wrapper_loads_the_same_arrays_and_is_quiet_when_fast(
    sharded, monkeypatch, capsys
):
    import mlx.core as mx
    import mlx_lm.utils as mu
    from mlx.utils import tree_flatten

    from mlx_arch_plugins.host.patches import patching

    assert patching.is_patched(mu, "load_model"), "the post-import step did not run"
    monkeypatch.setenv("MLX_ARCH_PLUGINS_PROGRESS_AFTER", "60")
    model, _ = mu.load_model(sharded)
    assert "[mlx-arch-plugins]" not in capsys.readouterr().err  # fast load: silent
    monkeypatch.setenv("MLX_ARCH_PLUGINS_PROGRESS", "0")
    plain, _ = mu.load_model(sharded)
    a, b = dict(tree_flatten(model.parameters())), dict(tree_flatten(plain.parameters()))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and mx.array_equal(a[k], b[k]).item(), k

    # lazy loads (convert, sharded loading) are passed through untouched
    monkeypatch.setenv("MLX_ARCH_PLUGINS_PROGRESS", "1")
    monkeypatch.setenv("MLX_ARCH_PLUGINS_PROGRESS_AFTER", "0")
    mu.load_model(sharded, lazy=True)
    assert "[mlx-arch-plugins]" not in capsys.readouterr().err


def test_reporter_rate_limit_and_threshold():
    out = io.StringIO()
    rep = progress_reporter(out, after=0.0)
    for i in range(50):
        rep.event(f"step {i}")
    rep.event("last", final=True)
    rep.done()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[mlx-arch-plugins] header"
    assert lines[1].startswith("[mlx-arch-plugins] step 0 [")
    assert not any("step 1 " in line for line in lines)  # within one second of the previous line
    assert lines[-2].startswith("[mlx-arch-plugins] last [")
    assert lines[-1].startswith("[mlx-arch-plugins] loaded in ")

    quiet = io.StringIO()
    rep = progress_reporter(quiet, after=3600.0)
    rep.event("x", final=True)
    rep.done()
    assert quiet.getvalue() == ""


def progress_reporter(stream, after):
    from mlx_arch_plugins.host.patches.progress import Reporter

    return Reporter("header", after, stream=stream)
