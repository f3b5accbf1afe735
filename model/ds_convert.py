"""DeepSpeed checkpoints of this project: reading their weights, and turning them into
megatron-core checkpoints (and from there into HF with `model.convert mcore-to-hf`).

    python -m model.convert ds-to-mcore --ckpt runs/tiny/pretrain_s1/checkpoints/iter_0000100 --out ckpt/s1

A DeepSpeed checkpoint (recipes.deepspeed_engine) is DeepSpeed's own directory (model
states, one ZeRO optimizer partition per rank) plus `qwen3_deepspeed.json` with the
ModelConfig. DeepSpeed's zero_to_fp32 gathers the ZeRO-1/2/3 partitions into full fp32
tensors named like the megatron-core GPTModel's own state_dict at TP=PP=1, so they load
straight into a model built at that layout, which model.checkpoint then saves in the
layout-free megatron-core format. The other direction needs no tool: a megatron-core
checkpoint (converted or trained) starts a DeepSpeed stage through `init_from=`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.config import ConfigError, ModelConfig, model_config_from_dict

DS_METADATA = "qwen3_deepspeed.json"


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DS_METADATA).is_file()


def read_deepspeed_metadata(path: str | Path) -> dict:
    if not is_deepspeed_checkpoint(path):
        raise ConfigError(f"{path} is not a DeepSpeed checkpoint of this project (no {DS_METADATA})")
    return json.loads((Path(path) / DS_METADATA).read_text())


def deepspeed_model_config(path: str | Path) -> ModelConfig:
    return model_config_from_dict(read_deepspeed_metadata(path)["model"])


def deepspeed_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a DeepSpeed checkpoint, ZeRO partitions gathered.
    One process, no process group."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    read_deepspeed_metadata(path)
    path = Path(path)
    return get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)


def load_deepspeed_weights(chunks, path: str | Path) -> None:
    """Weights of a DeepSpeed checkpoint into bare model chunks built at TP=PP=1."""
    if len(chunks) != 1:
        raise ConfigError(f"{path} is a DeepSpeed checkpoint, which loads at TP=PP=1 only; convert it "
                          "first: python -m model.convert ds-to-mcore --ckpt CKPT --out DIR")
    state = deepspeed_weights(path)
    missing, unexpected = chunks[0].load_state_dict(state, strict=False)
    # TE modules keep an FP8 `_extra_state`, which DeepSpeed does not store as a tensor.
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConfigError(f"{path} does not fit {chunks[0].config.num_layers}-layer model: "
                          f"missing {missing[:3]}, unexpected {unexpected[:3]}")


def ds_to_mcore(ckpt: str | Path, out: str | Path) -> Path:
    """A DeepSpeed checkpoint as a megatron-core checkpoint (weights only, any layout).
    Builds the model once in this process: memory for the fp32 model."""
    from model.builder import build_model
    from model.checkpoint import save_model
    from model.config import ParallelConfig
    from model.parallel import destroy_distributed, init_distributed

    cfg = deepspeed_model_config(ckpt)
    par = ParallelConfig()
    init_distributed(par, model=cfg)
    chunks = build_model(cfg, par, dtype=torch.float32, perform_initialization=False)
    load_deepspeed_weights(chunks, ckpt)
    save_model(chunks, out, cfg, extra={"source": str(Path(ckpt).resolve())})
    destroy_distributed()
    return Path(out)
