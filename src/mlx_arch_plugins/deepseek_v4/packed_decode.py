"""Decode of a packed batch: one token per sequence, each at its own position.

The server and ``batch_generate`` keep one ``DeepseekV4Cache`` per sequence inside a
``BatchDeepseekV4Cache``. For a decode step the sequences' caches are stacked along the
batch axis (``PackedDecodeState``: right-aligned windows, entry buffers with a scratch
slot, compressor rows in per-sequence rings) so that one set of kernels serves all of
them. What differs between sequences (positions, masks, which rows complete a block) is
described by a ``Plan`` built once per step from Python lists and shared by every layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx


@dataclass
class Plan:
    """Index arrays of one packed decode step (plain data, usable from any thread)."""

    Ta: mx.array  # [B] positions of the new tokens
    next: List[int]  # positions after this step
    wmask: Optional[mx.array]  # [B, 1, 1, W] window rows that exist, None if all do
    wmask2d: Optional[mx.array]  # the same as [B, W]
    # compressed layers only (ratio m > 0):
    rows: Optional[mx.array] = None  # [B] batch row numbers
    hot: Optional[mx.array] = None  # [B, R, 1] ring slot of the new row
    ape_pos: Optional[mx.array] = None  # [B] position inside the block
    pool: bool = False  # some sequence completes a block
    blocks: Optional[mx.array] = None  # [B] block index of the new row
    write: Optional[mx.array] = None  # [B] entry slot (scratch when no block completes)
    order: Optional[mx.array] = None  # [B, 2m, 1] ring slots oldest first (overlap)
    n: Optional[List[int]] = None  # entries per sequence after this step
    N: int = 0  # most entries of any sequence
    cmask: Optional[mx.array] = None  # [B, N] entries that exist, None if all do
    base: Optional[mx.array] = None  # [B, 1] flat offset of each row's entries
    mask: Optional[mx.array] = None  # [B, 1, 1, W + N] or None


def _window_masks(T, W):
    # window row j holds position T-W+1+j; rows below position 0 are empty
    low = [W - 1 - t for t in T]
    if max(low) <= 0:
        return None, None
    rows = [[j >= lo for j in range(W)] for lo in low]
    return rows, mx.array(rows)


@functools.lru_cache(maxsize=16)
def plan_step(T: tuple, W: int, m: int, cap: int) -> Plan:
    """The plan of one step at positions ``T`` (window ``W``, ratio ``m``, entry buffer
    capacity ``cap``). Memoised: every layer of a kind asks for the same one."""
    B = len(T)
    wm, wmask2d = _window_masks(T, W)
    p = Plan(
        Ta=mx.array(T, dtype=mx.int32),
        next=[t + 1 for t in T],
        wmask=None if wm is None else mx.array([[[r]] for r in wm]),
        wmask2d=wmask2d,
    )
    if not m:
        return p
    R = 2 * m if m == 4 else m
    p.rows = mx.array(list(range(B)), dtype=mx.int32)
    p.hot = mx.array([[[t % R == r] for r in range(R)] for t in T])
    p.ape_pos = mx.array([t % m for t in T], dtype=mx.int32)
    done = [(t + 1) % m == 0 for t in T]
    p.pool = any(done)
    blocks = [t // m for t in T]
    p.blocks = mx.array(blocks, dtype=mx.int32)
    p.write = mx.array([kb if d else cap - 1 for kb, d in zip(blocks, done)], dtype=mx.int32)
    if p.pool and m == 4:
        p.order = mx.array(
            [[[s % R] for s in range((kb - 1) * m, kb * m + m)] for kb in blocks],
            dtype=mx.int32,
        )
    p.n = [(t + 1) // m for t in T]
    p.N = N = max(p.n)
    cm = [[j < n for j in range(N)] for n in p.n] if min(p.n) < N else None
    p.cmask = None if cm is None else mx.array(cm)
    p.base = mx.array([[b * cap] for b in range(B)], dtype=mx.int32)
    if wm is not None or cm is not None:
        rows = [
            (w if wm else [True] * W) + (c if cm else [True] * N)
            for w, c in zip(wm or [None] * B, cm or [None] * B)
        ]
        p.mask = mx.array([[[r]] for r in rows])
    return p


@mx.compile
def _ring_write(ring_kv, ring_sc, hot, kv, score, ape):
    # each sequence's new row into its slot (``hot``), in one elementwise pass
    # instead of two scatters; scores carry the block-position embedding
    score = score.astype(mx.float32) + ape[:, None]
    return mx.where(hot, kv.astype(mx.float32), ring_kv), mx.where(hot, score, ring_sc)


def _state(attn, cache, kv_dtype):
    st = cache._packed
    if st is not None:
        return st
    dims = dict(window=attn.window, ratio=attn.ratio, dtype=kv_dtype, head_dim=attn.head_dim)
    if attn.ratio:
        dims["comp_width"] = attn.compressor.ape.shape[1]
        if attn.ratio == 4:
            ic = attn.indexer.compressor
            dims.update(index_dim=ic.dim, index_width=ic.ape.shape[1])
    return cache.packed(**dims)


def decode(attn, q, kv, proj, cache):
    """Attention output [B, 1, H, hd] of one packed decode step of ``attn``
    (a ``DeepseekV4Attention``); advances the packed state."""
    st = _state(attn, cache, kv.dtype)
    st.checkpoint()  # references only: lets trim() undo this step
    m = attn.ratio
    if m:
        need = max(st.offsets) // m + 2  # newest block's slot + scratch
        if need > st.cap:
            st.grow(((need + 255) // 256) * 256)
    plan = plan_step(tuple(st.offsets), attn.window, m, st.cap)
    q = attn._rope(q.transpose(0, 2, 1, 3), plan.Ta)  # [B, H, 1, hd]
    kv = attn._round_kv(attn._rope(kv[:, None], plan.Ta)[:, 0])  # [B, 1, hd]
    st.window = mx.concatenate([st.window[:, 1:], kv], 1)
    sinks = attn._sinks(q.dtype)
    if m:
        _compress(attn, proj, st, plan)
    if m == 4 and plan.N > attn.indexer.topk:
        o = _sparse(attn, q, proj, st, plan, sinks)
    else:
        keys, mask = st.window, plan.wmask
        if m and plan.N:
            keys = mx.concatenate([keys, st.comp[:, : plan.N]], 1)
            mask = plan.mask
        o = mx.fast.scaled_dot_product_attention(
            q, keys[:, None], keys[:, None], scale=attn.scale, mask=mask, sinks=sinks
        )
    st.offsets = plan.next
    return attn._rope(o, plan.Ta, inverse=True).transpose(0, 2, 1, 3)


def _compress(attn, proj, st, plan):
    """One new row per sequence into the compressor rings; entries of the blocks this
    row completes go to their slots (the others to scratch)."""
    new = _ring_step(attn.compressor, proj["ckv"], proj["cgate"], "comp", st, plan)
    if new is not None:
        st.comp[plan.rows, plan.write] = attn._round_kv(new)
    if attn.ratio == 4:
        ic = attn.indexer.compressor
        new = _ring_step(ic, proj["ikv"], proj["igate"], "index", st, plan)
        if new is not None:
            st.index[plan.rows, plan.write] = attn.indexer.rotate(new)
    st.n = plan.n


def _ring_step(comp, kv, score, name, st, plan):
    m, d = comp.ratio, comp.dim
    ring_kv, ring_sc = _ring_write(*st.rings[name], plan.hot, kv, score, comp.ape[plan.ape_pos])
    st.rings[name] = (ring_kv, ring_sc)
    if not plan.pool:
        return None
    if comp.overlap:
        # each sequence's previous block (first d channels) then its current block
        # (last d channels), oldest row first
        bkv = mx.take_along_axis(ring_kv, plan.order, axis=1)
        bsc = mx.take_along_axis(ring_sc, plan.order, axis=1)
        bkv = mx.concatenate([bkv[:, :m, :d], bkv[:, m:, d:]], 1)
        bsc = mx.concatenate([bsc[:, :m, :d], bsc[:, m:, d:]], 1)
    else:  # ring of one block: slot i holds row i of the block
        bkv, bsc = ring_kv, ring_sc
    w = mx.softmax(bsc, axis=1, precise=True)
    entries = comp.norm((bkv * w).sum(1).astype(kv.dtype))  # [B, d]
    return comp._rope(entries[:, None, None], plan.blocks, stride=m)[:, 0, 0]


def _sparse(attn, q, proj, st, plan, sinks):
    from .model import gather_rows, topk_indices

    B = q.shape[0]
    k, N = attn.indexer.topk, plan.N
    iq = attn.indexer.queries(proj["iq"], plan.Ta)  # [B, 1, Hi, ihd]
    score = attn.indexer.scores(iq, proj["iw"], st.index[:, :N])[:, 0]  # [B, N]
    if plan.cmask is not None:
        score = mx.where(plan.cmask, score, -mx.inf)
    top = topk_indices(score, k)  # [B, k]
    flat = st.comp.reshape(-1, st.comp.shape[-1])
    keys = mx.concatenate([st.window, gather_rows(flat, top, plan.base)], 1)[:, None]
    mask = None
    if plan.wmask is not None or plan.cmask is not None:
        if plan.wmask is not None:
            wm = plan.wmask2d
        else:
            wm = mx.ones((B, attn.window), dtype=mx.bool_)
        if plan.cmask is not None:
            cm = mx.take_along_axis(plan.cmask, top, axis=-1)
        else:
            cm = mx.ones((B, k), dtype=mx.bool_)
        mask = mx.concatenate([wm, cm], 1)[:, None, None]
    return mx.fast.scaled_dot_product_attention(
        q, keys, keys, scale=attn.scale, mask=mask, sinks=sinks
    )
