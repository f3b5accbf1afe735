"""The thinking-mode fusion data builder (Qwen3 report section 4.3): one SFT set in which
`/think` and `/no_think` flags switch the model between answering with and without
reasoning.

    python -m data_pipeline.fusion thinking=think.jsonl non_thinking=plain.jsonl \\
        output=data/sft/fusion.jsonl ratio=0.5 seed=0 [flags.system_prob=0.2 ...]

Inputs are chat JSONL ({"messages": [...], "tools"?, "source"?}, data_pipeline.chat's
schema). An assistant turn's reasoning is its "reasoning_content" (or a `<think>...</think>`
prefix of its content).

- Thinking samples (the `thinking` file: e.g. rejection-sampled from the reasoning-RL
  model) need reasoning in their final assistant turn. Non-thinking samples (the
  `non_thinking` file) lose any reasoning they carry ("reasoning_content" becomes "", so
  they render with the empty think block); `reasoning_stripped` counts them. A row whose
  first answer comes before its first user turn is skipped: no flag could precede it.
- They are mixed so that `ratio` of them are thinking samples: all that the ratio allows
  without reusing a row, or `size` of them.
- Flags go at the end of a user turn (" /think", " /no_think") or, with probability
  `flags.system_prob`, into the system message (one is added when there is none). A
  non-thinking sample always carries `/no_think` before its first answer; a thinking
  sample carries `/think`, except a share `flags.unflagged_thinking_prob` that carries no
  flag, since thinking is the default. In multi-turn samples each later user turn may
  repeat the sample's flag (`flags.repeat_prob`).
- Switchable rows (in either file) carry both answers in every assistant turn:
  "reasoning_content" and "content" for thinking, and "no_think_content" for the answer
  without thinking. Such a row gets between one and all of its user turns flagged, each
  flag `/think` with probability `ratio`, and every assistant turn takes the variant of
  the last flag before it (thinking when none). They are used in addition to the mix.
- Flags already at the end of a user or system turn are removed first, so that no sample
  contradicts itself.

Output rows: {"messages", "tools"?, "source", "kind": "thinking" | "non_thinking" |
"switchable"}, shuffled. The result depends only on the inputs and `seed`. Counts per
kind, per flag placement and per skip reason are printed and saved to
`{output}.stats.json`; both files are written under temporary names and renamed.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline.chat import NO_THINK_FLAG, THINK_FLAG, split_reasoning, problem
from data_pipeline.cold_start import hydra_entry, jsonl_rows, require, write_outputs
from model.config import ConfigError, from_dict

THINKING, NON_THINKING, SWITCHABLE = "thinking", "non_thinking", "switchable"
_TRAILING_FLAGS = re.compile(r"(?:\s*/(?:no_)?think)+\s*$")


@dataclass
class FlagConfig:
    system_prob: float = 0.2
    unflagged_thinking_prob: float = 0.3
    repeat_prob: float = 0.3

    def check(self) -> "FlagConfig":
        for name, value in asdict(self).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ConfigError(f"flags.{name} must be a probability in [0, 1], got {value!r}")
        return self


def _assistant(message: dict, mode: str) -> dict:
    """The assistant turn in `mode`: thinking keeps reasoning, non-thinking has an empty one."""
    reasoning, answer = split_reasoning(message)
    out = {"role": "assistant"}
    if mode == THINKING:
        out.update(content=answer, reasoning_content=reasoning)
    else:
        out.update(content=message.get("no_think_content", answer), reasoning_content="")
    if message.get("tool_calls"):
        out["tool_calls"] = message["tool_calls"]
    return out


def _is_switchable(messages: list[dict]) -> bool:
    turns = [m for m in messages if m["role"] == "assistant"]
    return all(isinstance(m.get("no_think_content"), str) and split_reasoning(m)[0].strip() for m in turns)


def _without_flags(messages: list[dict]) -> tuple[list[dict], int]:
    """Copies of the turns with trailing flags removed from user and system content."""
    out, removed = [], 0
    for m in messages:
        m = dict(m)
        if m["role"] in ("user", "system") and _TRAILING_FLAGS.search(m["content"]):
            m["content"] = _TRAILING_FLAGS.sub("", m["content"])
            removed += 1
        out.append(m)
    return out, removed


def _append_flag(message: dict, flag: str) -> None:
    content = message["content"].rstrip()
    message["content"] = f"{content} {flag}" if content else flag


# The two thinking modes of a prompt: rendered with enable_thinking on or off (off: the
# generation prompt pre-fills the empty think block, Qwen3's hard switch).
MODES = ("think", "no_think")


def in_mode(messages: list[dict], mode: str, flag: bool) -> list[dict]:
    """A copy of a prompt for `mode`; with `flag`, its last user turn also ends with
    /think or /no_think (the soft switch the fusion stage teaches), earlier flags removed."""
    out = [dict(m) for m in messages]
    users = _user_turns(out)
    if flag and users:
        last = out[users[-1]]
        last["content"] = _TRAILING_FLAGS.sub("", str(last.get("content") or ""))
        _append_flag(last, THINK_FLAG if mode == "think" else NO_THINK_FLAG)
    return out


def _user_turns(messages: list[dict]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "user"]


def flag_single_mode(messages: list[dict], kind: str, rng: random.Random, flags: FlagConfig,
                     counts: Counter) -> list[dict]:
    """A thinking or non-thinking sample with its flags; every assistant turn in `kind`'s mode."""
    users = _user_turns(messages)
    out = [_assistant(m, kind) if m["role"] == "assistant" else dict(m) for m in messages]
    if kind == NON_THINKING and any(split_reasoning(m)[0].strip() for m in messages if m["role"] == "assistant"):
        counts["reasoning_stripped"] += 1
    flag = THINK_FLAG if kind == THINKING else NO_THINK_FLAG
    if kind == THINKING and rng.random() < flags.unflagged_thinking_prob:
        counts["unflagged_thinking"] += 1
        return out
    # the first flag must come before the first answer: the system message or the first query
    if rng.random() < flags.system_prob:
        if out[0]["role"] == "system":
            _append_flag(out[0], flag)
        else:
            out.insert(0, {"role": "system", "content": flag})
            users = [i + 1 for i in users]
        counts[f"{flag}_system"] += 1
        later = users
    else:
        _append_flag(out[users[0]], flag)
        counts[f"{flag}_user"] += 1
        later = users[1:]
    for i in later:
        if rng.random() < flags.repeat_prob:
            _append_flag(out[i], flag)
            counts[f"{flag}_user"] += 1
    return out


