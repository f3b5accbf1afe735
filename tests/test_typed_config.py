"""Typed configs (recipes/schema.py): the dataclasses are the one home of every default and
type of hydra_conf/config.yaml, and a command line the schema refuses is one line, exit 2,
before anything starts."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from omegaconf import OmegaConf

from model.config import HYDRA_CONF, ConfigError
from model.launch import compose
from recipes.schema import Config, DeepSpeedSettings, LoggingConfig, OptimConfig
from recipes.train import TrainerConfig
from tests.conftest import python_module


@pytest.mark.parametrize("override,says", [
    ("trainer.max_steps=abc", ["trainer.max_steps", "abc", "integer"]),
    ("optim.lr=abc", ["optim.lr", "abc", "number"]),
    ("optim.lr=-1", ["optim.lr=-1", "> 0"]),
    ("trainer.seq_length=0", ["trainer.seq_length=0", ">= 1"]),
    ("trainer.max_stepz=3", ["trainer.max_stepz", "3", "did you mean trainer.max_steps?"]),
    ("+trainer.max_stepz=3", ["trainer.max_stepz", "3", "did you mean trainer.max_steps?"]),
    ("optim.lrr=1e-4", ["optim.lrr", "1e-4", "did you mean optim.lr?"]),
])
def test_a_bad_command_line_is_one_line_and_exit_2_before_any_launch(tmp_path, override, says):
    # trainer.nprocs=2: a config that got past the checks would start torchrun and two
    # ranks, which would create the run directory
    runs = tmp_path / "runs"
    proc = python_module("recipes.pretrain", "model=tiny", "parallel=default", f"run.root={runs}",
                         "trainer.nprocs=2", override, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for part in says:
        assert part in lines[0], lines[0]
    assert not runs.exists()


@pytest.mark.parametrize("overrides,says", [
    # a key of a section the stage does not have
    (["rl.grpo.group_size=2"], "rl is null"),
    # a stage's own section is typed too
    (["stage=rl_reasoning", "rl.grpo.group_sise=3"], "did you mean rl.grpo.group_size?"),
    (["stage=distill_off_policy", "distill.loss.top_k=many"], "distill.loss.top_k must be an integer"),
    # list elements, which a Hydra override alone lets through untyped
    (["trainer.inject_nan_at_steps=[a]"], "trainer.inject_nan_at_steps"),
    (["+foo=1"], "unknown key foo"),
    (["model=tinyy"], "did you mean model=tiny?"),
    (["trainer.max_steps=["], "trainer.max_steps=[: not a key=value override"),
])
def test_composition_errors_are_one_line_naming_the_key(overrides, says):
    with pytest.raises(ConfigError) as e:
        compose("config", ["model=tiny", *overrides])
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_help_prints_the_usage():
    proc = python_module("recipes.sft", "--help", timeout=300)
    assert proc.stdout.startswith("Supervised fine-tuning stages") and not proc.stderr


def _defaults(cls) -> dict:
    return {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}


def test_the_composed_defaults_are_the_dataclasses():
    cfg = compose("config", [])
    assert cfg.trainer.log_interval == TrainerConfig().log_interval
    stage = OmegaConf.load(HYDRA_CONF / "stage" / "pretrain_s1.yaml")   # the default stage sets a few keys
    for section, cls in (("trainer", TrainerConfig), ("optim", OptimConfig), ("deepspeed", DeepSpeedSettings)):
        for key, value in _defaults(cls).items():
            if key not in stage.get(section, {}):
                assert cfg[section][key] == value, f"{section}.{key}"
    assert cfg.logging.wandb.mode == LoggingConfig().wandb.mode
    # a pretraining stage carries no recipe section of another stage
    assert cfg.sft is None and cfg.rl is None and cfg.distill is None


def test_config_yaml_restates_no_default():
    root = yaml.safe_load((HYDRA_CONF / "config.yaml").read_text())
    for section in ("trainer", "optim", "deepspeed", "logging", "stage", "sft", "rl", "distill"):
        assert section not in root, section
    schema = OmegaConf.structured(Config)

    def leaves(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value

    kept = dict(leaves({k: v for k, v in root.items() if k not in ("defaults", "hydra")}))
    assert kept, "config.yaml sets the checkout's paths"
    for key, value in kept.items():
        # only what the schema cannot know: a value without a default there
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(schema, parent) if parent else schema
        assert OmegaConf.is_missing(node, name), f"{key}: {value!r} restates recipes.schema's default"
