"""DeepSeek-V4 chat template: official encoder outputs, mlx-lm request shape, wiring."""

import copy
import json

import pytest
from helpers import chat_support as cs

from mlx_arch_plugins.deepseek_v4 import chat_template as tmpl

ENCODE = cs.encode_cases()
RUNS = [
    pytest.param(case, release, id=f"{case['id']}|{release}")
    for case in ENCODE
    for release in case["same_output_for_releases"]
]
SERVER_RUNS = [
    p
    for p in RUNS
    if p.values[0]["mlx_server_template_input"].get("error") is None
    and p.values[0]["expected_error"] is None
]


def _server_kwargs(case, release):
    kwargs = {
        "thinking_mode": case["thinking_mode"],
        "reasoning_effort": case["reasoning_effort"],
        "encoder_release": release,
    }
    if "drop_thinking" in case["encoder_call"]["kwargs"]:
        kwargs["drop_thinking"] = case["encoder_call"]["kwargs"]["drop_thinking"]
    return kwargs


@pytest.fixture(scope="module")
def wrapper(tmp_path_factory):
    """The TokenizerWrapper mlx_lm.tokenizer_utils.load returns for a deepseek_v4 checkpoint."""
    tu = cs.ensure_plugin()
    folder = cs.make_checkpoint(tmp_path_factory.mktemp("dsv4_tok"))
    return tu.load(folder)


@pytest.mark.parametrize("case,release", RUNS)
def test_encode_messages_matches_official(case, release):
    call = case["encoder_call"]
    if case["expected_error"]:
        with pytest.raises(tmpl.DeepSeekV4TemplateError, match="reasoning_effort"):
            tmpl.encode_messages(call["messages"], release=release, **call["kwargs"])
        return
    got = tmpl.encode_messages(call["messages"], release=release, **call["kwargs"])
    assert got == case["expected_prompt"]


@pytest.mark.parametrize("case,release", SERVER_RUNS)
def test_apply_chat_template_on_server_input(case, release):
    """What mlx_lm.server hands over (dict arguments, tools as kwarg) renders officially."""
    messages = case["mlx_server_template_input"]["messages"]
    before = copy.deepcopy(messages)
    got = tmpl.apply_chat_template(
        messages, tools=case["tools"], add_generation_prompt=True, **_server_kwargs(case, release)
    )
    assert got == case["expected_prompt"]
    assert messages == before, "the template must not modify the caller's messages"


@pytest.mark.parametrize("case,release", SERVER_RUNS)
def test_no_generation_prompt_drops_only_the_suffix(case, release):
    got = tmpl.apply_chat_template(
        case["mlx_server_template_input"]["messages"],
        tools=case["tools"],
        add_generation_prompt=False,
        **_server_kwargs(case, release),
    )
    expected = case["expected_prompt"]
    suffix = case["generation_prompt_suffix"]
    assert got == expected[: len(expected) - len(suffix)]


@pytest.mark.parametrize("case,release", SERVER_RUNS)
def test_wrapper_from_mlx_lm_load_renders_string_and_ids(wrapper, case, release):
    messages = case["mlx_server_template_input"]["messages"]
    kwargs = _server_kwargs(case, release)
    text = wrapper.apply_chat_template(
        messages, tools=case["tools"], add_generation_prompt=True, tokenize=False, **kwargs
    )
    assert text == case["expected_prompt"]
    ids = wrapper.apply_chat_template(
        messages, tools=case["tools"], add_generation_prompt=True, **kwargs
    )
    assert ids == case["expected_token_ids"]


@pytest.mark.parametrize("case,release", SERVER_RUNS)
def test_enable_thinking_switch_selects_mode(wrapper, case, release):
    """Without thinking_mode, mlx-lm's enable_thinking flag decides the mode."""
    kwargs = _server_kwargs(case, release)
    mode = kwargs.pop("thinking_mode")
    text = wrapper.apply_chat_template(
        case["mlx_server_template_input"]["messages"],
        tools=case["tools"],
        add_generation_prompt=True,
        tokenize=False,
        enable_thinking=(mode == "thinking"),
        **kwargs,
    )
    assert text == case["expected_prompt"]


def test_wrapper_defaults_to_thinking_mode(wrapper):
    # mlx-lm passes enable_thinking=True for a vocabulary with <think>.
    text = wrapper.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == cs.BOS + "<｜User｜>Hi<｜Assistant｜><think>"
    assert wrapper.has_thinking and wrapper.has_tool_calling and wrapper.has_chat_template


@pytest.mark.parametrize(
    "case",
    [c for c in ENCODE if any(m.get("reasoning_content") for m in c["messages"])],
    ids=lambda c: c["id"],
)
def test_reasoning_field_is_accepted_like_reasoning_content(case):
    release = case["same_output_for_releases"][0]
    if case["expected_error"] or case["mlx_server_template_input"].get("error"):
        pytest.skip("no server rendering for this case")
    messages = copy.deepcopy(case["mlx_server_template_input"]["messages"])
    for m in messages:
        if "reasoning_content" in m:
            m["reasoning"] = m.pop("reasoning_content")
    got = tmpl.apply_chat_template(messages, tools=case["tools"], **_server_kwargs(case, release))
    assert got == case["expected_prompt"]


