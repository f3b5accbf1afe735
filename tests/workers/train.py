"""torchrun worker: one megatron-core training step per (model, layout, optimizer) combination.

    torchrun --nproc-per-node 2 tests/workers/train.py --work DIR --out R.json

For each model it first builds `tiny`/`tiny_moe` at the tests' small vocabulary
(conftest.TEST_VOCAB: the layouts split the vocabulary the same way at any size, and
the full 151,936 rows made this launch three minutes) at the reference layout (TP=1, DP=2),
saves it with `model.checkpoint.save_model`, then for every layout and with the
distributed optimizer off and on: loads that checkpoint, runs two optimizer steps on the
same global batch through `recipes.engine.Engine.train_step`, and records the metrics.
For `tiny` it then trains on a partly masked batch with the output layer at the loss
positions only, at the layouts in PICKED, against the full projection at the reference.
It also checks that weights replicated across TP ranks (RMSNorm and QK-norm weights)
are still identical after the update: if their gradients were not reduced over TP
(Megatron-LM #816 for QK-norm), the replicas drift apart. At the end it records rank 0's
thread count, which shows whether the finished layouts' engines and process groups are gone.
"""

import argparse
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.config import load_model_config  # noqa: E402
from model.parallel import destroy_distributed, init_distributed, reset_model_parallel  # noqa: E402
from tests.conftest import TEST_VOCAB  # noqa: E402
from tests.workers.layouts import LAYOUTS  # noqa: E402

GLOBAL_BATCH, SEQ = 4, 32
PLAN = {"tiny": ["tp1", "tp2", "pp2", "pp2vpp2"], "tiny_moe": ["tp1", "tp2", "pp2", "ep2", "tp2ep2"]}
# Layouts that also train `tiny` on a partly masked batch with the output layer at the
# loss positions only (Engine.loss_positions_only), against the full projection at tp1:
# TP with sequence parallelism (the gather before the selection) and interleaved PP.
PICKED = ["tp1", "tp2", "pp2vpp2"]


def masked(batch: list) -> list:
    """The batch with loss on some positions only, as in SFT: a prompt-like prefix off,
    a scattered pattern, one row with a single loss position and one with none."""
    g = torch.Generator().manual_seed(99)
    out = []
    for i, b in enumerate(batch):
        m = (torch.rand(b["loss_mask"].shape, generator=g) < 0.6).float()
        m[:, :SEQ // 3] = 0
        if i == 1:
            m[:] = 0
            m[:, -1] = 1
        if i == 2:
            m[:] = 0
        out.append({**b, "loss_mask": m})
    return out


def global_batch(vocab: int):
    from recipes.engine import lm_batch

    g = torch.Generator().manual_seed(1234)
    return [lm_batch(torch.randint(0, vocab, (1, SEQ + 1), generator=g)) for _ in range(GLOBAL_BATCH)]


def tp_replica_drift(chunks) -> float:
    """Max difference of TP-replicated weights between TP ranks (0 when consistent)."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    worst = 0.0
    for c in chunks:
        for name, p in c.named_parameters():
            if "norm" not in name:
                continue
            copies = [torch.empty_like(p.data) for _ in range(dist.get_world_size(group))]
            dist.all_gather(copies, p.data.contiguous(), group=group)
            worst = max(worst, max((t - copies[0]).abs().max().item() for t in copies))
    return worst


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--plan", nargs="*", default=None,
                   help="MODEL=LAYOUT[,LAYOUT...] entries replacing the default PLAN")
    args = p.parse_args()
    plan = PLAN if not args.plan else {m: ls.split(",") for m, ls in (e.split("=") for e in args.plan)}
    from model.builder import build_model
    from model.checkpoint import load_model, save_model
    from recipes.engine import OptimConfig, build_engine, split_for_data_parallel

    results = {}
    for name, layouts in plan.items():
        cfg = load_model_config(name, vocab_size=TEST_VOCAB)
        ckpt = Path(args.work) / f"{name}_init"
        init_distributed(LAYOUTS["tp1"], seed=7, model=cfg)
        save_model(build_model(cfg, LAYOUTS["tp1"]), ckpt, cfg)
        reset_model_parallel()
        batch = global_batch(cfg.vocab_size)

        def two_steps(layout, rows, dist_opt=False, picked=False) -> dict:
            """Two optimizer steps from the saved checkpoint at `layout`, on this rank's share of `rows`."""
            init_distributed(LAYOUTS[layout], seed=7, model=cfg)
            engine = build_engine(cfg, LAYOUTS[layout], OptimConfig(lr=1e-3, use_distributed_optimizer=dist_opt),
                                  init=lambda chunks: load_model(chunks, ckpt))
            engine.loss_positions_only = picked
            mine = split_for_data_parallel(rows)
            out = {"steps": [engine.train_step(mine) for _ in range(2)], "tp_drift": tp_replica_drift(engine.chunks)}
            reset_model_parallel()
            return out

        for layout in layouts:
            for dist_opt in (False, True):
                results[f"{name}/{layout}/{'distopt' if dist_opt else 'plain'}"] = two_steps(layout, batch, dist_opt)
        if name != "tiny" or args.plan:
            continue
        for layout, picked in [("tp1", False), *((layout, True) for layout in PICKED)]:
            results[f"{name}/{layout}/{'picked' if picked else 'masked'}"] = two_steps(layout, masked(batch),
                                                                                        picked=picked)
    # Every layout above is over (reset_model_parallel) and unreferenced; once collected,
    # nothing of theirs should keep running.
    gc.collect()
    results["threads_at_end"] = len(os.listdir("/proc/self/task"))
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    destroy_distributed()


if __name__ == "__main__":
    main()
