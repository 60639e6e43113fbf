"""Safetensors shim: exact decoding, mx.load wrapping, header validation, lazy mapping.

Expected values are computed here from the format definitions (bit layouts of
E5M2, E2M1, E8M0), not with the shim's own helpers.
"""

import json
import os
import struct
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_arch_plugins.host.patches import safetensors_shim as shim
from mlx_arch_plugins.host.patches.safetensors_shim import SafetensorsError

# mlx 0.31 rejects F8_E8M0 outright, so the shim matters most there
pytestmark = pytest.mark.compat


def write_st(path, tensors, metadata=None, header_len=None, header_bytes=None, tail=b""):
    """tensors: list of (name, dtype, shape, raw bytes); offsets laid end to end."""
    hdr = {}
    if metadata is not None:
        hdr["__metadata__"] = metadata
    data = b""
    for name, dtype, shape, raw in tensors:
        hdr[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    h = header_bytes if header_bytes is not None else json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if header_len is None else header_len))
        f.write(h + data + tail)
    return path


def write_raw_header(path, header: dict, data: bytes):
    return write_st(path, [], header_bytes=json.dumps(header).encode(), tail=data)


@pytest.fixture
def installed():
    was = shim.is_installed()
    shim.install()
    yield
    if not was:
        shim.uninstall()


