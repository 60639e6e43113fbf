"""The mlx-community ``deepseek-ai-DeepSeek-V4-Flash-*bit`` layout (made with
another converter): DeepSeek's official names holding MLX affine triplets,
routed experts stacked as ``ffn.experts.w{1,2,3}``, ``attn.wo_a`` cut per output
group as ``attn.wo_a.{g}``. Built here from our own conversion of a golden case
by renaming back, it must load and compute exactly what our conversion does;
layouts we do not know are refused with an error that says so."""

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
from helpers.dsv4_golden import GOLDEN, run_protocol
from mlx_lm.utils import load_model

from mlx_arch_plugins.deepseek_v4 import tiny

pytestmark = pytest.mark.compat

CASE = "b_hca_long"  # two layers (HCA, CSA), hash routing, 2 wo_a groups

# our MLX names -> the community layout's (official) names, as that converter wrote them
BACK = (
    (r"^model\.embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^model\.norm\.", "norm."),
    (r"^model\.hc_head\.(fn|base|scale)$", r"hc_head_\1"),
    (r"^model\.layers\.", "layers."),
    (r"\.(attn|ffn)_hc\.(fn|base|scale)$", r".hc_\1_\2"),
    (r"\.ffn\.gate\.e_score_correction_bias$", ".ffn.gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.switch_mlp\.gate_proj\.", ".experts.w1."),
    (r"\.switch_mlp\.up_proj\.", ".experts.w3."),
    (r"\.switch_mlp\.down_proj\.", ".experts.w2."),
)
WO_A = re.compile(r"^(.*\.attn\.wo_a)\.(weight|scales|biases)$")


def community_weights(ours):
    """Our conversion's tensors under the community layout's names."""
    out = {}
    for key, w in mx.load(str(ours / "model.safetensors")).items():
        for pattern, repl in BACK:
            key = re.sub(pattern, repl, key)
        m = WO_A.match(key)
        if m:  # [G, o_lora, in'] (or flat) -> one [o_lora, in'] tensor per group
            groups = w.shape[0] if w.ndim == 3 else 2
            for g, part in enumerate(mx.split(w.reshape(groups, -1, w.shape[-1]), groups)):
                out[f"{m.group(1)}.{g}.{m.group(2)}"] = part[0]
            continue
        out[key] = w
    return out


def write(dst, weights, config_from):
    dst.mkdir()
    shutil.copy(config_from / "config.json", dst / "config.json")
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    return dst


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """Our own conversion: stock mlx_lm.convert of the golden bf16 case, affine 4-bit."""
    from mlx_lm.convert import convert

    root = tmp_path_factory.mktemp("community")
    src = root / "src"
    shutil.copytree(GOLDEN / CASE / "bf16", src)
    tiny.write_tokenizer(src, json.loads((src / "config.json").read_text())["vocab_size"])
    convert(str(src), mlx_path=str(root / "ours"), quantize=True, q_bits=4, q_group_size=64)
    return root / "ours"


@pytest.fixture(scope="module")
def community(ours):
    weights = community_weights(ours)
    # the layout's defining traits, so the fixture cannot drift into ours
    assert "embed.scales" in weights and "head.biases" in weights
    assert "layers.1.ffn.experts.w2.scales" in weights
    assert "layers.0.attn.wo_a.1.biases" in weights and "layers.0.hc_attn_fn" in weights
    assert not any(k.startswith(("model.", "lm_head")) for k in weights)
    return weights


def _error(path):
    with pytest.raises(ValueError) as e:
        load_model(path)
    return str(e.value)


def test_loads_and_computes_what_our_conversion_computes(ours, community, tmp_path):
    path = write(tmp_path / "community", community, ours)
    theirs, _ = load_model(path)
    mine, _ = load_model(ours)
    assert theirs.model.embed_tokens.bits == 4 and theirs.layers[1].attn.wo_a.bits == 4
    got = run_protocol(theirs, CASE)
    want = run_protocol(mine, CASE)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_experts_per_expert_is_an_unknown_quantized_layout(ours, community, tmp_path):
    w = dict(community)
    for part in ("weight", "scales", "biases"):
        stacked = w.pop(f"layers.1.ffn.experts.w1.{part}")
        for e in range(stacked.shape[0]):
            w[f"layers.1.ffn.experts.{e}.w1.{part}"] = stacked[e]
    msg = _error(write(tmp_path / "bad", w, ours))
    assert re.search(r"'layers\.1\.ffn\.experts\.\d+\.w1\.(weight|scales|biases)'", msg), msg
    assert ".scales" in msg and ".biases" in msg and "does not know" in msg
    assert "supported layouts" in msg and "mlx-community" in msg and "official" in msg


def test_missing_wo_a_group_is_named(ours, community, tmp_path):
    w = {k: v for k, v in community.items() if not k.startswith("layers.0.attn.wo_a.1.")}
    msg = _error(write(tmp_path / "bad", w, ours))
    assert "layers.0.attn.wo_a.0" in msg and "2 output groups" in msg and "[0]" in msg, msg


def test_affine_tensor_in_an_official_fp8_checkpoint_is_refused(tmp_path):
    """One MLX-quantized tensor among DeepSeek's FP8 ones: once refused as
    'expected shape (128, 128), found (128, 32)'; now named for what it is."""
    src = GOLDEN / CASE / "fp8"
    w = mx.load(str(src / "model.safetensors"))
    dense = mx.random.normal((128, 128))
    del w["layers.0.attn.wkv.scale"]
    w["layers.0.attn.wkv.weight"], scales, biases = mx.quantize(dense, group_size=64, bits=8)
    w["layers.0.attn.wkv.scales"], w["layers.0.attn.wkv.biases"] = scales, biases
    msg = _error(write(tmp_path / "mixed", w, src))
    assert "layers.0.attn.wkv.weight" in msg, msg
    assert "layers.0.attn.wkv.scales" in msg and "layers.0.attn.wkv.biases" in msg
    assert "supported layouts" in msg and "expected shape" not in msg
