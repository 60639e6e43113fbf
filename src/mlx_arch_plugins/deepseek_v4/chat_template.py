"""DeepSeek-V4 prompt encoding as an mlx-lm Python chat template.

DeepSeek-V4 ships no Jinja template; its prompt format is defined by DeepSeek's
Python encoder (``encoding/encoding_dsv4.py`` in the checkpoint repos). This
module reproduces that encoder's output for the two released versions and adapts
the request shape that mlx-lm hands to ``chat_template_type`` modules:

* ``encode_messages`` takes messages exactly like the official encoder
  (tools/response_format on a system or developer message, tool-call arguments
  as JSON strings, ``reasoning_content`` on assistant turns).
* ``apply_chat_template`` is the mlx-lm entry point (``mlx_lm.chat_templates``
  contract): request-level ``tools=``, ``enable_thinking`` / ``thinking_mode``,
  ``reasoning_effort``, ``drop_thinking``, ``encoder_release``, dict arguments
  from ``mlx_lm.server``, ``reasoning`` or ``reasoning_content`` on assistant
  turns, and the ``add_generation_prompt=False`` convention.
"""

import copy
import json
from typing import Any, Dict, List, Optional, Tuple

from .tokens import (
    ASSISTANT,
    BOS,
    DSML,
    EOS,
    LATEST_REMINDER,
    TASK_TOKENS,
    THINK_END,
    THINK_START,
    USER,
)

__all__ = [
    "RELEASES",
    "DEFAULT_RELEASE",
    "TOKENIZER_DEFAULTS",
    "DeepSeekV4TemplateError",
    "apply_chat_template",
    "encode_messages",
]

TOOLS_BLOCK = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. "
    'You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:\n\n'
    "<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="$TOOL_NAME">\n'
    '<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>\n'
    "...\n"
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="$TOOL_NAME2">\n'
    "...\n"
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n\n"
    'String parameters should be specified as is and set `string="true"`. '
    "For all other types (numbers, booleans, arrays, objects), pass the value in "
    'JSON format and set `string="false"`.\n\n'
    "If thinking_mode is enabled (triggered by <think>), you MUST output your complete "
    "reasoning inside <think>...</think> BEFORE any tool calls or final response.\n\n"
    "Otherwise, output directly after </think> with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to "
    "invoke tool calls.\n"
)

RESPONSE_FORMAT_BLOCK = (
    "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{schema}"
)

_EFFORT_ABSOLUTE_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the "
    "problem to resolve the root cause, rigorously stress-testing your logic against "
    "all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every "
    "intermediate step, considered alternative, and rejected hypothesis to ensure "
    "absolutely no assumption is left unchecked.\n\n"
)

_EFFORT_BEYOND_MAX = (
    "Reasoning Effort: Beyond maximum \u2014 exhaustive, relentless, and uncompromising.\n"
    "You MUST reason with the utmost depth and rigor, leaving absolutely nothing to "
    "chance: exhaustively decompose the problem into its most fundamental components, "
    "trace every causal chain to its root, and resolve the underlying cause rather "
    "than any surface symptom.\n"
    "Do not stop reasoning until you have independently verified the solution from "
    "multiple angles and are certain that no assumption remains unchecked and no "
    "error remains undiscovered.\n\n"
)

# Per release: the effort used for None, and the prefix for each accepted effort.
# The two releases differ only here (see docs/chat.md).
RELEASES: Dict[str, Dict[str, Any]] = {
    "v4-2604": {
        "default_effort": None,
        "prefixes": {None: "", "high": "", "max": _EFFORT_ABSOLUTE_MAX},
    },
    "v4-0731": {
        "default_effort": "low",
        "prefixes": {"low": "", "high": _EFFORT_ABSOLUTE_MAX, "max": _EFFORT_BEYOND_MAX},
    },
}
DEFAULT_RELEASE = "v4-0731"
_RELEASE_ALIASES = {"2604": "v4-2604", "0731": "v4-0731", "latest": DEFAULT_RELEASE}