def native_supports(dtype):
    """Whether this mlx's own loader reads `dtype` (probe file in a temp dir)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = write_st(os.path.join(d, "p.safetensors"), [("t", dtype, [2], b"\x01\x02")])
        loader = shim.original_load()
        try:
            loader(p)
            return True
        except RuntimeError as e:
            assert "unsupported dtype" in str(e)
            return False


# --- exact decoding -------------------------------------------------------------


def e5m2_reference(code):
    s = -1.0 if code & 0x80 else 1.0
    e = (code >> 2) & 0x1F
    m = code & 3
    if e == 31:
        return s * np.inf if m == 0 else np.nan
    if e == 0:
        return s * (m / 4) * 2.0**-14
    return s * (1 + m / 4) * 2.0 ** (e - 15)


def e2m1_reference(code):
    s = -1.0 if code & 8 else 1.0
    e = (code >> 1) & 3
    m = code & 1
    if e == 0:
        return s * 0.5 * m
    return s * (1 + m / 2) * 2.0 ** (e - 1)


def test_f8_e5m2_all_codes_exact(tmp_path):
    codes = bytes(range(256))
    p = write_st(tmp_path / "e5m2.safetensors", [("x", "F8_E5M2", [16, 16], codes)])
    got = shim.load_safetensors(p)["x"]
    assert got.dtype == mx.float16 and got.shape == (16, 16)
    got = np.array(got.astype(mx.float32)).ravel()
    want = np.array([e5m2_reference(c) for c in range(256)])
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok], want[ok])
    # signed zero survives
    assert np.signbit(got[0x80]) and not np.signbit(got[0])


def test_f8_e8m0_raw_bytes(tmp_path):
    raw = bytes([0, 1, 126, 127, 128, 200, 254, 255])
    p = write_st(tmp_path / "e8m0.safetensors", [("s", "F8_E8M0", [2, 4], raw)])
    got = shim.load_safetensors(p)["s"]
    assert got.dtype == mx.uint8
    assert np.array(got).tobytes() == raw
    # E8M0 meaning: 2**(byte - 127); the raw byte is what the model uses
    assert np.exp2(np.array(got, dtype=np.float64) - 127)[0, 3] == 1.0


def test_f4_packed_bytes_and_nibble_order(tmp_path):
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, size=(3, 4), dtype=np.uint8)
    packed[0, 0] = 0x08  # code 8 (-0) in the even column, 0 in the odd one
    packed[0, 1] = 0x8F  # -6 (even col) and -0 (odd col)
    p = write_st(tmp_path / "f4.safetensors", [("w", "F4", [3, 8], packed.tobytes())])
    got = shim.load_safetensors(p)["w"]
    assert got.dtype == mx.uint8 and got.shape == (3, 4)
    got = np.array(got)
    assert np.array_equal(got, packed)
    # decode independently: element 2k is the low nibble
    vals = np.array(
        [
            [
                e2m1_reference((b >> (4 * (j % 2))) & 15)
                for j, b in ((j, row[j // 2]) for j in range(8))
            ]
            for row in got
        ]
    )
    assert vals[0, 0] == 0.0 and vals[0, 1] == 0.0
    assert vals[0, 2] == -6.0 and vals[0, 3] == 0.0
    assert sorted({e2m1_reference(c) for c in range(16)}) == [
        -6,
        -4,
        -3,
        -2,
        -1.5,
        -1,
        -0.5,
        0,
        0.5,
        1,
        1.5,
        2,
        3,
        4,
        6,
    ]


def test_f4_odd_last_dim_rejected(tmp_path):
    p = write_st(tmp_path / "odd.safetensors", [("w", "F4", [2, 3], b"\x00" * 3)])
    with pytest.raises(SafetensorsError, match=r"odd\.safetensors.*'w'.*odd last dimension"):
        shim.load_safetensors(p)


def test_native_dtypes_match_mlx(tmp_path):
    """Every dtype this mlx reads itself comes back identical through the shim."""
    rng = np.random.default_rng(1)
    arrays = {
        "bf16": ("BF16", rng.integers(0, 2**16, size=(3, 5), dtype=np.uint16).tobytes(), (3, 5)),
        "f16": ("F16", rng.standard_normal(6).astype(np.float16).tobytes(), (6,)),
        "f32": ("F32", rng.standard_normal((2, 2)).astype(np.float32).tobytes(), (2, 2)),
        "i64": ("I64", rng.integers(-9, 9, size=4).astype(np.int64).tobytes(), (4,)),
        "i8": ("I8", rng.integers(-128, 128, size=7).astype(np.int8).tobytes(), (7,)),
        "u32": ("U32", rng.integers(0, 2**31, size=3).astype(np.uint32).tobytes(), (3,)),
        "bool": ("BOOL", bytes([1, 0, 1]), (3,)),
        "e4m3": ("F8_E4M3", bytes(range(0, 256, 7)), (37,)),
        "empty": ("F32", b"", (0, 4)),
    }
    if native_supports("F8_E8M0"):
        arrays["e8m0"] = ("F8_E8M0", bytes(range(100, 140)), (8, 5))
    p = write_st(
        tmp_path / "n.safetensors",
        [(k, dt, s, raw) for k, (dt, raw, s) in arrays.items()],
        metadata={"format": "pt"},
    )
    native = (shim.original_load())(str(p), return_metadata=True)
    mine = shim.load_safetensors(p, return_metadata=True)
    assert mine[1] == native[1] == {"format": "pt"}
    assert set(mine[0]) == set(native[0])
    for k in native[0]:
        a, b = native[0][k], mine[0][k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        if a.size:
            assert (
                np.array(a.view(mx.uint8) if a.dtype == mx.bfloat16 else a).tobytes()
                == np.array(b.view(mx.uint8) if b.dtype == mx.bfloat16 else b).tobytes()
            ), k


# --- mx.load wrapper ---------------------------------------------------------------


def test_install_uninstall_idempotent_and_reversible():
    was = shim.is_installed()
    shim.uninstall()
    original = mx.load
    assert not shim.is_installed()
    assert shim.install() is True
    assert shim.install() is False
    assert mx.load is not original and shim.is_installed()
    assert shim.uninstall() is True
    assert shim.uninstall() is False
    assert mx.load is original
    if was:
        shim.install()


def test_wrapper_falls_back_only_on_unsupported_dtype(tmp_path, installed, monkeypatch):
    p = write_st(
        tmp_path / "mixed.safetensors",
        [("a", "F8_E5M2", [2], bytes([0x3C, 0xC0])), ("b", "F32", [1], struct.pack("<f", 2.5))],
        metadata={"k": "v"},
    )
    w, md = mx.load(str(p), return_metadata=True)
    assert md == {"k": "v"}
    assert w["a"].tolist() == [1.0, -2.0] and w["b"].tolist() == [2.5]
    # positional format argument and pathlib paths behave like mx.load
    assert mx.load(p, "safetensors")["b"].tolist() == [2.5]

    calls = []
    monkeypatch.setattr(shim, "load_safetensors", lambda *a, **k: calls.append(a) or {})
    q = write_st(tmp_path / "plain.safetensors", [("b", "F32", [1], struct.pack("<f", 1.0))])
    assert mx.load(str(q))["b"].tolist() == [1.0]
    assert calls == []  # a file mlx reads itself never reaches the shim


def test_wrapper_passes_other_errors_and_formats(tmp_path, installed):
    np.savez(tmp_path / "x.npz", a=np.arange(3))
    assert mx.load(str(tmp_path / "x.npz"))["a"].tolist() == [0, 1, 2]
    with pytest.raises((RuntimeError, ValueError, OSError)):
        mx.load(str(tmp_path / "missing.npz"))


def test_wrapper_on_f8_e8m0_matches_raw(tmp_path, installed):
    raw = bytes([120, 121, 130, 131])
    p = write_st(
        tmp_path / "s.safetensors",
        [("s", "F8_E8M0", [2, 2], raw), ("w", "F8_E4M3", [2], b"\x38\xb8")],
    )
    d = mx.load(str(p))
    assert d["s"].dtype == mx.uint8 and np.array(d["s"]).tobytes() == raw
    assert d["w"].dtype == mx.uint8 and np.array(d["w"]).tobytes() == b"\x38\xb8"


# --- bad input ------------------------------------------------------------------------

F32x4 = struct.pack("<4f", 1, 2, 3, 4)


def bad_cases(tmp):
    good = {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    cases = {}
    cases["truncated"] = (
        write_raw_header(tmp / "truncated.safetensors", good, F32x4[:10]),
        r"truncated\.safetensors, tensor 't'.*end past the data section \(10 bytes",
    )
    cases["header_len_beyond_eof"] = (
        write_st(tmp / "hlen.safetensors", [("t", "F32", [4], F32x4)], header_len=10**9),
        r"hlen\.safetensors: header length field says 1000000000 bytes but only \d+ bytes follow",
    )
    cases["short_file"] = (
        (tmp / "short.safetensors").write_bytes(b"\x01\x02\x03") and tmp / "short.safetensors",
        r"short\.safetensors: file is 3 bytes; expected at least the 8-byte header length",
    )
    cases["not_json"] = (
        write_st(tmp / "nojson.safetensors", [], header_bytes=b"{not json"),
        r"nojson\.safetensors: header \(\d+ bytes\) is not valid UTF-8 JSON",
    )
    cases["unknown_dtype"] = (
        write_raw_header(
            tmp / "dtype.safetensors",
            {"t": {"dtype": "F7", "shape": [4], "data_offsets": [0, 4]}},
            bytes(4),
        ),
        r"dtype\.safetensors, tensor 't': unknown dtype 'F7'; expected one of .*BF16.*F8_E8M0",
    )
    cases["size_mismatch"] = (
        write_raw_header(
            tmp / "lies.safetensors",
            {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}},
            F32x4,
        ),
        r"lies\.safetensors, tensor 't': data_offsets \[0, 8\] span 8 bytes; expected 16 bytes for F32 shape \[4\]",
    )
    cases["huge_shape"] = (
        write_raw_header(
            tmp / "huge.safetensors",
            {"t": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 16]}},
            F32x4,
        ),
        r"huge\.safetensors, tensor 't': data_offsets \[0, 16\] span 16 bytes; expected \d+ bytes",
    )
    cases["offsets_beyond"] = (
        write_raw_header(
            tmp / "beyond.safetensors",
            {"t": {"dtype": "U8", "shape": [4], "data_offsets": [100, 104]}},
            F32x4,
        ),
        r"beyond\.safetensors, tensor 't': data_offsets \[100, 104\] end past the data section \(16 bytes",
    )
    cases["overlap"] = (
        write_raw_header(
            tmp / "overlap.safetensors",
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            F32x4,
        ),
        r"overlap\.safetensors, tensor 'b': data \[4, 12\) overlaps tensor 'a' \[0, 8\); expected disjoint",
    )
    cases["negative_offsets"] = (
        write_raw_header(
            tmp / "neg.safetensors",
            {"t": {"dtype": "U8", "shape": [4], "data_offsets": [8, 4]}},
            F32x4,
        ),
        r"neg\.safetensors, tensor 't': data_offsets \[8, 4\] are not ordered",
    )
    cases["bad_shape"] = (
        write_raw_header(
            tmp / "shape.safetensors",
            {"t": {"dtype": "U8", "shape": [-4], "data_offsets": [0, 4]}},
            F32x4,
        ),
        r"shape\.safetensors, tensor 't': shape must be a list of non-negative integers, got \[-4\]",
    )
    return cases


CASES = [
    "truncated",
    "header_len_beyond_eof",
    "short_file",
    "not_json",
    "unknown_dtype",
    "size_mismatch",
    "huge_shape",
    "offsets_beyond",
    "overlap",
    "negative_offsets",
    "bad_shape",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_headers_named_errors(tmp_path, case):
    path, pattern = bad_cases(tmp_path)[case]
    with pytest.raises(SafetensorsError, match=pattern):
        shim.read_header(path)
    with pytest.raises(SafetensorsError, match=pattern):
        shim.load_safetensors(path)


@pytest.mark.parametrize("case", CASES)
def test_bad_headers_through_mx_load(tmp_path, case, installed):
    path, pattern = bad_cases(tmp_path)[case]
    with pytest.raises(SafetensorsError, match=pattern):
        mx.load(str(path))


def test_undecodable_known_dtype(tmp_path):
    p = write_st(tmp_path / "f6.safetensors", [("t", "F6_E2M3", [4], b"\x00" * 3)])
    with pytest.raises(
        SafetensorsError,
        match=r"f6\.safetensors, tensor 't': dtype F6_E2M3 is valid safetensors but",
    ):
        shim.load_safetensors(p)


def test_missing_tensor_name(tmp_path):
    p = write_st(tmp_path / "one.safetensors", [("a", "U8", [1], b"\x00")])
    with pytest.raises(SafetensorsError, match=r"one\.safetensors, tensor 'b': no such tensor"):
        shim.load_safetensors(p, names=["b"])


# --- lazy mapping ---------------------------------------------------------------------

_RSS_PROBE = r"""
import resource, sys, json
import mlx.core as mx
from mlx_arch_plugins.host.patches import safetensors_shim as shim
path, mode = sys.argv[1], sys.argv[2]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if mode == "one":
    out = shim.load_safetensors(path, names=["small"])
