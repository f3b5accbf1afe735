"""Rule-based rewards, by name: `get_reward("math")(response, reference) -> float`.

One registry for every verifier the post-training stages use: the cold-start data filter
checks final answers with it now, and reasoning RL will add its verifiers (code in a
sandbox, format rewards) here with `@register("name")`, so that a config names a reward
and nothing else changes.
"""

from __future__ import annotations

from typing import Callable

from model.config import ConfigError

Reward = Callable[[str, str], float]
REWARDS: dict[str, Reward] = {}


def register(name: str) -> Callable[[Reward], Reward]:
    def add(fn: Reward) -> Reward:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return add


def get_reward(name: str) -> Reward:
    if name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
    return REWARDS[name]


# Registers its rewards on import; after the registry so that it can use `register`.
from recipes.rewards import math as _math  # noqa: E402,F401
