"""data_pipeline.mini: the miniature pipeline's datasets, built once here at a small size
(about 15 s: the tokenizer and the tokenized corpus are most of it)."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline import mini
from tests.conftest import REPO, run

# held out: as many of each size (1, 2 and 3 digits), so a multiple of 3
SEED, PROBLEMS, HELD_OUT = 0, 400, 30
TRAINING = ("cold_start", "rl_reasoning", "fusion", "rl_general", "distill_prompts")
QUESTION = re.compile(r"What is (\d+)\+(\d+)\?")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    paths = mini.write_mini_data(root, seed=SEED, problems=PROBLEMS, held_out=HELD_OUT, quiet=True)
    return root, paths


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pair(row: dict) -> tuple[int, int]:
    """The (a, b) of an addition row, read from its user turn's text."""
    users = [m["content"] for m in row["messages"] if m["role"] == "user"]
    assert len(users) == 1, row
    a, b = QUESTION.match(users[0]).groups()
    return int(a), int(b)


def size(row: dict) -> int:
    """Digits of the operands of an addition row (both have as many)."""
    a, b = pair(row)
    assert len(str(a)) == len(str(b)), row
    return len(str(a))


def files_of(root: Path, paths: dict) -> list[Path]:
    """Every file behind the outputs (an indexed dataset: .bin and .idx)."""
    out = []
    for name, path in paths.items():
        kind = mini.OUTPUTS[name][1]
        out += (sorted(path.iterdir()) if kind == "tokenizer"
                else [Path(f"{path}.bin"), Path(f"{path}.idx")] if kind == "indexed" else [path])
    return out + [root / mini.MANIFEST]


def mtimes(files: list[Path]) -> dict[Path, int]:
    return {f: f.stat().st_mtime_ns for f in files}


def test_every_output_exists_non_empty_and_is_listed(built):
    root, paths = built
    assert set(paths) == set(mini.OUTPUTS)
    for f in files_of(root, paths):
        assert f.is_file() and f.stat().st_size > 0, f
    manifest = json.loads((root / mini.MANIFEST).read_text())
    assert manifest["params"] == {"seed": SEED, "problems": PROBLEMS, "held_out": HELD_OUT, "tokenizer": "mini"}
    assert {n: root / e["path"] for n, e in manifest["files"].items()} == paths
    for name, entry in manifest["files"].items():
        if entry["kind"] == "jsonl":
            assert entry["rows"] == len(rows(paths[name])) > 0, name
    for name in TRAINING:
        assert len(rows(paths[name])) == PROBLEMS, name
    assert len(rows(paths["eval_held"])) == HELD_OUT


def test_stage_defaults_find_their_data(built):
    """Every `${data.root}/...` default in the root, stage and pipeline configs resolves
    under the root, except the teacher's generations, which the pipeline writes itself."""
    root, _ = built
    refs = set()
    for cfg in sorted((REPO / "hydra_conf").rglob("*.yaml")):   # the tokenizer's is in config.yaml
        refs |= set(re.findall(r"\$\{data(?:\.|_)root\}/([\w./-]+)", cfg.read_text()))
    assert {"tokenizer", "sft/cold_start.jsonl", "rl/reasoning.jsonl", "eval/held.jsonl"} <= refs
    missing = [r for r in refs - {"distill/teacher.jsonl"} if not (root / r).exists()]
    assert not missing
    from data_pipeline.preprocess import bucket_prefix
    from data_pipeline.indexed import validate

    for name in ("general", "code", "math"):   # the S1/S2 blend
        assert validate(root / name).documents > 0
    for lo, hi in zip(mini.LONG_BUCKETS, mini.LONG_BUCKETS[1:]):   # S3's length_mix (prefix: long)
        assert validate(bucket_prefix(root / "long", lo, hi)).documents > 0


