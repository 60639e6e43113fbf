"""End to end: unchanged ``mlx_lm generate`` / ``cache_prompt`` and the Python API
on a tiny DeepSeek-V4 checkpoint in the official on-disk format (FP8/FP4 weights,
real V4 tokenizer), each run as a real subprocess.

Expectations are computed in the test process by other routes: a greedy
reference that recomputes the whole sequence without any cache at every step,
or mlx-lm's Python API with a different prefill chunking.
"""

import json
import subprocess
import sys

import pytest
from helpers import e2e_support as es

pytestmark = pytest.mark.compat

N_TOKENS = 6
# Prompt for the short runs: longer than the sliding window (16) and several
# CSA blocks (ratio 4) once the chat template is applied. The cache_prompt test
# splits it into PREFIX + SUFFIX at a point where the tokenization does not merge.
PREFIX = (
    "Here is a short document about alpha bravo charlie delta echo foxtrot golf hotel india juliet."
)
SUFFIX = " Summarize it in one line."
PROMPT = PREFIX + SUFFIX


@pytest.fixture(scope="module")
def plain_run(ckpt):
    r = es.run_mlx_lm("generate", "--model", ckpt, "--prompt", PROMPT, "--max-tokens", N_TOKENS)
    return r


def test_generate_plain_matches_uncached_reference(ckpt, plain_run):
    """Greedy text of `mlx_lm generate` = a no-cache full-recompute greedy decode
    of the same chat-templated prompt; mlx-lm's own speed lines are printed."""
    model, tok = es.load_in_process(ckpt)
    ids = es.chat_prompt_ids(tok, [{"role": "user", "content": PROMPT}])
    assert len(ids) > es.SLIDING_WINDOW + 8
    ref = es.reference_greedy(model, ids, N_TOKENS, tok.eos_token_ids)
    n_prompt, n_gen = es.generate_stats(plain_run.stdout)
    assert n_prompt == len(ids)  # the CLI rendered the V4 chat template like the API
    assert n_gen == len(ref)
    assert es.generated_text(plain_run.stdout) == es.greedy_text(tok, ref)
    assert "Peak memory:" in plain_run.stdout


def test_generate_max_kv_size_is_accepted_and_has_no_effect(ckpt, plain_run):
    """DeepSeek-V4 builds its own bounded caches (make_cache: sliding window +
    compressed entries), and mlx-lm only applies --max-kv-size to models
    without make_cache. So the flag, even below the window, changes nothing."""
    r = es.run_mlx_lm(
        "generate",
        "--model",
        ckpt,
        "--prompt",
        PROMPT,
        "--max-tokens",
        N_TOKENS,
        "--max-kv-size",
        8,
    )
    assert es.generated_text(r.stdout) == es.generated_text(plain_run.stdout)
    assert es.generate_stats(r.stdout) == es.generate_stats(plain_run.stdout)


def _long_prompt():
    words = (
        "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
        "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu"
    ).split()
    return " ".join(f"{words[(7 * i) % 26]}{i % 10}" for i in range(110))


def test_generate_long_prompt_crosses_window_and_compression_blocks(ckpt):
    """A prompt of > 2 HCA blocks (ratio 128), dozens of CSA blocks and many
    sliding windows: the CLI (one prefill chunk) equals the Python API fed the
    prompt in chunks of 37 tokens (boundaries inside blocks and windows)."""
    from mlx_lm import generate

    prompt = _long_prompt()
    r = es.run_mlx_lm("generate", "--model", ckpt, "--prompt", prompt, "--max-tokens", N_TOKENS)
    model, tok = es.load_in_process(ckpt)
    ids = es.chat_prompt_ids(tok, [{"role": "user", "content": prompt}])
    assert len(ids) > 2 * 128 + 4
    n_prompt, _ = es.generate_stats(r.stdout)
    assert n_prompt == len(ids)
    text = generate(model, tok, ids, max_tokens=N_TOKENS, prefill_step_size=37)
    assert es.generated_text(r.stdout) == text


def test_cache_prompt_then_generate_equals_uncached(ckpt, plain_run, tmp_path):
    """`mlx_lm cache_prompt` saves DeepSeek-V4 caches to a file; `mlx_lm generate
    --prompt-cache-file` continues from it with the same greedy text as one run
    on the whole prompt."""
    _, tok = es.load_in_process(ckpt)
    full = es.chat_prompt_ids(tok, [{"role": "user", "content": PROMPT}])
    cached = tok.apply_chat_template(
        [{"role": "user", "content": PREFIX}],
        add_generation_prompt=False,
        continue_final_message=True,
    )
    # Precondition of the comparison: cached tokens + new tokens = the whole prompt.
    assert full[: len(cached)] == cached

    cache_file = tmp_path / "prefix.safetensors"
    es.run_mlx_lm(
        "cache_prompt", "--model", ckpt, "--prompt", PREFIX, "--prompt-cache-file", cache_file
    )
    assert cache_file.stat().st_size > 0
    r = es.run_mlx_lm(
        "generate", "--prompt-cache-file", cache_file, "--prompt", SUFFIX, "--max-tokens", N_TOKENS
    )
    n_prompt, _ = es.generate_stats(r.stdout)
    assert n_prompt == len(full) - len(cached)  # only the new tokens were processed
    assert es.generated_text(r.stdout) == es.generated_text(plain_run.stdout)


