"""What an mlx_lm.server request must look like before the generation thread sees it.

Stock ``mlx_lm.server`` checks the types of most sampling fields, but not the
ones below, and a bad value there does real damage: a ``stop`` that is not a
string kills the generation thread (every later request fails until a restart),
a ``logit_bias`` token id outside the vocabulary crashes the process, a
``top_k`` above the vocabulary size kills the generation thread, a ``seed``
mlx cannot take or a ``logit_bias`` value that is not a number drops the
connection, and malformed ``tools`` or ``messages`` reach the chat template.

The rules follow the OpenAI request shape and know nothing about any model
except, for two of them, its vocabulary size. Every failure is a
``RequestError`` whose message starts with the field it is about; the server
patch answers it with HTTP 400.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

__all__ = ["RequestError", "client_status", "check_body", "check_vocabulary", "vocab_size"]

# Keyword arguments the server passes to apply_chat_template itself, or that
# change what it returns (a dict or tensors instead of token ids): a request's
# chat_template_kwargs must not set them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "return_dict",
        "return_tensors",
        "return_assistant_tokens_mask",
    }
)

# Sampling fields stock checks for type only: JSON NaN and Infinity pass that.
FINITE_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "xtc_probability",
    "xtc_threshold",
)

_MISSING = object()


class RequestError(ValueError):
    """A request the server cannot serve as sent (answered with ``http_status``)."""

    http_status = 400


def client_status(exc: BaseException) -> Optional[int]:
    """The 4xx status an exception asks for through its ``http_status``, else None.

    This is the contract for plugins: an exception raised while a request's
    prompt is rendered (e.g. by a chat template) that carries ``http_status``
    in 400..499 is answered with that status and its message.
    """
    status = getattr(exc, "http_status", None)
    if isinstance(status, int) and not isinstance(status, bool) and 400 <= status < 500:
        return status
    return None


# --- small predicates ---------------------------------------------------------------


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _fail(field: str, expected: str, value: Any = _MISSING) -> RequestError:
    got = "" if value is _MISSING else f", got {_kind(value)}"
    return RequestError(f"{field} must be {expected}{got}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional(body: dict, field: str, kind: type, expected: str) -> Any:
    """``body[field]`` when it is null/absent or of ``kind``; else a RequestError."""
    value = body.get(field)
    if value is not None and not isinstance(value, kind):
        raise _fail(field, expected, value)
    return value


# --- messages and tools (chat requests) ----------------------------------------------


def _check_content(where: str, content: Any) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise _fail(f"{where}.content", "a string, an array of content parts or null", content)
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise _fail(at, "an object with a type", part)
        if not isinstance(part.get("type"), str):
            raise _fail(f"{at}.type", "a string", part.get("type"))
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise _fail(f"{at}.text", "a string", part.get("text"))


def _check_tool_calls(where: str, calls: Any) -> None:
    if calls is None:
        return
    if not isinstance(calls, list):
        raise _fail(f"{where}.tool_calls", "an array of tool calls", calls)
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise _fail(at, "an object", call)
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise _fail(f"{at}.function", "an object with a name", fn)
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _fail(f"{at}.function.name", "a non-empty string", fn.get("name"))
        _check_arguments(f"{at}.function.arguments", fn.get("arguments"))


def _check_arguments(field: str, args: Any) -> None:
    # Stock parses a non-empty string with json.loads before rendering.
    if args is None or isinstance(args, dict) or args == "":
        return
    if not isinstance(args, str):
        raise _fail(field, "a JSON string or an object", args)
    try:
        json.loads(args)
    except ValueError:
        raise RequestError(f"{field} must be a JSON string, got {args[:80]!r}") from None


def _check_messages(messages: Any) -> None:
    if messages is _MISSING:
        raise RequestError("messages is required")
    if not isinstance(messages, list):
        raise _fail("messages", "an array of messages", messages)
    if not messages:
        raise RequestError("messages must not be empty")
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _fail(where, "an object", msg)
        if not isinstance(msg.get("role"), str) or not msg["role"]:
            raise _fail(f"{where}.role", "a non-empty string", msg.get("role"))
        _check_content(where, msg.get("content"))
        _check_tool_calls(where, msg.get("tool_calls"))
        for key in ("name", "tool_call_id", "reasoning", "reasoning_content"):
            if msg.get(key) is not None and not isinstance(msg[key], str):
                raise _fail(f"{where}.{key}", "a string", msg[key])


def _check_tools(tools: Any) -> None:
    # Stock treats a falsy value ([] or null) as "no tools"; so do we.
    if tools is None or tools == []:
        return
    if not isinstance(tools, list):
        raise _fail("tools", "an array of tool objects", tools)
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _fail(at, 'an object like {"type": "function", "function": {...}}', tool)
        if tool.get("type", "function") != "function":
            continue  # another kind of tool: the chat template decides (stock passes it on)
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _fail(f"{at}.function", "an object with a name", fn)
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _fail(f"{at}.function.name", "a non-empty string", fn.get("name"))
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise _fail(f"{at}.function.description", "a string", fn["description"])
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise _fail(f"{at}.function.parameters", "a JSON Schema object", fn["parameters"])


# --- other fields ----------------------------------------------------------------------


def _check_stop(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list):
        raise _fail("stop", "a string or an array of strings", stop)
    for i, word in enumerate(stop):
        if not isinstance(word, str):
            raise _fail(f"stop[{i}]", "a string", word)


def _check_logit_bias(bias: Any) -> None:
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise _fail("logit_bias", "an object mapping token ids to numbers", bias)
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(f"logit_bias keys must be token ids, got {key!r}") from None
        if token < 0:
            raise RequestError(f"logit_bias token id {key} is negative")
        if not _is_number(value) or not math.isfinite(value):
            raise _fail(f"logit_bias[{key!r}]", "a finite number", value)


def _check_seed(seed: Any) -> None:
    # mlx.random.seed takes an unsigned 64-bit integer; stock checks the type only.
    if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed < 2**64:
        raise RequestError("seed must be between 0 and 2**64 - 1")


def _check_stream_options(body: dict) -> None:
    options = _optional(body, "stream_options", dict, "an object")
    if options is not None and options.get("include_usage") is not None:
        if not isinstance(options["include_usage"], bool):
            raise _fail("stream_options.include_usage", "a boolean", options["include_usage"])


def _check_template_kwargs(body: dict) -> None:
    kwargs = _optional(body, "chat_template_kwargs", dict, "an object")
    for key in sorted(RESERVED_TEMPLATE_KWARGS.intersection(kwargs or ())):
        raise RequestError(f"chat_template_kwargs must not set {key!r} (the server sets it)")


def _check_response_format(body: dict) -> None:
    fmt = _optional(body, "response_format", dict, 'an object like {"type": "json_object"}')
    if fmt is not None and not isinstance(fmt.get("type"), str):
        raise _fail("response_format.type", "a string", fmt.get("type"))


def _check_finite(body: dict) -> None:
    for field in FINITE_FIELDS:
        value = body.get(field)
        if isinstance(value, float) and not math.isfinite(value):
            raise RequestError(f"{field} must be a finite number, got {value}")


def check_body(body: dict, chat: bool) -> None:
    """Raise RequestError for the first field of ``body`` that would break the server.

    ``chat``: a /chat/completions request (else /completions).
    """
    if chat:
        _check_messages(body.get("messages", _MISSING))
        _check_tools(body.get("tools"))
    elif "prompt" not in body:
        raise RequestError("prompt is required")
    elif not isinstance(body["prompt"], str):
        raise _fail("prompt", "a string", body["prompt"])
    _check_stop(body.get("stop"))
    _check_logit_bias(body.get("logit_bias"))
    _check_seed(body.get("seed"))
    _check_stream_options(body)
    _check_template_kwargs(body)
    _check_response_format(body)
    _check_finite(body)
    _optional(body, "draft_model", str, "a string")
    _optional(body, "role_mapping", dict, "an object")


# --- checks that need the model ---------------------------------------------------------


def vocab_size(model) -> Optional[int]:
    """The number of logits ``model`` produces, when its config says so."""
    args = getattr(model, "args", None)
    size = getattr(args, "vocab_size", None)
    if size is None:
        text_config = getattr(args, "text_config", None)
        if isinstance(text_config, dict):
            size = text_config.get("vocab_size")
    return size if isinstance(size, int) and size > 0 else None


def check_vocabulary(size: Optional[int], top_k: Any, logit_bias: Any) -> None:
    """Token ids and ``top_k`` against the vocabulary (unknown size: nothing to check).

    An id past the end makes the logit-bias scatter write outside the logits
    (the process aborts); a ``top_k`` of the size or more fails inside the
    sampler, which in a batch kills the generation thread.
    """
    if size is None:
        return
    for token in logit_bias or {}:
        if not 0 <= int(token) < size:
            raise RequestError(
                f"logit_bias token id {token} is not below the vocabulary size {size}"
            )
    if _is_number(top_k) and top_k >= size:  # mlx-lm's top-k sampler needs k < size
        raise RequestError(f"top_k must be below the vocabulary size {size}, got {top_k}")
