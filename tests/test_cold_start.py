"""The cold-start data builder: each response filter (a failing and a passing example),
the query filters, and the CLI's counts on a small file."""

from __future__ import annotations

import json
import sys

import pytest

from data_pipeline import chat
from data_pipeline import cold_start as cs
from data_pipeline.cold_start import Thresholds
from model.config import ConfigError
from tests.conftest import run

T = Thresholds()
QUERY = "What is 12 times 3?"
THINKING = ("We need the product of 12 and 3.\n"
            "Twelve can be split into ten plus two, which makes the multiplication easy to do by hand.\n"
            "First, ten times three is thirty, because three groups of ten make thirty.\n"
            "Next, two times three is six, since three groups of two make six.\n"
            "Adding the partial products gives 30 + 6 = 36.\n"
            "Checking with repeated addition: 12 + 12 + 12 = 24 + 12 = 36, which agrees with the first way.\n"
            "So the product is 36.")
SUMMARY = "12 × 3 = 30 + 6, so the answer is \\boxed{36}."


def response(thinking: str = THINKING, summary: str = SUMMARY) -> str:
    return f"<think>\n{thinking}\n</think>\n\n{summary}"


def test_the_good_response_passes_every_filter():
    assert len(cs.words(THINKING)) >= T.min_thinking_words
    assert cs.response_failures(QUERY, "36", False, THINKING, SUMMARY, set(), T) == []


# 1 --------------------------------------------------------------------------------

def test_wrong_answer():
    assert cs.wrong_answer("so it is \\boxed{35}", "36", T)
    assert cs.wrong_answer("I cannot tell.", "36", T)           # no answer at all
    assert not cs.wrong_answer("so it is \\boxed{\\frac{72}{2}}", "36", T)
    assert not cs.wrong_answer("The answer is 36.0", "36", T)


# 2 --------------------------------------------------------------------------------

def test_repetition_rate_counts_repeated_ngrams():
    assert cs.repetition_rate("a b c d e".split(), 2) == 0.0
    # bigrams ab ba ab ba ab: 2 distinct of 5
    assert cs.repetition_rate("a b a b a b".split(), 2) == pytest.approx(0.6)
    assert cs.repetition_rate(["a"], 2) == 0.0


def test_repetition():
    loop = THINKING + "\n" + "Wait, let me recompute ten times three and two times three again. " * 12
    assert cs.repetitive(loop, T)
    assert not cs.repetitive(THINKING, T)


# 3 --------------------------------------------------------------------------------

def test_guessing():
    assert cs.guessing("It is 36.\nYes.\nDone.", True, T)                    # too few words
    one_step = " ".join(["the numbers multiply to give a value"] * 12) + " so 36"
    assert len(cs.words(one_step)) >= T.min_thinking_words
    assert cs.guessing(one_step, True, T)                                     # no steps
    assert not cs.guessing(THINKING, True, T)
    assert not cs.guessing("It is 36.", False, T)      # no answer given: nothing guessed


# 4 --------------------------------------------------------------------------------

def test_inconsistent():
    assert cs.inconsistent(THINKING, "so the answer is \\boxed{35}", T)
    assert not cs.inconsistent(THINKING.replace("is 36.", "is 72/2."), SUMMARY, T)  # equivalent forms
    assert not cs.inconsistent("No number was reached.", SUMMARY, T)


# 5 --------------------------------------------------------------------------------

@pytest.mark.parametrize("ch, script", [
    ("a", "Latin"), ("É", "Latin"), ("я", "Cyrillic"), ("ب", "Arabic"), ("中", "CJK"), ("の", "CJK"),
    ("カ", "CJK"), ("한", "Hangul"), ("θ", "Greek"), ("ש", "Hebrew"), ("क", "Devanagari"), ("ｂ", "Latin"),
    ("1", None), ("+", None), (" ", None), ("ℝ", None), ("𝑥", None),
])
def test_char_script(ch, script):
    assert cs.char_script(ch) == script