def flag_switchable(messages: list[dict], ratio: float, rng: random.Random, counts: Counter) -> list[dict]:
    """Random flags on one to all user turns; each assistant turn follows the last flag before it."""
    users = _user_turns(messages)
    flagged = set(rng.sample(users, rng.randint(1, len(users))))
    out, mode = [], THINKING
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            out.append(_assistant(m, mode))
            counts[f"{mode}_turns"] += 1
            continue
        out.append(dict(m))
        if i in flagged:
            flag = THINK_FLAG if rng.random() < ratio else NO_THINK_FLAG
            mode = THINKING if flag == THINK_FLAG else NON_THINKING
            _append_flag(out[-1], flag)
            counts[f"{flag}_user"] += 1
    return out


def read_rows(path: Path, kind: str, skipped: Counter, counts: Counter) -> tuple[list[dict], list[dict]]:
    """(single-mode rows, switchable rows) of one input file; bad rows counted by reason."""
    single, switchable = [], []
    for _, row in jsonl_rows(path):
        messages = row.get("messages") if isinstance(row, dict) else None
        reason = "bad_json" if row is None else problem(messages)
        if reason is None:
            users = _user_turns(messages)
            if not users:
                reason = "no_user_turn"
            elif any(m["role"] == "assistant" for m in messages[:users[0]]):
                reason = "answer_before_first_query"  # no flag could come before it
        if reason is None and kind == THINKING and not split_reasoning(messages[-1])[0].strip():
            reason = "no_reasoning_in_final_turn"
        if reason:
            skipped[reason] += 1
            continue
        messages, removed = _without_flags(messages)
        counts["flags_removed"] += removed
        entry = {"messages": messages, "source": row.get("source", path.name)}
        if row.get("tools"):
            entry["tools"] = row["tools"]
        (switchable if _is_switchable(messages) else single).append(entry)
    return single, switchable


def mix_sizes(n_thinking: int, n_plain: int, ratio: float, size: int | None) -> tuple[int, int]:
    """(thinking, non-thinking) sample counts at `ratio`: `size` in all, or the most that
    the inputs allow without reuse."""
    if size is None:
        limits = ([n_thinking / ratio] if ratio > 0 else []) + ([n_plain / (1 - ratio)] if ratio < 1 else [])
        size = int(min(limits) + 1e-9)
    think = round(size * ratio)
    if think > n_thinking or size - think > n_plain:
        raise ConfigError(f"size={size} at ratio={ratio} needs {think} thinking and {size - think} non-thinking "
                          f"samples; the inputs have {n_thinking} and {n_plain} usable")
    return think, size - think


