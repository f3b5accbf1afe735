"""Model and parallel-layout configs, and their mapping to/from HF `config.json`.

`ModelConfig` is the one description of a Qwen3 architecture in this project: the
Hydra files in `hydra_conf/model/` fill it, the converter fills it from an HF
`config.json`, and `model.builder` turns it into a megatron-core `GPTModel`.
Nothing here imports megatron-core, so configs can be read and validated before
any heavy import or process launch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
HYDRA_CONF = REPO_ROOT / "hydra_conf"


def register_resolvers() -> None:
    """`${repo:data}` in a config is that path inside this checkout: the defaults (data/,
    runs/) then name the same place whatever directory a job was submitted from. Every
    entry point composes its config after importing this module, which registers it."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("repo"):
        OmegaConf.register_new_resolver("repo", lambda path="": str(REPO_ROOT / str(path)))


register_resolvers()


class ConfigError(ValueError):
    """A config that cannot describe a Qwen3 model (one-line message)."""


@dataclass
class ModelConfig:
    """Architecture of one Qwen3 model (dense or MoE)."""

    name: str = "tiny"
    hidden_size: int = 64
    # Dense FFN width; for MoE models this is the width of the (unused) dense MLP that HF
    # still records as `intermediate_size`, kept only so the HF config round-trips.
    ffn_hidden_size: int = 192
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int = 2
    # Qwen3 decouples head_dim from hidden/heads (128 for every published size).
    kv_channels: int = 16
    # None: the training tokenizer's size, padded (padded_vocab_size); settings_from fills it
    # in before the model is built. The published sizes keep HF's 151,936.
    vocab_size: Optional[int] = 256
    tie_word_embeddings: bool = True
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40_960
    norm_eps: float = 1e-6
    init_method_std: float = 0.02
    # MoE; num_experts == 0 means dense.
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_router_topk: int = 8
    # HF `norm_topk_prob`: renormalise the top-k softmax probabilities to sum to 1.
    moe_norm_topk_prob: bool = True
    # "global_aux_loss" (Qwen3's global-batch balancing), "aux_loss" (per micro-batch),
    # "seq_aux_loss" or "none".
    moe_aux_loss_type: str = "global_aux_loss"
    moe_aux_loss_coeff: float = 1e-3
    # YaRN context extension (Qwen3: factor 4 over 32,768 positions, to 131,072). An
    # inference-time switch: training keeps plain RoPE, and the exported HF config
    # carries it as `rope_scaling` for HF/vLLM/SGLang to apply.
    yarn: bool = False
    yarn_factor: float = 4.0
    yarn_original_max_position_embeddings: int = 32_768

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def check(self) -> "ModelConfig":
        """Raise ConfigError on values no Qwen3 model can have."""
        if self.vocab_size is None:
            raise ConfigError(f"model {self.name}: vocab_size is null (the tokenizer's size) and was not "
                              "filled in from a tokenizer (recipes.train.settings_from)")
        positive = ["hidden_size", "num_layers", "num_attention_heads", "num_query_groups",
                    "kv_channels", "vocab_size", "max_position_embeddings"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"model.num_query_groups={self.num_query_groups} (GQA)")
        if self.is_moe:
            if self.moe_ffn_hidden_size <= 0:
                raise ConfigError("an MoE model needs model.moe_ffn_hidden_size > 0")
            if not 0 < self.moe_router_topk <= self.num_experts:
                raise ConfigError(
                    f"model.moe_router_topk={self.moe_router_topk} must be in "
                    f"[1, num_experts={self.num_experts}]")
            allowed = ("global_aux_loss", "aux_loss", "seq_aux_loss", "none")
            if self.moe_aux_loss_type not in allowed:
                raise ConfigError(
                    f"model.moe_aux_loss_type={self.moe_aux_loss_type!r} is not one of {allowed}")
        elif self.ffn_hidden_size <= 0:
            raise ConfigError("a dense model needs model.ffn_hidden_size > 0")
        if self.yarn and (self.yarn_factor <= 1 or self.yarn_original_max_position_embeddings <= 0):
            raise ConfigError(
                f"model.yarn needs yarn_factor > 1 and yarn_original_max_position_embeddings > 0, got "
                f"{self.yarn_factor} and {self.yarn_original_max_position_embeddings}")
        return self


@dataclass
class ParallelConfig:
    """Megatron parallel layout. World size = tp * pp * cp * dp (dp is derived)."""

    tp: int = 1
    pp: int = 1
    # Virtual pipeline stages per pipeline rank (interleaved 1F1B); None disables it.
    vpp: Optional[int] = None
    cp: int = 1
    ep: int = 1
    # Expert tensor parallelism; None means "same as tp" (megatron-core's default).
    etp: Optional[int] = None
    sp: bool = False
    # Count the embedding / loss as a layer when splitting layers over pipeline stages
    # (how NVIDIA splits Qwen3-235B's 94 layers over PP=16).
    account_for_embedding_in_pipeline_split: bool = False
    account_for_loss_in_pipeline_split: bool = False

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp


