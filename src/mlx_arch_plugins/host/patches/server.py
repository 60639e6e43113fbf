"""Changes to stock ``mlx_lm.server``: keep malformed tool-call text, refuse bad requests.

``apply(module)`` patches ``module`` (``mlx_lm.server``, or ``__main__`` when the
server runs with ``-m``) through ``patching.replace``; ``undo()`` restores it.
Both are idempotent.

**Tool-call text.** Stock hands each tool block's text to the parser; on a parse
error 0.32 logs a warning and drops the block (the text is lost, and
``finish_reason`` still says ``"tool_calls"``), and 0.31 lets the exception end
the request. For plugin tool parsers that set ``keep_unparsed_as_content``:

* ``ToolCallFormatter.__call__`` parses block by block; a block that fails is
  turned back into its text (``parser.unparsed_text(block)``, i.e. with its
  markers) instead of being dropped;
* ``APIHandler.generate_response`` appends that text to the content it sends
  (the same chunk in streaming) and reports ``finish_reason="stop"`` instead of
  ``"tool_calls"`` when no block of the response parsed.

Other tool parsers keep the stock behaviour.

**Bad requests.** No request may take the server down or go unanswered; one
the server cannot serve gets a 4xx whose message names the field
(rules: ``server_requests``):

* ``APIHandler.do_POST`` reads the body first: a body that is not UTF-8 or is
  nested past the recursion limit (stock drops the connection), or a negative
  Content-Length, gets 400; it answers the errors the other patches raise;
* ``APIHandler.validate_model_parameters`` checks the fields stock leaves
  unchecked before the request reaches the generation thread, and on 0.31
  turns stock's own type errors (which escape there) into a 400;
* ``ResponseGenerator._tokenize`` (generation thread, inside stock's error
  handling) checks ``logit_bias`` ids and ``top_k`` against the model's
  vocabulary, refuses an empty prompt, and marks the errors of rendering the
  prompt (a chat template's ``ValueError``) as the request's fault;
* ``ResponseGenerator.generate`` lets an error that asks for a 4xx status
  (``server_requests.client_status``) through to ``do_POST``, which answers
  with that status; stock answers every such error with 404.
"""

from __future__ import annotations

import io
import json
import logging
import threading

from . import patching
from .server_requests import (
    RequestError,
    check_body,
    check_vocabulary,
    client_status,
    vocab_size,
)

__all__ = ["apply", "undo"]


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


# --- bad requests ----------------------------------------------------------------------

# Set while our do_POST runs in this thread: only then is there someone to
# catch an _Answer (a handler thread serves one request at a time).
_local = threading.local()


class _Answer(BaseException):
    """A 4xx answer raised inside stock code for our do_POST to send.

    A BaseException so that stock's ``except Exception`` around ``generate``
    (which answers 404 to everything) lets it through. Raised only while our
    do_POST is on this thread's stack, and before any byte of a response.
    """

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def _in_our_do_post():
    return getattr(_local, "depth", 0) > 0


def _send_error(handler, status, message):
    handler._set_completion_headers(status)
    handler.end_headers()
    handler.wfile.write(json.dumps({"error": message}).encode())


def _read_body(handler):
    """The request body, or None where stock answers by itself (no or a
    non-numeric Content-Length)."""
    try:
        length = int(handler.headers.get("Content-Length"))
    except (TypeError, ValueError):
        return None
    if length < 0:  # stock would read until the client hangs up
        raise _Answer(400, "Invalid Content-Length header")
    return handler.rfile.read(length)


def _check_parses(body: bytes):
    """Stock decodes and parses the body catching only JSONDecodeError: a body that
    is not UTF-8, or JSON nested past the recursion limit, ends the connection
    without an answer. (Invalid JSON is left to stock, which answers 400.)"""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Answer(400, f"Request body is not valid UTF-8: {e}") from None
    try:
        json.loads(text)
    except RecursionError:
        raise _Answer(400, "Request body is JSON nested too deeply") from None
    except ValueError:
        pass


def _make_do_post(original):
    def do_POST(self):
        rfile = self.rfile
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            body = _read_body(self)
            if body is not None:
                _check_parses(body)
                self.rfile = io.BytesIO(body)  # stock reads the body from here
            original(self)
        except _Answer as answer:
            _send_error(self, answer.status, str(answer))
        except RequestError as e:  # 0.31: validate_model_parameters runs outside a try
            _send_error(self, e.http_status, str(e))
        finally:
            self.rfile = rfile
            _local.depth -= 1

    return do_POST


def _make_validate(original):
    def validate_model_parameters(self):
        check_body(self.body, chat="chat/completions" in self.path)
        try:
            original(self)
        except ValueError as e:  # stock's own type checks
            raise RequestError(str(e)) from e
        # Stock reads stream_options["include_usage"] unguarded; {} is valid.
        if isinstance(self.stream_options, dict) and "include_usage" not in self.stream_options:
            self.stream_options = dict(self.stream_options, include_usage=False)

    return validate_model_parameters


def _is_prompt_error(exc):
    """Rendering failed because of what the request holds (a template's
    ValueError or TypeError, jinja's raise_exception)."""
    return isinstance(exc, (ValueError, TypeError)) or type(exc).__module__.startswith("jinja2")


def _make_tokenize(original):
    def _tokenize(self, tokenizer, request, args):
        sampling = getattr(args, "sampling", None)
        logits = getattr(args, "logits", None)
        check_vocabulary(
            vocab_size(getattr(self.model_provider, "model", None)),
            getattr(sampling, "top_k", None),
            getattr(logits, "logit_bias", None),
        )
        try:
            out = original(self, tokenizer, request, args)
        except Exception as e:
            if client_status(e) is None and _is_prompt_error(e):
                raise RequestError(f"the prompt could not be rendered: {e}") from e
            raise
        if len(out[0]) == 0:  # the batch generator fails on an empty prompt
            raise RequestError("the prompt is empty (it encodes to no tokens)")
        return out

    return _tokenize


def _make_generate(original):
    def generate(self, *args, **kwargs):
        try:
            return original(self, *args, **kwargs)
        except Exception as e:
            status = client_status(e)
            if status is None or not _in_our_do_post():
                raise
            raise _Answer(status, str(e)) from e

    return generate


# --- entry points ----------------------------------------------------------------------

_PATCHES = (
    ("ToolCallFormatter", "__call__", _make_call),
    ("APIHandler", "generate_response", _make_generate_response),
    ("APIHandler", "do_POST", _make_do_post),
    ("APIHandler", "validate_model_parameters", _make_validate),
    ("ResponseGenerator", "_tokenize", _make_tokenize),
    ("ResponseGenerator", "generate", _make_generate),
)


def apply(module) -> None:
    """Patch the classes of ``module`` that it has (a stand-in may have fewer)."""
    for cls_name, name, make in _PATCHES:
        owner = getattr(module, cls_name, None)
        if owner is not None and callable(getattr(owner, name, None)):
            patching.replace(owner, name, make)


def undo() -> None:
    """Restore every class ``apply`` patched (this module's patching group)."""
    patching.undo()
