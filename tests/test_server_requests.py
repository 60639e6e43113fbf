"""No request can take mlx_lm.server down (issue 17, part 2).

A real ``mlx_lm server`` process on a tiny DeepSeek-V4 checkpoint gets, over
raw sockets, requests that stock mlx-lm mishandles: some killed its generation
thread (every later request failed until a restart), one crashed the process,
some dropped the connection without an answer, some were rendered into
nonsense prompts. Each must get a 4xx whose message names the field, and the
server must then answer a normal request exactly as before.

The last part checks the chat template's own errors in-process.
"""

import json
import socket
import urllib.request

import pytest
from helpers import e2e_support as es

CHAT = "/v1/chat/completions"
TEXT = "/v1/completions"
HELLO = [{"role": "user", "content": "Say hello."}]
GOOD = {
    "model": "default_model",
    "messages": HELLO,
    "max_tokens": 3,
    "temperature": 0.0,
    "chat_template_kwargs": {"enable_thinking": False},
}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = es.tiny_checkpoint(tmp_path_factory)
    log = tmp_path_factory.mktemp("server_requests") / "server.log"
    with es.mlx_lm_server(ckpt, log) as s:
        yield s


def _exchange(port, raw: bytes, timeout=60):
    """Send raw bytes, read until the server closes; (status or None, body bytes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(raw)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        return None, b""
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _post(port, path, body: bytes, headers=None):
    if headers is None:
        headers = {"Content-Length": str(len(body))}
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return _exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def _post_json(port, path, obj):
    return _post(port, path, json.dumps(obj).encode())


def _health(server):
    try:
        return urllib.request.urlopen(server.base_url + "/health", timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code


def _reply(server, request=GOOD):
    status, body = _post_json(server.port, CHAT, request)
    assert status == 200, body[:500]
    message = json.loads(body)["choices"][0]["message"]
    return message.get("content"), message.get("reasoning")


@pytest.fixture(scope="module")
def first_reply(server):
    """What a normal request gets from the fresh server."""
    return _reply(server)


def _assert_still_serving(server, first_reply):
    assert server.alive()
    assert _health(server) == 200
    assert _reply(server) == first_reply


def chat(**fields):
    return CHAT, dict(GOOD, **fields)


def text(**fields):
    return TEXT, dict({"max_tokens": 3, "temperature": 0.0}, **fields)


# (request, text the error message must contain: the field)
BAD_FIELDS = {
    # stock: the generation thread dies; 404 and /health 503 (0.32), hangs (0.31)
    "stop is a number": (chat(stop=5), "stop"),
    "stop holds a number": (chat(stop=[5]), "stop[0]"),
    "top_k above the vocabulary": (chat(top_k=10**9, temperature=1.0), "top_k"),
    "top_k equal to the vocabulary": (chat(top_k=129280, temperature=1.0), "top_k"),
    "empty completion prompt": (text(prompt=""), "prompt"),
    "completion prompt is a list": (text(prompt=["a"]), "prompt"),
    # stock: the process aborts
    "logit_bias id past the vocabulary": (chat(logit_bias={"999999999": 5}), "logit_bias"),
    "logit_bias id negative": (chat(logit_bias={"-999999": 5}), "logit_bias"),
    # stock: the connection closes without an answer
    "logit_bias value null": (chat(logit_bias={"5": None}), "logit_bias"),
    "logit_bias key not an id": (chat(logit_bias={"five": 1}), "logit_bias"),
    "logit_bias not an object": (chat(logit_bias=[1, 2]), "logit_bias"),
    "seed negative": (chat(seed=-1), "seed"),
    "seed too large": (chat(seed=2**70), "seed"),
    # stock: accepted and rendered (a string gives one "tool" per character)
    "tools is a string": (chat(tools="get_weather"), "tools"),
    "tools holds a number": (chat(tools=[42]), "tools[0]"),
    "tool without function": (chat(tools=[{"type": "function"}]), "tools[0].function"),
    "tool without name": (
        chat(tools=[{"type": "function", "function": {}}]),
        "tools[0].function.name",
    ),
    "tool schema not an object": (
        chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
        "tools[0].function.parameters",
    ),
    "content is a number": (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    "temperature NaN": (chat(temperature=float("nan")), "temperature"),
    "top_p Infinity": (chat(top_p=float("inf")), "top_p"),
    "response_format is a string": (chat(response_format="json"), "response_format"),
    "stream_options is a string": (chat(stream=True, stream_options="usage"), "stream_options"),
    "include_usage not a boolean": (
        chat(stream=True, stream_options={"include_usage": "yes"}),
        "stream_options.include_usage",
    ),
    # stock: 404 (as if the model were missing) with an unrelated message
    "messages empty": (chat(messages=[]), "messages"),
    "message without role": (chat(messages=[{"content": "hi"}]), "messages[0].role"),
    "tool_calls is a string": (
        chat(messages=HELLO + [{"role": "assistant", "tool_calls": "x"}] + HELLO),
        "messages[1].tool_calls",
    ),
    "tool call arguments not JSON": (
        chat(
            messages=HELLO
            + [
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
                }
            ]
            + HELLO
        ),
        "messages[1].tool_calls[0].function.arguments",
    ),
    "chat_template_kwargs is a string": (chat(chat_template_kwargs="x"), "chat_template_kwargs"),
    "chat_template_kwargs sets tokenize": (
        chat(chat_template_kwargs={"tokenize": False}),
        "chat_template_kwargs",
    ),
    "draft_model is a list": (chat(draft_model=["x"]), "draft_model"),
    "role_mapping is a string": (chat(role_mapping="x"), "role_mapping"),
    # the chat template's own errors (stock: 404)
    "template response_format": (
        chat(chat_template_kwargs={"response_format": "json"}),
        "response_format",
    ),
    "template reasoning_effort": (
        chat(chat_template_kwargs={"reasoning_effort": "extreme"}),
        "reasoning_effort",
    ),
    "template unknown role": (chat(messages=[{"role": "narrator", "content": "x"}]), "role"),
    # stock's own checks (0.31: the connection closes without an answer)
    "temperature is a string": (chat(temperature="hot"), "temperature"),
    "messages missing": ((CHAT, {"model": "default_model"}), "messages"),
}


@pytest.mark.compat
@pytest.mark.parametrize("name", list(BAD_FIELDS))
def test_bad_field_gets_400_naming_it_and_server_keeps_serving(server, first_reply, name):
    (path, request), field = BAD_FIELDS[name]
    status, body = _post_json(server.port, path, request)
    assert status == 400, f"{name}: HTTP {status}: {body[:300]!r}"
    error = json.loads(body)["error"]
    assert field in error, f"{name}: {error!r} does not name {field}"
    _assert_still_serving(server, first_reply)


@pytest.mark.compat
@pytest.mark.parametrize(
    "name,body",
    [
        ("invalid UTF-8", json.dumps(GOOD).encode()[:-1] + b'\xff"}'),
        ("latin-1 text", '{"model": "caf\u00e9", "messages": []}'.encode("latin-1")),
        ("nested too deeply", b"[" * 100_000 + b"]" * 100_000),
        (
            "a field nested too deeply",
            json.dumps(GOOD).encode()[:-1] + b', "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        ),
    ],
)
def test_body_that_does_not_parse_gets_400(server, first_reply, name, body):
    status, reply = _post(server.port, CHAT, body)
    assert status == 400, f"{name}: HTTP {status}: {reply[:300]!r}"
    assert "Request body" in json.loads(reply)["error"]
    _assert_still_serving(server, first_reply)


@pytest.mark.compat
def test_negative_content_length_gets_400(server, first_reply):
    status, reply = _post(server.port, CHAT, b"{}", headers={"Content-Length": "-1"})
    assert status == 400 and "Content-Length" in json.loads(reply)["error"]
    _assert_still_serving(server, first_reply)


@pytest.mark.compat
def test_valid_edge_values_are_served(server, first_reply):
    """What the checks must not refuse: ids at the vocabulary's edges, the largest
    top_k, the largest seed, stop words, well-formed tools and tool-call history, a
    completion prompt."""
    vocab = 129280
    ok = [
        chat(logit_bias={"0": -100, str(vocab - 1): 2.5}),
        chat(top_k=vocab - 1, temperature=0.7, seed=2**64 - 1),
        chat(top_k=vocab - 1, temperature=0.7),  # batched (no seed)
        chat(stop=["zzz", ""], tools=[TOOL], response_format={"type": "text"}),
        chat(tools=[], stop="zzz"),
        chat(
            messages=HELLO
            + [
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ]
        ),
        text(prompt="Once upon a time"),
    ]
    for path, request in ok:
        status, body = _post_json(server.port, path, request)
        assert status == 200, f"{request}: HTTP {status}: {body[:300]!r}"
        assert json.loads(body)["choices"]
    _assert_still_serving(server, first_reply)


@pytest.mark.compat
def test_stream_options_without_include_usage_finishes_the_stream(server, first_reply):
    """``stream_options: {}`` is valid; stock reads ``include_usage`` unguarded and
    the stream ended without ``data: [DONE]``."""
    status, body = _post_json(server.port, CHAT, dict(GOOD, stream=True, stream_options={}))
    assert status == 200
    events = [e for e in body.decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(e[6:]) for e in events[:-1])
    _assert_still_serving(server, first_reply)


# --- the chat template's own errors (in-process) ------------------------------------------

from mlx_arch_plugins.deepseek_v4 import chat_template as tmpl  # noqa: E402


@pytest.mark.compat
@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(tools="get_weather"), "tools"),
        (dict(tools=[42]), "tools[0]"),
        (dict(tools=[{"type": "function"}]), "tools[0]"),
        (
            dict(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
            "tools[0].function.parameters",
        ),
        (dict(messages="hello"), "messages"),
        (dict(messages=[42]), "messages[0]"),
        (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (
            dict(messages=HELLO + [{"role": "assistant", "tool_calls": "x"}]),
            "messages[1].tool_calls",
        ),
        (
            dict(messages=HELLO + [{"role": "assistant", "tool_calls": [{"function": {}}]}]),
            "messages[1].tool_calls[0]",
        ),
        (dict(messages=[{"role": "system", "content": "", "tools": "x"}]), "messages[0].tools"),
    ],
)
def test_template_names_the_malformed_field(kwargs, field):
    call = {"messages": HELLO, **kwargs}
    with pytest.raises(tmpl.DeepSeekV4TemplateError) as err:
        tmpl.apply_chat_template(call.pop("messages"), **call)
    assert str(err.value).startswith(field)
    assert err.value.http_status == 400  # what the server patch answers with


@pytest.mark.compat
def test_template_accepts_well_formed_tools_and_calls():
    prompt = tmpl.apply_chat_template(
        HELLO
        + [
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        tools=[TOOL],
    )
    assert '"name": "get_weather"' in prompt and '<｜DSML｜invoke name="get_weather">' in prompt


def test_tools_of_another_type_are_left_to_the_template():
    from mlx_arch_plugins.host.patches.server_requests import check_body

    messages = [{"role": "user", "content": "hi"}]
    # not a function tool: stock passes it to the chat template, and so do we
    check_body({"messages": messages, "tools": [{"type": "custom", "name": "x"}]}, chat=True)
    with pytest.raises(ValueError, match=r"tools\[0\]\.function"):
        check_body({"messages": messages, "tools": [{"type": "function"}]}, chat=True)
