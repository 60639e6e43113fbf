"""Batch vs single: throughput of stock ``mlx_lm server`` on a DeepSeek-V4 checkpoint.

Starts ``python -m mlx_lm server`` on 127.0.0.1, then sends N chat requests
(a) one after another and (b) all at once from N client threads, and prints
generated tokens per second for both. The two phases use different prompts
of the same lengths, so the server's prompt cache helps neither.

    python benchmarks/server_throughput.py                  # tiny random checkpoint
    python benchmarks/server_throughput.py --model DIR --clients 16 --max-tokens 64

Greedy sampling; a random-weight model may stop early on EOS, so the token
counts come from each response's ``usage``.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

WORDS = (
    "apple river stone cloud maple tiger ocean lemon violet copper forest "
    "meadow candle silver harbor falcon"
).split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny(root: Path) -> Path:
    from mlx_arch_plugins.deepseek_v4 import tiny

    return tiny.make_tiny(root / "dsv4-tiny", fmt="official", seed=0)


def start_server(model: Path, log_path: Path):
    port = free_port()
    log = open(log_path, "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.time() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log_path.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc, port, log
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise SystemExit("server did not start")
            time.sleep(0.3)


def ask(port, prompt, max_tokens):
    body = json.dumps(
        {
            "model": "default_model",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "chat_template_kwargs": {"enable_thinking": False},
        }
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        usage = json.loads(r.read())["usage"]
    return usage["prompt_tokens"], usage["completion_tokens"]


def prompts(n, phase, words):
    out = []
    for i in range(n):
        k = words + (i * 7) % max(1, words)  # different lengths
        out.append(
            f"[{phase}-{i}] "
            + " ".join(WORDS[(i * 3 + j + phase * 5) % len(WORDS)] for j in range(k))
        )
    return out


def run_sequential(port, ps, max_tokens):
    t0 = time.perf_counter()
    counts = [ask(port, p, max_tokens) for p in ps]
    return time.perf_counter() - t0, counts


def run_concurrent(port, ps, max_tokens):
    counts = [None] * len(ps)
    barrier = threading.Barrier(len(ps) + 1)

    def worker(i):
        barrier.wait()
        counts[i] = ask(port, ps[i], max_tokens)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(ps))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint folder (default: build a tiny random one)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=20, help="shortest prompt, in words")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = Path(args.model) if args.model else build_tiny(tmp)
        proc, port, log = start_server(model, tmp / "server.log")
        try:
            ask(port, "warm up", 4)  # loads the model, compiles kernels
            seq_t, seq = run_sequential(
                port, prompts(args.clients, 1, args.prompt_words), args.max_tokens
            )
            con_t, con = run_concurrent(
                port, prompts(args.clients, 2, args.prompt_words), args.max_tokens
            )
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()

    def line(name, t, counts):
        p = sum(c[0] for c in counts)
        g = sum(c[1] for c in counts)
        print(
            f"{name:<12} {len(counts):>3} requests  {p:>6} prompt tok  {g:>6} generated tok  "
            f"{t:>7.2f} s  {g / t:>7.2f} generated tok/s  {len(counts) / t:>6.3f} req/s"
        )
        return g / t

    print(
        f"model: {model if args.model else 'tiny random DeepSeek-V4 (make-tiny defaults)'}; "
        f"clients {args.clients}, max_tokens {args.max_tokens}; load average {os.getloadavg()[0]:.1f}"
    )
    a = line("sequential", seq_t, seq)
    b = line("concurrent", con_t, con)
    print(f"batching speed-up (generated tok/s): {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
