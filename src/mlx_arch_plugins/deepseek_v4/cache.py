"""Generation caches for DeepSeek-V4 (``model_type: deepseek_v4``).

One cache object per layer holds exactly what that layer needs to continue a
sequence: the raw KV of the last ``sliding_window`` positions, the compressed
entries emitted so far, the rows of the compressor's partial block (the
unfinished block, plus the previous block when ratio-4 windows overlap) and the
same two things for the CSA indexer. Nothing grows with the context except the
compressed entries, one per ``compress_ratio`` tokens.

``DeepseekV4Cache`` serves one sequence (or several that share every position,
e.g. a plain batch without padding). ``BatchDeepseekV4Cache`` is what
``merge`` returns for mlx-lm's batch generator: a list of single caches plus
the padding bookkeeping of the current prompt, so that every sequence is
computed exactly as it would be alone. For decode steps (one token per
sequence, each at its own position) it switches to a packed form,
``PackedDecodeState``: the sequences' arrays stacked along the batch axis, so
a step costs one set of kernels for the whole batch instead of one per
sequence.

Both classes are registered in ``mlx_lm.models.cache`` by the plugin (that is
where ``load_prompt_cache`` looks classes up by name).
"""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache

# Names of the arrays a single cache owns, in ``state`` order (after offset).
_ARRAY_FIELDS = (
    "window",  # [B, <=win, head_dim] raw KV rows, oldest first
    "comp",  # [B, n_comp, head_dim] compressed entries
    "comp_kv",  # [B, rows, coff*head_dim] fp32 pending compressor rows
    "comp_score",  # same shape, gate scores (ape added)
    "index",  # [B, n_comp, index_head_dim] indexer keys
    "index_kv",
    "index_score",
)

_GROW_STEP = 256
# Stands for a missing array in ``state`` (mlx 0.31 cannot save 0-size arrays).
_ABSENT = mx.array([0.0])  # data, not a lazy op: usable from any thread

# How many of the last tokens ``trim`` can undo exactly (speculative decoding
# trims at most the draft length; prompt-cache reuse a short tail). Undo keeps
# references to earlier arrays, not copies, so the bound costs no compute.
TRIM_BOUND = 16

# Fields of a single cache that change as tokens arrive (entries only grow,
# so ``n_comp`` is enough to undo them).
_UNDO_FIELDS = ("window", "comp_kv", "comp_score", "index_kv", "index_score", "n_comp")


def pending_start(end: int, ratio: int) -> int:
    """First position of the rows a compressor keeps after ``end`` tokens: its
    unfinished block, plus the previous whole block when blocks overlap."""
    last = end // ratio
    if ratio == 4 and last > 0:
        return (last - 1) * ratio
    return last * ratio


# Steps a cache taken out of a packed batch can still undo (see _own_undo).
EXTRACTED_UNDO = 8


class _Undo:
    """What one call of a layer on ``L`` tokens at position ``T`` replaced.

    ``before`` holds the cache's fields as they were at ``T`` (references).
    A chunk (``L > 1``) also keeps the rows it fed: its raw KV rows from
    index ``kv0`` on, and per compressor the float32 rows from position
    ``start`` on, so that any position inside the chunk can be rebuilt.
    """

    __slots__ = ("T", "L", "before", "kv", "kv0", "rows")

    def __init__(self, T: int, L: int, before: dict):
        self.T, self.L, self.before = T, L, before
        self.kv, self.kv0, self.rows = None, 0, {}

    def fields(self) -> dict:
        return self.before


def _nbytes(a: Optional[mx.array]) -> int:
    return 0 if a is None else a.nbytes


def _new_handle(a: Optional[mx.array]) -> Optional[mx.array]:
    """Another Python handle to the same array (no new graph node, no copy): an
    in-place write through one leaves the other as it was."""
    return None if a is None else a.astype(a.dtype)


def _tail(a: mx.array, k: int, own: bool) -> mx.array:
    """``a[:, k:]``; with ``own`` a copy, so that an undo record of a long
    prefill chunk does not keep the chunk's whole buffer alive."""
    t = a[:, k:] if k else a
    return mx.contiguous(t) if own and k else t


