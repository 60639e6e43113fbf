"""End to end: unchanged ``mlx_lm chat`` on a tiny DeepSeek-V4 checkpoint, two
turns typed on stdin, greedy."""

import pytest
from helpers import e2e_support as es

pytestmark = pytest.mark.compat

N_TOKENS = 3
TURNS = ["What is the capital of France?", "And of Italy, in one word?"]


def test_chat_two_turns_through_stdin(tmp_path_factory):
    """Each turn's streamed reply equals a no-cache greedy decode of everything the
    chat's cache holds at that point: mlx_lm.chat keeps one cache across turns
    and sends only the new user message, so turn 2 sees turn 1's prompt, turn 1's
    generated tokens (all of them are fed back by generate_step) and turn 2's
    prompt."""
    ckpt = es.tiny_checkpoint(tmp_path_factory)
    r = es.run_mlx_lm(
        "chat",
        "--model",
        ckpt,
        "--max-tokens",
        N_TOKENS,
        "--temp",
        "0.0",
        input="\n".join(TURNS + ["q"]) + "\n",
    )
    model, tok = es.load_in_process(ckpt)
    context = []
    expected = []
    for turn in TURNS:
        ids = es.chat_prompt_ids(tok, [{"role": "user", "content": turn}])
        gen = es.reference_greedy(model, context + ids, N_TOKENS, tok.eos_token_ids)
        expected.append(es.greedy_text(tok, gen))
        context += ids + gen
    assert all(expected)
    assert expected[0] != expected[1]
    out = r.stdout
    first = out.find(expected[0])
    assert first >= 0, f"turn 1 reply {expected[0]!r} not in:\n{out}"
    second = out.find(expected[1], first + len(expected[0]))
    assert second >= 0, f"turn 2 reply {expected[1]!r} not after turn 1 in:\n{out}"
