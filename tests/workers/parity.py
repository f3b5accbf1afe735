"""torchrun worker: logits parity of one converted checkpoint against HF at several layouts.

    torchrun --nproc-per-node 2 tests/workers/parity.py --hf-dir D --ckpt C --out R.json tp1 tp2 pp2 ep2

Writes {layout: metrics} from the reporting rank. One process group serves every
layout, so the (slow) interpreter start is paid once for all of them.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.compare_hf import compare, sample_tokens  # noqa: E402
from model.parallel import destroy_distributed, reset_model_parallel  # noqa: E402
from tests.workers.layouts import LAYOUTS  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("layouts", nargs="+")
    args = p.parse_args()
    from model.checkpoint import read_model_config

    cfg = read_model_config(args.ckpt)
    tokens = sample_tokens(cfg.vocab_size, batch=2, seq=24, seed=1)
    results = {}
    for name in args.layouts:
        metrics = compare(args.hf_dir, args.ckpt, LAYOUTS[name], tokens)
        if metrics is not None:
            results[name] = metrics
        reset_model_parallel()
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        merged = {k: v for part in gathered for k, v in part.items()}
        Path(args.out).write_text(json.dumps(merged, indent=2))
    destroy_distributed()


if __name__ == "__main__":
    main()