def build(thinking, non_thinking, output, ratio: float = 0.5, seed: int = 0, size: int | None = None,
          flags: FlagConfig | None = None, progress: bool = True) -> dict:
    flags = (flags or FlagConfig()).check()
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ConfigError(f"ratio must be in [0, 1] (the share of thinking samples), got {ratio!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ConfigError(f"size must be a non-negative integer or null, got {size!r}")
    paths = {THINKING: Path(str(thinking)), NON_THINKING: Path(str(non_thinking))}
    for kind, p in paths.items():
        if not p.is_file():
            raise ConfigError(f"{kind}={p} does not exist")
    counts, skipped, pools, switchable = Counter(), {}, {}, []
    for kind, p in paths.items():
        skipped[kind] = Counter()
        pools[kind], extra = read_rows(p, kind, skipped[kind], counts)
        switchable += extra
    n_think, n_plain = mix_sizes(len(pools[THINKING]), len(pools[NON_THINKING]), float(ratio), size)

    rng = random.Random(seed)
    chosen = ([(THINKING, r) for r in rng.sample(pools[THINKING], n_think)]
              + [(NON_THINKING, r) for r in rng.sample(pools[NON_THINKING], n_plain)]
              + [(SWITCHABLE, r) for r in switchable])
    from tqdm import tqdm

    samples = []
    for kind, row in tqdm(chosen, desc="fusion", unit=" sample", disable=not progress, file=sys.stderr):
        if kind == SWITCHABLE:
            messages = flag_switchable(row["messages"], float(ratio), rng, counts)
        else:
            messages = flag_single_mode(row["messages"], kind, rng, flags, counts)
        samples.append({**row, "messages": messages, "kind": kind})
    rng.shuffle(samples)

    kinds = Counter(s["kind"] for s in samples)
    stats = {
        "inputs": {kind: str(p) for kind, p in paths.items()}, "output": str(output), "ratio": ratio,
        "seed": seed, "size": size, "flags_config": asdict(flags),
        "samples": len(samples), "kinds": {k: kinds[k] for k in (THINKING, NON_THINKING, SWITCHABLE)},
        "usable": {THINKING: len(pools[THINKING]), NON_THINKING: len(pools[NON_THINKING]),
                   SWITCHABLE: len(switchable)},
        "skipped": {kind: dict(c) for kind, c in skipped.items()},
        "flags": {k: counts[k] for k in (f"{THINK_FLAG}_user", f"{THINK_FLAG}_system", f"{NO_THINK_FLAG}_user",
                                         f"{NO_THINK_FLAG}_system", "unflagged_thinking")},
        "switchable_turns": {THINKING: counts[f"{THINKING}_turns"], NON_THINKING: counts[f"{NON_THINKING}_turns"]},
        "reasoning_stripped": counts["reasoning_stripped"], "flags_removed": counts["flags_removed"],
    }
    return write_outputs(Path(str(output)), (json.dumps(s, ensure_ascii=False) + "\n" for s in samples), stats)


def format_summary(stats: dict) -> str:
    k, f = stats["kinds"], stats["flags"]
    lines = [f"wrote {stats['samples']:,} samples to {stats['output']}: {k[THINKING]:,} thinking, "
             f"{k[NON_THINKING]:,} non-thinking, {k[SWITCHABLE]:,} switchable",
             "flags: " + ", ".join(f"{name} {n:,}" for name, n in f.items()),
             f"reasoning stripped from {stats['reasoning_stripped']:,} non-thinking rows; "
             f"{stats['flags_removed']:,} existing flags removed"]
    for kind, reasons in stats["skipped"].items():
        lines += [f"skipped {kind} rows, {reason}: {n:,}" for reason, n in reasons.items()]
    lines.append(f"stats: {stats['stats_path']}")
    return "\n".join(lines)


def job(cfg) -> str:
    from omegaconf import OmegaConf

    require(cfg, "thinking", "non_thinking", "output")
    flags = from_dict(FlagConfig, OmegaConf.to_container(cfg.flags, resolve=True), "flags")
    return format_summary(build(cfg.thinking, cfg.non_thinking, cfg.output, ratio=cfg.ratio, seed=cfg.seed,
                                size=cfg.size, flags=flags, progress=bool(cfg.progress)))


if __name__ == "__main__":
    hydra_entry("fusion", job, __doc__)
