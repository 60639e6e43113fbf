"""Prompt-cache reuse with caches that trim only their last few tokens.

Stock ``LRUPromptCache.fetch_nearest_cache`` trims a longer cached prompt down to the
common prefix by any number of tokens. A cache that undoes only a bounded tail (it says
so by having ``max_trim()``; its ``trim`` raises beyond it) makes that trim fail; the
patched fetch then answers "nothing cached" (the prompt is computed in full) instead of
failing the request. Trims within the bound reuse the longer prefix as stock intends.
"""

from __future__ import annotations

from . import patching


def _wrap_fetch(fetch):
    def fetch_nearest_cache(self, model, tokens):
        try:
            return fetch(self, model, tokens)
        except ValueError:  # a bounded cache refused a long trim
            return None, tokens

    return fetch_nearest_cache


def apply(module):
    """Patch ``mlx_lm.models.cache`` (its ``LRUPromptCache``)."""
    cls = getattr(module, "LRUPromptCache", None)
    if cls is not None:
        patching.replace(cls, "fetch_nearest_cache", _wrap_fetch)
