"""Keep malformed tool-call text in mlx_lm.server responses (served parsers only).

Stock ``mlx_lm.server`` hands each tool block's text to the parser; on a parse
error 0.32 logs a warning and drops the block (the text is lost, and
``finish_reason`` still says ``"tool_calls"``), and 0.31 lets the exception end
the request. For parsers of this package that set ``keep_unparsed_as_content``
(the DeepSeek-V4 DSML parser), ``apply(module)`` changes two methods:

* ``ToolCallFormatter.__call__`` parses block by block; a block that fails is
  turned back into its text (``parser.unparsed_text(block)``, i.e. with its
  markers) instead of being dropped;
* ``APIHandler.generate_response`` appends that text to the content it sends
  (the same chunk in streaming) and reports ``finish_reason="stop"`` instead of
  ``"tool_calls"`` when no block of the response parsed.

Other tool parsers keep the stock behaviour. ``apply`` is idempotent; ``undo``
restores both methods.
"""

import logging

__all__ = ["apply", "undo"]

_MARK = "_mlx_arch_plugins_original"
_patched = {}


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
                logging.warning(
                    "Tool call block did not parse (%s); returning it as content", e
                )
                unparsed += self._tool_parser.unparsed_text(tool_text)
                continue
            if not isinstance(calls, list):
                calls = [calls]
            parsed.extend(self._format(tc) for tc in calls)
            self._mlx_arch_plugins_parsed = True
        return _FormattedCalls(parsed, unparsed, self)

    setattr(__call__, _MARK, original)
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

    setattr(generate_response, _MARK, original)
    return generate_response


def apply(module) -> None:
    """Patch ``module`` (``mlx_lm.server``, or ``__main__`` when run with ``-m``)."""
    formatter = getattr(module, "ToolCallFormatter", None)
    handler = getattr(module, "APIHandler", None)
    if formatter is None or handler is None:
        return
    if hasattr(formatter.__call__, _MARK):
        return
    formatter.__call__ = _make_call(formatter.__call__)
    handler.generate_response = _make_generate_response(handler.generate_response)
    _patched[id(module)] = (formatter, handler)


def undo() -> None:
    while _patched:
        _, (formatter, handler) = _patched.popitem()
        if hasattr(formatter.__call__, _MARK):
            formatter.__call__ = getattr(formatter.__call__, _MARK)
        if hasattr(handler.generate_response, _MARK):
            handler.generate_response = getattr(handler.generate_response, _MARK)