class DeepseekV4Cache(_BaseCache):
    """Per-layer cache of one DeepSeek-V4 sequence (or an aligned batch)."""

    def __init__(self, sliding_window: int = 0, compress_ratio: int = 0):
        self.sliding_window = sliding_window
        self.compress_ratio = compress_ratio
        self.offset = 0
        self.window = None
        self._comp = None  # growth buffer; valid rows [:n_comp]
        self._index = None
        self.n_comp = 0
        self.comp_kv = self.comp_score = None
        self.index_kv = self.index_score = None
        self._undo: List[_Undo] = []  # newest last; see checkpoint()
        self._guess_bufs = None  # see start_guess()

    # -- compressed entries live in buffers that grow in steps, so appending
    # one entry every few tokens does not copy the whole history each time.
    @property
    def comp(self):
        return None if self._comp is None else self._comp[:, : self.n_comp]

    @property
    def index(self):
        return None if self._index is None else self._index[:, : self.n_comp]

    def _grow(self, buf, new, n):
        need = n + new.shape[1]
        if buf is None or need > buf.shape[1]:
            cap = ((need + _GROW_STEP - 1) // _GROW_STEP) * _GROW_STEP
            grown = mx.zeros((new.shape[0], cap, new.shape[2]), dtype=new.dtype)
            if buf is not None and n > 0:
                grown[:, :n] = buf[:, :n]
            buf = grown
        buf[:, n:need] = new
        return buf

    def append_entries(self, comp: mx.array, index: Optional[mx.array]):
        """Append newly completed compressed entries (and indexer keys)."""
        if comp.shape[1] == 0:
            return
        n = self.n_comp
        self._comp = self._grow(self._comp, comp, n)
        if index is not None:
            self._index = self._grow(self._index, index, n)
        self.n_comp = n + comp.shape[1]

    def push_window(self, kv: mx.array):
        """Keep the last ``sliding_window`` raw KV rows."""
        rec = self._open_chunk()
        if rec is not None:  # the rows a trim into this chunk will need
            rec.kv0 = max(0, rec.L - TRIM_BOUND - self.sliding_window)
            rec.kv = _tail(kv, rec.kv0, rec.L > TRIM_BOUND)
        rows = kv if self.window is None else mx.concatenate([self.window, kv], 1)
        self.window = rows[:, -self.sliding_window :]

    # -- exact undo of the last tokens ---------------------------------------
    def checkpoint(self, L: int):
        """Remember the state before the next ``L`` tokens (called by the
        layer before it feeds them), so ``trim`` can come back to any
        position of the last ``TRIM_BOUND`` tokens."""
        end = self.offset + L
        undo = [r for r in self._undo if r.T + r.L > end - TRIM_BOUND]
        undo.append(_Undo(self.offset, L, {f: getattr(self, f) for f in _UNDO_FIELDS}))
        self._undo = undo

    def _open_chunk(self) -> Optional[_Undo]:
        r = self._undo[-1] if self._undo else None
        return r if r is not None and r.L > 1 and r.T == self.offset else None

    def keep_rows(self, name: str, kv: mx.array, score: mx.array, end: int):
        """Pending rows of compressor ``name`` ("comp" or "index") after a
        chunk ending at ``end``, given all rows the chunk saw (``kv``/``score``
        end at ``end``). The chunk's undo record keeps what a trim needs."""
        start = end - kv.shape[1]
        rec = self._open_chunk()
        if rec is not None:
            lo = max(start, pending_start(max(rec.T, end - TRIM_BOUND), self.compress_ratio))
            own = rec.L > TRIM_BOUND
            rec.rows[name] = (_tail(kv, lo - start, own), _tail(score, lo - start, own), lo)
        keep = max(pending_start(end, self.compress_ratio), start)
        if keep >= end:
            return None, None
        return kv[:, keep - start :], score[:, keep - start :]

    def max_trim(self) -> int:
        """How many of the last tokens ``trim`` can undo now."""
        floor = self.offset  # every position in [floor, offset] is reachable
        for r in reversed(self._undo):
            if r.T + r.L < floor:
                break
            # a record reaches its start and, inside, the positions whose
            # rows it kept (all of them unless it is a long prefill chunk)
            low = r.T + max(1, r.L - TRIM_BOUND)
            if low > floor:
                break
            floor = r.T if low == r.T + 1 else low
            if low != r.T + 1:
                break
        return min(TRIM_BOUND, self.offset - floor)

    def _state_at(self, t: int) -> dict:
        """The fields as they were right after position ``t - 1``."""
        for rec in reversed(self._undo):
            if rec.T <= t:
                break
        fields = dict(rec.fields())
        j = t - rec.T
        if j == 0:
            return fields
        # inside a chunk: rebuild from the rows it kept
        W = self.sliding_window
        new = rec.kv[:, : j - rec.kv0]
        win = fields["window"]
        rows = new if win is None or rec.kv0 else mx.concatenate([win, new], 1)
        fields["window"] = rows[:, -W:]
        m = self.compress_ratio
        if m:
            fields["n_comp"] += t // m - rec.T // m
            for name in ("comp", "index"):
                if name not in rec.rows:
                    continue
                kv, sc, lo = rec.rows[name]
                keep = pending_start(t, m)
                got = (kv[:, keep - lo : t - lo], sc[:, keep - lo : t - lo])
                if keep >= t:
                    got = (None, None)
                fields[f"{name}_kv"], fields[f"{name}_score"] = got
        return fields

    # -- tokens fed on a guess -------------------------------------------------
    # Speculative decoding builds the next verify before it knows whether the guess it
    # rests on holds, and drops it unevaluated when it does not. ``trim`` alone would
    # not free the cache from a dropped graph: new entries are written into the growth
    # buffers in place, so the buffers would still depend on (and evaluate) it.
    def start_guess(self):
        """Write the next entries through new handles of the growth buffers, so that
        ``drop_guess`` can give back the untouched ones."""
        self._guess_bufs = (self._comp, self._index)
        self._comp, self._index = _new_handle(self._comp), _new_handle(self._index)

    def keep_guess(self):
        """The guessed tokens stand (the old handles go: writes may reuse the memory)."""
        self._guess_bufs = None

    def drop_guess(self, n: int):
        """Undo the ``n`` guessed tokens, unevaluated, and their buffer writes."""
        if self._guess_bufs is None:
            raise RuntimeError("drop_guess() without start_guess()")
        self.trim(n)
        (self._comp, self._index), self._guess_bufs = self._guess_bufs, None

    def is_trimmable(self):
        # Exact for the last ``max_trim()`` tokens (at most TRIM_BOUND);
        # ``trim`` refuses more with the reason.
        return True

    def trim(self, n):
        """Undo the last ``n`` tokens exactly (``n <= max_trim()``)."""
        n = min(self.offset, n)
        if n <= 0:
            return 0
        if n > self.max_trim():
            raise ValueError(
                f"DeepseekV4Cache can undo at most its last {self.max_trim()} tokens "
                f"(bound {TRIM_BOUND}; earlier raw KV rows and compressor rows are "
                f"pooled away), not {n}; recompute from a shorter prefix instead."
            )
        t = self.offset - n
        for f, v in self._state_at(t).items():
            setattr(self, f, v)
        self.offset = t
        self._undo = [r for r in self._undo if r.T < t]
        return n

    # -- mlx-lm cache protocol -------------------------------------------------
    # ``state`` holds arrays only (0.31.x saves nothing else): the three
    # integers travel as one small array, a missing array as ``_ABSENT``.
    @property
    def state(self):
        head = mx.array([self.offset, self.sliding_window, self.compress_ratio])
        return [head] + [
            _ABSENT if getattr(self, f) is None else getattr(self, f) for f in _ARRAY_FIELDS
        ]

    @state.setter
    def state(self, v):
        self.offset, self.sliding_window, self.compress_ratio = (int(x) for x in v[0].tolist())
        arrays = {
            k: (None if a is None or a.ndim != 3 else a) for k, a in zip(_ARRAY_FIELDS, v[1:])
        }
        self.window = arrays["window"]
        self._comp = arrays["comp"]
        self._index = arrays["index"]
        self.n_comp = 0 if self._comp is None else self._comp.shape[1]
        self.comp_kv, self.comp_score = arrays["comp_kv"], arrays["comp_score"]
        self.index_kv, self.index_score = arrays["index_kv"], arrays["index_score"]
        self._undo = []  # history is not saved: a loaded cache trims nothing
        self._guess_bufs = None

    @property
    def meta_state(self):
        return (str(self.offset), str(self.sliding_window), str(self.compress_ratio))

    @meta_state.setter
    def meta_state(self, v):
        self.offset, self.sliding_window, self.compress_ratio = (int(x) for x in v)

    @classmethod
    def from_state(cls, state, meta_state=None):
        obj = cls.__new__(cls)
        obj.state = state
        return obj

    def size(self):
        return self.offset

    def empty(self):
        return self.offset == 0

    @property
    def nbytes(self):
        return sum(_nbytes(getattr(self, f)) for f in _ARRAY_FIELDS)

    def copy(self) -> "DeepseekV4Cache":
        """An independent cache with the same content."""
        new = copy.copy(self)
        # Slices give new array objects, so in-place writes into one cache's
        # growth buffers never show in the other.
        new._comp = self.comp
        new._index = self.index
        new._undo = list(self._undo)  # records are never changed in place
        return new

    @classmethod
    def merge(cls, caches: Sequence["DeepseekV4Cache"]) -> "BatchDeepseekV4Cache":
        return BatchDeepseekV4Cache([c.copy() for c in caches])

    # Batch-protocol no-ops, for a cache that is used unbatched.
    def prepare(self, **kwargs):
        if any(v is not None and max(v, default=0) > 0 for v in kwargs.values()):
            raise ValueError(
                "DeepseekV4Cache serves one aligned sequence; padding needs "
                "BatchDeepseekV4Cache (use merge)."
            )

    def finalize(self):
        pass


class BatchDeepseekV4Cache(_BaseCache):
    """Per-layer cache of a batch of independent sequences.

    Sequences keep their own ``DeepseekV4Cache``; the model runs the
    projections and experts for the whole batch and the position-dependent
    part of attention per sequence, on that sequence's real tokens only.
    """

    def __init__(self, caches: List[DeepseekV4Cache]):
        self._caches = list(caches)
        self._packed: Optional[PackedDecodeState] = None
        self._lead = None  # per sequence: padded positions before real tokens
        self._lengths = None  # per sequence: real tokens in the padded prompt
        self._pos = 0  # padded positions consumed since prepare()

    @property
    def caches(self) -> List[DeepseekV4Cache]:
        """The per-sequence caches (unpacks a packed decode state)."""
        if self._packed is not None:
            self._caches = self._packed.unpack()
            self._packed = None
        return self._caches

    @caches.setter
    def caches(self, v):
        self._packed = None
        self._caches = list(v)

    def packed(self, **dims) -> "PackedDecodeState":
        """The packed form for decode steps (built on first use)."""
        if self._packed is None:
            self._packed = PackedDecodeState.pack(self._caches, **dims)
            self._caches = []
        return self._packed

    def decoding(self, L: int) -> bool:
        """Whether the next L inputs are one real token per sequence."""
        if L != 1:
            return False
        if self._lead is None and self._lengths is None:  # no padding in play
            return True
        return all(n == 1 for _, _, n in self.segments(L))

    def __len__(self):
        return len(self._packed.offsets) if self._packed is not None else len(self._caches)

    @property
    def offset(self):
        if self._packed is not None:
            return mx.array(self._packed.offsets)
        return mx.array([c.offset for c in self.caches])

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        n = len(self)
        self._lead = list(left_padding) if left_padding is not None else [0] * n
        self._lengths = list(lengths) if lengths is not None else None
        self._pos = 0

    def finalize(self):
        self._lead = self._lengths = None
        self._pos = 0

    def segments(self, L: int) -> List[Tuple[int, int, int]]:
        """(sequence, first, count) of the real tokens in the next L inputs."""
        out = []
        for b in range(len(self)):
            lo, hi = 0, L
            if self._lead is not None:
                lo = max(0, self._lead[b] - self._pos)
            if self._lengths is not None:
                end = (self._lead[b] if self._lead else 0) + self._lengths[b]
                hi = min(L, max(0, end - self._pos))
            out.append((b, lo, max(0, hi - lo)))
        return out

    def advance(self, L: int):
        self._pos += L

    @property
    def state(self):
        return [c.state for c in self.caches]

    @state.setter
    def state(self, v):
        self.caches = [DeepseekV4Cache.from_state(s) for s in v]
        self._lead = self._lengths = None
        self._pos = 0

    @property
    def meta_state(self):
        return ()

    @meta_state.setter
    def meta_state(self, v):
        pass

    @classmethod
    def from_state(cls, state, meta_state=None):
        obj = cls.__new__(cls)
        obj.state = state
        return obj

    def filter(self, batch_indices):
        if isinstance(batch_indices, mx.array):
            batch_indices = batch_indices.tolist()
        if self._packed is not None:
            self._packed.filter(batch_indices)
        else:
            self._caches = [self._caches[i] for i in batch_indices]
        for attr in ("_lead", "_lengths"):
            vals = getattr(self, attr)
            if vals is not None:
                setattr(self, attr, [vals[i] for i in batch_indices])

    def extend(self, other: "BatchDeepseekV4Cache"):
        if self._packed is not None:
            self._packed.extend(other.caches)
        else:
            self._caches.extend(other.caches)

    def extract(self, idx: int) -> DeepseekV4Cache:
        return self.caches[idx].copy()

    @classmethod
    def merge(cls, caches):
        out = []
        for c in caches:
            out.extend(c.caches if isinstance(c, cls) else [c])
        return cls([c.copy() for c in out])

    def size(self):
        if self._packed is not None:
            return max(self._packed.offsets, default=0)
        return max((c.size() for c in self.caches), default=0)

    def empty(self):
        if self._packed is not None:
            return all(t == 0 for t in self._packed.offsets)
        return all(c.empty() for c in self.caches)

    @property
    def nbytes(self):
        if self._packed is not None:
            return self._packed.nbytes
        return sum(c.nbytes for c in self.caches)

    def is_trimmable(self):
        return True

    def max_trim(self) -> int:
        """How many of the last tokens every sequence can undo now."""
        if self._packed is not None:
            return len(self._packed._undo)
        return min((c.max_trim() for c in self._caches), default=0)

    def trim(self, n):
        """Undo the last ``n`` tokens of every sequence (as mlx-lm's batch
        caches do), exactly; more than ``max_trim()`` is refused."""
        if self._packed is not None:
            return self._packed.trim(n)
        done = [c.trim(n) for c in self._caches]
        return max(done, default=0)


def _pad_rows(a: Optional[mx.array], rows: int, like: mx.array, left: bool = False):
    """``a`` [1, r, d] padded with zeros to [1, rows, d] (None: all zeros)."""
    if a is None or a.shape[1] == 0:
        return mx.zeros((1, rows, like.shape[-1]), dtype=like.dtype)
    pad = mx.zeros((1, rows - a.shape[1], a.shape[2]), dtype=a.dtype)
    return mx.concatenate([pad, a] if left else [a, pad], 1)


def _cap(n: int) -> int:
    # room for one more entry plus a scratch slot (see PackedDecodeState)
    return ((n + 2 + _GROW_STEP - 1) // _GROW_STEP) * _GROW_STEP


class PackedDecodeState:
    """A batch of DeepSeek-V4 sequences, each at its own position, stacked
    for decode steps of one token per sequence.

    - ``window`` [B, W, hd]: the last W raw KV rows, right-aligned (rows of
      positions below 0 are zeros and masked);
    - ``comp`` / ``index`` [B, cap, d]: compressed entries and indexer keys,
      ``n[b]`` valid per sequence. The last slot is scratch: a step computes
      entries for every sequence and writes those whose block is not complete
      there, so the batch needs no per-sequence branches;
    - ``ring_*`` [B, R, width]: the compressor's pending rows (float32), row
      of position p in slot p % R; R = ratio, or 2 * ratio when blocks
      overlap. Unwritten score slots are -inf (no contribution).

    ``unpack`` gives back caches identical in content to what the same steps
    would have left in per-sequence ``DeepseekV4Cache`` objects.
    """

    def __init__(self):
        self.offsets: List[int] = []
        self.n: List[int] = []
        self.window = self.comp = self.index = None
        self.rings = {}  # "comp" / "index" -> (kv ring, score ring)
        self.dims = {}
        self._undo: List[tuple] = []  # snapshots before the last steps

    # -- exact undo of the last steps ---------------------------------------
    def _snapshot(self) -> tuple:
        # references only; entry buffers are not needed: entries are written
        # at slot n (or scratch), so restoring n undoes them
        return (self.offsets, self.n, self.window, dict(self.rings))

    def checkpoint(self):
        """Remember the state before a decode step (the layer calls this)."""
        self._undo = self._undo[-(TRIM_BOUND - 1) :] + [self._snapshot()]

    def trim(self, k: int) -> int:
        """Undo the last ``k`` decode steps of every sequence."""
        if k > len(self._undo):
            raise ValueError(
                f"packed DeepSeek-V4 batch can undo at most its last "
                f"{len(self._undo)} steps (bound {TRIM_BOUND}), not {k}"
            )
        if k <= 0:
            return 0
        snap = self._undo[-k]
        self.offsets, self.n, self.window, rings = snap
        self.rings = dict(rings)
        self._undo = self._undo[:-k]
        return k

    # -- building ---------------------------------------------------------
    @classmethod
    def pack(
        cls,
        caches: Sequence[DeepseekV4Cache],
        *,
        window: int,
        ratio: int,
        dtype,
        head_dim: int,
        comp_width: int = 0,
        index_dim: int = 0,
        index_width: int = 0,
    ) -> "PackedDecodeState":
        """``dtype``/``head_dim`` of the KV rows (for empty caches); widths:
        the compressors' row widths (0: none)."""
        st = cls()
        # the dtype by name: unpacked caches keep this state for their undo
        # records, and mlx_lm.server deep-copies them (an mx.Dtype cannot be)
        dtype = getattr(mx, dtype) if isinstance(dtype, str) else dtype
        st.dims = dict(
            window=window,
            ratio=ratio,
            dtype=str(dtype).rsplit(".", 1)[-1],
            head_dim=head_dim,
            comp_width=comp_width,
            index_dim=index_dim,
            index_width=index_width,
        )
        st.offsets = [c.offset for c in caches]
        st.n = [c.n_comp for c in caches]
        like = mx.zeros((1, 1, head_dim), dtype=dtype)
        st.window = mx.concatenate(
            [_pad_rows(c.window, window, like, left=True) for c in caches], 0
        )
        if ratio:
            cap = _cap(max(st.n, default=0))
            st.comp = mx.concatenate([_pad_rows(c.comp, cap, like) for c in caches], 0)
            st.rings["comp"] = st._pack_ring(caches, "comp_kv", "comp_score", comp_width)
            if index_dim:
                ilike = mx.zeros((1, 1, index_dim), dtype=dtype)
                st.index = mx.concatenate([_pad_rows(c.index, cap, ilike) for c in caches], 0)
                st.rings["index"] = st._pack_ring(caches, "index_kv", "index_score", index_width)
        return st

    def _ring_size(self):
        m = self.dims["ratio"]
        return 2 * m if m == 4 else m

    def _pack_ring(self, caches, kv_name, sc_name, width):
        R = self._ring_size()
        kvs, scs = [], []
        for c in caches:
            kv = mx.zeros((1, R, width), dtype=mx.float32)
            sc = mx.full((1, R, width), -mx.inf, dtype=mx.float32)
            rows_kv, rows_sc = getattr(c, kv_name), getattr(c, sc_name)
            if rows_kv is not None and rows_kv.shape[1]:
                r = rows_kv.shape[1]
                slots = mx.array([p % R for p in range(c.offset - r, c.offset)])
                kv[:, slots] = rows_kv.astype(mx.float32)
                sc[:, slots] = rows_sc.astype(mx.float32)
            kvs.append(kv)
            scs.append(sc)
        return mx.concatenate(kvs, 0), mx.concatenate(scs, 0)

    # -- batch bookkeeping ------------------------------------------------
    def filter(self, idx: List[int]):
        sel = mx.array(idx, dtype=mx.int32)
        self._undo = []  # the batch changed: its history no longer lines up
        self.offsets = [self.offsets[i] for i in idx]
        self.n = [self.n[i] for i in idx]
        for name in ("window", "comp", "index"):
            a = getattr(self, name)
            if a is not None:
                setattr(self, name, a[sel])
        self.rings = {k: (kv[sel], sc[sel]) for k, (kv, sc) in self.rings.items()}

    def extend(self, caches: Sequence[DeepseekV4Cache]):
        other = PackedDecodeState.pack(caches, **self.dims)
        self._undo = []  # the batch changed: its history no longer lines up
        cap = max(self.cap, other.cap)
        self.grow(cap)
        other.grow(cap)
        # new lists: step plans share theirs between layers
        self.offsets = self.offsets + other.offsets
        self.n = self.n + other.n
        for name in ("window", "comp", "index"):
            a, b = getattr(self, name), getattr(other, name)
            if a is not None:
                setattr(self, name, mx.concatenate([a, b], 0))
        self.rings = {
            k: tuple(mx.concatenate([x, y], 0) for x, y in zip(v, other.rings[k]))
            for k, v in self.rings.items()
        }

    @property
    def cap(self) -> int:
        return 0 if self.comp is None else self.comp.shape[1]

    def grow(self, cap: int):
        """Make the entry buffers ``cap`` slots long (never shrinks)."""
        for name in ("comp", "index"):
            a = getattr(self, name)
            if a is not None and a.shape[1] < cap:
                pad = mx.zeros((a.shape[0], cap - a.shape[1], a.shape[2]), dtype=a.dtype)
                setattr(self, name, mx.concatenate([a, pad], 1))

    @property
    def nbytes(self) -> int:
        arrays = [self.window, self.comp, self.index]
        arrays += [a for pair in self.rings.values() for a in pair]
        return sum(a.nbytes for a in arrays if a is not None)

    # -- back to per-sequence caches ------------------------------------------
    def unpack(self) -> List[DeepseekV4Cache]:
        W, m = self.dims["window"], self.dims["ratio"]
        snap = self._snapshot()
        out = []
        for b, T in enumerate(self.offsets):
            c = DeepseekV4Cache(W, m)
            c.offset = T
            for f, v in self._fields(b, snap).items():
                setattr(c, f, v)
            if m and c.n_comp:
                c._comp = self.comp[b : b + 1]
                if self.index is not None:
                    c._index = self.index[b : b + 1]
            c._undo = self._own_undo(b)
            out.append(c)
        return out

    def _own_undo(self, b: int) -> list:
        """Undo records of sequence ``b``'s last ``EXTRACTED_UNDO`` steps, as copies of
        its own rows: records pointing into the packed snapshots would keep the whole
        batch's windows and rings alive behind a cache the server keeps as a prompt
        cache (whose byte count does not see them). Enough for the server to trim a
        cached conversation back to where the next turn's prompt differs."""
        records = []
        for snap in self._undo[-EXTRACTED_UNDO:]:
            fields = {
                f: mx.contiguous(v) if isinstance(v, mx.array) else v
                for f, v in self._fields(b, snap).items()
            }
            mx.eval([v for v in fields.values() if isinstance(v, mx.array)])
            records.append(_Undo(snap[0][b], 1, fields))
        return records

    def _fields(self, b: int, snap: tuple) -> dict:
        """Sequence ``b``'s ``_UNDO_FIELDS`` in snapshot ``snap``."""
        offsets, n, window, rings = snap
        W, m, T = self.dims["window"], self.dims["ratio"], offsets[b]
        r = min(T, W)
        f = {"window": window[b : b + 1, W - r :] if r else None}
        f["n_comp"] = n[b] if m else 0
        for name in ("comp", "index"):
            got = self._unpack_ring(rings[name], b, T) if name in rings else (None, None)
            f[f"{name}_kv"], f[f"{name}_score"] = got
        return f

    def _unpack_ring(self, ring, b, T):
        # rows a per-sequence compressor keeps: its partial block, plus the
        # previous whole block when blocks overlap
        m, R = self.dims["ratio"], self._ring_size()
        keep = (T // m) * m
        if R != m and T // m > 0:
            keep -= m
        if T == keep:
            return None, None
        slots = mx.array([p % R for p in range(keep, T)])
        kv, sc = ring
        return kv[b : b + 1, slots], sc[b : b + 1, slots]
