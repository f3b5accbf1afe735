"""The `math` reward: 1.0 when a response's final answer matches the reference.

- `math_reward(response, reference)`: the answer extracted from the response's final part
  (after the last `</think>`, when there is one) matched against the reference, both with
  data_pipeline.math_answers (`extract_answer`, `answers_match`: math-verify, time-bounded,
  usable off the main thread), which the cold-start data filter uses too.
- `final_part(response)`: that final part, which the other rewards score as well.
"""

from __future__ import annotations

from data_pipeline.math_answers import answers_match, extract_answer
from recipes.rewards import register


def final_part(response: str) -> str:
    """What follows the last `</think>`: the answer a thinking response ends with."""
    return response.rsplit("</think>", 1)[-1] if isinstance(response, str) else ""


def _math_reference_problem(reference) -> str | None:
    if isinstance(reference, bool) or not isinstance(reference, (str, int, float)) or not str(reference).strip():
        return f"math reference {reference!r} is not an answer"
    return None


@register("math", _math_reference_problem)
def math_reward(response: str, reference: str) -> float:
    return 1.0 if answers_match(extract_answer(final_part(response)), reference) else 0.0

