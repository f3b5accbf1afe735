"""torchrun worker: logits parity of converted checkpoints against HF at several layouts.

    torchrun --nproc-per-node 2 tests/workers/parity.py --out R.json \
        --case NAME HF_DIR CKPT tp1,tp2,pp2 [--case ...]

Writes {name: {layout: metrics}} from the reporting ranks. One process group serves every
case and layout, so the (slow) interpreter start is paid once for all of them.
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
    p.add_argument("--out", required=True)
    p.add_argument("--case", nargs=4, action="append", required=True, metavar=("NAME", "HF_DIR", "CKPT", "LAYOUTS"),
                   help="an HF directory, its converted checkpoint, and comma-separated layouts")
    args = p.parse_args()
    from model.checkpoint import read_model_config

    results = {}
    for name, hf_dir, ckpt, layouts in args.case:
        cfg = read_model_config(ckpt)
        tokens = sample_tokens(cfg.vocab_size, batch=2, seq=24, seed=1)
        results[name] = {}
        for layout in layouts.split(","):
            metrics = compare(hf_dir, ckpt, LAYOUTS[layout], tokens)
            if metrics is not None:
                results[name][layout] = metrics
            reset_model_parallel()
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        merged = {name: {k: v for part in gathered for k, v in part[name].items()} for name in results}
        Path(args.out).write_text(json.dumps(merged, indent=2))
    destroy_distributed()


if __name__ == "__main__":
    main()