else:
    out = shim.load_safetensors(path)
mx.eval(list(out.values()))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"delta_bytes": (after - before) * 1024, "n": len(out)}))
"""


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("big") / "big.safetensors"
    big = 256 * 1024 * 1024
    hdr = {
        "small": {"dtype": "F8_E5M2", "shape": [8], "data_offsets": [0, 8]},
        "big": {"dtype": "U8", "shape": [big], "data_offsets": [8, 8 + big]},
    }
    h = json.dumps(hdr).encode()
    h += b" " * (-len(h) % 8)
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + bytes([0x3C] * 8))
        chunk = bytes(range(256)) * (4 * 1024 * 16)  # 16 MiB of non-zero data
        for _ in range(big // len(chunk)):
            f.write(chunk)
    return p, big


def _probe(path, mode):
    r = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(path), mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_one_tensor_touches_only_its_bytes(big_file):
    path, _ = big_file
    r = _probe(path, "one")
    assert r["n"] == 1
    # a whole-file read would add >= 256 MiB; mapping touches one page
    assert r["delta_bytes"] < 32 * 1024 * 1024, r


def test_whole_file_peak_stays_near_one_copy(big_file):
    path, big = big_file
    r = _probe(path, "all")
    assert r["n"] == 2
    # result arrays hold `big` bytes; reading the file into memory first, or keeping
    # the mapped pages resident, would need ~2x. Allow 25% for allocator slack.
    assert r["delta_bytes"] < 1.25 * big, r


# --- activation through the plugin host ----------------------------------------------


def _fresh(code):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_installed_when_mlx_lm_utils_imported():
    # stock load_model calls mx.load on every shard before it resolves the model
    # class, so the wrapper must be in place as soon as mlx_lm.utils exists
    code = (
        "from mlx_arch_plugins.host.patches import safetensors_shim as shim\n"
        "before = shim.is_installed()\n"
        "import mlx_lm.utils\n"
        "print(before, shim.is_installed())"
    )
    assert _fresh(code) == "False True"


def test_mx_load_after_mlx_lm_import_reads_unsupported_dtypes(tmp_path):
    """What stock load_model sees from mx.load, with no model module imported."""
    p = write_st(
        tmp_path / "model.safetensors",
        [("s", "F8_E8M0", [2], bytes([127, 130])), ("h", "F8_E5M2", [1], bytes([0x40]))],
    )
    code = (
        "import mlx_lm.utils as u, mlx.core as mx\n"
        f"w = mx.load({str(p)!r})\n"
        "print(w['s'].dtype, w['s'].tolist(), w['h'].dtype, w['h'].tolist())"
    )
    assert _fresh(code) == "mlx.core.uint8 [127, 130] mlx.core.float16 [2.0]"
