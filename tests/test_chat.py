"""The Qwen3 chat format: the Python renderer, the saved Jinja template and the loss mask.

Three sources are held to each other: `render` (what SFT trains on), the template saved
in the tokenizer directory (what `apply_chat_template` and inference servers use), and
hand-written expected texts of the documented Qwen3 format.
"""

from __future__ import annotations

import pytest

from data_pipeline.chat import BUDGET_STOP, CHAT_TEMPLATE, encode, problem, render

CASES = {
    "single_turn": (
        [{"role": "user", "content": "What is 2+3?"},
         {"role": "assistant", "reasoning_content": "2+3=5.", "content": "\\boxed{5}"}],
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2+3=5.\n</think>\n\n\\boxed{5}<|im_end|>\n"),
    "multi_turn_history_reasoning_dropped": (
        [{"role": "user", "content": "Hi"},
         {"role": "assistant", "reasoning_content": "A greeting.", "content": "Hello!"},
         {"role": "user", "content": "2*4?"},
         {"role": "assistant", "reasoning_content": "Twice four.", "content": "8"}],
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\n2*4?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nTwice four.\n</think>\n\n8<|im_end|>\n"),
    "non_thinking": (
        [{"role": "user", "content": "Name a colour. /no_think"},
         {"role": "assistant", "reasoning_content": "", "content": "Blue."}],
        "<|im_start|>user\nName a colour. /no_think<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nBlue.<|im_end|>\n"),
    "system_message": (
        [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "Capital of France?"},
         {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nParis."}],
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nEasy.\n</think>\n\nParis.<|im_end|>\n"),
    "tool_calls": (
        [{"role": "user", "content": "Weather in Oslo?"},
         {"role": "assistant", "reasoning_content": "Use the tool.", "content": "",
          "tool_calls": [{"type": "function", "function": {"name": "weather",
                                                          "arguments": {"city": "Oslo"}}}]},
         {"role": "tool", "content": "{\"temp\": -3}"},
         {"role": "tool", "content": "{\"wind\": 5}"},
         {"role": "assistant", "reasoning_content": "Cold.", "content": "It is -3 C."}],
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nUse the tool.\n</think>\n\n<tool_call>\n"
        "{\"name\": \"weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"temp\": -3}\n</tool_response>\n<tool_response>\n"
        "{\"wind\": 5}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nCold.\n</think>\n\nIt is -3 C.<|im_end|>\n"),
}


@pytest.fixture(scope="module")
def tokenizer(qwen3_tokenizer_dir):
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(qwen3_tokenizer_dir)
    assert (qwen3_tokenizer_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    return tok


@pytest.mark.parametrize("case", CASES)
def test_render_matches_documented_format(case):
    messages, expected = CASES[case]
    assert render(messages).text == expected


@pytest.mark.parametrize("case", CASES)
def test_ids_match_apply_chat_template(tokenizer, case):
    messages, _ = CASES[case]
    ids, mask = encode(tokenizer, messages)
    reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ids == list(reference)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == render(messages).text
    assert len(mask) == len(ids)


@pytest.mark.parametrize("thinking", [True, False])
def test_generation_prompt(tokenizer, thinking):
    messages = CASES["multi_turn_history_reasoning_dropped"][0][:3]
    text = render(messages, add_generation_prompt=True, enable_thinking=thinking).text
    tail = "<|im_start|>assistant\n" + ("" if thinking else "<think>\n\n</think>\n\n")
    assert text.endswith("<|im_start|>user\n2*4?<|im_end|>\n" + tail)
    assert text == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                 enable_thinking=thinking)


def test_tools_in_system_prompt(tokenizer):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [{"role": "system", "content": "Be brief."}, *CASES["tool_calls"][0]]
    text = render(messages, tools=tools).text
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '\n{"type": "function", "function": {"name": "weather"' in text
    assert text == tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)


def test_loss_mask_token_by_token(tokenizer):
    messages = CASES["multi_turn_history_reasoning_dropped"][0]
    ids, mask = encode(tokenizer, messages)
    pieces = [tokenizer.decode([t]) for t in ids]
    # every maximal run of loss tokens, decoded, is one assistant output
    runs, current = [], []
    for piece, m in zip(pieces, mask):
        if m:
            current.append(piece)
        elif current:
            runs.append("".join(current))
            current = []
    assert runs == ["Hello!<|im_end|>", "<think>\nTwice four.\n</think>\n\n8<|im_end|>"]
    # nothing of the prompts carries loss: system/user turns and the assistant headers
    masked_out = "".join(p for p, m in zip(pieces, mask) if not m)
    assert masked_out == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n\n"
                          "<|im_start|>user\n2*4?<|im_end|>\n<|im_start|>assistant\n\n")


def test_budget_stop_phrase_closes_thinking(tokenizer):
    ids = tokenizer.encode(BUDGET_STOP, add_special_tokens=False)
    assert tokenizer.convert_tokens_to_ids("</think>") in ids
    assert tokenizer.decode(ids) == BUDGET_STOP


@pytest.mark.parametrize("messages, reason", [
    ([], "no_messages"),
    ([{"role": "user", "content": "hi"}], "no_assistant_turn"),
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "bad_role"),
    ([{"role": "user"}, {"role": "assistant", "content": "x"}], "missing_content"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ", "reasoning_content": ""}],
     "empty_assistant_turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"},
      {"role": "user", "content": "more"}], "does_not_end_with_assistant"),
    (CASES["single_turn"][0], None),
])
def test_problem_reasons(messages, reason):
    assert problem(messages) == reason
