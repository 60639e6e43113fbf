"""``mlx-arch-plugins demo``: stock ``mlx_lm generate`` on a tiny checkpoint.

Builds once a tiny random-weight checkpoint of the default architecture with that
architecture's tiny builder (see ``cli.tiny_builder``: ``build_demo(path)``,
``DEMO_NAME``, ``DEMO_FORMAT``, ``demo_tokenizer()``, ``tokenizer_note(kind)``), caches
it under ``$XDG_CACHE_HOME/mlx-arch-plugins/demo-<version>`` (default ``~/.cache``),
then runs the unchanged command

    python -m mlx_lm generate --model <that folder> --prompt ...

in a subprocess, so its text and its own speed lines appear as a user sees them. The
weights are random: the text is gibberish by design.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from .. import __version__

DEFAULT_PROMPT = "Write a haiku about the sea."
DEFAULT_MAX_TOKENS = 24
_MARKER = "mlx_arch_plugins_demo.json"  # written last: the folder is complete


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mlx-arch-plugins"


def demo_dir() -> Path:
    return cache_root() / f"demo-{__version__}"


def _builder():
    from .cli import tiny_builder

    return tiny_builder()


def _is_complete(path: Path, tokenizer: str) -> bool:
    try:
        meta = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == __version__ and meta.get("tokenizer") == tokenizer


def ensure_checkpoint(rebuild: bool = False, out=sys.stdout) -> Path:
    """The demo checkpoint folder, built if missing, stale or ``rebuild``."""
    builder = _builder()
    path = demo_dir()
    kind = builder.demo_tokenizer()
    if not rebuild and _is_complete(path, kind):
        return path
    print(
        f"Building a tiny {builder.DEMO_NAME} checkpoint ({builder.DEMO_FORMAT}, "
        f"random weights) in {path} ...",
        file=out,
        flush=True,
    )
    t0 = time.perf_counter()
    # The builder writes into a temporary sibling folder and renames it into place when
    # complete, so an interrupted build never leaves a half checkpoint.
    builder.build_demo(path)
    (path / _MARKER).write_text(json.dumps({"version": __version__, "tokenizer": kind}) + "\n")
    elapsed = time.perf_counter() - t0
    print(f"Built in {elapsed:.1f}s (cached for the next runs).", file=out, flush=True)
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="mlx-arch-plugins demo",
        description="Run unchanged `mlx_lm generate` on a tiny random-weight checkpoint.",
    )
    ap.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"prompt (default: {DEFAULT_PROMPT!r})"
    )
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help=f"tokens to generate (default: {DEFAULT_MAX_TOKENS})",
    )
    ap.add_argument("--rebuild", action="store_true", help="build the cached checkpoint again")
    return ap


def _print_notes(builder, tokenizer: str) -> None:
    name = builder.DEMO_NAME
    print(f"NOTE: this {name} checkpoint has RANDOM weights, so the text below is gibberish.")
    print(
        "      It shows that stock mlx-lm loads, runs and times the architecture, not model quality."
    )
    print(f"      Tokenizer: {builder.tokenizer_note(tokenizer)}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_tokens < 1:
        print("demo: error: --max-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        path = ensure_checkpoint(args.rebuild)
    except (OSError, ValueError) as e:
        print(
            f"demo: error: could not build the checkpoint in {demo_dir()}: {e}",
            file=sys.stderr,
        )
        return 1
    tokenizer = json.loads((path / _MARKER).read_text())["tokenizer"]
    cmd = [sys.executable, "-m", "mlx_lm", "generate", "--model", str(path)]
    cmd += ["--prompt", args.prompt, "--max-tokens", str(args.max_tokens)]
    _print_notes(_builder(), tokenizer)
    print(f"Running: {shlex.join(['python', *cmd[1:]])}", flush=True)
    verbosity = os.environ.get("TRANSFORMERS_VERBOSITY", "error")
    return subprocess.call(cmd, env=dict(os.environ, TRANSFORMERS_VERBOSITY=verbosity))


if __name__ == "__main__":
    sys.exit(main())
