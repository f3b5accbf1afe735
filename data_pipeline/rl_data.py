"""Query-verifier data for the RL stages: JSONL prompts with what their rewards check.

One row per query:

    {"id": "q17",                                    # optional; default: file:line
     "prompt": "What is 12+34?",                      # or "messages": [...] (a trailing
                                                      #   assistant turn is dropped)
     "reference": "46",                               # what the reward checks against:
                                                      #   an answer, test cases, instructions
     "reward": "math",                                # optional; default: rl.rewards
     "enable_thinking": true}                         # optional; default: rl.grpo's

`reward` is a name, or a list of names and {"name", "weight", "reference"} entries whose
weighted sum is the reward (general RL mixes rule-based and model-based rewards); an
entry's own "reference" overrides the row's. The model-based rewards (`reward_model`,
`judge`) are given the row's prompt by the reader. Rows that cannot be used are skipped and
counted by reason, never fatal: unreadable JSON, no prompt, an unknown reward, a bad
weight, a reference the reward rejects, or a prompt too long for the stage's sequence length.

Which rewards exist and which references they accept is the reward registry's knowledge
(recipes.rewards, a layer above this one): the caller hands it in as `known` (the names)
and `reference_problem(name, reference) -> why not | None`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Container

from data_pipeline.chat import prompt_ids, prompt_messages


@dataclass
class RLPrompt:
    id: str
    messages: list[dict]
    rewards: list[tuple[str, float, Any]]   # (reward name, weight, reference)
    enable_thinking: bool | None = None
    ids: list[int] | None = None            # the rendered prompt's tokens


def reward_entries(spec, reference, messages: list[dict] | None = None, *, known: Container[str],
                   reference_problem: Callable[[str, Any], str | None] | None = None
                   ) -> list[tuple[str, float, Any]]:
    """The (name, weight, reference) list a row's `reward` field names: KeyError for a name
    not in `known`, ValueError if malformed or (with `reference_problem`) for a reference
    its reward rejects.

    Model-based rewards score the response against its prompt, so the row's prompt
    `messages` become their reference: `reward_model` gets the prompt, `judge` gets
    {"prompt", "reference"} with the row's reference answer (unless the entry says otherwise).
    """
    items = spec if isinstance(spec, list) else [spec]
    if not items:
        raise ValueError("empty reward list")
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"reward entry {item!r} needs a name")
        if item["name"] not in known:
            raise KeyError(item["name"])
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"reward weight {weight!r} is not a number")
        ref = item.get("reference", reference)
        if item["name"] == "reward_model" and "reference" not in item:
            ref = messages
        elif item["name"] == "judge" and not isinstance(ref, dict):
            ref = {"prompt": messages, "reference": ref}
        if reference_problem is not None and (problem := reference_problem(item["name"], ref)) is not None:
            raise ValueError(problem)
        out.append((item["name"], float(weight), ref))
    return out


def read_prompts(files: list, default_rewards, tokenizer, max_prompt_tokens: int, enable_thinking: bool, *,
                 known: Container[str], reference_problem: Callable[[str, Any], str | None]
                 ) -> tuple[list[RLPrompt], Counter]:
    """Every usable row of `files`, prompt tokens rendered, and the skipped rows by reason;
    rewards checked as `reward_entries` does."""
    prompts, skipped = [], Counter()
    for file in files:
        path = Path(str(file))
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                messages = prompt_messages(row)
            except (json.JSONDecodeError, ValueError, AttributeError, TypeError):
                skipped["unreadable row or no prompt"] += 1
                continue
            if not messages or not all(isinstance(m, dict) for m in messages):
                skipped["unreadable row or no prompt"] += 1
                continue
            try:
                rewards = reward_entries(row.get("reward", default_rewards), row.get("reference"), messages,
                                         known=known, reference_problem=reference_problem)
            except KeyError:
                skipped["unknown reward"] += 1
                continue
            except ValueError:
                skipped["bad reward or reference"] += 1
                continue
            thinking = row.get("enable_thinking", enable_thinking)
            if not isinstance(thinking, bool):
                skipped["unreadable row or no prompt"] += 1
                continue
            ids = prompt_ids(tokenizer, messages, thinking)
            if len(ids) > max_prompt_tokens:
                skipped["prompt too long"] += 1
                continue
            prompts.append(RLPrompt(str(row.get("id", f"{path.name}:{n}")), messages, rewards, thinking, ids))
    return prompts, skipped


def describe(prompts: list[RLPrompt], skipped: Counter) -> str:
    text = f"rl data: {len(prompts)} prompts"
    if skipped:
        text += f"; skipped {sum(skipped.values())} rows (" + ", ".join(
            f"{reason}: {count}" for reason, count in sorted(skipped.items())) + ")"
    return text
