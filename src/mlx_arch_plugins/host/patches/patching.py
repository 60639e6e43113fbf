"""The one way this package changes stock code: install once, remember, undo everything.

Every patch of an mlx-lm (or mlx) attribute goes through ``replace`` or ``add``. Each
records the owner, the attribute name, what was there before and what was put in its
place, so that

* installing twice is a no-op (the second call sees its own value in place),
* ``original(value)`` finds what a patch replaced (also as ``__wrapped__``, the attribute
  ``inspect.unwrap`` follows),
* ``undo(group)`` / ``undo_all()`` restore the attributes in reverse order, and leave
  alone any attribute that somebody else changed after us.

``group`` defaults to the name of the module that called (each ``host.patches`` module
is one group), so one patch module can be undone on its own.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

_MISSING = object()


@dataclass
class Patch:
    owner: Any
    name: str
    before: Any  # _MISSING when the attribute was added
    after: Any
    group: str


_applied: List[Patch] = []


def _caller() -> str:
    """Module name of the code that called replace/rebind/add (two frames up)."""
    return sys._getframe(2).f_globals.get("__name__", "")


def _find(owner, name):
    for patch in reversed(_applied):
        if patch.owner is owner and patch.name == name:
            return patch
    return None


def is_patched(owner, name: str) -> bool:
    """True while ``owner.name`` holds a value this module put there."""
    patch = _find(owner, name)
    return patch is not None and getattr(owner, name, _MISSING) is patch.after


def replace(owner, name: str, make: Callable[[Any], Any], group: Optional[str] = None):
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
    _applied.append(Patch(owner, name, before, after, group or _caller()))
    return after


def rebind(owner, name: str, before, after, group: Optional[str] = None) -> bool:
    """Record that ``owner.name`` must follow a patch of ``before`` to ``after`` (a module
    that imported the function by name): points it at ``after`` if it still holds
    ``before``, and adopts it if it already holds ``after``. Undone like the others."""
    current = getattr(owner, name, _MISSING)
    if current is not before and (current is not after or is_patched(owner, name)):
        return False
    setattr(owner, name, after)
    _applied.append(Patch(owner, name, before, after, group or _caller()))
    return True


def add(owner, name: str, value, group: Optional[str] = None) -> bool:
    """Add ``owner.name = value`` where the name is free; False when it is taken."""
    if getattr(owner, name, None) is not None:
        return False
    setattr(owner, name, value)
    _applied.append(Patch(owner, name, _MISSING, value, group or _caller()))
    return True


@contextlib.contextmanager
def temporarily(owner, name: str, value):
    """``owner.name = value`` inside the block only (not recorded: always undone)."""
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield value
    finally:
        if getattr(owner, name, None) is value:
            setattr(owner, name, before)


def original(value):
    """What the patch that installed ``value`` replaced (``value`` itself if none did)."""
    for patch in _applied:
        if patch.after is value:
            return patch.before
    return value


def _caller_of_undo() -> str:
    return sys._getframe(2).f_globals.get("__name__", "")


def _restore(patch: Patch) -> bool:
    if getattr(patch.owner, patch.name, _MISSING) is not patch.after:
        return False  # changed by somebody else since: theirs now
    if patch.before is _MISSING:
        delattr(patch.owner, patch.name)
    else:
        setattr(patch.owner, patch.name, patch.before)
    return True


def _describe(patch: Patch) -> str:
    return f"{getattr(patch.owner, '__name__', patch.owner)}.{patch.name}"


def undo(group: Optional[str] = None, owner: Any = None) -> List[str]:
    """Restore the patches of one group (of one owner, if given), newest first. Returns
    those it could not undo because the attribute had been changed since (they are left
    as they are)."""
    group = group or _caller_of_undo()
    mine = [p for p in _applied if p.group == group and (owner is None or p.owner is owner)]
    skipped = []
    for patch in reversed(mine):
        _applied.remove(patch)
        if not _restore(patch):
            skipped.append(_describe(patch))
    return skipped


def undo_all() -> List[str]:
    """Restore every patch, newest first (see ``undo``)."""
    skipped = []
    while _applied:
        patch = _applied.pop()
        if not _restore(patch):
            skipped.append(_describe(patch))
    return skipped
