"""Prompt-cache reuse with caches that trim only their last few tokens.

Stock ``LRUPromptCache.fetch_nearest_cache`` trims a longer cached prompt down to the
common prefix by any number of tokens. A cache that undoes only a bounded tail (it says
so by having ``max_trim()``; its ``trim`` raises beyond it) makes that trim fail; the
patched fetch then asks stock again with trimming off for that one call, so it falls back
to what it does for caches that cannot trim (a shorter cached prefix, or nothing) instead
of failing the request. Trims within the bound reuse the longer prefix as stock intends.

Stock ``insert_cache`` also drops every cached prefix of a prompt whose cache can trim (it
could be trimmed back to them). A bounded cache cannot, beyond its bound: the patched
insert keeps the prefixes (a shared system prompt stays cached for the next user).
"""

from __future__ import annotations

import threading

from . import patching

_no_trim = threading.local()  # set while a fetch is retried without trimming


def _wrap_fetch(fetch):
    def fetch_nearest_cache(self, model, tokens):
        try:
            return fetch(self, model, tokens)
        except ValueError:  # a bounded cache refused a long trim
            _no_trim.on = True
            try:
                return fetch(self, model, tokens)
            finally:
                _no_trim.on = False

    return fetch_nearest_cache


def _bounded(prompt_cache) -> bool:
    return any(hasattr(c, "max_trim") for c in prompt_cache or ())


def _wrap_insert(insert):
    def insert_cache(self, model, tokens, prompt_cache, *args, **kwargs):
        if not _bounded(prompt_cache):
            return insert(self, model, tokens, prompt_cache, *args, **kwargs)
        _no_trim.on = True
        try:
            return insert(self, model, tokens, prompt_cache, *args, **kwargs)
        finally:
            _no_trim.on = False

    return insert_cache


def _wrap_can_trim(can_trim):
    def can_trim_prompt_cache(cache):
        return False if getattr(_no_trim, "on", False) else can_trim(cache)

    return can_trim_prompt_cache


def apply(module):
    """Patch ``mlx_lm.models.cache`` (its ``LRUPromptCache``)."""
    cls = getattr(module, "LRUPromptCache", None)
    if cls is not None:
        patching.replace(cls, "fetch_nearest_cache", _wrap_fetch)
        patching.replace(cls, "insert_cache", _wrap_insert)
        patching.replace(module, "can_trim_prompt_cache", _wrap_can_trim)
