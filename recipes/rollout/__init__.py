"""Rollout engines: what samples responses for the RL stages, on-policy distillation's
student, teacher data (`python -m recipes.generate ... backend=vllm`) and the eval.

`backend` picks one from `BACKENDS`:

  megatron  the built-in engine (recipes.generate.generate): the policy's own megatron-core
            weights, at any training layout, so nothing is synced;
  vllm      vLLM (recipes/rollout/vllm_engine.py), started once per job in the trainer's
            own process; after every optimizer step that precedes a rollout the trainer's
            weights reach it in memory under HF names (`sync_weights`).

Both return `recipes.generate.Generation`s with the per-token log-probs the GRPO loss's
TIS correction and the `rl/logp_mismatch` metric compare against, apply the thinking
budget the same way and stop at the same tokens.

This module imports nothing heavy: the typed config (recipes/schema.py) reads its dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from model.config import ConfigError

DEFAULT_BACKEND = "megatron"


@dataclass
class VLLMSettings:
    """`*.rollout.vllm:` what the vLLM engine is started with."""

    # GPU: the share of the GPU's memory vLLM may take (weights and KV cache) beside the
    # trainer, which is colocated with it in the same process
    gpu_memory_utilization: float = 0.3
    # GPU: vLLM frees its weights and KV cache between rollouts (sleep mode, level 1), so
    # training gets that memory back, and wakes before the next sync
    sleep: bool = True
    # vLLM's own tensor parallelism; above 1 the trainer's ranks are also vLLM's
    # (external launcher), so the trainer's world must be a multiple of it
    tensor_parallel_size: int = 1
    # GPU: no CUDA graphs (faster start, slower decode). The CPU build always runs eager.
    enforce_eager: bool = False
    # CPU: the KV cache's size. Left to itself vLLM's CPU backend takes most of the host's memory.
    cpu_kv_cache_mb: int = 256

    def problems(self, where: str) -> list[str]:
        p = []
        if not 0 < self.gpu_memory_utilization < 1:
            p.append(f"{where}.vllm.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1)")
        if self.tensor_parallel_size < 1 or self.cpu_kv_cache_mb < 1:
            p.append(f"{where}.vllm.tensor_parallel_size={self.tensor_parallel_size} and cpu_kv_cache_mb="
                     f"{self.cpu_kv_cache_mb} must be >= 1")
        return p


@dataclass
class RolloutConfig:
    """`rl.rollout:` which engine samples the rollouts."""

    backend: str = DEFAULT_BACKEND
    vllm: VLLMSettings = field(default_factory=VLLMSettings)

    def check(self, where: str = "rl.rollout") -> "RolloutConfig":
        if self.backend not in BACKENDS:
            raise ConfigError(f"{where}.backend={self.backend!r} is not one of {', '.join(BACKENDS)}")
        problems = self.vllm.problems(where)
        if problems:
            raise ConfigError(problems[0])
        return self


def settings_from(node, where: str = "rl.rollout") -> RolloutConfig:
    """A checked RolloutConfig from a config node or dict (typed by the schema or not)."""
    from omegaconf import DictConfig, OmegaConf

    from model.config import from_dict

    d = dict(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node or {})
    vllm = d.pop("vllm", None) or {}
    if not isinstance(vllm, VLLMSettings):
        vllm = from_dict(VLLMSettings, dict(vllm), f"{where}.vllm")
    return from_dict(RolloutConfig, {**d, "vllm": vllm}, where).check(where)


def launch_problem(settings: RolloutConfig, model_cfg, trainer_backend: str = "megatron") -> str | None:
    """Why the engine cannot run this model here, checked before launch; None if it can."""
    if settings.backend != "vllm":
        return None
    if trainer_backend != "megatron":
        return (f"the vllm rollout backend syncs weights from megatron-core's model; trainer.backend="
                f"{trainer_backend} is not supported with it")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "the vllm rollout backend needs vLLM: `make setup` installs it (requirements-vllm.txt)"
    import torch

    if not torch.cuda.is_available():
        from recipes.rollout.vllm_engine import head_dim_problem

        return head_dim_problem(model_cfg)
    return None


class RolloutEngine(Protocol):
    """Samples responses for token prompts. Collective: every rank of the trainer's world
    calls each method together (a rank with no prompts passes an empty list)."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling, budget,
                 top_k_logprobs: int = 0, logprob_temperature: float = 1.0) -> list:
        """`recipes.generate.Generation` per prompt: tokens, their log-probs under the
        sampling distribution (softmax(logits / temperature); greedy: temperature 1), which
        were forced by the thinking `budget`, why it finished, and with `top_k_logprobs` k
        the k most likely ids and log-probs of softmax(logits / logprob_temperature) per token."""
        ...

    def sync_weights(self, chunks) -> None:
        """Take the trainer's current weights (megatron-core chunks at any layout)."""
        ...

    def close(self) -> None:
        ...


def megatron_engine(chunks, model_cfg, tokenizer, settings: RolloutConfig, max_length: int, seed: int):
    from recipes.generate import stop_ids
    from recipes.rollout.megatron_engine import MegatronEngine

    return MegatronEngine(chunks, stop_ids(tokenizer), len(tokenizer))


def vllm_engine(chunks, model_cfg, tokenizer, settings: RolloutConfig, max_length: int, seed: int):
    from recipes.generate import stop_ids
    from recipes.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_cfg, stop_ids(tokenizer), len(tokenizer), settings.vllm, max_length, seed,
                      next(chunks[0].parameters()).dtype)


# name -> factory(chunks, model config, tokenizer, settings, longest prompt + response, seed)
BACKENDS = {"megatron": megatron_engine, "vllm": vllm_engine}


def make_engine(settings: RolloutConfig, chunks, model_cfg, tokenizer, max_length: int, seed: int) -> RolloutEngine:
    """The configured engine, holding the weights of `chunks` (collective)."""
    engine = BACKENDS[settings.check().backend](chunks, model_cfg, tokenizer, settings, max_length, seed)
    engine.sync_weights(chunks)
    return engine
