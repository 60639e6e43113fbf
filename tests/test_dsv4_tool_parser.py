"""DeepSeek-V4 DSML parsing: reference acceptance rules and the mlx-lm streaming path."""

import json

import pytest
from helpers import chat_support as cs

from mlx_arch_plugins.deepseek_v4 import tool_parser as parser

DECODE = cs.decode_cases()


def _ids(cases):
    return [c["id"] for c in cases]


def _arguments(call_json):
    try:
        return json.loads(call_json)
    except ValueError:
        return None


@pytest.mark.parametrize("case", DECODE, ids=_ids(DECODE))
def test_parse_completion_matches_reference(case):
    exp = case["expected"]
    if not exp["ok"]:
        with pytest.raises(parser.DSMLParseError):
            parser.parse_completion(case["completion_text"], case["thinking_mode"])
        return
    got = parser.parse_completion(case["completion_text"], case["thinking_mode"])
    assert got["role"] == "assistant"
    assert got["reasoning_content"] == exp["reasoning_content"]
    assert got["content"] == exp["content"]
    assert [c["function"]["name"] for c in got["tool_calls"]] == [
        c["function"]["name"] for c in exp["tool_calls"]
    ]
    for call, want in zip(got["tool_calls"], exp["tool_call_arguments_parsed"]):
        args = _arguments(call["function"]["arguments"])
        if "__invalid_json__" in want:
            assert args is None  # the reference emits invalid JSON here too
        else:
            assert args == want


def _server_pipeline(wrapper, token_ids, initial_state):
    """Decode token by token and split text like mlx_lm.server's handle_completion."""
    gen = pytest.importorskip("mlx_lm.generate")
    if not hasattr(gen, "TextStateMachine"):
        pytest.skip("this mlx-lm matches markers on tokens (< 0.32); see test_chat_server")
    TextStateMachine, make_text_state_machine = gen.TextStateMachine, gen.make_text_state_machine

    sm = make_text_state_machine(wrapper)
    state = sm.make_state(initial_state)
    detok = wrapper.detokenizer
    detok.reset()
    out = {"reasoning": "", "content": "", "tool_texts": []}
    tool_text, prev = "", initial_state
    for tok in token_ids:
        detok.add_token(tok)
        state, segments = TextStateMachine.split(state, detok.last_segment)
        for name, text in segments:
            if name == "reasoning":
                out["reasoning"] += text
            elif name == "tool":
                tool_text += text
            elif name == "normal":
                if prev == "tool":
                    out["tool_texts"].append(tool_text)
                    tool_text = ""
                out["content"] += text
            prev = name
    # The final EOS is not decoded; the server discards the held buffer on stop.
    detok.finalize()
    state, segments = TextStateMachine.split(state, detok.last_segment)
    for name, text in segments:
        if name == "tool":
            tool_text += text
        elif name == "reasoning":
            out["reasoning"] += text
        elif name == "normal":
            out["content"] += text
    if tool_text:
        out["tool_texts"].append(tool_text)
    return out


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory):
    tu = cs.ensure_plugin()
    return tu.load(cs.make_checkpoint(tmp_path_factory.mktemp("dsv4_parse")))


OK_CASES = [c for c in DECODE if c["expected"]["ok"] and c["completion_text"].endswith(cs.EOS)]


@pytest.mark.parametrize("case", OK_CASES, ids=_ids(OK_CASES))
def test_server_split_and_parse_tool_call(wrapper, case):
    """Token stream -> state machine -> parse_tool_call gives the reference message."""
    assert wrapper.tool_call_start == parser.tool_call_start
    ids = case["completion_token_ids"]
    assert ids[-1] == 1  # EOS: the server stops on it without decoding it
    initial = "reasoning" if case["thinking_mode"] == "thinking" else "normal"
    got = _server_pipeline(wrapper, ids[:-1], initial)
    exp = case["expected"]
    assert got["reasoning"] == exp["reasoning_content"]
    if got["content"] != exp["content"]:
        # Documented cost of a start marker that begins with "\n\n": trailing
        # newlines right before EOS are held as a possible marker and discarded.
        assert exp["content"].rstrip("\n") == got["content"]
        assert exp["content"].endswith("\n")
    calls = []
    for text in got["tool_texts"]:
        calls.extend(wrapper.tool_parser(text, None))
    assert [c["name"] for c in calls] == [c["function"]["name"] for c in exp["tool_calls"]]
    for call, want in zip(calls, exp["tool_call_arguments_parsed"]):
        assert isinstance(call["arguments"], dict)
        if "__invalid_json__" in want:
            # string="false" but not JSON: the raw text is kept as a string value.
            assert call["arguments"]["num_results"] == "five"
        else:
            assert call["arguments"] == want
        json.dumps(call["arguments"], ensure_ascii=False)


@pytest.mark.parametrize(
    "text,match",
    [
        ('\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a" string="true">x', "not closed"),
        (
            '\n<｜DSML｜invoke name="f">\n<｜DSML｜parameter name="a">1</｜DSML｜parameter>\n</｜DSML｜invoke>\n',
            "string",
        ),
        ("\nhello\n", "Invoke format error"),
        ("\n", "no invoke"),
        (
            '\n<｜DSML｜invoke name="f">\n'
            '<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="a" string="true">2</｜DSML｜parameter>\n</｜DSML｜invoke>\n',
            "Duplicate parameter name 'a'",
        ),
    ],
)
def test_malformed_tool_text_raises_value_error(text, match):
    with pytest.raises(ValueError, match=match):
        parser.parse_tool_call(text, None)


def test_parse_tool_call_types_and_multiple_invokes():
    text = (
        "\n"
        '<｜DSML｜invoke name="a">\n'
        '<｜DSML｜parameter name="s" string="true">  spaced "q" \n line</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">-2.5e3</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="o" string="false">{"k": [null, true]}</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="b">\n\n</｜DSML｜invoke>\n'
    )
    assert parser.parse_tool_call(text, None) == [
        {
            "name": "a",
            "arguments": {"s": '  spaced "q" \n line', "n": -2500.0, "o": {"k": [None, True]}},
        },
        {"name": "b", "arguments": {}},
    ]


def test_marker_matching_survives_bpe_merges(wrapper):
    """'.\\n\\n' is one token before the block: the start marker must match on text."""
    text = (
        'Sure.\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="x" string="false">1</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>"
    )
    ids = wrapper.encode(text, add_special_tokens=False)
    start_ids = wrapper.encode(parser.tool_call_start, add_special_tokens=False)
    assert not any(ids[i : i + len(start_ids)] == start_ids for i in range(len(ids)))
    got = _server_pipeline(wrapper, ids, "normal")
    assert got["content"] == "Sure."
    assert [wrapper.tool_parser(t, None) for t in got["tool_texts"]] == [
        [{"name": "f", "arguments": {"x": 1}}]
    ]


def test_reasoning_opened_in_chat_mode_is_separated(wrapper):
    ids = wrapper.encode("<think>hmm</think>Answer.", add_special_tokens=False)
    got = _server_pipeline(wrapper, ids, "normal")
    assert (got["reasoning"], got["content"]) == ("hmm", "Answer.")
