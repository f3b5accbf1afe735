"""Rule-based rewards: format checks and instruction following, on crafted outputs whose
scores are worked out by hand, and on junk that must score 0.0 without raising."""

from __future__ import annotations

import json
import math
import sys

import pytest

from data_pipeline.chat import render
from recipes.rewards import REWARDS, get_reward, reference_problem, safe_reward
from recipes.rewards.rules import (format_boxed, format_think, instruction_problems, instruction_results,
                                   instructions, instructions_all, no_think, split_think)
from tests.conftest import run

RULE_REWARDS = ("format_think", "format_boxed", "no_think", "instructions", "instructions_all")


@pytest.mark.parametrize("response, expected", [
    ("<think>\nreason\n</think>\n\nThe answer.<|im_end|>", 1.0),
    ("  <think>r</think>answer", 1.0),                            # leading whitespace is fine
    ("<think>\n\n</think>\n\nanswer", 1.0),                       # an empty block is well-formed
    ("<think>\nr\n</think>.\n\nanswer", 1.0),                     # after the thinking-budget stop phrase
    ("<think>r</think>answer<|endoftext|>", 1.0),
    ("just an answer", 0.0),                                      # no block
    ("<think>a</think>b<think>c</think>d", 0.0),                  # two blocks
    ("<think>still thinking", 0.0),                               # unclosed
    ("<think>a<think>b</think>c</think>d", 0.0),                  # nested
    ("<think>r</think>\n\n<|im_end|>", 0.0),                      # empty answer
    ("<think>r</think>.\n\n", 0.0),                               # only the budget stop's '.'
    ("preamble <think>r</think> answer", 0.0),                    # block not at the start
    ("r</think> answer", 0.0),                                    # stray close
    ("<think>r</think>answer<|im_end|><|im_start|>user\nhi", 0.0),  # ran into the next turn
])
def test_format_think(response, expected):
    assert format_think(response, None) == expected


@pytest.mark.parametrize("response, expected", [
    ("<think>r</think>So \\boxed{42}.<|im_end|>", 1.0),
    ("<think>r</think>\\fbox{7}", 1.0),
    ("<think>r</think>\\boxed{\\frac{1}{2}}", 1.0),               # nested braces are one box
    ("<think>\\boxed{1}</think>no box", 0.0),                     # a box in the thinking does not count
    ("<think>r</think>\\boxed{1} or \\boxed{2}", 0.0),            # two boxes
    ("<think>r</think>\\boxed{1", 0.0),                           # cut off
    ("<think>r</think>\\boxed{1} and \\boxed{2", 0.0),            # one complete, one cut off
    ("<think>r</think>\\boxed{ }", 0.0),                          # empty
    ("<think>r</think>\\boxed{\\boxed{1}}", 0.0),                 # a box in a box
    ("\\boxed{3}", 0.0),                                          # no think block
    ("<think>r</think>\\boxed{3}</think>", 0.0),                  # malformed block
])
def test_format_boxed(response, expected):
    assert format_boxed(response, None) == expected


@pytest.mark.parametrize("response, expected", [
    ("The answer is 4.<|im_end|>", 1.0),                          # the prompt already had the empty block
    ("<think>\n\n</think>\n\nThe answer is 4.", 1.0),
    ("<think> \n </think>4", 1.0),
    ("<think>\nlet me think\n</think>\n\n4", 0.0),
    ("<think>\n\n</think>\n\n", 0.0),
    ("<|im_end|>", 0.0),
    ("4</think>", 0.0),
    ("<think>\n\n</think>\n\n4<|im_start|>assistant\n4", 0.0),
])
def test_no_think(response, expected):
    assert no_think(response, None) == expected