# Read by mlx-lm >= 0.32 through the model module (models/deepseek_v4.py re-exports it).
TOKENIZER_DEFAULTS = {
    "chat_template_type": "deepseek_v4",
    "tool_parser_type": "deepseek_v4",
}


class DeepSeekV4TemplateError(ValueError):
    """A conversation or option the DeepSeek-V4 encoder cannot render.

    The request's fault, not the server's: ``mlx_lm.server`` (with this
    package's server patch) answers it with ``http_status`` and the message.
    """

    http_status = 400


# --------------------------------------------------------------------------
# Option handling


def resolve_release(release: Optional[str]) -> str:
    if release is None:
        return DEFAULT_RELEASE
    name = _RELEASE_ALIASES.get(str(release), str(release))
    if name not in RELEASES:
        raise DeepSeekV4TemplateError(
            f"Unknown DeepSeek-V4 encoder_release {release!r}; expected one of {sorted(RELEASES)}"
        )
    return name


def detect_release(model_path) -> Optional[str]:
    """The encoder release of a checkpoint that ships DeepSeek's ``encoding/`` folder.

    The April file has a single ``REASONING_EFFORT_MAX`` text, the 0731 update a
    ``REASONING_EFFORT_PROMPTS`` table. None when the file is absent or unclear.
    """
    from pathlib import Path

    path = Path(model_path) / "encoding" / "encoding_dsv4.py"
    try:
        source = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    if "REASONING_EFFORT_PROMPTS" in source:
        return "v4-0731"
    if "REASONING_EFFORT_MAX" in source:
        return "v4-2604"
    return None


def _effort_prefix(release: str, effort: Optional[str]) -> str:
    spec = RELEASES[release]
    if effort is None:
        effort = spec["default_effort"]
    if effort not in spec["prefixes"]:
        accepted = ", ".join(repr(e) for e in spec["prefixes"] if e is not None)
        raise DeepSeekV4TemplateError(
            f"Invalid reasoning_effort {effort!r} for DeepSeek-V4 encoder release "
            f"{release}: accepted values are None, {accepted}"
        )
    return spec["prefixes"][effort]


def _check_mode(thinking_mode: str) -> str:
    if thinking_mode not in ("chat", "thinking"):
        raise DeepSeekV4TemplateError(
            f"thinking_mode must be 'chat' or 'thinking', got {thinking_mode!r}"
        )
    return thinking_mode


# --------------------------------------------------------------------------
# Input checks: a clear error naming the field instead of a crash (or, for
# a string of tools, one "tool" per character) further down.


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_tools(tools: Any, field: str = "tools") -> None:
    if not isinstance(tools, list):
        raise DeepSeekV4TemplateError(
            f"{field} must be a list of tool objects, got {_type_name(tools)}"
        )
    for i, tool in enumerate(tools):
        schema = _tool_schema(tool)
        if not isinstance(schema, dict) or not isinstance(schema.get("name"), str):
            raise DeepSeekV4TemplateError(
                f'{field}[{i}] must be an object like {{"type": "function", "function": '
                f'{{"name": ..., "parameters": {{...}}}}}}, got {_type_name(tool)} without a '
                "function name"
            )
        params = schema.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise DeepSeekV4TemplateError(
                f"{field}[{i}].function.parameters must be a JSON Schema object, "
                f"got {_type_name(params)}"
            )


def _check_tool_calls(calls: Any, field: str) -> None:
    if not isinstance(calls, list):
        raise DeepSeekV4TemplateError(f"{field} must be a list, got {_type_name(calls)}")
    for j, call in enumerate(calls):
        name = _call_parts(call)[0] if isinstance(call, dict) else None
        if not isinstance(name, str) or not name:
            raise DeepSeekV4TemplateError(
                f"{field}[{j}] must be an object with function.name (a string)"
            )


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise DeepSeekV4TemplateError(
            f"messages must be a list of message objects, got {_type_name(messages)}"
        )
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise DeepSeekV4TemplateError(
                f"messages[{i}] must be an object with a role, got {_type_name(msg)}"
            )
        content = msg.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise DeepSeekV4TemplateError(
                f"messages[{i}].content must be a string, a list of parts or null, "
                f"got {_type_name(content)}"
            )
        if msg.get("tool_calls") is not None:
            _check_tool_calls(msg["tool_calls"], f"messages[{i}].tool_calls")
        if msg.get("tools") is not None:
            _check_tools(msg["tools"], f"messages[{i}].tools")


