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
        if os.environ.get("QWEN3_RELAUNCHED") == "1":
            _die_with_launcher()
        return
    if nprocs == 1:
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nprocs}", "-m", module, *argv]
    sys.exit(subprocess.call(cmd, env={**os.environ, "QWEN3_RELAUNCHED": "1"}))


def _die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own, so a SIGKILL to the command's
    process group (a killed job step, `kill -9 -PGID`) stops the launcher but would leave
    the ranks training on as orphans, writing into a run directory that a re-run then
    shares. Ask Linux to kill this rank when its parent, the launcher, dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:   # the launcher died before the request took effect
        os._exit(1)


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
