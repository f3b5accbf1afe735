"""The thinking-mode fusion builder: one test per rule (mix ratio, stripped reasoning, flag
placement, unflagged thinking, /no_think always, multi-turn flags, determinism, counts)."""

from __future__ import annotations

import json
import re
import sys

import pytest

from data_pipeline import chat
from data_pipeline import fusion as fu
from data_pipeline.fusion import FlagConfig
from model.config import ConfigError
from tests.conftest import run

FLAG = re.compile(r" ?(/no_think|/think)$")


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def thinking_row(i: int, system: bool = False) -> dict:
    msgs = [{"role": "system", "content": "You are helpful."}] if system else []
    return {"messages": msgs + [{"role": "user", "content": f"question {i}"},
                                {"role": "assistant", "reasoning_content": f"reasoning {i}",
                                 "content": f"answer {i}"}]}


def plain_row(i: int, turns: int = 1) -> dict:
    msgs = []
    for t in range(turns):
        msgs += [{"role": "user", "content": f"plain {i}.{t}"}, {"role": "assistant", "content": f"reply {i}.{t}"}]
    return {"messages": msgs}


def switchable_row(i: int, turns: int = 4) -> dict:
    msgs = []
    for t in range(turns):
        msgs += [{"role": "user", "content": f"turn {i}.{t}"},
                 {"role": "assistant", "reasoning_content": f"r{i}.{t}", "content": f"T{i}.{t}",
                  "no_think_content": f"N{i}.{t}"}]
    return {"messages": msgs}


def build(tmp_path, thinking, plain, **kw):
    t = _write(tmp_path / "think.jsonl", thinking)
    n = _write(tmp_path / "plain.jsonl", plain)
    out = tmp_path / "fusion.jsonl"
    stats = fu.build(t, n, out, progress=False, **kw)
    return [json.loads(line) for line in out.read_text().splitlines()], stats


def flags_of(messages) -> list[tuple[int, str]]:
    """(turn index, flag) for every flag at the end of a user or system turn."""
    found = []
    for i, m in enumerate(messages):
        hit = FLAG.search(m["content"]) if m["role"] in ("user", "system") else None
        if hit:
            found.append((i, hit.group(1)))
    return found


def first_answer(messages) -> int:
    return next(i for i, m in enumerate(messages) if m["role"] == "assistant")


def test_mix_ratio(tmp_path):
    rows, stats = build(tmp_path, [thinking_row(i) for i in range(30)], [plain_row(i) for i in range(30)],
                        ratio=0.25)
    # 30 non-thinking rows are 75%: 40 samples, 10 of them thinking
    assert stats["kinds"] == {"thinking": 10, "non_thinking": 30, "switchable": 0}
    kinds = [r["kind"] for r in rows]
    assert kinds.count("thinking") == 10 and kinds.count("non_thinking") == 30
    for r in rows:
        final = r["messages"][-1]
        assert (final["reasoning_content"] != "") == (r["kind"] == "thinking")
    # no row is used twice
    assert len({json.dumps(r["messages"][-1]) for r in rows}) == 40

    rows, stats = build(tmp_path, [thinking_row(i) for i in range(30)], [plain_row(i) for i in range(30)],
                        ratio=0.6, size=20)
    assert stats["kinds"]["thinking"] == 12 and stats["kinds"]["non_thinking"] == 8
    assert fu.mix_sizes(7, 100, 1.0, None) == (7, 0)
    assert fu.mix_sizes(7, 100, 0.0, None) == (0, 100)
    with pytest.raises(ConfigError, match="size=60 at ratio=0.6 needs 36 thinking"):
        build(tmp_path, [thinking_row(i) for i in range(30)], [plain_row(i) for i in range(30)],
              ratio=0.6, size=60)
    with pytest.raises(ConfigError, match="ratio must be in"):
        build(tmp_path, [], [], ratio=1.5)


