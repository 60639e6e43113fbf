"""Tokenizer wiring for deepseek_v4 checkpoints and the tokenizer.json fallback."""

import json

import pytest
from helpers import chat_support as cs

from mlx_arch_plugins.deepseek_v4 import chat_template as tmpl
from mlx_arch_plugins.host.patches import patching, tokenizer_fallback
from mlx_arch_plugins.host.patches import tokenizer as _tokenizer_patch

ENCODE = {c["id"]: c for c in cs.encode_cases()}
TOOL_CASE = ENCODE["enc-014-single-tool-call-roundtrip"]


def _render(wrapper, case, **kwargs):
    return wrapper.apply_chat_template(
        case["mlx_server_template_input"]["messages"],
        tools=case["tools"],
        add_generation_prompt=True,
        thinking_mode=case["thinking_mode"],
        **kwargs,
    )


@pytest.fixture()
def tu():
    return cs.ensure_plugin()


@pytest.fixture()
def transformers_broken(tu, monkeypatch):
    """AutoTokenizer fails like transformers versions that do not know the checkpoint."""
    calls = []

    def fail(*args, **kwargs):
        calls.append(args)
        raise ValueError(
            "Tokenizer class TokenizersBackend does not exist or is not currently imported."
        )

    monkeypatch.setattr(tu.AutoTokenizer, "from_pretrained", fail)
    return calls


def test_shipped_toolless_jinja_is_replaced_by_official_encoder(tu, tmp_path):
    folder = cs.make_checkpoint(tmp_path, jinja=cs.COMMUNITY_JINJA.encode("utf-8"))
    wrapper = tu.load(folder)
    assert wrapper._tokenizer.chat_template  # transformers did read the file
    assert _render(wrapper, TOOL_CASE) == TOOL_CASE["expected_token_ids"]
    assert wrapper.has_tool_calling


def test_explicit_user_template_wins(tu, tmp_path):
    folder = cs.make_checkpoint(tmp_path, jinja=cs.COMMUNITY_JINJA.encode("utf-8"))
    wrapper = tu.load(folder, {"chat_template": "{{ bos_token }}X{{ messages[0]['content'] }}"})
    text = wrapper.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == cs.BOS + "Xhi"
    # The tool parser is still the DSML one.
    assert wrapper.tool_call_start == "\n\n<｜DSML｜tool_calls>"


