"""Bad DeepSeek-V4 checkpoints and configs are refused with errors that name
the file, the tensor (or key) and what was expected."""

import json
import shutil

import mlx.core as mx
import pytest
from helpers.dsv4_golden import GOLDEN
from mlx_lm.utils import load_model

SRC = GOLDEN / "b_hca_long" / "fp8"


def _checkpoint(tmp_path, edit=None, config_edit=None):
    out = tmp_path / "ckpt"
    out.mkdir()
    cfg = json.loads((SRC / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (out / "config.json").write_text(json.dumps(cfg))
    weights = mx.load(str(SRC / "model.safetensors"))
    if edit:
        edit(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    return out


def _error(path):
    with pytest.raises(ValueError) as e:
        load_model(path)
    return str(e.value)


def test_wrong_shape_names_file_tensor_and_expectation(tmp_path):
    def edit(w):
        w["layers.1.attn.wkv.weight"] = w["layers.1.attn.wkv.weight"][:64]

    msg = _error(_checkpoint(tmp_path, edit))
    assert "layers.1.attn.wkv.weight" in msg
    assert "(128, 128)" in msg and "(64, 128)" in msg
    assert "model.safetensors" in msg


def test_wrong_scale_grid(tmp_path):
    def edit(w):
        w["layers.0.attn.wq_b.scale"] = mx.concatenate([w["layers.0.attn.wq_b.scale"]] * 2)

    msg = _error(_checkpoint(tmp_path, edit))
    assert "layers.0.attn.wq_b.scale" in msg and "128x128" in msg


def test_missing_expert(tmp_path):
    def edit(w):
        for k in ("weight", "scale"):
            del w[f"layers.1.ffn.experts.2.w3.{k}"]

    msg = _error(_checkpoint(tmp_path, edit))
    assert "1 of 4 experts missing" in msg and "expert 2" in msg and "up_proj" in msg


def test_missing_tensor(tmp_path):
    def edit(w):
        del w["layers.0.attn.kv_norm.weight"]

    msg = _error(_checkpoint(tmp_path, edit))
    assert "model.layers.0.attn.kv_norm.weight" in msg and "missing" in msg


def test_unexpected_tensor(tmp_path):
    def edit(w):
        w["layers.0.attn.bogus.weight"] = mx.zeros((4, 4))

    msg = _error(_checkpoint(tmp_path, edit))
    assert "layers.0.attn.bogus.weight" in msg and "unexpected" in msg


def test_config_says_fp8_but_weights_are_not(tmp_path):
    bf16 = tmp_path / "bf16"
    shutil.copytree(GOLDEN / "b_hca_long" / "bf16", bf16)
    cfg = json.loads((SRC / "config.json").read_text())
    (bf16 / "config.json").write_text(json.dumps(cfg))
    msg = _error(bf16)
    assert "expert_dtype fp4" in msg and "experts.0.w" in msg and "model.safetensors" in msg


def test_config_without_fp4_flag_but_fp4_experts_load(tmp_path):
    # The initial Flash revision lacks expert_dtype; FP4 experts are still
    # recognised from their packed shape.
    path = _checkpoint(tmp_path, config_edit=lambda c: c.pop("expert_dtype"))
    model, _ = load_model(path)
    assert model.layers[0].ffn.switch_mlp.up_proj.mode == "mxfp4"


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda c: c.pop("head_dim"), ["head_dim", "required"]),
        (lambda c: c.update(compress_ratios=[0, 8]), ["compress ratio", "[8]"]),
        (lambda c: c.update(compress_ratios=[0]), ["1 entries for 2 layers"]),
        (lambda c: c.update(o_groups=3), ["o_groups 3"]),
        (lambda c: c.update(num_key_value_heads=2), ["one shared KV head"]),
        (lambda c: c.update(head_dim=100), ["multiple of 64"]),
        (lambda c: c.update(index_head_dim=96), ["index_head_dim 96"]),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, change, words):
    msg = _error(_checkpoint(tmp_path, config_edit=change))
    for w in words:
        assert w in msg, msg


def test_pipelined_host_may_lack_whole_blocks(tmp_path, monkeypatch):
    """Under a multi-host launch a block with no tensor at all belongs to
    another host; a partly present block is still an error."""
    from mlx_arch_plugins.deepseek_v4 import checkpoint as ck

    def drop_layer(w):
        for k in [k for k in w if k.startswith("layers.1.")]:
            del w[k]

    path = _checkpoint(tmp_path, drop_layer)
    assert "missing" in _error(path)  # single process: refused
    monkeypatch.setattr(ck, "_distributed", lambda: True)
    load_model(path, strict=False)

    def drop_one(w):
        del w["layers.1.attn.kv_norm.weight"]

    other = tmp_path / "other"
    other.mkdir()
    assert "kv_norm" in _error(_checkpoint(other, drop_one))
