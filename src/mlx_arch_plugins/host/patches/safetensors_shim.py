"""Safetensors reader for dtypes the installed mlx rejects.

``install()`` wraps ``mlx.core.load``. For a ``.safetensors`` path the wrapper
first checks the header against the file size (cheap: one small read), then
calls the original ``mx.load``; only when that raises mlx's
``[safetensor] unsupported dtype ...`` error does this module read the file.

What the fallback returns, per safetensors dtype:

* every dtype mlx reads natively: the same mlx dtype mlx would give;
* ``F8_E4M3`` and ``F8_E8M0``: ``uint8`` raw bytes (what mlx 0.32 returns;
  mlx 0.31 rejects ``F8_E8M0``);
* ``F8_E5M2``: ``float16``. E5M2 is the top byte of an IEEE half, so the
  decoded values are exact, including inf and nan;
* ``F4`` (e2m1, two per byte, element 2k in the low nibble): ``uint8`` packed
  bytes, shape ``[..., n // 2]``, same layout as the official FP4 expert weights (I8)
  and as MLX's own 4-bit packing;
* ``F64``: ``float64`` (mlx has no safetensors reader for it).

The fallback maps the file (``mmap``) and copies each tensor in chunks
straight into its mlx buffer, dropping each mapped chunk right after, so
resident memory stays near the size of the arrays returned.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from . import patching

__all__ = [
    "SafetensorsError",
    "TensorInfo",
    "read_header",
    "load_safetensors",
    "install",
    "uninstall",
    "is_installed",
]

# Bits per element of every dtype in the safetensors spec.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "U16": 16,
    "I16": 16,
    "F16": 16,
    "BF16": 16,
    "U32": 32,
    "I32": 32,
    "F32": 32,
    "U64": 64,
    "I64": 64,
    "F64": 64,
    "C64": 64,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F4": 4,
}

# mlx refuses headers this large; a sane one is a few MB at most.
MAX_HEADER_BYTES = 100 * 1024 * 1024

_UNSUPPORTED_RE = re.compile(r"unsupported dtype\s*(\S*)")


class SafetensorsError(ValueError):
    """A safetensors file that cannot be read as its header says."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def _fail(path, msg, tensor=None):
    where = f"{os.fspath(path)}"
    if tensor is not None:
        where += f", tensor '{tensor}'"
    raise SafetensorsError(f"[safetensors] {where}: {msg}")


