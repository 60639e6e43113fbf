"""DeepSeek-V4 DSML tool-call parser (mlx-lm ``tool_parsers`` contract).

mlx-lm's server cuts the decoded text at ``tool_call_start`` / ``tool_call_end``
(matched on text, not tokens: the newlines before ``<｜DSML｜tool_calls>`` merge
with neighbouring characters in BPE) and calls ``parse_tool_call`` with the text
in between. A completion looks like::

    …content\\n\\n<｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls><｜end▁of▁sentence｜>

``string="true"`` values are raw text; ``string="false"`` values are JSON.

``parse_completion`` is the whole-message parser (reasoning, content, tool calls),
with the same acceptance rules as DeepSeek's reference
``parse_message_from_completion_text``.
"""

import json
import re
from typing import Any, Dict, List, Optional, Tuple

from .tokens import ASSISTANT, BOS, DSML, EOS, THINK_END, THINK_START, USER

__all__ = [
    "tool_call_start",
    "tool_call_end",
    "parse_tool_call",
    "parse_completion",
    "DSMLParseError",
]


# The official parser splits content from calls at "\n\n<｜DSML｜tool_calls"; keeping
# the newlines in the marker keeps them out of the content, as it does.
tool_call_start = f"\n\n<{DSML}tool_calls>"
tool_call_end = f"</{DSML}tool_calls>"

# Tokens that must not appear in reasoning or content of a well-formed completion.
_FORBIDDEN_IN_TEXT = (
    THINK_START,
    THINK_END,
    DSML,
    EOS,
    BOS,
    USER,
    ASSISTANT,
)

_INVOKE_OPEN = re.compile(r"<" + DSML + r'invoke name="([^"\n]*)">')
_INVOKE_CLOSE = f"</{DSML}invoke>"
_PARAM_OPEN = re.compile(r"<" + DSML + r'parameter name="([^"\n]*)" string="(true|false)">')
_PARAM_CLOSE = f"</{DSML}parameter>"


class DSMLParseError(ValueError):
    """Malformed DSML (a ValueError, which is what mlx_lm.server catches)."""


