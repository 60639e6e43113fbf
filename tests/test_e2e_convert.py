"""End to end: ``mlx_lm convert -q`` (the CLI, a subprocess) from the official
DeepSeek-V4 format to MLX 4-bit, then ``mlx_lm generate`` on the result.

The conversion's numerics (every linear quantized, logits within quantization
error, dequantize / plain conversions) are checked in-process by
tests/test_formats_convert.py and tests/test_formats_roundtrip.py; this file
checks the user's command line: files written, tokenizer and chat template
carried over, and generation from the converted folder.
"""

import json

import pytest
from helpers import e2e_support as es

pytestmark = pytest.mark.compat

PROMPT = "Translate to French: the cat sleeps on the warm window sill."
N_TOKENS = 3


def test_convert_official_to_4bit_then_generate(tmp_path_factory):
    src = es.tiny_checkpoint(tmp_path_factory)
    dst = tmp_path_factory.mktemp("converted") / "q4"
    es.run_mlx_lm(
        "convert", "--hf-path", src, "--mlx-path", dst, "-q", "--q-bits", 4, "--q-group-size", 64
    )

    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v4"
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 64
    assert cfg["quantization"].get("mode", "affine") == "affine"
    assert (dst / "tokenizer.json").is_file()
    assert list(dst.glob("*.safetensors"))
    # Official names (no "model." prefix, FP8 weight + ".scale" pairs) became MLX
    # names with 4-bit weight / scales / biases.
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert all(k.startswith(("model.", "lm_head.")) for k in index)
    for k in ("model.layers.1.attn.wq_a", "model.layers.2.ffn.switch_mlp.gate_proj", "lm_head"):
        assert {f"{k}.weight", f"{k}.scales", f"{k}.biases"} <= set(index), k

    r = es.run_mlx_lm("generate", "--model", dst, "--prompt", PROMPT, "--max-tokens", N_TOKENS)
    model, tok = es.load_in_process(dst)
    assert model.lm_head.bits == 4
    ids = es.chat_prompt_ids(tok, [{"role": "user", "content": PROMPT}])
    # Same V4 chat template as the official folder renders.
    from mlx_lm.utils import load_tokenizer

    tok_src = load_tokenizer(src)
    assert ids == es.chat_prompt_ids(tok_src, [{"role": "user", "content": PROMPT}])
    n_prompt, _ = es.generate_stats(r.stdout)
    assert n_prompt == len(ids)
    ref = es.reference_greedy(model, ids, N_TOKENS, tok.eos_token_ids)
    assert es.generated_text(r.stdout) == es.greedy_text(tok, ref)