# --------------------------------------------------------------------------
# Pieces


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _tool_schema(tool: Dict[str, Any]) -> Dict[str, Any]:
    # OpenAI tools wrap the schema in {"type": "function", "function": {...}}.
    if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
        return tool["function"]
    return tool


def _render_tools(tools: List[Dict[str, Any]]) -> str:
    schemas = "\n".join(_to_json(_tool_schema(t)) for t in tools)
    return TOOLS_BLOCK.replace("{schemas}", schemas)


def _render_extras(msg: Dict[str, Any]) -> str:
    out = ""
    if msg.get("tools"):
        out += "\n\n" + _render_tools(msg["tools"])
    if msg.get("response_format"):
        out += "\n\n" + RESPONSE_FORMAT_BLOCK.replace("{schema}", _to_json(msg["response_format"]))
    return out


def _call_parts(call: Dict[str, Any]) -> Tuple[Any, Any]:
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    return fn.get("name"), fn.get("arguments")


def _render_parameters(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            loaded = json.loads(arguments)
        except ValueError:
            loaded = None
        # Not a JSON object: the official encoder passes the raw text as one
        # string parameter named "arguments".
        arguments = loaded if isinstance(loaded, dict) else {"arguments": arguments}
    elif arguments is None:
        arguments = {}
    elif not isinstance(arguments, dict):
        raise DeepSeekV4TemplateError(
            f"tool call arguments must be a JSON object or a JSON string, got "
            f"{type(arguments).__name__}"
        )
    lines = []
    for key, value in arguments.items():
        if isinstance(value, str):
            flag, text = "true", value
        else:
            flag, text = "false", _to_json(value)
        lines.append(f'<{DSML}parameter name="{key}" string="{flag}">{text}</{DSML}parameter>')
    return "\n".join(lines)


def _render_tool_calls(tool_calls: List[Dict[str, Any]]) -> str:
    invokes = []
    for call in tool_calls:
        name, arguments = _call_parts(call)
        invokes.append(
            f'<{DSML}invoke name="{name}">\n{_render_parameters(arguments)}\n</{DSML}invoke>'
        )
    return f"\n\n<{DSML}tool_calls>\n" + "\n".join(invokes) + f"\n</{DSML}tool_calls>"


def _text_of(content: Any) -> str:
    """Text of a content field: strings as is, lists of parts joined by a blank line."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                parts.append(part.get("text") or "")
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                parts.append(f"[Unsupported {kind}]")
        return "\n\n".join(parts)
    return str(content)


# --------------------------------------------------------------------------
# Conversation normalisation


def _merge_user_turns(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Fold tool results and consecutive user messages into single user turns.

    A merged turn keeps its pieces in ``_blocks`` as (kind, text, tool_call_id).
    """
    merged: List[Dict[str, Any]] = []
    for msg in messages:
        role = msg.get("role")
        if role not in ("user", "tool"):
            merged.append(dict(msg))
            continue
        if role == "tool":
            block = ("tool_result", _text_of(msg.get("content")), msg.get("tool_call_id"))
        else:
            block = ("text", _text_of(msg.get("content")), None)
        prev = merged[-1] if merged else None
        if (
            prev is not None
            and "_blocks" in prev
            and prev.get("task") is None
            and not (role == "user" and msg.get("task") is not None)
        ):
            prev["_blocks"].append(block)
            continue
        turn = {k: v for k, v in msg.items() if k not in ("content", "tool_call_id")}
        turn["role"] = "user"
        turn["_blocks"] = [block]
        merged.append(turn)
    return merged


def _sort_tool_results(messages: List[Dict[str, Any]]) -> None:
    """Put tool results back into the order of the calls they answer (by id)."""
    last_calls: List[Dict[str, Any]] = []
    for msg in messages:
        if msg.get("role") == "assistant":
            last_calls = msg.get("tool_calls") or []
            continue
        blocks = msg.get("_blocks")
        if not blocks:
            continue
        order = {}
        for i, call in enumerate(last_calls):
            if isinstance(call, dict) and call.get("id") is not None:
                order.setdefault(call["id"], i)
        slots = [i for i, b in enumerate(blocks) if b[0] == "tool_result"]
        results = [blocks[i] for i in slots]
        if not results or not all(b[2] in order for b in results):
            continue
        results.sort(key=lambda b: order[b[2]])
        for i, b in zip(slots, results):
            blocks[i] = b


def _render_blocks(blocks) -> str:
    parts = []
    for kind, text, _ in blocks:
        parts.append(f"<tool_result>{text}</tool_result>" if kind == "tool_result" else text)
    return "\n\n".join(parts)


# --------------------------------------------------------------------------
# Encoder


def _encode(
    messages: List[Dict[str, Any]],
    thinking_mode: str,
    drop_thinking: bool,
    reasoning_effort: Optional[str],
    release: str,
) -> Tuple[str, str]:
    """Render a message-level conversation; returns (prompt, generation suffix)."""
    _check_mode(thinking_mode)
    release = resolve_release(release)
    prefix = _effort_prefix(release, reasoning_effort)
    thinking = thinking_mode == "thinking"

    msgs = _merge_user_turns(messages)
    _sort_tool_results(msgs)

    # With tools anywhere, past reasoning is kept (the agent loop needs it).
    keep_reasoning = not drop_thinking or any(m.get("tools") for m in msgs)
    last_user = -1
    for i, m in enumerate(msgs):
        if m.get("role") in ("user", "developer"):
            last_user = i

    out = [BOS]
    suffix = ""
    for i, msg in enumerate(msgs):
        role = msg.get("role")
        if i == 0 and thinking:
            out.append(prefix)
        if role == "system":
            out.append(_text_of(msg.get("content")) + _render_extras(msg))
        elif role == "developer":
            out.append(USER + _text_of(msg.get("content")) + _render_extras(msg))
        elif role == "user":
            out.append(USER + _render_blocks(msg["_blocks"]))
        elif role == "latest_reminder":
            out.append(LATEST_REMINDER + _text_of(msg.get("content")))
        elif role == "assistant":
            prev_task = i > 0 and msgs[i - 1].get("task") is not None
            text = ""
            if thinking and not prev_task and (keep_reasoning or i > last_user):
                reasoning = msg.get("reasoning_content")
                if reasoning is None:
                    reasoning = msg.get("reasoning")
                text += (reasoning or "") + THINK_END
            text += _text_of(msg.get("content"))
            if msg.get("tool_calls"):
                text += _render_tool_calls(msg["tool_calls"])
            if not msg.get("wo_eos", False):
                text += EOS
            out.append(text)
        else:
            raise DeepSeekV4TemplateError(
                f"messages[{i}] has role {role!r}; DeepSeek-V4 accepts system, user, "
                "assistant, tool, developer and latest_reminder"
            )

        # The assistant header follows the turn an assistant (or the model) answers;
        # a latest_reminder between them belongs to that turn (as in deepseek-recipe).
        nxt = msgs[i + 1].get("role") if i + 1 < len(msgs) else None
        if nxt not in (None, "assistant"):
            continue
        task = msg.get("task")
        if task is not None:
            if task not in TASK_TOKENS:
                raise DeepSeekV4TemplateError(
                    f"messages[{i}] has task {task!r}; expected one of {sorted(TASK_TOKENS)}"
                )
            if task == "action":
                trans = ASSISTANT + (THINK_START if thinking else THINK_END)
                trans += TASK_TOKENS[task]
            else:
                trans = TASK_TOKENS[task]
        elif role in ("user", "developer", "latest_reminder"):
            open_think = thinking and (keep_reasoning or i >= last_user)
            trans = ASSISTANT + (THINK_START if open_think else THINK_END)
        else:
            continue
        out.append(trans)
        if nxt is None:
            suffix = trans
    return "".join(out), suffix


def encode_messages(
    messages: List[Dict[str, Any]],
    thinking_mode: str = "thinking",
    drop_thinking: bool = True,
    reasoning_effort: Optional[str] = None,
    release: Optional[str] = None,
) -> str:
    """Message-level encoder: same input and output as DeepSeek's ``encode_messages``."""
    _check_messages(messages)
    return _encode(messages, thinking_mode, drop_thinking, reasoning_effort, release)[0]


# --------------------------------------------------------------------------
# mlx-lm entry point


def _thinking_mode_from(kwargs: Dict[str, Any]) -> str:
    mode = kwargs.get("thinking_mode")
    if mode is not None:
        if isinstance(mode, bool):
            return "thinking" if mode else "chat"
        return _check_mode(mode)
    for key in ("enable_thinking", "thinking"):
        flag = kwargs.get(key)
        if flag is not None:
            return "thinking" if flag else "chat"
    return "thinking"


def _response_schema(response_format: Any) -> Optional[Dict[str, Any]]:
    """The schema DeepSeek's request converter puts on the system message."""
    if not response_format:
        return None
    if not isinstance(response_format, dict):
        raise DeepSeekV4TemplateError(
            f"response_format must be an object, got {type(response_format).__name__}"
        )
    kind = response_format.get("type")
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise DeepSeekV4TemplateError(
                "response_format of type json_schema needs json_schema.schema (an object)"
            )
        return schema
    if kind in ("text", "json_object"):
        return None
    # Anything else is taken as the schema itself.
    return response_format


def apply_chat_template(
    messages: List[Dict[str, Any]],
    tools: Optional[List[Dict[str, Any]]] = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    **kwargs: Any,
) -> str:
    """Render OpenAI-style ``messages`` to the DeepSeek-V4 prompt string.

    The string starts with BOS (mlx-lm encodes it with ``add_special_tokens=False``).
    Keyword options (all optional; unknown ones are ignored):

    * ``thinking_mode``: ``"thinking"`` or ``"chat"``; otherwise ``enable_thinking``
      (mlx-lm's switch, True by default for this vocabulary) or ``thinking`` decide.
    * ``reasoning_effort``: ``None``/``"high"``/``"max"`` (v4-2604) or
      ``None``/``"low"``/``"high"``/``"max"`` (v4-0731); only thinking mode uses it.
    * ``drop_thinking`` (default True): drop reasoning of turns before the last
      user message (never when tools are present, as in the official encoder).
    * ``encoder_release``: ``"v4-0731"`` (default) or ``"v4-2604"``.
    * ``response_format``: OpenAI ``{"type": "json_schema", "json_schema": {"schema": …}}``.

    Request-level ``tools`` are attached to the first message if it is a system
    message, else to an empty system message inserted first. With
    ``add_generation_prompt=False`` the assistant header that the official encoder
    appends after a final user/tool/developer turn is left out.
    """
    mode = _thinking_mode_from(kwargs)
    effort = kwargs.get("reasoning_effort")
    drop_thinking = kwargs.get("drop_thinking", True)
    release = kwargs.get("encoder_release", kwargs.get("release"))

    _check_messages(messages)
    if tools is not None:
        _check_tools(tools)
    msgs = [dict(m) for m in copy.deepcopy(list(messages))]
    for m in msgs:
        if m.get("role") == "assistant" and m.get("reasoning_content") is None:
            if m.get("reasoning") is not None:
                m["reasoning_content"] = m["reasoning"]

    schema = _response_schema(kwargs.get("response_format"))
    if tools or schema is not None:
        if not msgs or msgs[0].get("role") != "system":
            msgs.insert(0, {"role": "system", "content": ""})
        if tools:
            msgs[0]["tools"] = list(tools)
        if schema is not None:
            msgs[0]["response_format"] = schema

    if continue_final_message and msgs and msgs[-1].get("role") == "assistant":
        msgs[-1]["wo_eos"] = True

    prompt, suffix = _encode(msgs, mode, drop_thinking, effort, release)
    if not add_generation_prompt and suffix:
        prompt = prompt[: len(prompt) - len(suffix)]
    return prompt
