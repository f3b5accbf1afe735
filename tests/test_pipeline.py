"""The pipeline runner (recipes/pipeline.py), the eval (recipes/eval.py) and the shortened
miniature pipeline: both Qwen3 paths, every stage, each consuming the previous stage's
checkpoint, a kill in the middle of rl_reasoning and a re-run that continues from there."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from model.config import ConfigError
from recipes import pipeline
from recipes.eval import response_form
from tests.conftest import REPO, _env

FLAGSHIP = ["pretrain_s1", "pretrain_s2", "pretrain_s3", "sft_cold_start", "rl_reasoning", "sft_fusion", "rl_general"]
SMALL = ["pretrain_s1", "pretrain_s2", "pretrain_s3", "distill_off_policy", "distill_on_policy"]


# ----------------------------------------------------------------------------- planning

def test_flagship_plan_wires_each_stage_to_the_previous_one(tmp_path):
    plan = pipeline.make_plan("qwen3_flagship", [f"run.root={tmp_path}", "model=qwen3_8b",
                                                 "stages.rl_reasoning.trainer.max_steps=5"])
    assert [s.name for s in plan.stages] == FLAGSHIP
    assert plan.run_dir == tmp_path / "qwen3_8b"
    assert [s.init_from for s in plan.stages] == [None, *FLAGSHIP[:-1]]
    for stage in plan.stages:
        # the per-stage override reaches rl_reasoning alone; the common one reaches every stage
        assert ("trainer.max_steps=5" in stage.overrides) == (stage.name == "rl_reasoning")
        assert pipeline.stage_command(plan, stage)[2:4] == [f"recipes.{stage.recipe}", f"stage={stage.name}"]
        assert "model=qwen3_8b" in pipeline.stage_command(plan, stage)
    assert plan.settings.budget_curve.stage == "sft_fusion"


def test_small_plan_reads_the_teacher_and_writes_its_data_first(tmp_path):
    plan = pipeline.make_plan("qwen3_small", [f"run.root={tmp_path}", "teacher=/ckpt/flagship/rl_general"])
    assert [s.name for s in plan.stages] == SMALL
    off, on = plan.stages[3], plan.stages[4]
    assert off.teacher == on.teacher == "/ckpt/flagship/rl_general"
    assert "teacher=/ckpt/flagship/rl_general" in off.overrides and "init_from=pretrain_s3" in off.overrides
    generate = pipeline.generate_command(plan, off)
    out = f"{plan.run_dir}/teacher_data/teacher.jsonl"
    assert f"output={out}" in generate and "checkpoint=/ckpt/flagship/rl_general" in generate
    assert f"distill.data.files=[{out}]" in off.overrides
    assert on.generate is None and "init_from=distill_off_policy" in on.overrides


@pytest.mark.parametrize("override,message", [
    ("stages.no_such_stage.trainer.max_steps=1", "stages.<stage>.<key>=<value> with a stage of this pipeline"),
    ("trainer.no_such_key=1", "stage pretrain_s1: trainer.no_such_key=1: unknown key trainer.no_such_key"),
    ("stages.pretrain_s2.run.name=other", "stage pretrain_s2 would write to"),
    ("stages.sft_fusion.init_from=rl_general", "init_from=rl_general is not an earlier stage"),
    # a training setting only the stage's own checks catch, found before the first stage runs
    ("stages.sft_cold_start.trainer.max_steps=2", "stage sft_cold_start: optim warmup (2 steps) must be shorter"),
])
def test_bad_pipeline_override_is_one_line_before_any_stage(tmp_path, override, message):
    with pytest.raises(ConfigError, match=None) as e:
        pipeline.check_plan(pipeline.make_plan("qwen3_flagship", [f"run.root={tmp_path}", "optim.warmup_steps=2",
                                                                  override]))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "tiny").exists()


def test_unknown_pipeline_names_the_ones_there_are():
    with pytest.raises(ConfigError, match="no pipeline 'nope' \\(have: .*qwen3_flagship.*qwen3_small"):
        pipeline.make_plan("nope", [])


def test_override_values_survive_hydra(tmp_path):
    assert pipeline.override_value([1, "a b", None, True]) == "[1,'a b',null,true]"
    assert pipeline.flatten({"a": {"b": 1, "c": [2, 3]}, "d": "x/y"}) == ["a.b=1", "a.c=[2,3]", "d=x/y"]
    # a path with a space and a list, composed the way the stage will see them
    cfg = pipeline.compose_stage("sft_cold_start", [f"run.root={pipeline.override_value(str(tmp_path / 'a b'))}",
                                                    f"sft.data.files={pipeline.override_value(['x y.jsonl'])}"])
    assert cfg.run.root == str(tmp_path / "a b") and list(cfg.sft.data.files) == ["x y.jsonl"]


def test_response_form():
    assert response_form("<think>\nadd the tens\n</think>\n\n\\boxed{57}") == "think"
    assert response_form("<think>\n\n</think>\n\n\\boxed{57}") == "no_think"
    assert response_form("\\boxed{57}") is None
    assert response_form("<think>\nno end of thinking") is None
    assert response_form("<think>\nx\n</think>\n\n") is None   # no answer after the block


# ----------------------------------------------------------------------------- the shortened run

# Steps enough that the kill, sent once the first checkpoint appears, lands inside the stage
# even on a loaded machine (each in-process step is well under a second).
RL_STEPS = 8


def _mini(root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "recipes.pipeline_mini", "--root", str(root), "--quick",
                             f"stages.rl_reasoning.trainer.max_steps={RL_STEPS}", "stages.rl_reasoning.trainer.save_interval=1"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _markers(run: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (run / "pipeline").glob("*.json") if p.stem != "plan"}


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """The shortened miniature pipeline, SIGKILLed (with its whole process group) once
    rl_reasoning has written its first checkpoint, then run again with the same command."""
    root = tmp_path_factory.mktemp("mini")
    first = _mini(root)
    latest = root / "flagship" / "rl_reasoning" / "latest"
    deadline = time.time() + 900
    while not latest.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert latest.exists(), first.communicate()[0][-5000:] if first.poll() is not None else "timed out"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    # what the stages before the killed one left: a re-run must not touch it
    done = [root / "flagship" / stage for stage in FLAGSHIP[:FLAGSHIP.index("rl_reasoning")]]
    before = {p: p.stat().st_mtime_ns for d in done for p in (d / "metrics.jsonl", d / "final.json")}
    before.update({p: p.stat().st_mtime_ns for d in done for p in [root / "flagship" / "pipeline" / f"{d.name}.json"]})
    second = _mini(root)
    out = second.communicate(timeout=1500)[0]
    assert second.returncode == 0, out[-6000:]
    yield root, before, out
    # twelve stages' checkpoints with optimizer state: gigabytes the later tests need
    shutil.rmtree(root, ignore_errors=True)


def test_every_stage_consumes_the_previous_stage_checkpoint(mini_run):
    root, _, _ = mini_run
    for title, stages in (("flagship", FLAGSHIP), ("small", SMALL)):
        markers = _markers(root / title)
        assert sorted(markers, key=lambda s: markers[s]["order"]) == stages
        for previous, stage in zip(stages, stages[1:]):
            m, p = markers[stage], markers[previous]
            # what the stage itself recorded loading (final.json), against what the previous one wrote
            assert m["init_from"] == p["checkpoint"], (stage, m["init_from"], p["checkpoint"])
            assert m["init_fingerprint"] == p["fingerprint"]
        assert markers[stages[0]]["init_from"] is None
        for name, m in markers.items():
            assert m["eval"] and all(math.isfinite(v) for v in m["eval"].values()), (name, m["eval"])
            assert ("expert_load_max_over_mean" in m["eval"]) == (title == "small")
    # the teacher's data for off-policy: generate.max_rows=8 prompts, thinking mode (mini_small.yaml)
    rows = [json.loads(line) for line in (root / "small" / "teacher_data" / "teacher.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in rows}) == 8 and {r["mode"] for r in rows} == {"think"}
    teacher = _markers(root / "flagship")["rl_general"]
    for stage in ("distill_off_policy", "distill_on_policy"):
        m = _markers(root / "small")[stage]
        assert (m["teacher"], m["teacher_fingerprint"]) == (teacher["checkpoint"], teacher["fingerprint"])


def test_kill_in_rl_reasoning_continues_without_redoing_earlier_stages(mini_run):
    root, before, out = mini_run
    # the earlier stages were skipped: their metrics and markers are untouched
    for path, mtime in before.items():
        assert path.stat().st_mtime_ns == mtime, path
    for stage in FLAGSHIP[:4]:
        assert f"{stage}: done earlier" in out
    assert "rl_reasoning: resuming from" in out
    records = [json.loads(line) for line in (root / "flagship" / "rl_reasoning" / "metrics.jsonl").read_text().splitlines()]
    (resumed,) = [r["step"] for r in records if r.get("event") == "resume"]
    assert 1 <= resumed < RL_STEPS
    after = records[[r.get("event") for r in records].index("resume") + 1:]
    assert [r["step"] for r in after if "event" not in r] == list(range(resumed + 1, RL_STEPS + 1))


def test_report_and_budget_curve(mini_run):
    root, _, _ = mini_run
    report = (root / "report.md").read_text()
    for stage in set(FLAGSHIP + SMALL):
        assert f"| {stage} |" in report
    for png in ("loss", "rl", "distill_kl", "budget"):
        assert (root / "plots" / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = json.loads((root / "flagship" / "budget_curve.json").read_text())
    assert curve["stage"] == "rl_general" and [p["budget"] for p in curve["points"]] == [0, None]
    assert curve["points"][0]["thinking_tokens"] == 0


@pytest.mark.slow
def test_quick_pass_at_the_full_vocabulary(tmp_path):
    """The same shortened run with the real Qwen3 tokenizer: `mini`'s vocabulary then comes
    from its 151,669 entries, padded to 151,680, and every stage of both paths still runs."""
    proc = subprocess.run([sys.executable, "-m", "recipes.pipeline_mini", "--root", str(tmp_path), "--quick",
                           "--tokenizer", "qwen3"], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    for title, stages in (("flagship", FLAGSHIP), ("small", SMALL)):
        assert sorted(_markers(tmp_path / title)) == sorted(stages)
        for stage in stages:
            config = (tmp_path / title / stage / "config.yaml").read_text()
            assert "  vocab_size: 151680\n" in config, (title, stage)
