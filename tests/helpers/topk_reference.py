"""What ``kernels.topk_rows`` promises, in numpy: per row, the indices of the ``k``
largest scores before the row's limit, in index order, a tie at the k-th score
going to the lower indices; a row with at most ``k`` entries before its limit
gets 0..k-1."""

import numpy as np


def topk_reference(score, k, limit=None):
    s = np.asarray(score, dtype=np.float32)
    lead, n = s.shape[:-1], s.shape[-1]
    rows = s.reshape(-1, n)
    limits = np.broadcast_to(n if limit is None else np.asarray(limit), lead).reshape(-1)
    out = np.empty((rows.shape[0], k), dtype=np.uint32)
    for r, (row, lim) in enumerate(zip(rows, limits)):
        lim = min(max(int(lim), 0), n)
        if lim <= k:
            out[r] = np.arange(k)
        else:  # a stable sort of the negated scores puts ties in index order
            out[r] = np.sort(np.argsort(-row[:lim], kind="stable")[:k])
    return out.reshape(*lead, k)