def test_script_units_and_ties():
    assert cs.script_units("The cat, 中文 and x = y + 1") == {"Latin": 3, "CJK": 2}   # x, y: variables
    assert cs.script_units("Это тест") == {"Cyrillic": 2}
    # a tie goes to the query's script
    assert cs.dominant_script(cs.script_units("Read 读"), prefer="Latin") == "Latin"
    assert cs.dominant_script(cs.script_units("Read 读"), prefer="CJK") == "CJK"
    assert cs.offscript_fraction("Translate the word.", "Read 读.") == 0.0


def test_language_mixing():
    mixed = THINKING + "\n我们再检查一遍。\n十二乘以三等于三十六。"
    assert cs.offscript_fraction(QUERY, mixed) == pytest.approx(2 / 9)
    assert cs.language_mixing(QUERY, mixed, T)
    assert cs.language_mixing("十二乘以三是多少？", THINKING, T)              # Chinese query, English answer
    # math notation and single-letter variables are not another language
    assert not cs.language_mixing(QUERY, THINKING + "\nLet θ = π/2.\nThen sin θ = 1.\nα + β = γ.", T)
    assert not cs.language_mixing("求函数的最大值。", "所以 f(x) = sin x + cos x。\n最大值是 √2。", T)
    assert not cs.language_mixing("2 + 2 = ?", "我们计算。\n结果是 4。", T)   # a query with no words


# 6 --------------------------------------------------------------------------------

def test_validation_overlap(tmp_path):
    held = tmp_path / "val.jsonl"
    problem = ("A farmer has seventeen sheep and all but nine run away from the farm during the storm; "
               "how many sheep are left")
    held.write_text(json.dumps({"problem": problem}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "Name the largest planet."}]}) + "\n"
                    + "not json\n")
    grams, items = cs.validation_ngrams(held, T.overlap_n)
    assert items == 2
    assert cs.validation_overlap(f"Recall: {problem}? Nine are left.", grams, T)
    assert not cs.validation_overlap(QUERY + THINKING, grams, T)
    # a 13-word window: 12 shared words are not enough
    assert not cs.validation_overlap(" ".join(problem.split()[:12]), grams, T)
    assert not cs.validation_overlap(problem, set(), T)


# query filters and the whole build ----------------------------------------------------

def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows))
    return path


def test_query_filters_and_code_rows(tmp_path):
    src = _write(tmp_path / "in.jsonl", [
        {"query": QUERY, "reference": "36", "responses": [response()]},                  # kept
        {"query": "Sort a list.", "tests": [{"input": "[2,1]", "output": "[1,2]"}],
         "response": response(THINKING, "```python\nprint(sorted(xs))\n```")},          # code
        {"query": "Tell me a story.", "responses": [response()]},                      # unverifiable
        {"query": QUERY, "reference": "36", "no_cot_correct": True, "responses": [response()]},
        {"id": "q7", "query": QUERY, "reference": "36", "responses": [response()]},    # solved in file
        {"id": "q8", "query": QUERY, "reference": "36", "responses": [response()]},    # failed in file
    ])
    answers = _write(tmp_path / "no_cot.jsonl", [{"id": "q7", "answer": "It is \\boxed{36}."},
                                                 {"query_id": "q8", "response": "It is 35."}])
    out = tmp_path / "out.jsonl"
    stats = cs.build(src, out, no_cot_answers=answers, progress=False)
    assert stats["queries"]["dropped"] == {"unverifiable": 1, "no_cot_correct": 2}
    assert stats["responses"][cs.UNVERIFIED_CODE] == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, "q8"]
    assert rows[0]["messages"] == [{"role": "user", "content": QUERY},
                                   {"role": "assistant", "content": SUMMARY, "reasoning_content": THINKING}]
    assert "reference" not in rows[1]
    assert all(chat.problem(r["messages"]) is None for r in rows)   # what recipes.sft accepts

    stats = cs.build(src, out, Thresholds(keep_unverified_code=False), drop_no_cot_correct=False,
                     progress=False)
    assert stats["queries"]["dropped"] == {"unverifiable": 1}
    assert stats["responses"]["dropped_by"] == {cs.UNVERIFIED_CODE: 1}
    # a judge of the caller's own replaces the field and the file
    stats = cs.build(src, out, no_cot_correct=lambda row: row["id"] == 0, progress=False)
    assert stats["queries"]["dropped"] == {"unverifiable": 1, "no_cot_correct": 1}


