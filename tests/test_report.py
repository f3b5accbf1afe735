"""recipes.report on hand-written run directories: the per-stage table, the budget table,
the plots, non-finite values, resumed stages and the CLI's errors. No model runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from recipes.report import main, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(stage_dir: Path, lines: list[dict]) -> None:
    stage_dir.mkdir(parents=True)
    (stage_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def _marker(run: Path, stage: str, order: int, **fields) -> None:
    (run / "pipeline").mkdir(exist_ok=True)
    marker = {"stage": stage, "order": order, "checkpoint": f"/ckpt/{stage}/iter_0000010",
              "fingerprint": f"{stage[:4]}0123456789", "init_from": None, "wall_s": 12.0, "eval": {}, **fields}
    (run / "pipeline" / f"{stage}.json").write_text(json.dumps(marker))


def _plan(run: Path, stages: list[str]) -> None:
    (run / "pipeline" / "plan.json").write_text(json.dumps({"pipeline": run.name, "stages": stages}))


def _small(run: Path) -> None:
    # pretrain_s3 was killed after step 3 and resumed from step 2: the second step 3 counts.
    _metrics(run / "pretrain_s3", [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 3, "loss": 2.0},
                                   {"event": "resume", "step": 2}, {"step": 3, "loss": 1.75},
                                   {"event": "finished"}])
    _metrics(run / "distill_off_policy", [
        {"step": 1, "loss": 5.0, "distill/kl": 4.0, "distill/ce": 1.0, "distill/eval_kl": 3.5},
        {"step": 2, "loss": 4.0, "distill/kl": math.inf, "distill/ce": 1.0},
        {"step": 3, "loss": math.nan, "distill/kl": math.nan, "distill/ce": 1.0, "distill/eval_kl": 2.5}])
    _metrics(run / "distill_on_policy", [{"step": 1, "loss": 1.0, "distill/kl": 1.0},
                                         {"step": 2, "loss": 0.9, "distill/kl": 0.9}])
    # Written in the opposite of alphabetical order, so the table must follow `order`.
    _marker(run, "pretrain_s3", 0, init_from="/elsewhere/pretrain_s2/checkpoints/iter_0000042",
            eval={"lm_loss": 4.25})
    _marker(run, "distill_off_policy", 1, init_from="/ckpt/pretrain_s3/iter_0000010", wall_s=33.333,
            teacher="/t/iter_1", eval={"lm_loss": 3.1, "accuracy_think": 0.8, "format_no_think": None,
                                       "accuracy_no_think": math.nan})
    _plan(run, ["pretrain_s1", "pretrain_s2", "pretrain_s3", "distill_off_policy", "distill_on_policy"])
    (run / "budget_curve.json").write_text(json.dumps({"stage": "sft_fusion", "checkpoint": "/c", "points": [
        {"budget": 0, "accuracy": 0.05, "thinking_tokens": 0.0},
        {"budget": 8, "accuracy": 0.4, "thinking_tokens": 7.5},
        {"budget": None, "accuracy": 0.85, "thinking_tokens": 18.2}]}))


def _flagship(run: Path) -> None:
    _metrics(run / "rl_reasoning", [{"step": s, "loss": 0.1 * s, "rl/reward_mean": 0.2 * s, "rl/entropy": 1.0 / s}
                                    for s in range(1, 5)])
    _marker(run, "rl_reasoning", 0, eval={"accuracy_think": 0.5, "expert_load_max_over_mean": 1.4})
    _plan(run, ["pretrain_s1", "pretrain_s2", "pretrain_s3", "sft_cold_start", "rl_reasoning", "sft_fusion",
                "rl_general"])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    _small(root / "runs" / "small")
    _flagship(root / "runs" / "flagship")
    path = write_report(root / "out", {"small": root / "runs" / "small", "flagship": root / "runs" / "flagship"})
    return path, path.read_text()


def _table(text: str, title: str) -> list[dict]:
    """Rows of the first markdown table under `## title`, keyed by the header."""
    section = text.split(f"## {title}\n", 1)[1]
    lines = section[section.index("\n| "):].strip().split("\n\n", 1)[0].splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def test_table_rows_follow_order_with_loss_eval_and_origin(report):
    path, text = report
    assert path.name == "report.md" and not path.with_suffix(".md.tmp").exists()
    rows = _table(text, "small")
    assert [r["stage"] for r in rows[:2]] == ["pretrain_s3", "distill_off_policy"]
    s3, off = rows[0], rows[1]
    assert (s3["steps"], s3["wall (s)"], s3["lm_loss"], s3["fingerprint"]) == ("3", "12", "4.25", "pret0123")
    assert s3["from"] == "iter_0000042"  # no finished stage wrote that checkpoint: its basename
    assert off["from"] == "pretrain_s3"
    assert (off["wall (s)"], off["lm_loss"], off["accuracy_think"]) == ("33.3", "3.1", "0.8")
    assert off["format_no_think"] == "" and s3["accuracy_think"] == ""  # missing or null: blank
    # Eval columns: the union over the run's stages, in the fixed order.
    assert list(rows[0])[6:] == ["lm_loss", "accuracy_think", "accuracy_no_think", "format_no_think"]
    assert _table(text, "flagship")[0]["from"] == "random init"
    assert _table(text, "flagship")[0]["expert_load_max_over_mean"] == "1.4"


def test_unfinished_stages_are_listed_as_not_run(report):
    rows = {r["stage"]: r for r in _table(report[1], "small")}
    # The small pipeline's stages with no marker, including one that logged steps.
    assert rows["pretrain_s1"]["steps"] == "not run" and rows["pretrain_s2"]["steps"] == "not run"
    assert rows["distill_on_policy"]["steps"].startswith("not run")
    assert rows["distill_on_policy"]["final loss"] == ""
    flagship = [r["stage"] for r in _table(report[1], "flagship")]
    assert flagship[0] == "rl_reasoning" and "sft_fusion" in flagship


def test_resumed_stage_uses_last_record_per_step(report):
    assert _table(report[1], "small")[0]["final loss"] == "1.75"


def test_non_finite_values_show_as_nan(report):
    off = _table(report[1], "small")[1]
    assert off["final loss"] == "nan" and off["accuracy_no_think"] == "nan"


def test_plots_exist_and_are_linked(report):
    path, text = report
    for name in ("loss.png", "rl.png", "distill_kl.png", "budget.png"):
        assert (path.parent / "plots" / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f"(plots/{name})" in text


def test_budget_table_lists_every_point(report):
    section = report[1].split("## small\n", 1)[1].split("\n## ", 1)[0]
    budget = section.split("Thinking budget curve (sft_fusion):", 1)[1]
    assert "| 0 | 0.05 | 0 |" in budget
    assert "| 8 | 0.4 | 7.5 |" in budget
    assert "| no limit | 0.85 | 18.2 |" in budget


def test_absent_data_skips_the_plot_and_says_so(tmp_path):
    run = tmp_path / "pre"
    _metrics(run / "pretrain_s1", [{"step": 1, "loss": 2.0}])
    _marker(run, "pretrain_s1", 0)
    text = write_report(tmp_path / "out", {"pre": run}).read_text()
    assert (tmp_path / "out" / "plots" / "loss.png").is_file()
    for name, caption in (("rl.png", "RL reward"), ("distill_kl.png", "Distillation KL"),
                          ("budget.png", "Thinking budget")):
        assert not (tmp_path / "out" / "plots" / name).exists()
        assert f"(plots/{name})" not in text
        assert any(line.startswith(caption) and "skipped" in line for line in text.splitlines()), caption


def test_cli_missing_run_dir_is_one_error_line(tmp_path, capsys):
    run = tmp_path / "present"
    run.mkdir()
    assert main(["--out", str(tmp_path / "out"), str(run), str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "absent" in err and err.count("\n") == 1
    assert not (tmp_path / "out" / "report.md").exists()


def test_cli_writes_report_titled_by_dir_name(tmp_path, capsys):
    run = tmp_path / "myrun"
    _metrics(run / "pretrain_s1", [{"step": 1, "loss": 2.0}])
    _marker(run, "pretrain_s1", 0)
    assert main(["--out", str(tmp_path / "out"), str(run)]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == tmp_path / "out" / "report.md"
    assert _table(printed.read_text(), "myrun")[0]["final loss"] == "2"


def test_stages_not_run_yet_come_from_the_runs_plan(tmp_path):
    # recipes.pipeline writes the stage list to pipeline/plan.json before the first stage.
    run = tmp_path / "mini"
    _metrics(run / "pretrain_s1", [{"step": 1, "loss": 2.0}])
    _marker(run, "pretrain_s1", 0)
    (run / "pipeline" / "plan.json").write_text(json.dumps(
        {"pipeline": "mini", "stages": ["pretrain_s1", "pretrain_s2", "distill_off_policy"]}))
    (run / "pipeline" / "pretrain_s1.log").write_text("not json\n")
    rows = _table(write_report(tmp_path / "out", {"mini": run}).read_text(), "mini")
    assert [(r["stage"], r["steps"]) for r in rows] == [
        ("pretrain_s1", "1"), ("pretrain_s2", "not run"), ("distill_off_policy", "not run")]