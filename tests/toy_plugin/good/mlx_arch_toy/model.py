"""Toy language model: token embedding -> residual MLP blocks -> RMSNorm -> logits.

Each position sees only its own token, so generation needs no cache. Besides stock
mlx-lm's model-file contract it declares what the plugin host reads from an
architecture (see ``mlx_arch_plugins.host.plugins``): tokenizer defaults, a cache class
prompt-cache files may name, and the checkpoint / convert hooks.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.cache import KVCache

from mlx_arch_plugins.host.errors import CheckpointError

# The chat template and tool parser of this architecture's checkpoints.
TOKENIZER_DEFAULTS = {"chat_template_type": "toy_chat", "tool_parser_type": "toy_tools"}


class ToyCache(KVCache):
    """A cache class stock mlx-lm does not know: load_prompt_cache must find it."""


CACHE_CLASSES = (ToyCache,)


def convert_dequantize(model):
    """Called after stock dequantize_model (mlx_lm.convert -d)."""
    model.toy_dequantized = True
    return model


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int = 1
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.gelu(self.up_proj(x)))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [MLP(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, **kwargs):
        h = self.embed_tokens(inputs)
        for layer in self.layers:
            h = h + layer(h)
        h = self.norm(h)
        if self.args.tie_word_embeddings:
            return self.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights):
        # Checkpoints may carry a stale rotary table and, when tied, a copy of the head.
        if "refused.weight" in weights:  # the host adds the shard file to the message
            raise CheckpointError("refused.weight", "the toy refuses this tensor")
        weights = {k: v for k, v in weights.items() if "rotary_emb" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    def make_cache(self):
        return []
