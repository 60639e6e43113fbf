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
computed exactly as it would be alone.

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


def _nbytes(a: Optional[mx.array]) -> int:
    return 0 if a is None else a.nbytes


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
        rows = kv if self.window is None else mx.concatenate([self.window, kv], 1)
        self.window = rows[:, -self.sliding_window :]

    # -- mlx-lm cache protocol -------------------------------------------------
    # ``state`` holds arrays only (0.31.x saves nothing else): the three
    # integers travel as one small array, a missing array as ``_ABSENT``.
    @property
    def state(self):
        head = mx.array([self.offset, self.sliding_window, self.compress_ratio])
        return [head] + [
            _ABSENT if getattr(self, f) is None else getattr(self, f)
            for f in _ARRAY_FIELDS
        ]

    @state.setter
    def state(self, v):
        self.offset, self.sliding_window, self.compress_ratio = (
            int(x) for x in v[0].tolist()
        )
        arrays = {
            k: (None if a is None or a.ndim != 3 else a)
            for k, a in zip(_ARRAY_FIELDS, v[1:])
        }
        self.window = arrays["window"]
        self._comp = arrays["comp"]
        self._index = arrays["index"]
        self.n_comp = 0 if self._comp is None else self._comp.shape[1]
        self.comp_kv, self.comp_score = arrays["comp_kv"], arrays["comp_score"]
        self.index_kv, self.index_score = arrays["index_kv"], arrays["index_score"]

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

    def is_trimmable(self):
        # Rewinding would need raw KV that left the window and compressor rows
        # that were pooled away; refuse so callers recompute instead.
        return False

    def trim(self, n):
        return 0

    def copy(self) -> "DeepseekV4Cache":
        """An independent cache with the same content."""
        new = copy.copy(self)
        # Slices give new array objects, so in-place writes into one cache's
        # growth buffers never show in the other.
        new._comp = self.comp
        new._index = self.index
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
        self.caches = list(caches)
        self._lead = None  # per sequence: padded positions before real tokens
        self._lengths = None  # per sequence: real tokens in the padded prompt
        self._pos = 0  # padded positions consumed since prepare()

    @property
    def offset(self):
        return mx.array([c.offset for c in self.caches])

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        n = len(self.caches)
        self._lead = list(left_padding) if left_padding is not None else [0] * n
        self._lengths = list(lengths) if lengths is not None else None
        self._pos = 0

    def finalize(self):
        self._lead = self._lengths = None
        self._pos = 0

    def segments(self, L: int) -> List[Tuple[int, int, int]]:
        """(sequence, first, count) of the real tokens in the next L inputs."""
        out = []
        for b in range(len(self.caches)):
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
        self.caches = [self.caches[i] for i in batch_indices]
        for attr in ("_lead", "_lengths"):
            vals = getattr(self, attr)
            if vals is not None:
                setattr(self, attr, [vals[i] for i in batch_indices])

    def extend(self, other: "BatchDeepseekV4Cache"):
        self.caches.extend(other.caches)

    def extract(self, idx: int) -> DeepseekV4Cache:
        return self.caches[idx].copy()

    @classmethod
    def merge(cls, caches):
        out = []
        for c in caches:
            out.extend(c.caches if isinstance(c, cls) else [c])
        return cls([c.copy() for c in out])

    def size(self):
        return max((c.size() for c in self.caches), default=0)

    def empty(self):
        return all(c.empty() for c in self.caches)

    @property
    def nbytes(self):
        return sum(c.nbytes for c in self.caches)

    def is_trimmable(self):
        return False

    def trim(self, n):
        return 0
