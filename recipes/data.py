"""Pretraining data: weighted blends of indexed datasets, read in a resumable order.

A stage's `data` config names its datasets by prefix (relative to `data.root`) with a
weight each, and optionally a length mix (S3): one dataset per document-length bucket,
as written by `python -m data_pipeline.preprocess --length-buckets`. megatron-core's
`BlendedMegatronDatasetBuilder` turns that into one indexable dataset of fixed-length
samples. Sample `i` is a pure function of the config and seed, so the data position is
just "how many samples were consumed": resuming at a different parallel layout reads
exactly the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from model.config import ConfigError


@dataclass
class BlendSpec:
    prefixes: list[str]
    weights: list[float]
    names: list[str]        # short names for logging, one per prefix


def blend_spec(data_cfg) -> BlendSpec:
    """Prefixes and weights from a stage's `data` config (`blend` and/or `length_mix`)."""
    root = Path(str(data_cfg.root))
    names, prefixes, weights = [], [], []

    def add(name: str, prefix: str, weight) -> None:
        weight = float(weight)
        if weight < 0:
            raise ConfigError(f"data weight for {name} must be >= 0, got {weight}")
        if weight == 0:
            return
        path = Path(prefix)
        names.append(name)
        prefixes.append(str(path if path.is_absolute() else root / path))
        weights.append(weight)

    for name, weight in (data_cfg.get("blend") or {}).items():
        add(str(name), str(name), weight)
    mix = data_cfg.get("length_mix")
    if mix:
        from data_pipeline.preprocess import bucket_prefix

        edges, mix_weights = list(mix.buckets), list(mix.weights)
        if len(mix_weights) != len(edges) - 1:
            raise ConfigError(
                f"data.length_mix has {len(edges) - 1} buckets ({edges}) but {len(mix_weights)} weights")
        for lo, hi, w in zip(edges[:-1], edges[1:], mix_weights):
            prefix = bucket_prefix(str(mix.prefix), int(lo), int(hi))
            add(Path(prefix).name, prefix, w)
    if not prefixes:
        raise ConfigError("the stage has no data: set data.blend (name: weight) and/or data.length_mix")
    return BlendSpec(prefixes, weights, names)


def check_data(spec: BlendSpec) -> list[dict]:
    """Open every dataset (clear error if missing or corrupt) and describe it."""
    from data_pipeline.indexed import describe

    return [describe(p) for p in spec.prefixes]


class _TokenizerInfo:
    """What megatron-core's GPTDataset needs of a tokenizer when the data is pre-tokenized.

    No `pad` attribute: the dataset then uses its own pad id (-1), which can never collide
    with `<|endoftext|>` and so never masks real EOD labels.
    """

    def __init__(self, vocab_size: int, eod: int):
        self.vocab_size = vocab_size
        self.eod = eod
        # Part of the dataset description megatron-core hashes to name its index cache.
        self.unique_identifiers = {"class": "pretokenized", "vocab_size": vocab_size, "eod": eod}


def build_dataset(spec: BlendSpec, *, seq_length: int, num_samples: int, seed: int, vocab_size: int,
                  eod_id: int, cache_dir: str | Path, eod_mask_loss: bool = False):
    """Collective: the blended training dataset of at least `num_samples` samples."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(spec.prefixes, spec.weights if len(spec.prefixes) > 1 else None),
        split="1,0,0",
        path_to_cache=str(cache_dir),
        tokenizer=_TokenizerInfo(vocab_size, eod_id),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        # The causal mask is built by the attention itself; a [s, s] mask per sample
        # would only cost memory.
        create_attention_mask=False,
        mid_level_dataset_surplus=0.05,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()
    return train


class SampleBatches:
    """Global batch for each step, as this data-parallel rank's micro-batches.

    The global batch starting at sample `consumed` is samples [consumed, consumed + gbs);
    DP rank r takes the r-th contiguous slice, cut into micro-batches.
    """

    def __init__(self, dataset, names: list[str], global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ConfigError(
                f"trainer.global_batch_size={global_batch_size} is not divisible by "
                f"micro_batch_size*dp={micro_batch_size}*{dp_size}")
        self.dataset, self.names = dataset, names
        self.gbs, self.mbs = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __call__(self, consumed: int) -> list[dict]:
        per_rank = self.gbs // self.dp_size
        start = consumed + self.dp_rank * per_rank
        micro = []
        for m in range(0, per_rank, self.mbs):
            samples = [self.dataset[start + m + j] for j in range(self.mbs)]
            # every per-token field the samples have (distillation adds the teacher's top k)
            batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in samples[0] if k != "dataset_id"}
            for k in ("tokens", "labels"):
                if k in batch:
                    batch[k] = batch[k].long()
            batch["loss_mask"] = batch["loss_mask"].float()
            if "dataset_id" in samples[0]:
                batch["dataset_id"] = torch.as_tensor([int(s["dataset_id"]) for s in samples])
            micro.append(batch)
        return micro
