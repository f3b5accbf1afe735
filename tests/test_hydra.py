"""The hydra_conf tree composes with Hydra itself, with CLI-style overrides."""

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from model.config import HYDRA_CONF, ModelConfig, ParallelConfig, available_models, load_model_config
from model.parallel import validate_layout


def composed(*overrides):
    with initialize_config_dir(config_dir=str(HYDRA_CONF), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_default_is_tiny_on_one_process():
    cfg = composed()
    assert ModelConfig(**OmegaConf.to_container(cfg.model)) == load_model_config("tiny")
    assert ParallelConfig(**OmegaConf.to_container(cfg.parallel)) == ParallelConfig()


@pytest.mark.parametrize("name", [n for n in available_models() if n.startswith("qwen3_")])
def test_each_size_composes_with_its_layout(name):
    cfg = composed(f"model={name}", f"parallel={name}", "parallel.vpp=null")
    model = ModelConfig(**OmegaConf.to_container(cfg.model))
    assert model == load_model_config(name)
    validate_layout(model, ParallelConfig(**OmegaConf.to_container(cfg.parallel)))


def test_cli_override_reaches_the_config():
    cfg = composed("model=qwen3_8b", "model.num_layers=4", "parallel.tp=2")
    assert cfg.model.num_layers == 4 and cfg.model.hidden_size == 4096 and cfg.parallel.tp == 2
