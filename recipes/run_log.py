"""Where training metrics go: the console (progress bar + periodic lines), a
`metrics.jsonl` in the stage directory, and wandb (offline unless configured online).

Only global rank 0 logs; the metrics it gets are already reduced over all ranks.
`metrics.jsonl` is appended to, so a resumed stage continues the same file; a resume
writes an `{"event": "resume", ...}` line and readers keep the last record per step.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class RunLog:
    def __init__(self, stage_dir: Path, run_name: str, stage: str, config: dict, start_step: int,
                 max_steps: int, log_interval: int, wandb_cfg: dict | None, progress: bool,
                 enabled: bool):
        self.enabled = enabled
        self.log_interval = max(1, log_interval)
        self.wandb = None
        if not enabled:
            return
        self.file = open(Path(stage_dir) / METRICS_FILE, "a", buffering=1)
        if start_step:
            self.event("resume", step=start_step)
        self.bar = tqdm(total=max_steps, initial=start_step, desc=stage, unit="step", dynamic_ncols=True,
                        file=sys.stderr, disable=not progress, mininterval=1.0 if sys.stderr.isatty() else 30.0)
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
        if step % self.log_interval == 0 and (self.bar.disable or not sys.stderr.isatty()):
            print(f"step {step}/{self.bar.total} " + " ".join(f"{k}={_fmt(v)}" for k, v in shown.items()),
                  flush=True)

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