def test_format_rewards_on_the_chat_formats_own_assistant_turns():
    def assistant_output(reasoning: str) -> str:
        messages = [{"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "It is \\boxed{4}.", "reasoning_content": reasoning}]
        rendered = render(messages)
        (start, end), = rendered.loss_spans
        return rendered.text[start:end]

    thinking, plain = assistant_output("2 and 2 make 4."), assistant_output("")
    assert thinking.endswith("<|im_end|>") and plain.startswith("<think>\n\n</think>")
    assert (format_think(thinking), format_boxed(thinking), no_think(thinking)) == (1.0, 1.0, 0.0)
    assert (format_think(plain), format_boxed(plain), no_think(plain)) == (1.0, 1.0, 1.0)
    assert split_think(thinking) == ("\n2 and 2 make 4.\n", "It is \\boxed{4}.")


def _score(answer: str, spec) -> float:
    return instructions(f"<think>\nplan\n</think>\n\n{answer}<|im_end|>", spec)


@pytest.mark.parametrize("answer, spec, expected", [
    ("one two three", {"max_words": 3}, 1.0),
    ("one two three", {"max_words": 2}, 0.0),
    ("one two three", {"min_words": 3}, 1.0),
    ("one two three", {"min_words": 4}, 0.0),
    ("我喜欢苹果", {"max_words": 5}, 1.0),                          # a CJK character is a word
    ("我喜欢苹果", {"max_words": 4}, 0.0),
    ("First one. Second one! Third?", {"max_sentences": 3}, 1.0),
    ("First one. Second one! Third?", {"max_sentences": 2}, 0.0),
    ("Pi is 3.14 exactly.", {"max_sentences": 1}, 1.0),          # a decimal point ends nothing
    ("Line one\nLine two", {"min_sentences": 2}, 1.0),
    ("Line one\nLine two", {"min_sentences": 3}, 0.0),
    ("I like apples and pears", {"include": ["apples", "PEARS"]}, 1.0),
    ("I like apples and pears", {"include": "pears"}, 1.0),
    ("I like apples and pears", {"include": ["apple"]}, 0.0),    # whole words
    ("I like apples and pears", {"include": ["apples", "kiwi"]}, 0.0),
    ("我喜欢苹果", {"include": ["苹果"]}, 1.0),
    ("用Python写", {"include": ["python"]}, 1.0),
    ("I like apples", {"exclude": ["banana"]}, 1.0),
    ("I like apples", {"exclude": ["APPLES"]}, 0.0),
    ("I like pineapples", {"exclude": ["apples"]}, 1.0),
    ('{"a": 1}', {"format": "json"}, 1.0),
    ('```json\n[1, 2]\n```', {"format": "json"}, 1.0),
    ("42", {"format": "json"}, 0.0),                              # a scalar is not a JSON answer
    ('{"a": 1', {"format": "json"}, 0.0),
    ('Here: {"a": 1}', {"format": "json"}, 0.0),
    ("Fruits:\n- apple\n- pear\n  (ripe)", {"format": "bullet_list"}, 1.0),
    ("* a\n* b", {"format": "bullet_list"}, 1.0),
    ("- a\nplain prose", {"format": "bullet_list"}, 0.0),
    ("1. a\n2. b", {"format": "bullet_list"}, 0.0),
    ("**bold** text", {"format": "bullet_list"}, 0.0),
    ("1. a\n2) b\n   - detail", {"format": "numbered_list"}, 1.0),
    ("Steps:\n1. a\n2. b", {"format": "numbered_list"}, 1.0),
    ("- a\n- b", {"format": "numbered_list"}, 0.0),
    ("1.5 is a number", {"format": "numbered_list"}, 0.0),
    ("The quick brown fox.", {"language": "en"}, 1.0),
    ("Быстрая рыжая лиса.", {"language": "ru"}, 1.0),
    ("Быстрая рыжая лиса.", {"language": "en"}, 0.0),
    ("这是中文的句子。", {"language": "zh"}, 1.0),
    ("这是中文的句子。", {"language": "zh-CN"}, 1.0),
    ("这是中文的句子。", {"language": "ja"}, 0.0),
    ("これは日本語の文章です。", {"language": "ja"}, 1.0),
    ("これは日本語の文章です。", {"language": "zh"}, 0.0),
    ("안녕하세요 여러분", {"language": "ko"}, 1.0),
    # 12 CJK characters outweigh 4 Latin words
    ("Use the Python API 来调用这个函数并返回结果", {"language": "zh"}, 1.0),
    ("Use the Python API 来调用这个函数并返回结果", {"language": "en"}, 0.0),
    ("Dear Sir, hello", {"starts_with": "Dear"}, 1.0),
    ("Dear Sir, hello", {"starts_with": "dear"}, 0.0),           # exact case
    ("Thanks. Any other questions?", {"ends_with": "Any other questions?"}, 1.0),
    ("Thanks. Any other questions?", {"ends_with": "any other questions?"}, 0.0),
    ("Any other questions? Bye", {"ends_with": "Any other questions?"}, 0.0),
    ("all lower case here", {"lowercase": True}, 1.0),
    ("Not lower", {"lowercase": True}, 0.0),
    ("12345", {"lowercase": True}, 0.0),                          # no letters to be lower case
    ("ALL CAPS!", {"uppercase": True}, 1.0),
    ("ALL caps", {"uppercase": True}, 0.0),
])
def test_each_instruction(answer, spec, expected):
    assert _score(answer, spec) == expected
    assert _score(answer, json.dumps(spec)) == expected
    assert instruction_problems(spec) == []


def test_fraction_of_instructions_and_the_strict_variant():
    spec = {"max_words": 5, "include": ["apple"], "exclude": ["banana"], "lowercase": True}
    # 7 words, has apple, has banana, starts with a capital: one of four holds
    response = "<think>\nlist the fruit\n</think>\n\nI ate an apple and a banana<|im_end|>"
    assert instruction_results(response, spec) == {"max_words": False, "include": True, "exclude": False,
                                                   "lowercase": False}
    assert instructions(response, spec) == 0.25
    assert instructions_all(response, spec) == 0.0
    good = "<think>\nshort, no banana\n</think>\n\nan apple a day<|im_end|>"
    assert instructions(good, spec) == 1.0 and instructions_all(good, spec) == 1.0
    assert instructions(good, json.dumps(spec)) == 1.0


def test_checks_read_only_the_final_answer():
    spec = {"exclude": ["banana"]}
    assert instructions("<think>\nI must not say banana\n</think>\n\nI like apples", spec) == 1.0
    assert instructions("<think>\nI must not say banana\n</think>\n\nI like apples",
                        {"include": ["banana"]}) == 0.0
    assert instructions("plain answer, no block", spec) == 1.0
    # no answer yet (cut off while thinking) or an empty one satisfies nothing
    assert instructions("<think>apple", spec) == 0.0
    assert instructions("<think>a</think>b<think>still going", spec) == 0.0
    assert instructions("<think>x</think>\n\n<|im_end|>", spec) == 0.0


def test_unknown_keys_and_bad_values_count_as_unsatisfied():
    assert _score("an apple", {"include": ["apple"], "rhyme": True}) == 0.5
    assert _score("an apple", {"include": "apple", "max_words": "ten"}) == 0.5
    assert _score("an apple", {"include": "apple", "lowercase": "yes"}) == 0.5
    assert _score("an apple", {"include": "apple", "format": "yaml"}) == 0.5
    assert _score("an apple", {"include": "apple", "language": "klingon"}) == 0.5
    assert _score("an apple", {"include": "apple", 3: 4}) == 0.5
    assert instructions_all("an apple", {"include": ["apple"], "rhyme": True}) == 0.0


@pytest.mark.parametrize("spec, problem", [
    ({"rhyme": True}, "unknown instruction 'rhyme'; known: max_words"),
    ({"max_words": -1}, "instruction max_words must be an integer >= 0, got -1"),
    ({"min_words": True}, "instruction min_words must be an integer >= 0, got True"),
    ({"max_sentences": 2.5}, "instruction max_sentences must be an integer >= 0"),
    ({"include": []}, "instruction include must be a non-empty string or a non-empty list"),
    ({"exclude": ["ok", ""]}, "instruction exclude must be a non-empty string or a non-empty list"),
    ({"format": "yaml"}, "instruction format must be one of json, bullet_list, numbered_list, got 'yaml'"),
    ({"language": "klingon"}, "instruction language must be a language code"),
    ({"ends_with": "  "}, "instruction ends_with must be a non-empty string"),
    ({"lowercase": False}, "instruction lowercase must be true"),
    ({"min_words": 5, "max_words": 3}, "min_words=5 > max_words=3 cannot both hold"),
    ({"min_sentences": 2, "max_sentences": 1}, "min_sentences=2 > max_sentences=1 cannot both hold"),
    ({"lowercase": True, "uppercase": True}, "lowercase and uppercase cannot both hold"),
    ({"include": "apple pie", "exclude": ["Apple"]}, "include 'apple pie' contains excluded 'Apple'"),
    ({}, "no instructions"),
    ("{}", "no instructions"),
    ("{not json", "instructions must be a dict or a JSON object string, got str"),
    ('["max_words"]', "instructions must be a dict or a JSON object string, got str"),
    (None, "instructions must be a dict or a JSON object string, got NoneType"),
    (42, "instructions must be a dict or a JSON object string, got int"),
])
def test_instruction_problems(spec, problem):
    problems = instruction_problems(spec)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_a_full_valid_spec_has_no_problems():
    spec = {"max_words": 50, "min_words": 5, "max_sentences": 3, "min_sentences": 1, "include": ["apple"],
            "exclude": "banana", "format": "bullet_list", "language": "en", "starts_with": "-",
            "ends_with": ".", "lowercase": True}
    assert instruction_problems(spec) == []
    assert instruction_problems(json.dumps(spec)) == []
    assert len(instruction_problems({"rhyme": 1, "max_words": "x"})) == 2


def test_data_readers_see_the_problems_through_the_registry():
    for name in ("instructions", "instructions_all"):
        assert reference_problem(name, {"max_words": 3}) is None
        assert reference_problem(name, '{"max_words": 3}') is None
        line = reference_problem(name, {"rhyme": 1, "max_words": "x"})
        assert line.startswith("unknown instruction 'rhyme'; known: max_words, min_words")
        assert line.endswith("uppercase; instruction max_words must be an integer >= 0, got 'x'")
        assert reference_problem(name, None).startswith("instructions must be a dict")
    for name in ("format_think", "format_boxed", "no_think"):  # the reference is unused
        assert reference_problem(name, None) is None


MEGABYTE = "word " * 200_000
JUNK_RESPONSES = [None, "", b"<think>x</think>bytes", 12, ["<think>x</think>a"], "<think>", "</think>",
                  "<think><think>", "<think>" + MEGABYTE, "\x00\ufffd<think>\udcff", "<|im_end|>",
                  "<think>" + "{" * 100_000]
JUNK_REFERENCES = [None, 5, "not json", '"a string"', "[" * 100_000, ["max_words"], {}, b"{}"]


@pytest.mark.parametrize("name", RULE_REWARDS)
def test_junk_scores_zero_without_raising(name):
    reward = get_reward(name)
    spec = {"max_words": 10 ** 9, "exclude": ["zzz"], "format": "json"}
    for response in JUNK_RESPONSES:
        value = reward(response, spec)
        assert isinstance(value, float) and value == 0.0, (name, repr(response)[:40], value)
    for reference in JUNK_REFERENCES:
        value = reward("<think>\nr\n</think>\n\n\\boxed{1}", reference)
        assert isinstance(value, float)
        assert value == (1.0 if name in ("format_think", "format_boxed") else 0.0), (name, reference)


def test_huge_and_deep_answers_are_judged_not_crashed():
    huge = f"<think>\nr\n</think>\n\n{MEGABYTE}<|im_end|>"
    assert instruction_results(huge, {"max_words": 10, "min_words": 200_000, "language": "en",
                                      "format": "json"}) == {
        "max_words": False, "min_words": True, "language": True, "format": False}
    assert format_think(huge) == 1.0 and no_think(huge) == 0.0
    # json.loads recurses: a deep enough nesting raises RecursionError, not ValueError
    assert _score("[" * 100_000 + "]" * 100_000, {"format": "json"}) == 0.0


def test_registry_and_safe_reward():
    for name in RULE_REWARDS:
        assert REWARDS[name] is get_reward(name)
    assert get_reward("instructions") is instructions

    def broken(response, reference):
        raise RuntimeError("verifier bug")

    assert safe_reward(broken, "<think>r</think>a", {"max_words": 3}) == (0.0, "RuntimeError: verifier bug")
    assert safe_reward(lambda r, ref: math.nan, "a", None) == (0.0, "non-finite reward nan")
    assert safe_reward(instructions, "<think>r</think>two words", '{"max_words": 3}') == (1.0, None)
    assert safe_reward(format_think, None, None) == (0.0, None)


def test_registered_when_cold_start_is_imported_first():
    # rules imports cold_start: importing cold_start first must leave the registry whole too
    run([sys.executable, "-c", "import data_pipeline.cold_start; from recipes.rewards import get_reward; "
         "assert get_reward('instructions')('an apple', {'include': 'apple'}) == 1.0"])
