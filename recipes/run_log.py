"""Where training metrics go: the console (progress bar + periodic lines), a
`metrics.jsonl` in the stage directory, and wandb (offline unless configured online).

Without a terminal (a SLURM job's `.out`, a redirected run) the bar is not redrawn, so
every `log_interval` steps, and always at the first step of the job and the last step of
the stage, one line goes to stdout:
`step 40/100 eta 2m05s tokens/s=51234 loss=2.913 lr=0.0003 grad_norm=0.8123`. Checkpoint
saves and the end of the stage are one line each there too (`info`).

Only global rank 0 logs; the metrics it gets are already reduced over all ranks.
`metrics.jsonl` is appended to, so a resumed stage continues the same file; a resume
writes an `{"event": "resume", ...}` line and readers keep the last record per step.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def duration(seconds: float) -> str:
    """`35s`, `4m07s`, `1h02m`: an ETA or a wall time in a log line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def token_count(value: float) -> str:
    """3.3e9, 2.56e3, 512: a token count in a log line."""
    return f"{value:.3g}".replace("e+0", "e").replace("e+", "e")


def finished_line(stage: str, step: int, start_step: int, checkpoint, wall_s: float, tokens: float) -> str:
    """The last line of a stage's job: its steps, final checkpoint, and this job's wall
    time and tokens (a job that resumed the stage at `start_step` says so)."""
    steps, this_job = f"{step} steps", ""
    if start_step:
        steps, this_job = f"{step} steps ({step - start_step} in this job)", " in this job"
    return (f"finished {stage}: {steps}, final checkpoint {checkpoint}, {duration(wall_s)} wall, "
            f"{token_count(tokens)} tokens{this_job}")


class RunLog:
    def __init__(self, stage_dir: Path, run_name: str, stage: str, config: dict, start_step: int,
                 max_steps: int, log_interval: int, wandb_cfg: dict | None, progress: bool,
                 enabled: bool):
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        self.start_step, self.max_steps = start_step, max_steps
        # ETA clock: built just before the loop, so the first step's time runs from here
        self.started = time.perf_counter()
        self.first_done = None
        self.wandb = None
        if not enabled:
            return
        self.file = open(Path(stage_dir) / METRICS_FILE, "a", buffering=1)
        if start_step:
            self.event("resume", step=start_step)
        # The bar only on a terminal: in a file (a SLURM job's .err) its redraws are noise,
        # and the step lines say the same.
        self.bar = tqdm(total=max_steps, initial=start_step, desc=stage, unit="step", dynamic_ncols=True,
                        file=sys.stderr, disable=not progress or not sys.stderr.isatty(), mininterval=1.0)
        mode = (wandb_cfg or {}).get("mode", "disabled")
        if mode != "disabled":
            import wandb

            # A stable id per stage directory: a resumed stage continues the same wandb run.
            self.wandb = wandb.init(
                project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"), mode=mode,
                dir=str(stage_dir), name=f"{run_name}/{stage}", id=f"{run_name}-{stage}".replace("/", "-"),
                resume="allow", config=config, settings=wandb.Settings(silent=True))

    def event(self, kind: str, **fields) -> None:
        if self.enabled:
            self.file.write(json.dumps({"event": kind, **fields}) + "\n")

    def step(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        self.bar.update(step - self.bar.n)
        shown = {k: metrics[k] for k in ("loss", "lr", "grad_norm", "tokens_per_s") if k in metrics}
        shown.update({k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("moe/")})
        self.bar.set_postfix({k: _fmt(v) for k, v in shown.items()}, refresh=False)
        first = step == self.start_step + 1
        eta = self._eta(step, first)
        if ((first or step == self.max_steps or step % self.log_interval == 0)
                and self.bar.disable):
            fields = {k: v for k, v in shown.items() if k != "tokens_per_s"}
            rate = f" tokens/s={metrics['tokens_per_s']:.0f}" if "tokens_per_s" in metrics else ""
            print(f"step {step}/{self.max_steps} eta {duration(eta)}{rate} "
                  + " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()), flush=True)

    def _eta(self, step: int, first: bool) -> float:
        """Seconds left: the steps to go times the mean wall time per step of this job's
        steps after its first (checkpoint saves and all). The first step is left out of the
        mean: it carries one-off costs (CUDA and NCCL start-up, kernel autotuning, the first
        data reads), often several regular steps' worth, that would inflate the ETA until
        enough steps had diluted them; until a second step exists, it is the only estimate."""
        now = time.perf_counter()
        if first or self.first_done is None:
            self.first_done = now
            per_step = now - self.started
        else:
            per_step = (now - self.first_done) / (step - self.start_step - 1)
        return per_step * max(0, self.max_steps - step)

    def info(self, text: str) -> None:
        """A line for the job's log (stdout, beside the step lines; the bar, on stderr, is
        cleared and redrawn around it)."""
        if self.enabled:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text, file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(stage_dir: Path) -> dict[int, dict]:
    """Last record per step from a stage's metrics.jsonl."""
    records: dict[int, dict] = {}
    path = Path(stage_dir) / METRICS_FILE
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if "step" in entry and "event" not in entry:
                records[entry["step"]] = entry
    return records
