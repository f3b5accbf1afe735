"""The hydra_conf tree composes with Hydra itself, with CLI-style overrides."""

import pytest
from omegaconf import OmegaConf

import recipes  # noqa: F401  (registers config.yaml's schema, recipes/schema.py)
from model.config import (HYDRA_CONF, ModelConfig, ParallelConfig, available_models, load_model_config,
                          load_parallel_config)
from model.launch import compose
from model.parallel import validate_layout


def composed(*overrides):
    """hydra_conf/config.yaml as the stage CLIs compose it (model.launch.hydra_cli)."""
    return compose("config", list(overrides))


def test_default_is_qwen3_0_6b_s1_on_the_repos_data_with_its_layout():
    cfg = composed()
    # The default stage is S1, which trains with RoPE base 10,000.
    assert cfg.stage.name == "pretrain_s1"
    assert ModelConfig(**OmegaConf.to_container(cfg.model)) == load_model_config("qwen3_0_6b", rope_theta=10000.0)
    assert ParallelConfig(**OmegaConf.to_container(cfg.parallel)) == load_parallel_config("qwen3_0_6b")
    # the repo's data/ and runs/, whatever the working directory
    assert (cfg.data.root, cfg.run.root) == (str(HYDRA_CONF.parent / "data"), str(HYDRA_CONF.parent / "runs"))


def test_choosing_a_model_chooses_its_layout_unless_one_is_given():
    assert ParallelConfig(**OmegaConf.to_container(composed("model=qwen3_8b").parallel)) == \
        load_parallel_config("qwen3_8b")
    assert load_parallel_config("qwen3_8b").tp > 1
    assert ParallelConfig(**OmegaConf.to_container(composed("model=qwen3_8b", "parallel=default").parallel)) == \
        ParallelConfig()
    assert composed("model=qwen3_8b", "parallel.tp=2").parallel.tp == 2


@pytest.mark.parametrize("name", [n for n in available_models() if n.startswith("qwen3_")])
def test_each_size_composes_with_its_layout(name):
    # S3 ends with the released RoPE base (1e6), so the model equals the published config.
    cfg = composed(f"model={name}", f"parallel={name}", "parallel.vpp=null", "stage=pretrain_s3")
    model = ModelConfig(**OmegaConf.to_container(cfg.model))
    assert model == load_model_config(name)
    validate_layout(model, ParallelConfig(**OmegaConf.to_container(cfg.parallel)))


def test_cli_override_reaches_the_config():
    cfg = composed("model=qwen3_8b", "model.num_layers=4", "parallel.tp=2")
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 4096 and cfg.parallel.tp == 2


def test_stage_chain_changes_what_the_report_says():
    s1, s2, s3 = (composed(f"stage=pretrain_s{i}", "model=qwen3_1_7b") for i in (1, 2, 3))
    assert composed("stage=s2").stage == s2.stage  # short names
    assert (s1.stage.init_from, s2.stage.init_from, s3.stage.init_from) == (None, "pretrain_s1", "pretrain_s2")
    assert s1.model.rope_theta == s2.model.rope_theta == 10000.0 and s3.model.rope_theta == 1_000_000.0
    assert s1.trainer.seq_length == s2.trainer.seq_length == 4096 and s3.trainer.seq_length == 32768
    # S2: more STEM/code/reasoning, and a faster decay (cosine over the stage, not S1's WSD).
    assert s2.data.blend.math + s2.data.blend.code > s1.data.blend.math + s1.data.blend.code
    assert (s1.optim.decay_style, s2.optim.decay_style) == ("WSD", "cosine")
    # S3: 75% of samples from 16K-32K documents, 25% from 4K-16K.
    assert s3.data.blend is None
    assert list(s3.data.length_mix.buckets) == [4096, 16384, 32768]
    assert list(s3.data.length_mix.weights) == [0.25, 0.75]
    assert s3.model.yarn is False
    assert composed("stage=pretrain_s3", "model.yarn=true").model.yarn is True


def test_cfg_job_prints_the_resolved_stage_config():
    from tests.conftest import python_module

    out = python_module("recipes.pretrain", "--cfg", "job", "--resolve", "stage=s3", "model=qwen3_8b").stdout
    assert "seq_length: 32768" in out and "rope_theta: 1000000.0" in out and "name: qwen3_8b" in out
    assert "init_from: pretrain_s2" in out
