"""Changes to stock ``mlx_lm.server``: keep malformed tool-call text.

``apply(module)`` patches ``module`` (``mlx_lm.server``, or ``__main__`` when the
server runs with ``-m``) through ``patching.replace``; ``undo()`` restores it.
Both are idempotent.

**Tool-call text.** Stock hands each tool block's text to the parser; on a parse
error 0.32 logs a warning and drops the block (the text is lost, and
``finish_reason`` still says ``"tool_calls"``), and 0.31 lets the exception end
the request. For parsers of this package that set ``keep_unparsed_as_content``
(the DeepSeek-V4 DSML parser):

* ``ToolCallFormatter.__call__`` parses block by block; a block that fails is
  turned back into its text (``parser.unparsed_text(block)``, i.e. with its
  markers) instead of being dropped;
* ``APIHandler.generate_response`` appends that text to the content it sends
  (the same chunk in streaming) and reports ``finish_reason="stop"`` instead of
  ``"tool_calls"`` when no block of the response parsed.

Other tool parsers keep the stock behaviour.
"""

from __future__ import annotations

import logging

from . import patching

__all__ = ["apply", "undo"]

_owners = []  # classes apply() patched, for undo()


# --- tool-call text ------------------------------------------------------------------


class _FormattedCalls(list):
    """The formatter's result plus the text of blocks that did not parse."""

    def __init__(self, items=(), unparsed="", formatter=None):
        super().__init__(items)
        self.unparsed = unparsed
        self.formatter = formatter


def _wants_recovery(parser):
    return bool(getattr(parser, "keep_unparsed_as_content", False))


def _make_call(original):
    def __call__(self, tool_calls):
        if not _wants_recovery(self._tool_parser):
            return original(self, tool_calls)
        parsed = []
        unparsed = ""
        for tool_text in tool_calls or []:
            try:
                calls = self._tool_parser(tool_text, self._tools)
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                logging.warning("Tool call block did not parse (%s); returning it as content", e)
                unparsed += self._tool_parser.unparsed_text(tool_text)
                continue
            if not isinstance(calls, list):
                calls = [calls]
            parsed.extend(self._format(tc) for tc in calls)
            self._mlx_arch_plugins_parsed = True
        return _FormattedCalls(parsed, unparsed, self)

    return __call__


def _make_generate_response(original):
    def generate_response(self, text, finish_reason, *args, **kwargs):
        calls = kwargs.get("tool_calls")
        if isinstance(calls, _FormattedCalls):
            if calls.unparsed:
                text = (text or "") + calls.unparsed
            parsed_any = getattr(calls.formatter, "_mlx_arch_plugins_parsed", False)
            if finish_reason == "tool_calls" and not parsed_any:
                finish_reason = "stop"
            kwargs["tool_calls"] = list(calls)
        return original(self, text, finish_reason, *args, **kwargs)

    return generate_response


# --- entry points ----------------------------------------------------------------------

_PATCHES = (
    ("ToolCallFormatter", "__call__", _make_call),
    ("APIHandler", "generate_response", _make_generate_response),
)


def apply(module) -> None:
    """Patch the classes of ``module`` that it has (a stand-in may have fewer)."""
    for cls_name, name, make in _PATCHES:
        owner = getattr(module, cls_name, None)
        if owner is None or not callable(getattr(owner, name, None)):
            continue
        if patching.replace(owner, name, make) is not None and owner not in _owners:
            _owners.append(owner)


def undo() -> None:
    patching.undo_for(_owners)
    _owners.clear()
