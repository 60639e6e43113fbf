"""The one way this package changes stock code: install once, remember, undo everything.

Every patch of an mlx-lm (or mlx) attribute goes through ``replace`` or ``add``. Each
records the owner, the attribute name, what was there before and what was put in its
place, so that

* installing twice is a no-op (the second call sees its own value in place),
* ``original(value)`` finds what a patch replaced (also as ``__wrapped__``, the attribute
  ``inspect.unwrap`` follows),
* ``undo_all()`` restores every attribute in reverse order, and leaves alone any
  attribute that somebody else changed after us.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List

_MISSING = object()


@dataclass
class Patch:
    owner: Any
    name: str
    before: Any  # _MISSING when the attribute was added
    after: Any


_applied: List[Patch] = []


def _find(owner, name):
    for patch in _applied:
        if patch.owner is owner and patch.name == name:
            return patch
    return None


def is_patched(owner, name: str) -> bool:
    """True while ``owner.name`` holds a value this module put there."""
    patch = _find(owner, name)
    return patch is not None and getattr(owner, name, _MISSING) is patch.after


def replace(owner, name: str, make: Callable[[Any], Any]):
    """Set ``owner.name = make(current)`` unless our value is already in place.

    Returns the installed value, or None when nothing changed.
    """
    if is_patched(owner, name):
        return None
    before = getattr(owner, name)
    after = make(before)
    if callable(after) and not hasattr(after, "__wrapped__"):
        try:
            after.__wrapped__ = before
        except (AttributeError, TypeError):
            pass
    setattr(owner, name, after)
    _applied.append(Patch(owner, name, before, after))
    return after


def rebind(owner, name: str, before, after) -> bool:
    """Point ``owner.name`` at ``after`` where it still holds ``before`` (a module that
    imported a patched function by name before the patch). Undone like the others."""
    if getattr(owner, name, _MISSING) is not before:
        return False
    setattr(owner, name, after)
    _applied.append(Patch(owner, name, before, after))
    return True


def add(owner, name: str, value) -> bool:
    """Add ``owner.name = value`` where the name is free; False when it is taken."""
    if getattr(owner, name, None) is not None:
        return False
    setattr(owner, name, value)
    _applied.append(Patch(owner, name, _MISSING, value))
    return True


def original(value):
    """What the patch that installed ``value`` replaced (``value`` itself if none did)."""
    for patch in _applied:
        if patch.after is value:
            return patch.before
    return value


def undo_all() -> List[str]:
    """Restore everything, newest first. Returns the patches it could not undo because
    the attribute had been changed since (those are left as they are)."""
    skipped = []
    while _applied:
        patch = _applied.pop()
        if getattr(patch.owner, patch.name, _MISSING) is not patch.after:
            skipped.append(f"{getattr(patch.owner, '__name__', patch.owner)}.{patch.name}")
            continue
        if patch.before is _MISSING:
            delattr(patch.owner, patch.name)
        else:
            setattr(patch.owner, patch.name, patch.before)
    return skipped
