"""Logs a cluster user can read: the step lines of a run without a terminal, one process's
warnings per job, and a `--help` that works for every command-line entry point."""

import logging
import os
import re
import runpy
import sys
import warnings
from types import SimpleNamespace

import pytest

from model.parallel import QUIET_LOGGERS, quiet_other_ranks
from recipes import run_log
from recipes.run_log import RunLog, duration, finished_line, token_count

METRICS = {"loss": 2.5, "lr": 3e-4, "grad_norm": 0.75, "tokens_per_s": 51234.5, "step_time_s": 0.1}
LINE = re.compile(r"^step (\d+)/(\d+) eta (\S+) tokens/s=51234 loss=2\.5 lr=0\.0003 grad_norm=0\.75$")


def make_log(tmp_path, start_step: int, max_steps: int, log_interval: int, progress: bool = False) -> RunLog:
    return RunLog(tmp_path, "run", "pretrain_s1", {}, start_step, max_steps, log_interval, None, progress,
                  enabled=True)


def step_lines(capsys, log: RunLog, steps) -> list[str]:
    for step in steps:
        log.step(step, dict(METRICS))
    log.close()
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("start_step", [0, 4])
def test_first_and_last_step_print_a_line_whatever_the_interval(tmp_path, capsys, start_step):
    """log_interval beyond max_steps: this job's first step and the stage's last each print
    a line (step/total, ETA, tokens/s, loss, LR, grad norm); the steps between print nothing."""
    lines = step_lines(capsys, make_log(tmp_path, start_step, 10, log_interval=100), range(start_step + 1, 11))
    assert [LINE.match(line).group(1, 2) for line in lines] == [(str(start_step + 1), "10"), ("10", "10")], lines
    assert LINE.match(lines[-1]).group(3) == "0s"


def test_interval_steps_print_between(tmp_path, capsys):
    lines = step_lines(capsys, make_log(tmp_path, 0, 10, log_interval=4), range(1, 11))
    assert [LINE.match(line).group(1) for line in lines] == ["1", "4", "8", "10"], lines


def test_eta_leaves_out_the_first_step(tmp_path, capsys, monkeypatch):
    """A fake clock: a 30 s first step (warm-up), then 1 s steps. At step 1 the ETA is all
    it knows (199 x 30 s); from step 2 on it is the mean of the steps after the first."""
    clock = iter([0.0, 30.0, 31.0, 32.0])
    monkeypatch.setattr(run_log, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    lines = step_lines(capsys, make_log(tmp_path, 0, 200, log_interval=1), range(1, 4))
    assert [LINE.match(line).group(3) for line in lines] == ["1h39m", "3m18s", "3m17s"], lines


def test_a_terminal_gets_the_bar_not_the_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert step_lines(capsys, make_log(tmp_path, 0, 3, log_interval=1, progress=True), range(1, 4)) == []


def test_formats():
    assert [duration(s) for s in (0.4, 35, 60, 307, 3599.6, 3720, 90000)] == \
        ["0s", "35s", "1m00s", "5m07s", "1h00m", "1h02m", "25h00m"]
    assert [token_count(n) for n in (512, 2560, 3.3e9, 1.234e12)] == ["512", "2.56e3", "3.3e9", "1.23e12"]
    assert finished_line("pretrain_s1", 100, 0, "/r/ckpt/iter_0000100", 3720, 3.3e9) == \
        "finished pretrain_s1: 100 steps, final checkpoint /r/ckpt/iter_0000100, 1h02m wall, 3.3e9 tokens"
    assert finished_line("sft", 100, 40, "c", 35, 2e9) == \
        "finished sft: 100 steps (60 in this job), final checkpoint c, 35s wall, 2e9 tokens in this job"


@pytest.fixture
def restored_warnings(monkeypatch):
    """Warning filters, logger levels and PYTHONWARNINGS as they were, after the test."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.setenv("PYTHONWARNINGS", "default")
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.mark.parametrize("env", [{"RANK": "1"}, {"SLURM_PROCID": "3"}, {"RANK": "2", "SLURM_PROCID": "0"}])
def test_other_ranks_print_no_warnings(restored_warnings, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert quiet_other_ranks()
    warnings.warn("Apex is not installed", UserWarning)
    warnings.warn("deprecated", FutureWarning)
    assert restored_warnings == []
    assert os.environ["PYTHONWARNINGS"] == "ignore"   # the rank's own Python subprocesses
    megatron = logging.getLogger("megatron.core.transformer")
    assert not megatron.isEnabledFor(logging.WARNING) and megatron.isEnabledFor(logging.ERROR)


@pytest.mark.parametrize("env", [{}, {"RANK": "0"}, {"SLURM_PROCID": "0"}, {"RANK": "0", "SLURM_PROCID": "5"}])
def test_rank_zero_keeps_its_warnings(restored_warnings, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert not quiet_other_ranks()
    warnings.warn("Apex is not installed", UserWarning)
    assert [str(w.message) for w in restored_warnings] == ["Apex is not installed"]
    assert os.environ["PYTHONWARNINGS"] == "default"
    assert logging.getLogger("megatron.core.transformer").isEnabledFor(logging.WARNING)


# Every `python -m` entry point the docs name: those that parse their own arguments, and
# the Hydra ones (model.launch.hydra_cli prints the module's docstring).
CLIS = ["model.convert", "model.compare_hf", "model.params", "model.plan", "recipes.report", "recipes.pipeline",
        "recipes.pipeline_mini", "data_pipeline.preprocess", "data_pipeline.tokenizer", "data_pipeline.corpus",
        "data_pipeline.mini", "data_pipeline.bench", "bench.memory", "bench.rollout", "bench.train",
        "recipes.pretrain", "recipes.sft", "recipes.rl", "recipes.distill", "recipes.generate", "recipes.eval",
        "data_pipeline.cold_start", "data_pipeline.fusion"]


@pytest.mark.parametrize("module", CLIS)
def test_help_prints_usage(module, monkeypatch, capsys):
    # in this process (as `python -m module --help` runs it): one import of torch for all
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    out = capsys.readouterr().out
    assert e.value.code in (0, None), out[:2000]
    assert "usage" in out.lower() or module in out, out[:2000]