def test_default_release_is_0731():
    case = next(c for c in ENCODE if c["id"] == "enc-031-effort-max-thinking@v4-0731")
    kwargs = dict(case["encoder_call"]["kwargs"])
    assert (
        tmpl.encode_messages(case["encoder_call"]["messages"], **kwargs) == case["expected_prompt"]
    )
    assert tmpl.DEFAULT_RELEASE == "v4-0731"


def test_low_effort_error_names_value_and_release():
    with pytest.raises(ValueError) as info:
        tmpl.apply_chat_template(
            [{"role": "user", "content": "x"}],
            thinking_mode="thinking",
            reasoning_effort="low",
            encoder_release="v4-2604",
        )
    assert "'low'" in str(info.value) and "v4-2604" in str(info.value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"encoder_release": "v5"}, "encoder_release"),
        ({"thinking_mode": "deep"}, "thinking_mode"),
        ({"reasoning_effort": "medium"}, "reasoning_effort"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tmpl.apply_chat_template([{"role": "user", "content": "x"}], **kwargs)


def test_unknown_role_is_rejected_with_its_index():
    with pytest.raises(ValueError, match=r"messages\[1\].*'narrator'"):
        tmpl.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "narrator", "content": "y"}]
        )


def test_server_prompt_cache_segmentation_call(wrapper):
    """mlx_lm.server renders system messages + an empty user with add_generation_prompt=False
    and uses the common prefix with the real prompt as the cached system segment."""
    for case in ENCODE:
        msgs = case["mlx_server_template_input"]["messages"]
        if case["expected_error"] or case["mlx_server_template_input"].get("error"):
            continue
        if msgs[-1]["role"] != "user" or msgs[0]["role"] != "system":
            continue
        n = next(i for i, m in enumerate(msgs) if m["role"] != "system")
        kwargs = _server_kwargs(case, case["same_output_for_releases"][0])
        sys_text = wrapper.apply_chat_template(
            msgs[:n] + [{"role": "user", "content": ""}],
            tools=case["tools"],
            add_generation_prompt=False,
            tokenize=False,
            **kwargs,
        )
        assert sys_text.endswith("<｜User｜>")
        # The shared prefix covers the whole system part (tools included).
        assert case["expected_prompt"].startswith(sys_text[: -len("<｜User｜>")])


def test_response_format_kwarg_goes_on_the_system_message():
    case = next(c for c in ENCODE if c["id"] == "enc-029-response-format-and-tools")
    schema = case["encoder_call"]["messages"][0]["response_format"]
    messages = copy.deepcopy(case["mlx_server_template_input"]["messages"])
    for m in messages:
        m.pop("response_format", None)
    got = tmpl.apply_chat_template(
        messages,
        tools=case["tools"],
        thinking_mode=case["thinking_mode"],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    assert got == case["expected_prompt"]


def test_continue_final_message_leaves_assistant_open():
    case = next(c for c in ENCODE if c["id"] == "enc-046-assistant-wo-eos-prefill")
    messages = [{k: v for k, v in m.items() if k != "wo_eos"} for m in case["messages"]]
    got = tmpl.apply_chat_template(
        messages, thinking_mode="chat", add_generation_prompt=False, continue_final_message=True
    )
    assert got == case["expected_prompt"]


def test_tokenizer_defaults_name_this_package_modules():
    import importlib

    for key in ("chat_template_type", "tool_parser_type"):
        name = tmpl.TOKENIZER_DEFAULTS[key]
        prefix = "mlx_lm.chat_templates." if key == "chat_template_type" else "mlx_lm.tool_parsers."
        cs.ensure_plugin()
        mod = importlib.import_module(prefix + name)
        assert mod.__name__.startswith(("mlx_arch_plugins.", "mlx_lm."))
    assert json.dumps(tmpl.TOKENIZER_DEFAULTS)


def test_template_tokens_are_single_vocabulary_tokens(wrapper):
    """Every control string the encoder writes is one added token of the real vocabulary."""
    table = {t["content"]: t["id"] for t in cs.load_cases("special_tokens.json")["added_tokens"]}
    strings = [
        tmpl.BOS,
        tmpl.EOS,
        tmpl.USER,
        tmpl.ASSISTANT,
        tmpl.THINK_START,
        tmpl.THINK_END,
        tmpl.DSML,
        tmpl.LATEST_REMINDER,
        *tmpl.TASK_TOKENS.values(),
    ]
    for s in strings:
        assert s in table, s
        assert wrapper.encode(s, add_special_tokens=False) == [table[s]], s


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="task 'nope'"):
        tmpl.encode_messages(
            [{"role": "user", "content": "q", "task": "nope"}], thinking_mode="chat"
        )


def test_cache_prompt_and_generate_query_split(wrapper):
    """mlx_lm.cache_prompt renders the user turn without generation prompt; mlx_lm.generate
    then cuts its prompt at "<query>" and appends only the rest to the cached tokens."""
    cached = wrapper.apply_chat_template(
        [{"role": "user", "content": "Long context."}],
        add_generation_prompt=False,
        continue_final_message=True,
        tokenize=False,
    )
    assert cached == cs.BOS + "<｜User｜>Long context."
    full = wrapper.apply_chat_template(
        [{"role": "user", "content": "Long context.<query>"}], tokenize=False
    )
    assert full == cs.BOS + "<｜User｜>Long context.<query><｜Assistant｜><think>"