API_SCRIPT = r"""
import json, sys
from mlx_lm import load, generate, stream_generate, batch_generate

model, tokenizer = load(sys.argv[1])
n = int(sys.argv[4])
ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
       for p in sys.argv[2:4]]
alone = [generate(model, tokenizer, i, max_tokens=n) for i in ids]
streamed, decoded = [], []
for i in ids:
    rs = list(stream_generate(model, tokenizer, i, max_tokens=n))
    streamed.append("".join(r.text for r in rs))
    toks = [r.token for r in rs]
    if rs[-1].finish_reason == "stop":
        toks = toks[:-1]  # batch_generate does not decode the stop token
    decoded.append(tokenizer.decode(toks))
batched = batch_generate(model, tokenizer, ids, max_tokens=n).texts
print(json.dumps({"model_type": model.model_type, "alone": alone, "streamed": streamed,
                  "decoded": decoded, "batched": list(batched),
                  "modules": sorted(m for m in sys.modules if "arch_plugins" in m)}))
"""


def test_python_api_in_a_plain_script(ckpt, tmp_path):
    """`from mlx_lm import load, generate, stream_generate, batch_generate` in a
    script that never imports this package: load works on the official checkpoint,
    stream_generate agrees with generate, batch_generate (two prompts of different
    lengths, so one is left-padded) gives each prompt its unbatched tokens."""
    script = tmp_path / "api.py"
    script.write_text(API_SCRIPT)
    assert "mlx_arch_plugins" not in API_SCRIPT
    r = subprocess.run(
        [sys.executable, str(script), str(ckpt), "Hi.", PROMPT, str(N_TOKENS)],
        capture_output=True,
        text=True,
        timeout=180,
        env=es.subprocess_env(),
    )
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["model_type"] == "deepseek_v4"
    assert out["modules"], "the start-up hook, not the script, brought the plugin in"
    assert all(out["alone"])
    assert out["streamed"] == out["alone"]
    # batch_generate returns tokenizer.decode of the tokens (it keeps a leading
    # space that the streaming detokenizer of generate drops).
    assert out["batched"] == out["decoded"]


THREAD_SCRIPT = r"""
import json, sys, threading
from mlx_lm import batch_generate, generate, load

out, errors = {}, []

def work():
    try:
        model, tok = load(sys.argv[1])
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
               for p in ("Hi.", "Hello there, how are you?")]
        out["single"] = generate(model, tok, ids[0], max_tokens=2)
        out["batch"] = batch_generate(model, tok, ids, max_tokens=2).texts
    except Exception as e:
        errors.append(repr(e))

t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps({"errors": errors, **out}), flush=True)
# mlx 0.32 aborts at interpreter exit after work on a second thread (stock
# models too: "terminate called without an active exception"); skip that.
import os
os._exit(0)
"""


def test_generate_in_a_worker_thread(ckpt, tmp_path):
    """mlx_lm.server generates on its own thread, after mlx_lm (and with it this
    package's cache module) was imported on the main thread. A fresh interpreter
    does the same here: import on the main thread, load and generate (single and
    batched) on a worker thread. A lazy module-level array made at import lives
    on the main thread's stream and fails there with "There is no Stream(cpu, 0)
    in current thread"."""
    script = tmp_path / "thread.py"
    script.write_text(THREAD_SCRIPT)
    r = subprocess.run(
        [sys.executable, str(script), str(ckpt)],
        capture_output=True,
        text=True,
        timeout=180,
        env=es.subprocess_env(),
    )
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["errors"] == []
    assert out["single"] and len(out["batch"]) == 2


@pytest.mark.parametrize("k", ["1", "3"])
def test_generate_with_mtp_drafting_gives_the_same_text(ckpt, plain_run, k):
    """`--draft-model mtp` (the checkpoint's own MTP block, no second load): the same
    greedy text as plain decoding, through stock mlx-lm's command line."""
    r = es.run_mlx_lm(
        "generate",
        "--model",
        ckpt,
        "--prompt",
        PROMPT,
        "--max-tokens",
        N_TOKENS,
        "--draft-model",
        "mtp",
        "--num-draft-tokens",
        k,
    )
    assert es.generated_text(r.stdout) == es.generated_text(plain_run.stdout)
    assert es.generate_stats(r.stdout) == es.generate_stats(plain_run.stdout)