def test_non_thinking_rows_lose_their_reasoning(tmp_path):
    plain = [{"messages": [{"role": "user", "content": "q1"},
                           {"role": "assistant", "reasoning_content": "secret", "content": "a1"}]},
             {"messages": [{"role": "user", "content": "q2"},
                           {"role": "assistant", "content": "<think>\nhidden\n</think>\n\na2"}]},
             plain_row(3)]
    rows, stats = build(tmp_path, [], plain, ratio=0.0)
    assert stats["reasoning_stripped"] == 2
    answers = {r["messages"][-1]["content"]: r["messages"][-1]["reasoning_content"] for r in rows}
    assert answers == {"a1": "", "a2": "", "reply 3.0": ""}
    for r in rows:
        # renders with the empty think block, as Qwen3 does for non-thinking answers
        assert chat.EMPTY_THINK + r["messages"][-1]["content"] in chat.render(r["messages"]).text


def test_flag_goes_to_the_end_of_the_user_turn_or_the_system_message(tmp_path):
    thinking = [thinking_row(i, system=i % 2 == 0) for i in range(10)]
    plain = [plain_row(i) for i in range(10)]
    flags = FlagConfig(system_prob=0.0, unflagged_thinking_prob=0.0, repeat_prob=0.0)
    rows, _ = build(tmp_path, thinking, plain, flags=flags)
    for r in rows:
        user = next(m for m in r["messages"] if m["role"] == "user")
        flag = "/think" if r["kind"] == "thinking" else "/no_think"
        assert re.fullmatch(f"(question|plain) [0-9.]+ {flag}", user["content"])
        assert all(m["role"] != "system" or not FLAG.search(m["content"]) for m in r["messages"])

    rows, stats = build(tmp_path, thinking, plain, flags=FlagConfig(system_prob=1.0, unflagged_thinking_prob=0.0,
                                                                     repeat_prob=0.0))
    for r in rows:
        system = r["messages"][0]
        flag = "/think" if r["kind"] == "thinking" else "/no_think"
        assert system["role"] == "system"
        assert system["content"] in (flag, f"You are helpful. {flag}")
        assert flags_of(r["messages"]) == [(0, flag)]
    assert stats["flags"]["/think_system"] == 10 and stats["flags"]["/no_think_system"] == 10
    assert stats["flags"]["/think_user"] == stats["flags"]["/no_think_user"] == 0


def test_some_thinking_samples_carry_no_flag(tmp_path):
    thinking, plain = [thinking_row(i) for i in range(200)], [plain_row(i) for i in range(200)]
    rows, stats = build(tmp_path, thinking, plain, flags=FlagConfig(unflagged_thinking_prob=0.3))
    unflagged = [r for r in rows if r["kind"] == "thinking" and not flags_of(r["messages"])]
    assert 20 < len(unflagged) < 100 and len(unflagged) == stats["flags"]["unflagged_thinking"]
    for r in rows:
        if r["kind"] == "thinking":
            assert {f for _, f in flags_of(r["messages"])} <= {"/think"}

    rows, _ = build(tmp_path, thinking, plain, flags=FlagConfig(unflagged_thinking_prob=1.0))
    assert not any(flags_of(r["messages"]) for r in rows if r["kind"] == "thinking")
    rows, _ = build(tmp_path, thinking, plain, flags=FlagConfig(unflagged_thinking_prob=0.0))
    assert all(flags_of(r["messages"]) for r in rows if r["kind"] == "thinking")


@pytest.mark.parametrize("flags", [FlagConfig(),
                                   FlagConfig(system_prob=0.5, unflagged_thinking_prob=1.0, repeat_prob=1.0),
                                   FlagConfig(system_prob=0.0, repeat_prob=0.0)])
def test_non_thinking_samples_always_carry_no_think_before_the_first_answer(tmp_path, flags):
    plain = [plain_row(i, turns=1 + i % 3) for i in range(60)]
    rows, _ = build(tmp_path, [], plain, ratio=0.0, flags=flags)
    assert len(rows) == 60
    for r in rows:
        found = flags_of(r["messages"])
        assert found and found[0][0] < first_answer(r["messages"])
        assert {f for _, f in found} == {"/no_think"}
        assert all(m["reasoning_content"] == "" for m in r["messages"] if m["role"] == "assistant")


