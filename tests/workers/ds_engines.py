"""torchrun worker: the Megatron engine (DP=2) and DeepSpeed ZeRO stages train a model from
the same initial weights on the same batches, in one process group.

    torchrun --nproc-per-node 2 tests/workers/ds_engines.py --work DIR --out R.json [--plan tiny=1,2,3 ...]

Per model and engine: the loss, grad-norm, LR and MoE metrics of every step. The ZeRO-3
run of `tiny` also saves a DeepSpeed checkpoint (`DIR/ds_zero3/checkpoints/iter_NNNNNNN`)
and the logits of its trained model on fixed tokens (`DIR/ds_zero3_logits.pt`), for the
conversion check.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.config import ParallelConfig, load_model_config  # noqa: E402
from model.parallel import destroy_distributed, init_distributed  # noqa: E402
from tests.conftest import TEST_VOCAB  # noqa: E402

STEPS, GLOBAL_BATCH, MICRO, SEQ = 10, 8, 2, 32
LOGIT_TOKENS = (2, 24)


def batches(vocab: int) -> list[list[dict]]:
    """Per step, the global batch as micro-batches: two distinct batches over a small part
    of the vocabulary alternate, so the loss clearly falls within 10 steps."""
    from recipes.engine import lm_batch

    g = torch.Generator().manual_seed(1234)
    distinct = [[lm_batch(torch.randint(0, vocab // 8, (MICRO, SEQ + 1), generator=g))
                 for _ in range(GLOBAL_BATCH // MICRO)] for _ in range(2)]
    return [distinct[step % 2] for step in range(STEPS)]


def train(engine, steps: list[list[dict]]) -> dict:
    from recipes.engine import split_for_data_parallel

    out: dict = {}
    for micro in steps:
        m = engine.train_step(split_for_data_parallel(micro))
        for k, v in m.items():
            if k in ("loss", "grad_norm", "lr") or k.startswith("moe/"):
                out.setdefault(k, []).append(v)
    return out


def save_and_probe(engine, cfg, work: Path) -> None:
    """A DeepSpeed checkpoint through the trainer's own save, and the model's logits."""
    from model.inference import forward_logits
    from recipes.checkpointing import save_checkpoint

    state = {"step": STEPS, "consumed_samples": STEPS * GLOBAL_BATCH, "nan_steps": 0, "counts": {}}
    save_checkpoint(engine, work / "ds_zero3", state, keep_last=1)
    tokens = torch.randint(0, cfg.vocab_size, LOGIT_TOKENS, generator=torch.Generator().manual_seed(5))
    logits = forward_logits(engine.chunks, tokens)
    if dist.get_rank() == 0:
        torch.save({"tokens": tokens, "logits": logits}, work / "ds_zero3_logits.pt")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--plan", nargs="*", default=["tiny=1,2,3"], help="MODEL=ZERO_STAGE[,ZERO_STAGE...] entries")
    args = p.parse_args()
    work = Path(args.work)

    from model.builder import build_model
    from model.checkpoint import load_model, save_model
    from recipes.deepspeed_engine import DeepSpeedSettings, build_deepspeed_engine
    from recipes.engine import OptimConfig, build_engine

    par = ParallelConfig()
    optim = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, decay_style="cosine")
    results = {}
    for entry in args.plan:
        name, stages = entry.split("=")
        # The tests' small vocabulary: the 151,936-entry embedding would be most of the compute.
        cfg = load_model_config(name, vocab_size=TEST_VOCAB)
        init_distributed(par, seed=7, model=cfg)
        init = work / f"{name}_init"
        save_model(build_model(cfg, par), init, cfg)
        steps = batches(cfg.vocab_size)
        results[name] = {"megatron": train(build_engine(cfg, par, optim, max_steps=STEPS,
                                                        init=lambda chunks: load_model(chunks, init)), steps)}
        for stage in map(int, stages.split(",")):
            engine = build_deepspeed_engine(cfg, par, optim, DeepSpeedSettings(zero_stage=stage), MICRO,
                                            GLOBAL_BATCH, init=lambda chunks: load_model(chunks, init),
                                            max_steps=STEPS, scratch=work)
            results[name][f"zero{stage}"] = train(engine, steps)
            if stage == 3 and name == "tiny":
                save_and_probe(engine, cfg, work)

    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=1))
    destroy_distributed()


if __name__ == "__main__":
    main()
