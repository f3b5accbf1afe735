"""The math verifier: answer extraction, math-verify equivalence, bounds on junk and time."""

from __future__ import annotations

import signal
import threading

import pytest

from model.config import ConfigError
from data_pipeline import math_answers as ma
from data_pipeline.math_answers import answers_match, extract_answer
from recipes.rewards import REWARDS, get_reward
from recipes.rewards.math import math_reward

# Slow to verify: sympy compares 9^(9^9) with 1 until math-verify's alarm stops it.
HUGE = "$9^{9^{9}}$"


@pytest.mark.parametrize("text, expected", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("first \\boxed{3}, then corrected: \\boxed{x^{2}+\\sqrt{y}}", "x^{2}+\\sqrt{y}"),
    ("\\fbox{7}", "7"),
    ("\\boxed{12} but the last box is cut \\boxed{1", "12"),    # an unclosed box is no answer
    ("Adding gives 17, then 20 in total.", "20"),
    ("x = -3.", "-3"),
    ("10-3", "3"),                                             # binary minus is not a sign
    ("There are 1,234,567 apples", "1,234,567"),
    ("half is 3.25 or 3/4", "3/4"),
    ("it equals $\\frac{5}{8}$ in lowest terms", "\\frac{5}{8}"),
    ("no digits here", None),
    ("", None),
    (None, None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("predicted, reference", [
    ("1/2", "0.5"),
    ("0.5", "\\frac{1}{2}"),
    ("\\frac12", "1/2"),
    ("\\dfrac{2}{4}", "\\frac{1}{2}"),
    ("3", "3.0"),
    ("1,000", "1000"),
    ("x+1", "1+x"),
    ("\\sqrt{2}", "2^{1/2}"),
    ("$\\frac{3}{4}$", "0.75"),
    ("\\boxed{6}", "6"),
    ("(B)", "(B)"),   # does not parse as a number: identical strings still match
    (7, "7"),
])
def test_equivalent_answers_match(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize("predicted, reference", [
    ("5", "6"),
    ("-3", "3"),
    ("1/3", "0.33"),
    ("\\frac{1}{2}", "\\frac{1}{3}"),
    ("x+1", "x-1"),
    ("\\pi", "3.14159"),
    (None, "5"),          # no answer extracted
    ("", "5"),
    ("   ", "5"),
    ("5", ""),
    ({"a": 1}, "1"),
    (["1"], "1"),
    (True, "1"),
    ("\\frac{", "1"),
    ("}}}{{{", "1"),
    ("\\boxed{", "1"),
    ("9" * 3000, "1"),
])
def test_different_or_junk_answers_do_not_match(predicted, reference):
    assert answers_match(predicted, reference) is False


def test_math_reward_reads_the_final_answer_not_the_thinking():
    reference = "12"
    assert math_reward("<think>\n3*4 = 12\n</think>\n\nThe product is \\boxed{12}.", reference) == 1.0
    assert math_reward("<think>\n3*4 = 12\n</think>\n\nThe product is \\boxed{13}.", reference) == 0.0
    # the right number only inside the thinking earns nothing
    assert math_reward("<think>\nit is 12\n</think>\n\nI am not sure.", reference) == 0.0
    assert math_reward("The answer is 11.", reference) == 0.0
    assert math_reward("The answer is 24/2", reference) == 1.0


def test_registry():
    assert get_reward("math") is math_reward
    assert REWARDS["math"] is math_reward
    with pytest.raises(ConfigError, match="unknown reward 'nope'; known: .*math"):
        get_reward("nope")


def test_timeout_bounds_a_hopeless_comparison_and_keeps_the_callers_timer():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 600.0)
    try:
        assert answers_match(HUGE, "1", timeout_s=1) is False
        # math-verify's own alarm(0) would have cancelled this timer
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < left < 600
        assert answers_match("1/2", "0.5", timeout_s=1)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not fired


def _in_thread(fn):
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported to the test below
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    return out


def test_works_off_the_main_thread():
    from math_verify import parse

    # what the module works around: math-verify's alarm refuses to run in a thread
    assert isinstance(_in_thread(lambda: parse("$1/2$")).get("error"), ValueError)

    out = _in_thread(lambda: [answers_match("1/2", "0.5"), answers_match("\\frac{2}{3}", "0.5"),
                              answers_match(HUGE, "1", timeout_s=1), answers_match("x+1", "1+x")])
    assert out == {"value": [True, False, False, True]}


def test_a_dead_or_overrunning_worker_is_replaced(monkeypatch):
    assert _in_thread(lambda: answers_match("2/4", "0.5")) == {"value": True}
    ma._worker.proc.kill()
    ma._worker.proc.wait()
    assert _in_thread(lambda: answers_match("2/4", "0.5")) == {"value": True}

    # a deadline shorter than the child's own 1 s alarm: the child is killed, the answer
    # counts as wrong, and the next call gets a new child
    monkeypatch.setattr(ma, "DEADLINE_SLACK_S", -5.9)
    first = ma._worker.proc
    assert _in_thread(lambda: answers_match(HUGE, "1", timeout_s=1)) == {"value": False}
    assert first.poll() is not None
    monkeypatch.setattr(ma, "DEADLINE_SLACK_S", 10.0)
    assert _in_thread(lambda: answers_match("2/4", "0.5")) == {"value": True}
    assert ma._worker.proc is not first
