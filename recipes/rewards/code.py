"""The `code` rewards: run the response's program on test cases in the sandbox.

- The program is the last fenced block (```python, ```py, ```python3 or a bare ```)
  in the response's final part (after the last `</think>`); a block cut off before its
  closing fence is no program. No program: reward 0.0.
- `reference` is the test cases: a list of `{"input": str, "output": str}`, the APPS
  form `{"inputs": [...], "outputs": [...]}`, or either as a JSON string. A malformed
  reference is a data error and raises ValueError (`safe_reward` counts it).
- Each case runs the program once in `run_sandboxed` with the input on stdin; it passes
  when the run ends with status "ok" and its stdout equals the expected output line by
  line, each line stripped of surrounding whitespace, trailing blank lines ignored.
- `code`: the fraction of cases passed (a denser signal for GRPO's group advantages).
  `code_all`: 1.0 only when every case passes, the pass/fail reward of the Qwen3
  report; it stops at the first failing case.
"""

from __future__ import annotations

import json
import re
from typing import Any

from recipes.rewards import register
from recipes.rewards.math import final_part
from recipes.rewards.sandbox import Limits, run_sandboxed

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"", "python", "py", "python3"}
LIMITS = Limits()


def extract_code(response: Any) -> str | None:
    """The last Python (or untagged) fenced block of the final part, else None."""
    blocks = [body for tag, body in _FENCE.findall(final_part(response)) if tag.lower() in _PYTHON_TAGS]
    return blocks[-1] if blocks and blocks[-1].strip() else None


def cases_from(reference: Any) -> list[tuple[str, str]]:
    """(input, expected output) pairs from any accepted reference form."""
    if isinstance(reference, (str, bytes)):
        try:
            reference = json.loads(reference)
        except ValueError as e:
            raise ValueError(f"code reference is not valid JSON: {e}") from None
    if isinstance(reference, dict) and {"inputs", "outputs"} <= reference.keys():
        if len(reference["inputs"]) != len(reference["outputs"]):
            raise ValueError("code reference has different numbers of inputs and outputs")
        reference = [{"input": i, "output": o} for i, o in zip(reference["inputs"], reference["outputs"])]
    if not isinstance(reference, list) or not reference:
        raise ValueError("code reference must be a non-empty list of {'input', 'output'} test cases")
    cases = []
    for case in reference:
        if not (isinstance(case, dict) and isinstance(case.get("input"), str)
                and isinstance(case.get("output"), str)):
            raise ValueError(f"code test case must be {{'input': str, 'output': str}}, got {case!r:.200}")
        cases.append((case["input"], case["output"]))
    return cases


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().splitlines()]


def passes(code: str, stdin: str, expected: str, limits: Limits = LIMITS) -> bool:
    outcome = run_sandboxed(code, stdin, limits)
    return outcome.status == "ok" and _lines(outcome.stdout) == _lines(expected)


def _scores(response: Any, reference: Any):
    """Pass/fail per test case, computed lazily (so `all` stops at the first failure)."""
    cases = cases_from(reference)  # a bad reference raises even when the response has no code
    code = extract_code(response)
    return (code is not None and passes(code, stdin, expected) for stdin, expected in cases), len(cases)


def _reference_problem(reference: Any) -> str | None:
    try:
        cases_from(reference)
    except ValueError as e:
        return str(e)
    return None


@register("code", _reference_problem)
def code_reward(response: str, reference: Any) -> float:
    scores, count = _scores(response, reference)
    return sum(scores) / count


@register("code_all", _reference_problem)
def code_all_reward(response: str, reference: Any) -> float:
    scores, _ = _scores(response, reference)
    return 1.0 if all(scores) else 0.0