def test_bad_thresholds_are_config_errors(tmp_path):
    src = _write(tmp_path / "in.jsonl", [])
    with pytest.raises(ConfigError, match="max_repetition_rate must be in"):
        cs.build(src, tmp_path / "o.jsonl", Thresholds(max_repetition_rate=2), progress=False)
    with pytest.raises(ConfigError, match="overlap_n must be a int"):
        cs.build(src, tmp_path / "o.jsonl", Thresholds(overlap_n="x"), progress=False)
    with pytest.raises(ConfigError, match="validation=.* does not exist"):
        cs.build(src, tmp_path / "o.jsonl", validation=tmp_path / "nope.jsonl", progress=False)


def test_cli_counts_every_filter(tmp_path):
    held = _write(tmp_path / "val.jsonl", [{"query": "A train leaves the station at nine in the morning "
                                                     "travelling east at sixty miles per hour toward the city"}])
    src = _write(tmp_path / "in.jsonl", [
        {"query": QUERY, "reference": "36", "responses": [
            response(),                                                           # kept
            response(summary="so the answer is \\boxed{35}"),                     # 1 (and 4)
            response(THINKING + "\n" + "Let me say that once more to be sure. " * 20),  # 2
            response("It is 36.", SUMMARY),                                       # 3
            response(THINKING.replace("is 36.", "is 35."), SUMMARY),              # 4
            response(THINKING + "\n我们再检查一遍。\n十二乘以三等于三十六。", SUMMARY),   # 5
            "no think block \\boxed{36}",                                         # malformed
        ]},
        {"query": "A train leaves the station at nine in the morning travelling east at sixty miles per hour "
                  "toward the city. When does it arrive?", "reference": "11", "responses": [
            response(THINKING.replace("36", "11"), "\\boxed{11}")]},              # 6
        {"query": "Write a poem.", "responses": [response()]},                   # unverifiable
        "{broken json",
    ])
    out = tmp_path / "sft" / "cold.jsonl"
    proc = run([sys.executable, "-m", "data_pipeline.cold_start", f"input={src}", f"output={out}",
                f"validation={held}", "progress=false"])
    stats = json.loads((tmp_path / "sft" / "cold.jsonl.stats.json").read_text())
    assert stats["queries"] == {"total": 4, "kept": 1, "all_responses_dropped": 1,
                                "dropped": {"unverifiable": 1, "invalid_row": 1}}
    r = stats["responses"]
    assert (r["total"], r["kept"]) == (8, 1)
    assert r["dropped_by"] == {"wrong_answer": 1, "repetition": 1, "guessing": 1, "inconsistent": 1,
                               "language_mixing": 1, "validation_overlap": 1, "malformed": 1}
    assert r["failed"]["inconsistent"] == 2 and r["failed"]["wrong_answer"] == 1
    assert stats["samples"] == 1 and len(out.read_text().splitlines()) == 1
    assert "dropped by language_mixing: 1" in proc.stdout
    assert not list(tmp_path.glob("sft/*.tmp-*"))

    bad = run([sys.executable, "-m", "data_pipeline.cold_start", f"input={src}", f"output={out}",
               "filters.overlap_n=0"], check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: filters.overlap_n must be > 0, got 0"]