def test_multi_turn_flags_and_each_answer_follows_the_last_flag(tmp_path):
    rows, stats = build(tmp_path, [switchable_row(i) for i in range(20)],
                        [switchable_row(i + 100, turns=2) for i in range(20)], ratio=0.5)
    assert stats["kinds"] == {"thinking": 0, "non_thinking": 0, "switchable": 40}
    flag_counts, modes = [], set()
    for r in rows:
        msgs, mode = r["messages"], "/think"
        found = dict(flags_of(msgs))
        flag_counts.append(len(found))
        assert found, "a multi-turn switchable row gets at least one flag"
        for i, m in enumerate(msgs):
            if i in found:
                mode = found[i]
            if m["role"] == "assistant":
                tag = msgs[i - 1]["content"].split()[1]
                modes.add(mode)
                if mode == "/think":
                    assert (m["content"], m["reasoning_content"]) == (f"T{tag}", f"r{tag}")
                else:
                    assert (m["content"], m["reasoning_content"]) == (f"N{tag}", "")
                assert "no_think_content" not in m
    assert modes == {"/think", "/no_think"}
    assert max(flag_counts) >= 3      # several flags in one conversation
    assert sum(stats["switchable_turns"].values()) == 20 * 4 + 20 * 2


def test_existing_flags_are_replaced(tmp_path):
    thinking = [{"messages": [{"role": "user", "content": "q /no_think"},
                              {"role": "assistant", "reasoning_content": "r", "content": "a"}]}]
    rows, stats = build(tmp_path, thinking, [], ratio=1.0, flags=FlagConfig(system_prob=0.0,
                                                                          unflagged_thinking_prob=0.0))
    assert rows[0]["messages"][0]["content"] == "q /think"
    assert stats["flags_removed"] == 1


def test_bad_rows_are_counted(tmp_path):
    thinking = [thinking_row(0), {"messages": [{"role": "user", "content": "q"},
                                               {"role": "assistant", "content": "no reasoning"}]},
                {"messages": [{"role": "robot", "content": "x"}]},
                {"messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "q"},
                              {"role": "assistant", "reasoning_content": "r", "content": "a"}]}]
    t = _write(tmp_path / "t.jsonl", thinking)
    t.write_text(t.read_text() + "{not json\n")
    n = _write(tmp_path / "n.jsonl", [plain_row(0)])
    stats = fu.build(t, n, tmp_path / "o.jsonl", progress=False)
    assert stats["skipped"]["thinking"] == {"no_reasoning_in_final_turn": 1, "bad_role": 1, "bad_json": 1,
                                           "answer_before_first_query": 1}
    assert stats["usable"]["thinking"] == 1


def test_deterministic_given_the_seed_and_the_cli_saves_counts(tmp_path):
    t = _write(tmp_path / "t.jsonl", [thinking_row(i, system=i % 3 == 0) for i in range(40)]
               + [switchable_row(i) for i in range(5)])
    n = _write(tmp_path / "n.jsonl", [plain_row(i, turns=1 + i % 2) for i in range(40)])
    for name, seed in (("b", 1), ("c", 2)):
        fu.build(t, n, tmp_path / f"{name}.jsonl", ratio=0.5, seed=seed, progress=False)

    proc = run([sys.executable, "-m", "data_pipeline.fusion", f"thinking={t}", f"non_thinking={n}",
                f"output={tmp_path / 'a.jsonl'}", "ratio=0.5", "seed=1", "progress=false"])
    a, b, c = ((tmp_path / f"{x}.jsonl").read_bytes() for x in "abc")
    assert a == b and a != c
    stats = json.loads((tmp_path / "a.jsonl.stats.json").read_text())
    assert stats["kinds"] == {"thinking": 40, "non_thinking": 40, "switchable": 5}
    rows = [json.loads(line) for line in a.decode().splitlines()]
    assert sum(r["kind"] == "switchable" for r in rows) == 5
    assert all(chat.problem(r["messages"]) is None for r in rows)   # what recipes.sft accepts
    placed = sum(len(flags_of(r["messages"])) for r in rows)
    assert placed == sum(v for k, v in stats["flags"].items() if k != "unflagged_thinking")
    assert "40 thinking, 40 non-thinking, 5 switchable" in proc.stdout

    bad = run([sys.executable, "-m", "data_pipeline.fusion", f"thinking={t}", "flags.system_prob=2"], check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: non_thinking= is required"]
    with pytest.raises(ConfigError, match=r"flags.system_prob must be a probability in \[0, 1\], got 2"):
        fu.build(t, n, tmp_path / "d.jsonl", flags=FlagConfig(system_prob=2), progress=False)
