"""Run a CLI entry point on N local processes when it was started as one.

`python -m model.convert hf-to-mcore --tp 2 ...` should just work on a workstation, so
entry points that need several ranks re-launch themselves through torchrun. Under
torchrun, srun or any launcher that sets WORLD_SIZE, nothing is re-launched; a world
size that does not fit is reported instead.
"""

from __future__ import annotations

import os
import subprocess
import sys


def relaunch_if_needed(module: str, argv: list[str], nprocs: int) -> None:
    """Return in the worker; in a single un-launched process, re-run on `nprocs` ranks and exit."""
    if "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        if world % nprocs:
            raise SystemExit(f"error: this layout needs a multiple of {nprocs} processes, got WORLD_SIZE={world}")
        return
    if nprocs == 1:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nprocs}", "-m", module, *argv]
    sys.exit(subprocess.call(cmd))


def hydra_cli(config_name: str, run_cli) -> None:
    """`python -m` entry of a CLI configured by hydra_conf/<config_name>.yaml: exits with
    `run_cli(cfg)`'s code."""
    from pathlib import Path

    import hydra

    conf = Path(__file__).resolve().parent.parent / "hydra_conf"   # absolute: this is not the caller's module

    @hydra.main(config_path=str(conf), config_name=config_name, version_base=None)
    def entry(cfg) -> None:
        sys.exit(run_cli(cfg))

    entry()