def test_held_out_problems_are_in_no_training_file(built):
    _, paths = built
    held = [pair(r) for r in rows(paths["eval_held"])]
    assert len(set(held)) == len(held) == HELD_OUT
    for name in TRAINING:
        train = [pair(r) for r in rows(paths[name])]   # pair() fails on a row it cannot read
        assert len(train) == PROBLEMS, name
        assert not set(train) & set(held), name


def test_references_are_the_sums(built):
    _, paths = built
    for name in ("rl_reasoning", "rl_general", "distill_prompts", "eval_held", "cold_start"):
        for r in rows(paths[name]):
            assert r["reference"] == str(sum(pair(r))), (name, r)
    for name in ("cold_start", "fusion"):
        for r in rows(paths[name]):
            answer = r["messages"][-1]
            assert answer["role"] == "assistant" and answer["content"] == f"\\boxed{{{sum(pair(r))}}}", (name, r)
            if answer["reasoning_content"]:
                # the column sums' last line carries the whole answer
                assert answer["reasoning_content"].splitlines()[-1].endswith(f", {sum(pair(r))}"), r


def test_sft_rows_render(built):
    from data_pipeline.sft_data import read_conversations

    _, paths = built
    for name in ("cold_start", "fusion"):
        skipped = Counter()
        assert len(list(read_conversations([paths[name]], skipped))) == PROBLEMS and not skipped, name
    assert all(r["messages"][-1]["reasoning_content"] for r in rows(paths["cold_start"]))


def test_fusion_mixes_both_modes(built):
    _, paths = built
    kinds = Counter()
    for r in rows(paths["fusion"]):
        answer = r["messages"][-1]
        flags = " ".join(m["content"] for m in r["messages"] if m["role"] in ("user", "system"))
        if answer["reasoning_content"] == "":
            assert r["kind"] == "non_thinking" and "/no_think" in flags, r
        else:
            assert r["kind"] == "thinking" and "/no_think" not in flags, r
        kinds[r["kind"], "/think" in flags] += 1
    assert kinds["non_thinking", False] == PROBLEMS * 3 // 4   # a quarter thinking rows
    # answered directly only where the model can without column sums; thinking: every size
    sizes = {kind: Counter(size(r) for r in rows(paths["fusion"]) if r["kind"] == kind)
             for kind in ("thinking", "non_thinking")}
    assert set(sizes["non_thinking"]) == {1, 2} and set(sizes["thinking"]) == {1, 2, 3}, sizes
    assert kinds["thinking", True] > 0 and kinds["thinking", False] > 0   # some thinking rows unflagged


def test_general_rl_has_both_flags_and_rewards_per_mode(built):
    from data_pipeline.rl_data import reward_entries
    from recipes.rewards import REWARDS, reference_problem

    _, paths = built
    modes, sizes = Counter(), Counter()
    for r in rows(paths["rl_general"]):
        text = r["messages"][-1]["content"]
        mode = "no_think" if text.endswith(" /no_think") else "think" if text.endswith(" /think") else None
        assert mode, r
        modes[mode] += 1
        sizes[mode, size(r)] += 1
        names = [name for name, _, _ in reward_entries(r["reward"], r["reference"], r["messages"], known=REWARDS,
                                                       reference_problem=reference_problem)]
        assert names == [{"think": "format_think", "no_think": "no_think"}[mode], "math"], r
    assert modes["think"] == modes["no_think"] == PROBLEMS // 2
    assert not sizes["no_think", 3] and sizes["think", 3] > 0   # no three-digit sums without thinking


def test_rl_reader_takes_every_row(built):
    from data_pipeline.rl_data import read_prompts
    from data_pipeline.tokenizer import load_tokenizer
    from recipes.rewards import REWARDS, reference_problem

    root, paths = built
    tok = load_tokenizer(root / "tokenizer")
    for name in ("rl_reasoning", "rl_general", "distill_prompts", "eval_held"):
        prompts, skipped = read_prompts([paths[name]], ["math"], tok, 64, True, known=REWARDS,
                                        reference_problem=reference_problem)
        assert len(prompts) == len(rows(paths[name])) and not skipped, (name, skipped)