def _load_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    if not path.is_file():
        raise ConfigError(f"no config file {path}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def from_dict(cls, data: dict, where: str):
    """A config dataclass from a dict, with unknown keys reported by name."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}")
    return cls(**data)


def available_models() -> list[str]:
    return sorted(p.stem for p in (HYDRA_CONF / "model").glob("*.yaml"))


def load_model_config(name_or_path: str, **overrides: Any) -> ModelConfig:
    """Load `hydra_conf/model/<name>.yaml` (or a yaml path) into a checked ModelConfig."""
    path = Path(name_or_path)
    if not path.suffix:
        path = HYDRA_CONF / "model" / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown model {name_or_path!r}; available: {', '.join(available_models())}")
    data = _load_yaml(path)
    data.update(overrides)
    return from_dict(ModelConfig, data, str(path)).check()


# Megatron's convention: the embedding table is padded to a multiple of 128 rows (fast
# GEMMs), which also splits evenly over every power-of-two TP up to 128, so a checkpoint
# keeps its shape at any such layout.
VOCAB_MULTIPLE = 128


def padded_vocab_size(tokens: int, tp: int = 1) -> int:
    """The model's vocabulary for a tokenizer of `tokens` ids: the next multiple of 128
    (and of `tp`, for a TP size that 128 does not divide)."""
    step = math.lcm(VOCAB_MULTIPLE, tp)
    return -(-tokens // step) * step


def load_parallel_config(name_or_path: str, **overrides: Any) -> ParallelConfig:
    """Load `hydra_conf/parallel/<name>.yaml` (or a yaml path) into a ParallelConfig."""
    path = Path(name_or_path)
    if not path.suffix:
        path = HYDRA_CONF / "parallel" / f"{name_or_path}.yaml"
    data = _load_yaml(path)
    data.update(overrides)
    return from_dict(ParallelConfig, data, str(path))


# ----------------------------------------------------------------------------- HF config


def from_hf_config(hf: dict, name: str = "hf") -> ModelConfig:
    """Read an HF Qwen3/Qwen3-MoE `config.json` dict.

    Accepts both the published checkpoints' spelling (`rope_theta`, `num_experts` at top
    level) and what transformers 5.x writes (`rope_parameters`, `num_local_experts`).
    """
    try:
        return _from_hf_config(hf, name)
    except KeyError as e:
        raise ConfigError(f"config.json lacks required key {e.args[0]!r}") from None


def _from_hf_config(hf: dict, name: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in ("qwen3", "qwen3_moe"):
        raise ConfigError(f"config.json has model_type={model_type!r}; expected qwen3 or qwen3_moe")
    if hf.get("attention_bias", False):
        raise ConfigError("config.json has attention_bias=true; Qwen3 has no QKV bias")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json has hidden_act={hf['hidden_act']!r}; Qwen3 uses silu")
    if hf.get("use_sliding_window", False):
        raise ConfigError("config.json enables sliding-window attention, which Qwen3 does not use")

    rope = hf.get("rope_parameters") or {}
    rope_theta = hf.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    scaling_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if scaling_type not in ("default", "yarn"):
        raise ConfigError(f"config.json sets rope scaling {scaling}; only plain RoPE and YaRN are supported")

    heads = hf["num_attention_heads"]
    cfg = ModelConfig(
        name=name,
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf.get("intermediate_size", 0),
        num_layers=hf["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads", heads),
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_theta=float(rope_theta),
        max_position_embeddings=hf.get("max_position_embeddings", 40_960),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_method_std=hf.get("initializer_range", 0.02),
    )
    if scaling_type == "yarn":
        cfg.yarn = True
        cfg.yarn_factor = float(scaling["factor"])
        cfg.yarn_original_max_position_embeddings = int(scaling["original_max_position_embeddings"])
    if model_type == "qwen3_moe":
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise ConfigError(
                "config.json mixes dense and MoE layers (mlp_only_layers/decoder_sparse_step); "
                "Qwen3-MoE has every layer MoE")
        cfg.num_experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
        cfg.moe_ffn_hidden_size = hf["moe_intermediate_size"]
        cfg.moe_router_topk = hf["num_experts_per_tok"]
        cfg.moe_norm_topk_prob = bool(hf.get("norm_topk_prob", True))
        cfg.moe_aux_loss_coeff = hf.get("router_aux_loss_coef", 1e-3)
    return cfg.check()


def to_hf_config(cfg: ModelConfig, dtype: str = "bfloat16") -> dict:
    """HF `config.json` in the published Qwen3 checkpoints' spelling."""
    hf = {
        "architectures": ["Qwen3MoeForCausalLM" if cfg.is_moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if cfg.is_moe else "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        # Qwen3's <|endoftext|> and <|im_end|>; absent from toy vocabularies.
        "bos_token_id": 151643 if cfg.vocab_size > 151643 else None,
        "eos_token_id": 151645 if cfg.vocab_size > 151645 else None,
        "head_dim": cfg.kv_channels,
        "hidden_act": "silu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": cfg.init_method_std,
        "intermediate_size": cfg.ffn_hidden_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "max_window_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_layers,
        "num_key_value_heads": cfg.num_query_groups,
        "rms_norm_eps": cfg.norm_eps,
        "rope_scaling": None,
        "rope_theta": cfg.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": cfg.vocab_size,
    }
    if cfg.yarn:
        hf["rope_scaling"] = {"rope_type": "yarn", "factor": cfg.yarn_factor,
                              "original_max_position_embeddings": cfg.yarn_original_max_position_embeddings}
        # transformers derives the extended context from this and warns if it disagrees.
        hf["max_position_embeddings"] = int(cfg.yarn_factor * cfg.yarn_original_max_position_embeddings)
    if cfg.is_moe:
        hf.update(
            decoder_sparse_step=1,
            mlp_only_layers=[],
            moe_intermediate_size=cfg.moe_ffn_hidden_size,
            norm_topk_prob=cfg.moe_norm_topk_prob,
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.moe_router_topk,
            output_router_logits=False,
            router_aux_loss_coef=cfg.moe_aux_loss_coeff,
        )
    return hf


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir} has no config.json (is it an HF model directory?)")
    return json.loads(path.read_text())


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(data: dict) -> ModelConfig:
    return from_dict(ModelConfig, dict(data), "model config").check()