def test_chat_template_type_in_checkpoint_config_is_respected(tu, tmp_path, monkeypatch):
    import sys
    import types

    fake = types.ModuleType("mlx_lm.chat_templates.chat_test_fake")
    fake.apply_chat_template = lambda messages, **kwargs: cs.BOS + "FAKE"
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    folder = cs.make_checkpoint(tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template_type"] = "chat_test_fake"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    wrapper = tu.load(folder)
    text = wrapper.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == cs.BOS + "FAKE"
    assert wrapper.has_tool_calling  # the DSML parser is still added


def test_other_model_types_are_untouched(tu, tmp_path):
    folder = cs.make_checkpoint(tmp_path, config={"model_type": "deepseek_v3"})
    wrapper = tu.load(folder)
    assert wrapper._chat_template is None
    assert not wrapper.has_tool_calling
    assert _tokenizer_patch.served_settings(folder) is None


def test_fallback_when_transformers_cannot_build_tokenizer(tu, tmp_path, transformers_broken):
    folder = cs.make_checkpoint(tmp_path)
    wrapper = tu.load(folder)
    assert transformers_broken, "AutoTokenizer was not tried first"
    tok = wrapper._tokenizer
    assert (tok.bos_token, tok.eos_token) == (cs.BOS, cs.EOS)
    assert wrapper.eos_token_ids == {1}
    assert wrapper.has_thinking and wrapper.has_tool_calling
    for cid in (
        "enc-001-user-only-chat",
        "enc-014-single-tool-call-roundtrip",
        "enc-040-non-ascii",
    ):
        case = ENCODE[cid]
        assert _render(wrapper, case) == case["expected_token_ids"]
        assert tok.decode(case["expected_token_ids"]) == case["expected_prompt"]
    # Streaming detokenizer over a DSML completion.
    dec = next(c for c in cs.decode_cases() if c["id"] == "dec-004-thinking-content-and-tool-call")
    detok = wrapper.detokenizer
    detok.reset()
    for t in dec["completion_token_ids"]:
        detok.add_token(t)
    detok.finalize()
    assert detok.text == dec["completion_text"]


def test_fallback_checkpoint_with_only_tokenizer_json_and_jinja(tu, tmp_path, transformers_broken):
    # No tokenizer_config.json / generation_config.json; a BOM-prefixed template file.
    folder = cs.make_checkpoint(
        tmp_path,
        tokenizer_config=False,
        generation_config=False,
        jinja=b"\xef\xbb\xbf" + cs.COMMUNITY_JINJA.encode("utf-8"),
    )
    tok = tokenizer_fallback.load_tokenizer(folder)
    assert tok.chat_template == cs.COMMUNITY_JINJA  # BOM stripped
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == (cs.BOS, cs.EOS, 1)
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi", add_special_tokens=False)

    wrapper = tu.load(folder)
    assert transformers_broken
    case = ENCODE["enc-012-tools-no-system-chat"]
    assert _render(wrapper, case) == case["expected_token_ids"]

    # With the user's explicit choice of the shipped Jinja template, it renders.
    wrapper = tu.load(folder, {"chat_template": cs.COMMUNITY_JINJA})
    text = wrapper.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == cs.BOS + "<｜User｜>Hi<｜Assistant｜></think>"


def test_fallback_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v4"}', encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenizer_fallback.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        tokenizer_fallback.load_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "x"}', encoding="utf-8")
    with pytest.raises(ValueError, match="generation_config.json"):
        tokenizer_fallback.eos_token_ids(tmp_path)


def test_eos_ids_from_generation_config(tu, tmp_path):
    folder = cs.make_checkpoint(tmp_path)
    (folder / "generation_config.json").write_text(
        '{"eos_token_id": [1, 128805]}', encoding="utf-8"
    )
    assert tokenizer_fallback.eos_token_ids(folder) == [1, 128805]
    assert tu.load(folder).eos_token_ids == {1, 128805}
    # An explicit list from the caller (config.json via mlx_lm.utils) wins.
    assert tu.load(folder, None, [1]).eos_token_ids == {1}


def test_apply_is_idempotent_and_undo_restores(tmp_path):
    import types

    calls = []

    def original(model_path, tokenizer_config_extra=None, eos_token_ids=None, defaults=None):
        calls.append(tokenizer_config_extra)
        return "loaded"

    fake = types.SimpleNamespace(load=original, AutoTokenizer=object())
    try:
        _tokenizer_patch.apply(fake)
        first = fake.load
        _tokenizer_patch.apply(fake)
        assert fake.load is first and first is not original
        folder = cs.make_checkpoint(tmp_path)
        assert fake.load(folder) == "loaded"
        assert calls[-1]["chat_template_type"] == "deepseek_v4"
        assert calls[-1]["tool_parser_type"] == "deepseek_v4"
        _tokenizer_patch.undo(fake)
        assert fake.load is original
    finally:
        _tokenizer_patch.undo(fake)


def test_mlx_lm_load_path_uses_patch(tu, tmp_path):
    """mlx_lm.utils.load_tokenizer (what mlx_lm.load calls) reaches the wrapper."""
    import mlx_lm.utils as mu

    folder = cs.make_checkpoint(tmp_path)
    wrapper = mu.load_tokenizer(folder, eos_token_ids=1)
    assert _render(wrapper, TOOL_CASE) == TOOL_CASE["expected_token_ids"]


def test_undo_and_reapply_on_real_module(tu, tmp_path):
    import mlx_lm.utils as mu

    folder = cs.make_checkpoint(tmp_path)
    _tokenizer_patch.undo()
    try:
        assert not patching.is_patched(tu, "load")
        assert not patching.is_patched(mu, "_load_tokenizer")
        plain = tu.load(folder)
        # Stock 0.32 without defaults: no template, no parser for this checkpoint.
        assert plain._chat_template is None and not plain.has_tool_calling
    finally:
        _tokenizer_patch.apply(tu)
    assert patching.is_patched(mu, "_load_tokenizer")
    assert tu.load(folder)._chat_template is tmpl.apply_chat_template


@pytest.mark.parametrize(
    "source,release",
    [
        (
            'REASONING_EFFORT_MAX = "Reasoning Effort: Absolute maximum ..."\n',
            "v4-2604",
        ),
        (
            "REASONING_EFFORT_PROMPTS = {'low': '', 'high': '...', 'max': '...'}\n",
            "v4-0731",
        ),
        (None, "v4-0731"),
    ],
)
def test_release_follows_the_checkpoint_encoder(tu, tmp_path, source, release):
    folder = cs.make_checkpoint(tmp_path)
    if source is not None:
        (folder / "encoding").mkdir()
        (folder / "encoding" / "encoding_dsv4.py").write_text(source, encoding="utf-8")
    assert tmpl.detect_release(folder) == (release if source else None)
    wrapper = tu.load(folder)
    case = ENCODE[f"enc-032-effort-high-thinking@{release}"]
    msgs = case["mlx_server_template_input"]["messages"]
    ids = wrapper.apply_chat_template(msgs, thinking_mode="thinking", reasoning_effort="high")
    assert ids == case["expected_token_ids"]
    # A release passed at call time still wins.
    other = "v4-2604" if release == "v4-0731" else "v4-0731"
    want = ENCODE[f"enc-032-effort-high-thinking@{other}"]["expected_token_ids"]
    assert (
        wrapper.apply_chat_template(
            msgs,
            thinking_mode="thinking",
            reasoning_effort="high",
            encoder_release=other,
        )
        == want
    )
