"""A scripted stand-in for a DeepSeek-V4 network, for end-to-end server tests.

Copied into a test checkpoint as ``scripted_model.py`` and loaded by mlx-lm through
``config.json``'s ``model_file`` (``--trust-remote-code``). It has mlx-lm's model
interface, and it emits the token ids listed in ``script.json`` (next to it),
then EOS. It recovers the tokens it has seen from its KV cache (token ids are
stored as the "keys"), so it works with mlx-lm's prompt cache, chunked prefill
and batching. The prompt of each request is appended to ``prompts.jsonl``.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import KVCache

HERE = Path(__file__).resolve().parent
ASSISTANT_ID = 128804  # <｜Assistant｜>: the generation prompt is it + <think> or </think>
EOS_ID = 1

# Scaffolding: the installed plugin wires its tokenizer patch when mlx_lm imports;
# apply it here only if that did not happen (records that it had to).
import mlx_lm.tokenizer_utils as _tu  # noqa: E402

from mlx_arch_plugins.host.patches import patching as _patching  # noqa: E402

if not _patching.is_patched(_tu, "load"):
    from mlx_arch_plugins.host.patches import tokenizer as _tokenizer_patch

    _tokenizer_patch.apply(_tu)
    (HERE / "tokenizer_patch_scaffold_used").write_text("1", encoding="utf-8")

import sys  # noqa: E402

from mlx_arch_plugins.host.patches import patching as _patching  # noqa: E402

for _name in ("mlx_lm.server", "__main__"):
    _server = sys.modules.get(_name)
    _fmt = getattr(_server, "ToolCallFormatter", None)
    if _fmt is not None and not _patching.is_patched(_fmt, "__call__"):
        from mlx_arch_plugins.host.patches import server as _server_patch

        _server_patch.apply(_server)
        (HERE / "server_patch_scaffold_used").write_text(_name, encoding="utf-8")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "deepseek_v4"
    vocab_size: int = 129280


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.dummy = mx.zeros((1,))
        self.layers = [nn.Identity()]

    def make_cache(self):
        return [KVCache()]

    def _script(self):
        with open(HERE / "script.json", "r", encoding="utf-8") as fid:
            return json.load(fid)["tokens"]

    def __call__(self, inputs, cache=None, **kwargs):
        ids = inputs.astype(mx.float32)[:, None, :, None]
        seen, _ = cache[0].update_and_fetch(ids, ids)
        seen = np.array(seen[:, 0, :, 0]).astype(np.int64)
        script = self._script()
        nxt = []
        for row in seen:
            where = np.nonzero(row == ASSISTANT_ID)[0]
            step = len(row) - (int(where[-1]) + 2) if len(where) else -1
            if step == 0:
                with open(HERE / "prompts.jsonl", "a", encoding="utf-8") as fid:
                    fid.write(json.dumps(row.tolist()) + "\n")
            nxt.append(script[step] if 0 <= step < len(script) else EOS_ID)
        logits = np.zeros((len(nxt), 1, self.args.vocab_size), dtype=np.float32)
        logits[np.arange(len(nxt)), 0, nxt] = 100.0
        return mx.array(logits)

    @property
    def n_kv_heads(self):
        return 1

    @property
    def head_dim(self):
        return 1