def test_pretraining_datasets_load(built):
    import numpy as np

    from data_pipeline.indexed import open_indexed
    from data_pipeline.preprocess import bucket_prefix
    from data_pipeline.tokenizer import load_tokenizer

    root, _ = built
    vocab = len(load_tokenizer(root / "tokenizer"))
    assert vocab == 4096   # tokenized with the mini tokenizer, not Qwen3's 151,669 ids
    for name in ("general", "code", "math"):
        ds = open_indexed(root / name)
        assert len(ds) > 100 and int(np.max(ds[0])) < vocab
    for lo, hi in zip(mini.LONG_BUCKETS, mini.LONG_BUCKETS[1:]):
        ds = open_indexed(bucket_prefix(root / "long", lo, hi))
        assert len(ds) > 0 and all(lo <= n < hi for n in ds.sequence_lengths)


def test_lm_eval_text_is_held_out(built):
    root, paths = built
    docs = [r["text"] for r in rows(paths["eval_lm"])]
    assert len(docs) == sum(mini.LM_DOCS.values()) and all(d.strip() for d in docs)
    train = [json.loads(line)["text"] for f in sorted((root / "corpus").glob("*.jsonl"))
             for line in f.read_text(encoding="utf-8").splitlines()]
    assert not set(docs) & set(train)
    used = set().union(*map(mini._sources, train))
    code = [d for d in docs if mini._sources(d)]
    assert len(code) == mini.LM_DOCS["code"] and not used & set().union(*map(mini._sources, code))


def test_second_call_rewrites_nothing(built):
    root, paths = built
    before = mtimes(files_of(root, paths))
    assert mini.write_mini_data(root, seed=SEED, problems=PROBLEMS, held_out=HELD_OUT, quiet=True) == paths
    assert mtimes(files_of(root, paths)) == before
    proc = run([sys.executable, "-m", "data_pipeline.mini", "--out", str(root), "--seed", str(SEED),
                "--problems", str(PROBLEMS), "--held-out", str(HELD_OUT)])
    assert "up to date" in proc.stdout
    assert mtimes(files_of(root, paths)) == before


