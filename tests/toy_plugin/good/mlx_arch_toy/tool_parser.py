"""Toy tool parser: '<call>name a=1 b=2</call>' -> {"name": ..., "arguments": {...}}."""

tool_call_start = "<call>"
tool_call_end = "</call>"


def parse_tool_call(text, tools=None):
    name, *pairs = text.split()
    arguments = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"toy tool call argument {pair!r} is not key=value")
        arguments[key] = value
    return {"name": name, "arguments": arguments}
