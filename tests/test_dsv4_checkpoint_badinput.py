"""Broken checkpoints through stock ``mlx_lm.utils.load_model``: each error names
the tensor (and, for file-level damage, the file) and what was expected.

Checkpoints are make-tiny output (golden case-a config) edited on disk.
"""

import json
import shutil
import struct
from pathlib import Path

import pytest

from mlx_arch_plugins.deepseek_v4 import tiny
from mlx_arch_plugins.host.patches.safetensors_shim import SafetensorsError

CFG_FILE = Path(__file__).parent / "data" / "formats" / "golden_a_fp8_config.json"


def read_all(path):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    h = json.loads(raw[8 : 8 + n])
    md = h.pop("__metadata__", None)
    base = 8 + n
    return {
        k: [v["dtype"], v["shape"], raw[base + v["data_offsets"][0] : base + v["data_offsets"][1]]]
        for k, v in h.items()
    }, md


def write_all(path, tensors, md=None):
    hdr = {"__metadata__": md or {"format": "pt"}}
    off, chunks = 0, []
    for k, (dt, shape, b) in tensors.items():
        hdr[k] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(b)]}
        off += len(b)
        chunks.append(b)
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(chunks))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    cfg = tiny.resolve_config(str(CFG_FILE))
    return {f: tiny.make_tiny(root / f, f, seed=1, cfg=cfg) for f in ("official", "bf16")}


def edited(tmp_path, src, edit_tensors=None, edit_config=None):
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    if edit_tensors:
        t, md = read_all(d / "model.safetensors")
        edit_tensors(t)
        write_all(d / "model.safetensors", t, md)
    if edit_config:
        c = json.loads((d / "config.json").read_text())
        edit_config(c)
        (d / "config.json").write_text(json.dumps(c))
    return d


def load(d):
    from mlx_lm.utils import load_model

    return load_model(Path(d))


@pytest.mark.compat
def test_truncated_shard(tmp_path, sources):
    d = edited(tmp_path, sources["official"])
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(
        SafetensorsError,
        match=rf"{f}, tensor '[^']+': data_offsets .* end past the data section.*truncated",
    ):
        load(d)


@pytest.mark.compat
def test_header_lies_about_size(tmp_path, sources):
    def lie(t):
        t["layers.0.attn.wq_a.weight"][1] = [128, 256]  # bytes are for [128, 128]

    d = edited(tmp_path, sources["official"], lie)
    with pytest.raises(
        SafetensorsError,
        match=r"tensor 'layers\.0\.attn\.wq_a\.weight': data_offsets .* expected 32768 bytes for F8_E4M3 shape \[128, 256\]",
    ):
        load(d)


@pytest.mark.compat
def test_unknown_dtype(tmp_path, sources):
    def bad(t):
        t["norm.weight"][0] = "Q4_K"

    d = edited(tmp_path, sources["official"], bad)
    with pytest.raises(
        SafetensorsError,
        match=r"model\.safetensors, tensor 'norm\.weight': unknown dtype 'Q4_K'; expected one of",
    ):
        load(d)


@pytest.mark.compat
def test_wrong_shape_official(tmp_path, sources):
    def bad(t):
        e = t["layers.0.attn.q_norm.weight"]
        e[1], e[2] = [64], e[2][:128]

    d = edited(tmp_path, sources["official"], bad)
    with pytest.raises(
        ValueError,
        match=r"'layers\.0\.attn\.q_norm\.weight': expected shape \(128,\), found \(64,\)",
    ):
        load(d)


@pytest.mark.compat
def test_wrong_scale_grid(tmp_path, sources):
    def bad(t):
        t["layers.0.attn.wq_b.scale"][1] = [1, 2]  # real grid is [2, 1]

    d = edited(tmp_path, sources["official"], bad)
    with pytest.raises(
        ValueError,
        match=r"'layers\.0\.attn\.wq_b\.scale': expected E8M0 block scales of shape \(2, 1\)",
    ):
        load(d)


@pytest.mark.compat
def test_config_not_matching_model_size(tmp_path, sources):
    d = edited(tmp_path, sources["official"], edit_config=lambda c: c.update(hidden_size=256))
    # which tensor is reported first depends on the shard's tensor order
    with pytest.raises(
        ValueError,
        match=r"tensor '[^']+': expected shape \([^)]*\b(256|1024)\b[^)]*\), "
        r"found \([^)]*\b(128|512)\b[^)]*\)",
    ):
        load(d)


@pytest.mark.compat
def test_fp8_config_on_unquantized_weights(tmp_path, sources):
    off = json.loads((sources["official"] / "config.json").read_text())
    d = edited(
        tmp_path,
        sources["bf16"],
        edit_config=lambda c: c.update(
            quantization_config=off["quantization_config"], expert_dtype="fp4"
        ),
    )
    with pytest.raises(
        ValueError,
        match=r"tensor '[^']+': config says expert_dtype fp4 but the expert has no scale",
    ):
        load(d)


@pytest.mark.compat
def test_missing_dense_weight_named(tmp_path, sources):
    d = edited(tmp_path, sources["bf16"], lambda t: t.pop("layers.1.attn.wkv.weight"))
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.wkv\.weight.*missing"):
        load(d)


# Missing halves of a quantized pair must be named, never loaded as raw bytes.


def test_missing_fp8_weight_named(tmp_path, sources):
    d = edited(tmp_path, sources["official"], lambda t: t.pop("layers.1.attn.wkv.weight"))
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.wkv\.weight.*missing"):
        load(d)


def test_missing_fp8_scale_named(tmp_path, sources):
    d = edited(tmp_path, sources["official"], lambda t: t.pop("layers.1.attn.wkv.scale"))
    with pytest.raises(ValueError, match=r"layers\.1\.attn\.wkv\.scale"):
        load(d)


def test_missing_expert_named(tmp_path, sources):
    d = edited(tmp_path, sources["official"], lambda t: t.pop("layers.2.ffn.experts.3.w2.weight"))
    with pytest.raises(ValueError, match=r"layers\.2\.ffn\.experts\.3\.w2\.weight.*missing"):
        load(d)


@pytest.mark.compat
def test_model_level_error_names_file(tmp_path, sources):
    def bad(t):
        e = t["layers.0.attn.q_norm.weight"]
        e[1], e[2] = [64], e[2][:128]

    d = edited(tmp_path, sources["official"], bad)
    with pytest.raises(
        ValueError, match=rf"'layers\.0\.attn\.q_norm\.weight'.*\(in {d / 'model.safetensors'}\)"
    ):
        load(d)
