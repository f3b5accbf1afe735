"""The pipeline report: one markdown file with a table per run and PNG plots.

    python -m recipes.report --out reports/ runs/qwen3_32b runs/qwen3_0_6b

Reads what the stages leave behind: `<stage>/metrics.jsonl` (recipes.run_log),
`pipeline/<stage>.json` (the completed-stage markers), `pipeline/plan.json` (the stage list) and the optional
`budget_curve.json`. A stage without a marker is listed as "not run"; its metrics, if any
were logged before it stopped, are still plotted, since a failed stage's curve is usually
what one wants to see.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from recipes.run_log import METRICS_FILE, read_metrics

EVAL_ORDER = ("lm_loss", "accuracy_think", "accuracy_no_think", "format_think", "format_no_think",
              "response_tokens_think", "response_tokens_no_think", "expert_load_max_over_mean")
RL_STAGES = ("rl_reasoning", "rl_general")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.3g}"  # nan and inf come out as "nan" / "inf"


def _finite(values) -> list[float]:
    # NaN leaves a gap in a line; inf would break the axis limits, so it becomes a gap too.
    return [v if isinstance(v, (int, float)) and math.isfinite(v) else math.nan for v in values]


def _planned(run_dir: Path) -> list[str]:
    """The stages the run's pipeline lists (recipes.pipeline writes pipeline/plan.json), so
    that stages not started yet are listed too."""
    path = run_dir / "pipeline" / "plan.json"
    return list(json.loads(path.read_text()).get("stages", [])) if path.is_file() else []


def load_run(title: str, run_dir: Path) -> dict:
    markers = {}
    # Markers are pipeline/<stage>.json (plan.json, the stage list, has no checkpoint).
    for path in sorted((run_dir / "pipeline").glob("*.json")):
        marker = json.loads(path.read_text())
        if isinstance(marker, dict) and "checkpoint" in marker:
            markers[marker.get("stage") or path.name.split(".")[0]] = marker
    logged = {p.parent.name for p in run_dir.glob(f"*/{METRICS_FILE}")}
    plan = _planned(run_dir)
    # Finished stages in the order they ran; the rest after them, in the pipeline's order.
    order = {s: m["order"] if isinstance(m.get("order"), int) else math.inf for s, m in markers.items()}
    names = sorted(markers, key=lambda s: (order[s], s))
    names += [s for s in plan if s not in markers] + sorted(logged - set(markers) - set(plan))
    stages = [{"name": s, "marker": markers.get(s), "metrics": read_metrics(run_dir / s)} for s in names]
    budget = run_dir / "budget_curve.json"
    return {"title": title, "dir": run_dir, "stages": stages,
            "budget": json.loads(budget.read_text()) if budget.is_file() else None}


def _same_path(a, b) -> bool:
    return a is not None and b is not None and (a == b or Path(a).resolve() == Path(b).resolve())


def _started_from(marker: dict, stages: list[dict]) -> str:
    init = marker.get("init_from")
    for other in stages:
        if other["marker"] and _same_path(other["marker"].get("checkpoint"), init):
            return other["name"]
    return Path(init).name if init else "random init"


def _table(run: dict) -> list[str]:
    done = [s["marker"] for s in run["stages"] if s["marker"]]
    seen = {k for m in done for k in (m.get("eval") or {})}
    evals = [k for k in EVAL_ORDER if k in seen] + sorted(seen - set(EVAL_ORDER))
    head = ["stage", "steps", "wall (s)", "final loss", "from", "fingerprint", *evals]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in run["stages"]:
        m, metrics = s["marker"], s["metrics"]
        if m is None:
            note = f"not run ({len(metrics)} steps logged)" if metrics else "not run"
            cells = [s["name"], note] + [""] * (len(head) - 2)
        else:
            last = metrics[max(metrics)] if metrics else {}
            ev = m.get("eval") or {}
            cells = [s["name"], _fmt(max(metrics)) if metrics else "0", _fmt(m.get("wall_s")),
                     _fmt(last.get("loss")), _started_from(m, run["stages"]), (m.get("fingerprint") or "")[:8],
                     *(_fmt(ev.get(k)) for k in evals)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _budget_table(curve: dict) -> list[str]:
    lines = [f"Thinking budget curve ({curve.get('stage', '?')}):", "",
             "| budget | accuracy | thinking tokens |", "|---|---|---|"]
    for p in curve.get("points", []):
        budget = "no limit" if p.get("budget") is None else str(p["budget"])
        lines.append(f"| {budget} | {_fmt(p.get('accuracy'))} | {_fmt(p.get('thinking_tokens'))} |")
    return lines


def _figure(rows: int, cols: int = 1):
    # Figure without pyplot: no global backend state, renders with Agg on savefig.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12 if cols > 1 else 10, 3.2 * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _stage_colours(runs: list[dict]) -> dict[str, tuple]:
    from matplotlib import colormaps

    names = list(dict.fromkeys(s["name"] for r in runs for s in r["stages"]))
    return {n: colormaps["tab10"](i % 10) for i, n in enumerate(names)}


def _plot_loss(runs, path: Path) -> bool:
    runs = [r for r in runs if any(s["metrics"] for s in r["stages"])]
    if not runs:
        return False
    colours = _stage_colours(runs)
    fig, axes = _figure(len(runs))
    for ax, run in zip(axes[:, 0], runs):
        offset = 0
        for s in run["stages"]:
            if not s["metrics"]:
                continue
            steps = sorted(s["metrics"])
            ax.plot([offset + k for k in steps], _finite(s["metrics"][k].get("loss") for k in steps),
                    color=colours[s["name"]], lw=1)
            ax.axvline(offset, color="grey", ls=":", lw=0.8)
            ax.text(offset, 1.0, f" {s['name']}", transform=ax.get_xaxis_transform(), rotation=90,
                    va="top", ha="left", fontsize=7)
            offset += steps[-1]
        ax.set(title=run["title"], xlabel="global step", ylabel="training loss")
    fig.savefig(path, dpi=100)
    return True


def _stages_with(runs, key, names=()) -> list[tuple[str, dict]]:
    return [(f"{r['title']}/{s['name']}", s["metrics"]) for r in runs for s in r["stages"]
            if s["metrics"] and (s["name"] in names or any(key in v for v in s["metrics"].values()))]


def _series(metrics: dict, key: str):
    steps = sorted(k for k, v in metrics.items() if key in v)
    return steps, _finite(metrics[k][key] for k in steps)


def _plot_rl(runs, path: Path) -> bool:
    found = _stages_with(runs, "rl/reward_mean", RL_STAGES)
    if not found:
        return False
    fig, axes = _figure(len(found), 2)
    for (label, metrics), row in zip(found, axes):
        for ax, key in zip(row, ("rl/reward_mean", "rl/entropy")):
            ax.plot(*_series(metrics, key), marker=".", lw=1)
            ax.set(title=f"{label}: {key}", xlabel="step")
    fig.savefig(path, dpi=100)
    return True


def _plot_distill(runs, path: Path) -> bool:
    found = _stages_with(runs, "distill/kl")
    if not found:
        return False
    fig, axes = _figure(len(found))
    for (label, metrics), ax in zip(found, axes[:, 0]):
        ax.plot(*_series(metrics, "distill/kl"), lw=1, label="train KL")
        steps, kl = _series(metrics, "distill/eval_kl")
        if steps:
            ax.plot(steps, kl, "o", label="held-out KL")
        ax.set(title=label, xlabel="step", ylabel="KL (nats/token)")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return True


def _plot_budget(runs, path: Path) -> bool:
    curves = [(r["title"], r["budget"].get("points", [])) for r in runs if r["budget"]]
    curves = [(t, pts) for t, pts in curves if pts]
    if not curves:
        return False
    budgets = sorted({p["budget"] for _, pts in curves for p in pts if p.get("budget") is not None})
    # "No limit" sits one typical gap to the right of the largest budget.
    gap = (budgets[-1] - budgets[0]) / max(len(budgets) - 1, 1) if len(budgets) > 1 else 1
    unlimited = (budgets[-1] if budgets else 0) + (gap or 1)
    fig, axes = _figure(1)
    ax = axes[0, 0]
    for title, pts in curves:
        pts = sorted(pts, key=lambda p: unlimited if p.get("budget") is None else p["budget"])
        xs = [unlimited if p.get("budget") is None else p["budget"] for p in pts]
        ax.plot(xs, _finite(p.get("accuracy") for p in pts), marker="o", label=title)
    ax.set_xticks(budgets + [unlimited], [str(b) for b in budgets] + ["no limit"], fontsize=8)
    ax.set(xlabel="thinking budget (tokens)", ylabel="accuracy", title="accuracy vs thinking budget")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    return True


PLOTS = (("loss.png", "Training loss", _plot_loss), ("rl.png", "RL reward and entropy", _plot_rl),
         ("distill_kl.png", "Distillation KL", _plot_distill), ("budget.png", "Thinking budget", _plot_budget))


def write_report(out_dir: Path, runs: dict[str, Path]) -> Path:
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    loaded = [load_run(title, Path(d)) for title, d in runs.items()]
    lines = ["# Pipeline report", ""]
    for run in loaded:
        lines += [f"## {run['title']}", "", f"Run directory: `{run['dir']}`", "", *_table(run), ""]
        if run["budget"]:
            lines += [*_budget_table(run["budget"]), ""]
    lines += ["## Plots", ""]
    for name, caption, plot in PLOTS:
        if plot(loaded, out_dir / "plots" / name):
            lines += [f"![{caption}](plots/{name})", ""]
        else:
            lines += [f"{caption}: no data, plot skipped.", ""]
    report = out_dir / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.report", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for report.md and plots/")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (<run.root>/<run.name>)")
    args = parser.parse_args(argv)
    runs = {}
    for d in args.runs:
        if not d.is_dir():
            print(f"error: run directory {d} does not exist", file=sys.stderr)
            return 2
        # Two runs with the same name under different roots keep distinct titles.
        runs[d.name if d.name not in runs else f"{d.parent.name}/{d.name}"] = d
    print(write_report(args.out, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
