"""Toy chat template: one line per message, '<s>' first, 'assistant:' to prompt."""


def apply_chat_template(messages, add_generation_prompt=False, tools=None, **kwargs):
    lines = [f"{m['role']}: {m.get('content') or ''}" for m in messages]
    if tools:
        lines.insert(0, "tools: " + " ".join(t["function"]["name"] for t in tools))
    if add_generation_prompt:
        lines.append("assistant:")
    return "<s> " + "\n".join(lines)