def read_header(path) -> Tuple[List[TensorInfo], Dict[str, str]]:
    """Parse and validate a safetensors header.

    Every size and offset is checked against the real file size before
    anything is allocated from it.
    """
    try:
        size = os.stat(path).st_size
    except OSError as e:
        _fail(path, f"cannot stat file ({e.strerror})")
    if size < 8:
        _fail(
            path,
            f"file is {size} bytes; expected at least the 8-byte header length (truncated?)",
        )
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            _fail(
                path,
                f"header length field says {n} bytes but only {size - 8} bytes follow "
                "(truncated or not a safetensors file)",
            )
        if n > MAX_HEADER_BYTES:
            _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _fail(path, f"header ({n} bytes) is not valid UTF-8 JSON: {e}")
    if not isinstance(header, dict):
        _fail(path, f"header must be a JSON object, got {type(header).__name__}")

    data_start = 8 + n
    data_len = size - data_start
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        _fail(path, "__metadata__ must map strings to strings")

    infos = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            _fail(path, "entry must be an object with dtype, shape, data_offsets", name)
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offs = entry.get("data_offsets")
        if dtype not in DTYPE_BITS:
            _fail(
                path,
                f"unknown dtype {dtype!r}; expected one of {', '.join(sorted(DTYPE_BITS))}",
                name,
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            _fail(
                path,
                f"shape must be a list of non-negative integers, got {shape!r}",
                name,
            )
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            _fail(path, f"data_offsets must be [begin, end] integers, got {offs!r}", name)
        b, e = offs
        numel = 1
        for d in shape:
            numel *= d
        bits = numel * DTYPE_BITS[dtype]
        if bits % 8:
            _fail(
                path,
                f"{dtype} shape {shape} holds {numel} elements, not a whole number of bytes",
                name,
            )
        nbytes = bits // 8
        if not 0 <= b <= e:
            _fail(path, f"data_offsets {offs} are not ordered 0 <= begin <= end", name)
        if e - b != nbytes:
            _fail(
                path,
                f"data_offsets {offs} span {e - b} bytes; expected {nbytes} bytes for {dtype} shape {shape}",
                name,
            )
        if e > data_len:
            _fail(
                path,
                f"data_offsets {offs} end past the data section ({data_len} bytes after the "
                f"{n}-byte header; file is {size} bytes): truncated shard?",
                name,
            )
        infos.append(TensorInfo(name, dtype, tuple(shape), data_start + b, data_start + e))

    by_start = sorted((t for t in infos if t.end > t.begin), key=lambda t: t.begin)
    for prev, cur in zip(by_start, by_start[1:]):
        if cur.begin < prev.end:
            _fail(
                path,
                f"data [{cur.begin - data_start}, {cur.end - data_start}) overlaps tensor "
                f"'{prev.name}' [{prev.begin - data_start}, {prev.end - data_start}); "
                "expected disjoint ranges",
                cur.name,
            )
    return infos, metadata


# Storage dtype (mlx) each decodable safetensors dtype is copied into.
_RAW_STORAGE = {
    "BOOL": "bool_",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "F16": "float16",
    "U32": "uint32",
    "I32": "int32",
    "F32": "float32",
    "U64": "uint64",
    "I64": "int64",
    "F64": "uint64",
    "C64": "complex64",
    "BF16": "uint16",
    "F8_E4M3": "uint8",
    "F8_E8M0": "uint8",
    "F8_E5M2": "uint8",
    "F4": "uint8",
}

DECODABLE = frozenset(_RAW_STORAGE)

_CHUNK = 16 * 1024 * 1024


def _storage_shape(path, info: TensorInfo):
    if info.dtype == "F4":
        shape = info.shape
        if shape and shape[-1] % 2:
            _fail(
                path,
                f"F4 shape {list(shape)} has an odd last dimension; cannot return whole bytes per row",
                info.name,
            )
        return shape[:-1] + (shape[-1] // 2,) if shape else ()
    return info.shape


def _copy_tensor(path, info: TensorInfo, mm):
    """Copy one tensor's bytes from the mapping straight into a fresh mlx buffer.

    The copy runs in chunks and each chunk's mapped pages are dropped right
    away, so at most one chunk of the file is resident besides the result.
    """
    import mlx.core as mx

    if info.dtype not in DECODABLE:
        _fail(
            path,
            f"dtype {info.dtype} is valid safetensors but neither mlx nor this reader decodes it "
            f"(reader handles {', '.join(sorted(DECODABLE))})",
            info.name,
        )
    dst = mx.zeros(_storage_shape(path, info), dtype=getattr(mx, _RAW_STORAGE[info.dtype]))
    mx.eval(dst)
    n = info.end - info.begin
    if n:
        # mlx documents that a numpy view without copy shares the array's memory
        out = np.array(dst, copy=False).reshape(-1).view(np.uint8)
        assert out.nbytes == n
        page = mmap.PAGESIZE
        for off in range(0, n, _CHUNK):
            c = min(_CHUNK, n - off)
            out[off : off + c] = np.frombuffer(mm, dtype=np.uint8, count=c, offset=info.begin + off)
            if hasattr(mmap, "MADV_DONTNEED"):
                lo = ((info.begin + off) // page) * page
                try:
                    mm.madvise(mmap.MADV_DONTNEED, lo, info.begin + off + c - lo)
                except (OSError, ValueError):
                    pass
        del out
    if info.dtype == "BF16":
        dst = dst.view(mx.bfloat16)
    elif info.dtype == "F64":
        dst = dst.view(mx.float64)
    elif info.dtype == "F8_E5M2":
        # E5M2 is the high byte of an IEEE half: exact
        dst = (dst.astype(mx.uint16) << 8).view(mx.float16)
    mx.eval(dst)
    return dst


def load_safetensors(path, return_metadata: bool = False, names=None):
    """Read a safetensors file (or only ``names``) into mlx arrays.

    Only the byte ranges of the requested tensors are touched.
    """
    infos, metadata = read_header(path)
    if names is not None:
        wanted = set(names)
        missing = wanted - {t.name for t in infos}
        if missing:
            _fail(path, "no such tensor in this file", sorted(missing)[0])
        infos = [t for t in infos if t.name in wanted]
    for info in infos:  # reject what we cannot decode before copying anything
        if info.dtype not in DECODABLE:
            _copy_tensor(path, info, None)
        _storage_shape(path, info)
    out = {}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        try:
            for info in infos:
                out[info.name] = _copy_tensor(path, info, mm)
        finally:
            if mm is not None:
                mm.close()
    return (out, metadata) if return_metadata else out


# --- mx.load wrapper -------------------------------------------------------
#
# The one wrapper of ``mx.load`` this package installs (through ``patching``). Other
# host code that wants to see loads (load progress) registers an observer instead of
# wrapping ``mx.load`` a second time.

_observers: List[Callable[[str], None]] = []


def _is_safetensors_path(file, fmt) -> bool:
    if not isinstance(file, (str, os.PathLike)):
        return False
    if fmt is not None:
        return fmt == "safetensors"
    return os.fspath(file).endswith(".safetensors")


def _unsupported_dtype(err: BaseException) -> Optional[str]:
    m = _UNSUPPORTED_RE.search(str(err))
    return m.group(1) if m else None


def _notify(file) -> None:
    if isinstance(file, (str, os.PathLike)):
        for observe in list(_observers):
            observe(os.fspath(file))


def _make_load(original):
    def load(file, /, format=None, return_metadata=False, **kwargs):
        if not _is_safetensors_path(file, format):
            out = original(file, format=format, return_metadata=return_metadata, **kwargs)
        else:
            read_header(file)  # clear errors for broken files, before mlx allocates anything
            try:
                out = original(file, format=format, return_metadata=return_metadata, **kwargs)
            except RuntimeError as e:
                if _unsupported_dtype(e) is None:
                    raise
                out = load_safetensors(file, return_metadata=return_metadata)
        _notify(file)
        return out

    load.__doc__ = (original.__doc__ or "") + (
        "\n\n(wrapped by mlx_arch_plugins: safetensors dtypes this mlx rejects are read by "
        "mlx_arch_plugins.host.patches.safetensors_shim)"
    )
    return load


@contextlib.contextmanager
def observing(callback: Callable[[str], None]):
    """Call ``callback(path)`` after each file ``mx.load`` reads inside the block."""
    _observers.append(callback)
    try:
        yield
    finally:
        _observers.remove(callback)


def is_installed() -> bool:
    import mlx.core as mx

    return patching.is_patched(mx, "load")


def original_load():
    """``mx.load`` as mlx defines it (the wrapper's target when installed)."""
    import mlx.core as mx

    return patching.original(mx.load)


def install() -> bool:
    """Wrap ``mlx.core.load``; idempotent. Returns True if it changed anything."""
    import mlx.core as mx

    return patching.replace(mx, "load", _make_load) is not None


def uninstall() -> bool:
    """Restore the original ``mlx.core.load`` if our wrapper is the current one."""
    was = is_installed()
    patching.undo(__name__)
    return was
