"""Supervised fine-tuning stages: long-CoT cold start and thinking-mode fusion.

    python -m recipes.sft stage=sft_cold_start init_from=runs/qwen3_8b/pretrain_s3
    python -m recipes.sft stage=sft_fusion init_from=runs/qwen3_8b/rl_reasoning
    python -m recipes.sft stage=sft_fusion init_from=/ckpts/qwen3_8b_mcore   # any converted checkpoint

Both stages are chat SFT on the shared loop: conversations rendered in the Qwen3 chat
format, loss on assistant output only, packed rows with per-conversation attention. They
differ only in config (hydra_conf/stage/sft_*.yaml) and in the data their builders make
(data_pipeline/cold_start.py, data_pipeline/fusion.py).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from model.config import ConfigError
from recipes import schema  # noqa: F401  (registers config.yaml's typed root before composing it)
from recipes.train import Settings, Task, chat_tokenizer, run


def _data_cfg(cfg: DictConfig):
    if cfg.get("sft") is None or cfg.sft.get("data") is None:
        raise ConfigError(f"stage {cfg.stage.name} has no sft.data section")
    return cfg.sft.data


class SFT:
    name = "sft"
    module = "recipes.sft"
    post_training = True

    def validate(self, cfg: DictConfig, s: Settings) -> None:
        from data_pipeline import sft_data
        from model.parallel import te_available

        d = _data_cfg(cfg)
        sft_data.input_files(d.files)
        if d.overlength not in sft_data.OVERLENGTH:
            raise ConfigError(f"sft.data.overlength={d.overlength!r} must be one of {sft_data.OVERLENGTH}")
        chat_tokenizer(cfg, s)
        if d.pack and te_available() and s.trainer.micro_batch_size != 1:
            raise ConfigError("packed SFT on the Transformer Engine path uses the THD layout, one row per "
                              f"micro-batch: set trainer.micro_batch_size=1 (got {s.trainer.micro_batch_size})")

    def task(self, cfg: DictConfig, s: Settings, engine) -> Task:
        import torch.distributed as dist
        from megatron.core import parallel_state

        from data_pipeline import sft_data
        from model.context_parallel import width_multiple
        from recipes.data import SampleBatches

        d = _data_cfg(cfg)
        t = s.trainer
        cache = Path(str(d.cache_dir)) if d.cache_dir else s.stage_dir / "data_cache"
        # Context parallelism splits each packed document into 2*cp chunks on the THD path
        # (model.context_parallel), so documents are padded to what the layout splits.
        multiple = width_multiple(engine.chunks[0].config) if d.pack and s.parallel.cp > 1 else 1
        build = dict(files=d.files, tokenizer_dir=cfg.tokenizer, seq_length=t.seq_length, cache_dir=cache,
                     overlength=d.overlength, pack_rows=bool(d.pack), document_multiple=multiple)
        # Rank 0 tokenizes and writes the cache; the others then read it.
        if dist.get_rank() == 0:
            data, where = sft_data.build(**build, progress=bool(cfg.logging.progress))
            print(f"{sft_data.describe(data.stats)} (cache {where})", flush=True)
        dist.barrier()
        if dist.get_rank() != 0:
            data, _ = sft_data.build(**build, progress=False)
        batches = SampleBatches(
            sft_data.SFTSamples(data, seed=int(cfg.seed)), [], t.global_batch_size, t.micro_batch_size,
            parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())
        efficiency = float(data.stats["packing_efficiency"])
        return Task(batches=batches, summarize=lambda counts: {"data/packing_efficiency": efficiency},
                    loss_positions_only=True,
                    tokens_per_step=t.global_batch_size * t.seq_length)


# What `stage.recipe: sft` runs (recipes.train.recipe_for).
RECIPE = SFT()


def main() -> None:
    from model.launch import hydra_cli

    hydra_cli("config", lambda cfg: run(cfg, RECIPE), usage=__doc__)


if __name__ == "__main__":
    main()