def test_new_parameters_rewrite(built, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(built[0], root)   # copy2 keeps the mtimes
    paths = {n: root / p.relative_to(built[0]) for n, p in built[1].items()}
    before = mtimes(files_of(root, paths))
    mini.write_mini_data(root, seed=SEED, problems=PROBLEMS + 10, held_out=HELD_OUT - 3, quiet=True)
    after = mtimes(files_of(root, paths))
    problem_files = [paths[n] for n, (_, _, step) in mini.OUTPUTS.items() if step == "problems"]
    for f in problem_files + [root / mini.MANIFEST]:
        assert after[f] != before[f], f
    # the tokenizer and the pretraining data do not depend on these: kept as they were
    assert all(after[f] == before[f] for f in before if f not in problem_files and f != root / mini.MANIFEST)
    for name in TRAINING:
        assert len(rows(paths[name])) == PROBLEMS + 10
    assert len(rows(paths["eval_held"])) == HELD_OUT - 3
    assert json.loads((root / mini.MANIFEST).read_text())["params"]["problems"] == PROBLEMS + 10



def test_new_seed_redoes_the_pretraining_data(built, tmp_path, monkeypatch):
    """Only the steps that depend on the seed run again (the corpus step is stubbed here:
    re-tokenizing costs seconds, and test_new_parameters_rewrite covers real rewrites)."""
    root = tmp_path / "copy"
    shutil.copytree(built[0], root)
    calls, real = [], mini._problems
    files = json.loads((root / mini.MANIFEST).read_text())["files"]

    def pretrain(r, seed, progress):
        calls.append(("pretrain", seed))
        return {n: e["rows"] for n, e in files.items() if e["step"] == "pretrain"}

    def problems(r, seed, *args):
        calls.append(("problems", seed))
        return real(r, seed, *args)

    def tokenizer(r, kind):
        calls.append(("tokenizer", None))
        return {"tokenizer": "-"}

    monkeypatch.setattr(mini, "_pretrain", pretrain)
    monkeypatch.setattr(mini, "_problems", problems)
    monkeypatch.setattr(mini, "_tokenizer", tokenizer)
    mini.write_mini_data(root, seed=SEED + 1, problems=PROBLEMS, held_out=HELD_OUT, quiet=True)
    assert calls == [("pretrain", SEED + 1), ("problems", SEED + 1)]
    assert json.loads((root / mini.MANIFEST).read_text())["params"]["seed"] == SEED + 1
    calls.clear()
    mini.write_mini_data(root, seed=SEED + 1, problems=PROBLEMS, held_out=HELD_OUT, quiet=True)
    assert calls == []


def test_crash_leaves_no_manifest_and_next_call_recovers(built, tmp_path, monkeypatch):
    import data_pipeline.fusion as fusion

    root = tmp_path / "copy"
    shutil.copytree(built[0], root)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fusion, "build", crash)
    with pytest.raises(KeyboardInterrupt):
        mini.write_mini_data(root, seed=SEED, problems=PROBLEMS - 10, held_out=HELD_OUT, quiet=True)
    assert not (root / mini.MANIFEST).exists()   # half-rebuilt: not marked complete
    assert not list(root.rglob("*.tmp*"))
    monkeypatch.undo()
    paths = mini.write_mini_data(root, seed=SEED, problems=PROBLEMS - 10, held_out=HELD_OUT, quiet=True)
    assert json.loads((root / mini.MANIFEST).read_text())["params"]["problems"] == PROBLEMS - 10
    assert len(rows(paths["fusion"])) == len(rows(paths["cold_start"])) == PROBLEMS - 10


@pytest.mark.parametrize("kw, message", [
    ({"problems": 1}, "problems must be an integer >= 2"),
    ({"held_out": 1.5}, "held_out must be an integer >= 3"),
    ({"held_out": 2}, "held_out must be an integer >= 3"),
    ({"held_out": 40}, "held_out=40 must be a multiple of 3"),
    # more than half the 100 one-digit pairs held out
    ({"held_out": 153}, "held_out=153 must be a multiple of 3 .* of at most 150"),
    ({"tokenizer": "gpt2"}, "tokenizer must be one of mini, qwen3, got 'gpt2'"),
])
def test_bad_parameters_are_refused(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        mini.write_mini_data(tmp_path / "d", quiet=True, **kw)
    assert not (tmp_path / "d").exists()


def test_held_out_is_stratified_over_sizes(built):
    _, paths = built
    held = rows(paths["eval_held"])
    assert Counter(size(r) for r in held) == {1: HELD_OUT // 3, 2: HELD_OUT // 3, 3: HELD_OUT // 3}


def test_thinking_budgets_step_up_with_the_sizes(built):
    """0, then per size the fewest tokens that finish every held-out answer's thinking,
    then no limit. Counted here without the chat renderer: <think> and </think> are
    added tokens, so the thinking between them is tokenized on its own."""
    from data_pipeline.corpus import column_sums
    from data_pipeline.tokenizer import load_tokenizer

    root, paths = built
    tok = load_tokenizer(root / "tokenizer")
    longest = Counter()
    for r in rows(paths["eval_held"]):
        a, b = pair(r)
        thinking = len(tok.encode("\n" + column_sums(a, b) + "\n", add_special_tokens=False))
        longest[size(r)] = max(longest[size(r)], thinking)
    budgets = mini.thinking_budgets(root)
    assert budgets == [0, longest[1] + 1, longest[2] + 1, longest[3] + 1, None]
    # longer sums need longer thinking: the curve has a step per size
    assert 0 < budgets[1] < budgets[2] < budgets[3]