def _preview(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _parse_params(body: str, name: str) -> List[Tuple[str, bool, str]]:
    params: List[Tuple[str, bool, str]] = []
    seen = set()
    pos = 0
    while True:
        rest = body[pos:]
        stripped = rest.lstrip()
        if not stripped:
            return params
        pos += len(rest) - len(stripped)
        m = _PARAM_OPEN.match(body, pos)
        if m is None:
            raise DSMLParseError(
                f"Parameter format error in invoke {name!r} at {_preview(body[pos:])}: "
                f'expected <{DSML}parameter name="…" string="true|false">'
            )
        end = body.find(_PARAM_CLOSE, m.end())
        if end < 0:
            raise DSMLParseError(
                f"Parameter {m.group(1)!r} of invoke {name!r} is not closed "
                f"(truncated output?): {_preview(body[m.start() :])}"
            )
        key = m.group(1)
        if key in seen:
            raise DSMLParseError(f"Duplicate parameter name {key!r} in invoke {name!r}")
        seen.add(key)
        params.append((key, m.group(2) == "true", body[m.end() : end]))
        pos = end + len(_PARAM_CLOSE)


def _parse_invokes(block: str) -> List[Tuple[str, List[Tuple[str, bool, str]]]]:
    """Parse the inside of a tool_calls block: one or more invoke elements."""
    calls = []
    pos = 0
    while True:
        rest = block[pos:]
        stripped = rest.lstrip()
        if not stripped:
            break
        pos += len(rest) - len(stripped)
        m = _INVOKE_OPEN.match(block, pos)
        if m is None:
            raise DSMLParseError(
                f'Invoke format error at {_preview(block[pos:])}: expected <{DSML}invoke name="…">'
            )
        end = block.find(_INVOKE_CLOSE, m.end())
        if end < 0:
            raise DSMLParseError(
                f"Invoke {m.group(1)!r} is not closed (truncated output?): "
                f"{_preview(block[m.start() :])}"
            )
        calls.append((m.group(1), _parse_params(block[m.end() : end], m.group(1))))
        pos = end + len(_INVOKE_CLOSE)
    if not calls:
        raise DSMLParseError("Empty tool_calls block: no invoke found")
    return calls


def _value(is_string: bool, raw: str) -> Any:
    if is_string:
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        # Not JSON although string="false" (e.g. a bare word): keep the text
        # rather than drop the call; the reference parser passes it verbatim too.
        return raw


def parse_tool_call(text: str, tools: Optional[List[Any]] = None):
    """Parse the text between ``tool_call_start`` and ``tool_call_end``.

    Returns a list of ``{"name": str, "arguments": dict}`` (mlx_lm.server
    JSON-encodes the arguments). Raises ``DSMLParseError`` (a ``ValueError``)
    on malformed or truncated DSML.
    """
    # Tolerate a start marker that was matched without its closing ">".
    body = text[1:] if text.startswith(">") else text
    calls = []
    for name, params in _parse_invokes(body):
        calls.append({"name": name, "arguments": {k: _value(s, v) for k, s, v in params}})
    return calls


def unparsed_text(text: str) -> str:
    """The completion text of a block that did not parse, markers included.

    mlx_lm.server strips the markers; a block whose last invoke is closed ended
    with ``tool_call_end`` (it only fails inside), a truncated one did not.
    """
    closed = text.rstrip().endswith(_INVOKE_CLOSE)
    return tool_call_start + text + (tool_call_end if closed else "")


# Read by mlx_arch_plugins._server_patch: failed blocks go back into the content.
parse_tool_call.keep_unparsed_as_content = True
parse_tool_call.unparsed_text = unparsed_text


# --------------------------------------------------------------------------
# Whole-message parsing (reference acceptance rules)


def _arguments_json(params: List[Tuple[str, bool, str]]) -> str:
    # Built like the reference: string values JSON-encoded, others verbatim.
    items = []
    for key, is_string, raw in params:
        value = json.dumps(raw, ensure_ascii=False) if is_string else raw
        items.append(f"{json.dumps(key, ensure_ascii=False)}: {value}")
    return "{" + ", ".join(items) + "}"


def _check_text(text: str, where: str) -> None:
    for token in _FORBIDDEN_IN_TEXT:
        if token in text:
            raise DSMLParseError(f"Unexpected special token {token!r} in {where}")


def parse_completion(text: str, thinking_mode: str = "thinking") -> Dict[str, Any]:
    """Parse a full completion (the text generated after the prompt).

    In thinking mode the text starts inside the reasoning. Returns
    ``{"role": "assistant", "reasoning_content", "content", "tool_calls"}`` with
    OpenAI-style tool calls (``arguments`` as a JSON string). Raises
    ``DSMLParseError`` where the reference parser rejects the text: missing
    ``</think>`` or EOS, text after the tool block, special tokens in content,
    malformed DSML.
    """
    if thinking_mode not in ("chat", "thinking"):
        raise ValueError(f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}")
    reasoning = ""
    rest = text
    if thinking_mode == "thinking":
        cut = rest.find(THINK_END)
        if cut < 0:
            raise DSMLParseError("Invalid thinking format: missing </think>")
        reasoning, rest = rest[:cut], rest[cut + len(THINK_END) :]
        _check_text(reasoning, "reasoning")

    tool_calls = []
    sentinel = f"\n\n<{DSML}tool_calls"
    cut = rest.find(sentinel)
    if cut >= 0:
        content, block = rest[:cut], rest[cut + len(sentinel) :]
        if not block.startswith(">"):
            raise DSMLParseError(f"Tool block format error: {_preview(block)}")
        end = block.find(tool_call_end)
        if end < 0:
            raise DSMLParseError("Tool block is not closed (truncated output?)")
        tail = block[end + len(tool_call_end) :]
        if tail not in ("", EOS):
            raise DSMLParseError(f"Unexpected content after tool calls: {_preview(tail)}")
        for name, params in _parse_invokes(block[1:end]):
            tool_calls.append(
                {
                    "type": "function",
                    "function": {"name": name, "arguments": _arguments_json(params)},
                }
            )
    else:
        if not rest.endswith(EOS):
            raise DSMLParseError("Invalid format: missing EOS token")
        content = rest[: -len(EOS)]
        if EOS in content:
            raise DSMLParseError("Unexpected content at end: text after EOS")
    _check_text(content, "content")
    return {
        "role": "assistant",
        "reasoning_content": reasoning,
        "content": content,
        "tool_calls": tool_calls,
    }
