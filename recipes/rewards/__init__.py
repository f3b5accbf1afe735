"""Rewards by name: `get_reward("math")(response, reference) -> float`.

One registry for every verifier and reward the post-training stages use: the RL stages
score rollouts with it and distillation its held-out answers (the `math` reward judges
answers as the cold-start data filter does, by data_pipeline.math_answers), so that a
config or a data row names a reward and nothing else changes. A module registers
its rewards with `@register("name")` and is imported at the bottom of this file.

`reference` is whatever the data row carries for that reward: a final answer (math), a
list of test cases (code), a dict of instructions (instruction following), or None.

`safe_reward` is how training calls them: a reward that raises, or returns something that
is not a finite number, gives 0.0 and reports the error, so a malformed model output or a
verifier bug costs one sample's reward, never the run.
"""

from __future__ import annotations

from math import isfinite
from typing import Any, Callable

from model.config import ConfigError

Reward = Callable[[str, Any], float]
REWARDS: dict[str, Reward] = {}
# name -> reference -> why that reference cannot be used (None: it can); data readers
# call it through `reference_problem` to skip and count a bad row before training.
REFERENCE_CHECKS: dict[str, Callable[[Any], str | None]] = {}


def register(name: str, check_reference: Callable[[Any], str | None] | None = None
             ) -> Callable[[Reward], Reward]:
    def add(fn: Reward) -> Reward:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        if check_reference is not None:
            REFERENCE_CHECKS[name] = check_reference
        return fn

    return add


def reference_problem(name: str, reference: Any) -> str | None:
    check = REFERENCE_CHECKS.get(name)
    try:
        return None if check is None else check(reference)
    except Exception as e:  # noqa: BLE001 - a checker that fails rejects the row
        return f"{type(e).__name__}: {e}"


def get_reward(name: str) -> Reward:
    if name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


def safe_reward(fn: Reward, response: str, reference: Any) -> tuple[float, str | None]:
    """(reward, None), or (0.0, "ErrorType: message") when the reward failed."""
    try:
        value = float(fn(response, reference))
    except Exception as e:  # noqa: BLE001 - any verifier failure is a zero reward, counted
        return 0.0, f"{type(e).__name__}: {e}"
    if not isfinite(value):
        return 0.0, f"non-finite reward {value}"
    return value, None


# Register their rewards on import; after the registry so that they can use `register`.
from recipes.rewards import math as _math  # noqa: E402,F401
from recipes.rewards import rules as _rules  # noqa: E402,F401
from recipes.rewards import model_based as _model_based  # noqa: E402,F401
from recipes.rewards import code as _code  # noqa: E402,F401
