"""Pretraining stages S1 (general), S2 (reasoning) and S3 (long context).

    python -m recipes.pretrain stage=pretrain_s1 model=qwen3_1_7b parallel=qwen3_1_7b data.root=/data
    python -m recipes.pretrain stage=pretrain_s2 model=qwen3_1_7b ...   # starts from S1's final checkpoint
    python -m recipes.pretrain --cfg job stage=pretrain_s3                # print the resolved config

The stages differ only in config (hydra_conf/stage/pretrain_s*.yaml); this module adds
the pretraining data (a weighted blend of indexed datasets) to the shared loop.
"""

from __future__ import annotations


from omegaconf import DictConfig

from model.config import ConfigError
from recipes import data as pretrain_data
from recipes import schema  # noqa: F401  (registers config.yaml's typed root before composing it)
from recipes.train import Settings, Task, run


def document_end(cfg: DictConfig) -> int:
    """The <|endoftext|> id the preprocessor put after every document: data.eod_id, or the
    tokenizer's own when that is null."""
    if cfg.data.get("eod_id") is not None:
        return int(cfg.data.eod_id)
    from data_pipeline.tokenizer import eod_id, load_tokenizer

    return eod_id(load_tokenizer(cfg.tokenizer))


class Pretrain:
    name = "pretrain"
    module = "recipes.pretrain"
    post_training = False

    def validate(self, cfg: DictConfig, s: Settings) -> None:
        spec = pretrain_data.blend_spec(cfg.data)
        for info in pretrain_data.check_data(spec):
            if info["documents"] == 0:
                raise ConfigError(f"dataset {info['prefix']} has no documents")
        eod = document_end(cfg)
        if eod >= s.model.vocab_size:
            raise ConfigError(f"the document separator id {eod} is outside model.vocab_size={s.model.vocab_size}")

    def task(self, cfg: DictConfig, s: Settings, engine) -> Task:
        import torch
        from megatron.core import parallel_state

        spec = pretrain_data.blend_spec(cfg.data)
        t = s.trainer
        dataset = pretrain_data.build_dataset(
            spec, seq_length=t.seq_length, num_samples=t.max_steps * t.global_batch_size, seed=int(cfg.seed),
            vocab_size=s.model.vocab_size, eod_id=document_end(cfg),
            cache_dir=cfg.data.cache_dir or s.stage_dir / "data_cache", eod_mask_loss=bool(cfg.data.eod_mask_loss))
        batches = pretrain_data.SampleBatches(
            dataset, spec.names, t.global_batch_size, t.micro_batch_size,
            parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size())

        def batch_counts(micro: list[dict]) -> dict:
            ids = torch.cat([m["dataset_id"] for m in micro]) if "dataset_id" in micro[0] else None
            if ids is None:  # a single dataset: every sample is from it
                return {spec.names[0]: torch.tensor([float(sum(m["tokens"].shape[0] for m in micro))])}
            return {name: (ids == i).sum().reshape(1).double() for i, name in enumerate(spec.names)}

        def summarize(counts: dict) -> dict:
            total = sum(counts.values()) or 1
            return {f"data/{name}": counts.get(name, 0) / total for name in spec.names}

        return Task(batches=batches, batch_counts=batch_counts, summarize=summarize,
                    tokens_per_step=t.global_batch_size * t.seq_length)


# What `stage.recipe: pretrain` runs (recipes.train.recipe_for).
RECIPE = Pretrain()


def main() -> None:
    from model.launch import hydra_cli

    hydra_cli("config", lambda cfg: run(cfg, RECIPE), usage=__doc__)


if __name__ == "__main__":
    main()
