"""_server_patch on stand-in classes shaped like mlx_lm.server's (both versions)."""

import importlib
import inspect
import types

import pytest

from mlx_arch_plugins.deepseek_v4 import tool_parser as parser
from mlx_arch_plugins.host.patches import patching
from mlx_arch_plugins.host.patches import server as _server_patch

GOOD = '\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="false">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
BAD_CLOSED = '\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
TRUNCATED = '\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">Ber'


@pytest.fixture()
def server_module():
    """Stand-ins for mlx_lm.server's classes (subclasses holding the stock methods),
    patched by the real apply() and restored around each test."""
    server = importlib.import_module("mlx_lm.server")
    fmt = types.new_class("ToolCallFormatter", (server.ToolCallFormatter,))
    fmt.__call__ = inspect.unwrap(server.ToolCallFormatter.__call__)
    handler = types.new_class("APIHandler", (object,))
    handler.generate_response = inspect.unwrap(server.APIHandler.generate_response)
    module = types.SimpleNamespace(ToolCallFormatter=fmt, APIHandler=handler)
    _server_patch.apply(module)
    yield module
    _undo_stand_ins(module)


def _undo_stand_ins(module):
    # only the stand-ins: the real mlx_lm.server stays patched in this process
    for owner in (module.ToolCallFormatter, module.APIHandler):
        patching.undo(group=_server_patch.__name__, owner=owner)


class _Handler:
    """Just enough state for APIHandler.generate_response."""

    def __init__(self, cls, stream):
        self.obj = cls.__new__(cls)
        self.obj.stream = stream
        self.obj.request_id = "x"
        self.obj.system_fingerprint = "fp"
        self.obj.object_type = "chat.completion.chunk" if stream else "chat.completion"
        self.obj.requested_model = "m"
        self.obj.created = 0

    def __call__(self, text, finish, calls):
        kwargs = dict(tool_calls=calls)
        if not self.obj.stream:
            kwargs.update(prompt_token_count=1, completion_token_count=1)
        return self.obj.generate_response(text, finish, **kwargs)["choices"][0]


@pytest.mark.parametrize("stream", [False, True])
def test_failed_block_becomes_content_and_finish_reason_stop(server_module, stream):
    fmt = server_module.ToolCallFormatter(parser.parse_tool_call, None, stream)
    handler = _Handler(server_module.APIHandler, stream)
    choice = handler("Hi.", "tool_calls", fmt([BAD_CLOSED]))
    msg = choice["delta" if stream else "message"]
    assert msg["content"] == "Hi." + parser.tool_call_start + BAD_CLOSED + parser.tool_call_end
    assert "tool_calls" not in msg
    assert choice["finish_reason"] == "stop"


def test_good_and_bad_blocks_keep_both(server_module):
    fmt = server_module.ToolCallFormatter(parser.parse_tool_call, None, False)
    handler = _Handler(server_module.APIHandler, False)
    choice = handler("", "tool_calls", fmt([GOOD, TRUNCATED]))
    msg = choice["message"]
    assert msg["content"] == parser.tool_call_start + TRUNCATED  # no end marker was seen
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["f"]
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
    assert choice["finish_reason"] == "tool_calls"


def test_other_parsers_keep_stock_behaviour(server_module):
    def other(text, tools):
        raise ValueError("nope")

    fmt = server_module.ToolCallFormatter(other, None, False)
    try:
        out = fmt(["x"])
    except ValueError:
        return  # 0.31 lets the error through
    assert out == [] and not hasattr(out, "unparsed")  # 0.32 drops it


def test_apply_is_idempotent_and_undo_restores(server_module):
    fmt, handler = server_module.ToolCallFormatter, server_module.APIHandler
    stock_call, stock_response = (
        inspect.unwrap(fmt.__call__),
        inspect.unwrap(handler.generate_response),
    )
    patched = fmt.__call__
    assert patched is not stock_call
    _server_patch.apply(server_module)
    assert fmt.__call__ is patched
    _undo_stand_ins(server_module)
    assert fmt.__call__ is stock_call and handler.generate_response is stock_response
    assert not patching.is_patched(fmt, "__call__")
    _server_patch.apply(server_module)  # fixture teardown undoes again


def test_undo_restores_the_real_server_and_apply_repatches():
    """``undo()`` restores every method ``apply`` patched in mlx_lm.server (the six
    of them); ``apply`` installs them again, once."""
    server = importlib.import_module("mlx_lm.server")
    _server_patch.apply(server)  # no-op when the start-up hook already did it
    targets = [(getattr(server, cls), name) for cls, name, _ in _server_patch._PATCHES]
    patched = [getattr(owner, name) for owner, name in targets]
    assert len(targets) == 6 and all(patching.is_patched(o, n) for o, n in targets)
    _server_patch.undo()
    try:
        for (owner, name), value in zip(targets, patched):
            assert getattr(owner, name) is inspect.unwrap(value)
            assert not patching.is_patched(owner, name)
    finally:
        _server_patch.apply(server)
    assert all(patching.is_patched(o, n) for o, n in targets)
    _server_patch.apply(server)
    assert [inspect.unwrap(getattr(o, n)) for o, n in targets] == [
        inspect.unwrap(v) for v in patched
    ]
    assert all(getattr(o, n).__wrapped__ is inspect.unwrap(getattr(o, n)) for o, n in targets)


def test_unparsed_text_reconstruction():
    assert parser.unparsed_text(BAD_CLOSED).endswith("</｜DSML｜invoke>\n</｜DSML｜tool_calls>")
    assert parser.unparsed_text(TRUNCATED) == "\n\n<｜DSML｜tool_calls>" + TRUNCATED
