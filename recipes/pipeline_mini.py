"""Both Qwen3 training paths in miniature, end to end on a CPU (`make pipeline-mini`).

    python -m recipes.pipeline_mini --root runs/mini [--quick] [override ...]

1. generated data (data_pipeline/mini.py) under <root>/data, with the mini tokenizer
   (4,096 ids in the Qwen3 format; `--tokenizer qwen3`: the real one, 151,669 ids);
2. the flagship path (hydra_conf/pipeline/mini_flagship.yaml, dense `mini`) into <root>/flagship;
3. the small-model path (mini_small.yaml, a `mini_moe` student) into <root>/small, with the
   flagship's final stage as teacher;
4. <root>/report.md with every stage's metrics, plots and the thinking-budget curve.

Both paths run in this command's own processes: it re-launches itself under torchrun on the
stages' number of ranks, and every stage, teacher-data generation and eval runs in them
(recipes.pipeline's `in_process`).

Re-running continues: finished stages are skipped, a crashed one resumes from its latest
checkpoint. `--quick` is the shortened run of the default test suite: every stage, a few
steps each, a small eval; it shows the wiring, not learning. Other arguments are pipeline
overrides for both paths (stages.<stage>.<key>=...).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from model.config import ConfigError
from recipes import pipeline

# The shortened run: every stage still runs and hands its checkpoint on.
QUICK_PROBLEMS = 200
QUICK = {
    "common": ["eval.samples=6", "eval.lm_rows=2", "eval.max_new_tokens=24", "eval.batch_size=6"],
    "mini_flagship": ["stages.pretrain_s1.trainer.max_steps=2", "stages.pretrain_s2.trainer.max_steps=1",
                      "stages.pretrain_s3.trainer.max_steps=1", "stages.sft_cold_start.trainer.max_steps=2",
                      "stages.sft_cold_start.optim.warmup_steps=0",
                      "stages.rl_reasoning.trainer.max_steps=1", "stages.sft_fusion.trainer.max_steps=1",
                      "stages.rl_general.trainer.max_steps=1", "budget_curve.budgets=[0,null]",
                      *[f"stages.{rl}.{k}" for rl in ("rl_reasoning", "rl_general")
                        for k in ("trainer.global_batch_size=8", "trainer.micro_batch_size=4",
                                  "rl.grpo.prompts_per_rollout=2", "rl.grpo.group_size=4",
                                  "rl.grpo.max_new_tokens=24")]],
    "mini_small": ["stages.pretrain_s1.trainer.max_steps=1", "stages.pretrain_s2.trainer.max_steps=1",
                   "stages.pretrain_s3.trainer.max_steps=1", "stages.distill_off_policy.trainer.max_steps=1",
                   "stages.distill_off_policy.optim.warmup_steps=0",
                   "stages.distill_on_policy.trainer.max_steps=1",
                   "stages.distill_off_policy.generate.max_rows=8"],
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m recipes.pipeline_mini", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/mini", help="where data, both runs and the report go")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage (the CI smoke run)")
    parser.add_argument("--problems", type=int, default=None, help="arithmetic training problems to generate")
    parser.add_argument("--tokenizer", choices=("mini", "qwen3"), default="mini",
                        help="the mini tokenizer, or the real Qwen3 one (full vocabulary; slower)")
    args, overrides = parser.parse_known_args(argv)
    root = Path(args.root).resolve()
    started = time.time()

    from data_pipeline.mini import PROBLEMS, thinking_budgets, write_mini_data
    from model.launch import relaunch_if_needed
    from model.parallel import process_group
    from recipes.report import write_report

    paths = (("flagship", "mini_flagship"), ("small", "mini_small"))
    stages = {name: set(pipeline.load_pipeline(name).stages) for _, name in paths}
    for o in overrides:   # stages.<stage>.<key>=... goes to the path(s) with that stage
        target = o.split("=", 1)[0].split(".")
        if target[0] == "stages" and not any(len(target) > 1 and target[1] in names for names in stages.values()):
            print(f"error: {o}: no path has a stage {'.'.join(target[1:2])!r}", file=sys.stderr)
            return 2
    plans = {}
    try:
        for title, name in paths:
            extra = [*QUICK["common"], *QUICK[name]] if args.quick else []
            own = [o for o in overrides if not o.startswith("stages.") or o.split(".")[1] in stages[name]]
            plans[title] = (name, [f"pipeline={name}", f"run.root={root}", f"data.root={root / 'data'}"], [*extra, *own])
        world = {pipeline.make_plan(name, [*where[1:], *more]).world_size
                 for name, where, more in plans.values()}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(world) > 1:
        print(f"error: both paths must run on the same number of ranks, not {sorted(world)}", file=sys.stderr)
        return 2
    # both paths, every stage, in these processes (recipes.pipeline's in_process)
    relaunch_if_needed("recipes.pipeline_mini", argv, world.pop())
    with process_group():
        import torch.distributed as dist

        rank0 = dist.get_rank() == 0
        if rank0:
            print(f"pipeline-mini: data under {root / 'data'}", flush=True)
            write_mini_data(root / "data", problems=args.problems or (QUICK_PROBLEMS if args.quick else PROBLEMS),
                            tokenizer=args.tokenizer)
        dist.barrier()
        # the budget curve's points where each problem size comes within reach (the data's own)
        budgets = f"budget_curve.budgets={pipeline.override_value(thinking_budgets(root / 'data'))}"
        for title, (name, where, more) in plans.items():
            code = pipeline.main([*where, *([budgets] if title == "flagship" else []), *more])
            if code != 0:
                if rank0:
                    print(f"pipeline-mini: the {title} path stopped (exit {code}); run the same command again to "
                          "continue", file=sys.stderr)
                return code
        if rank0:
            report = write_report(root, {title: root / title for title in plans})
            print(f"pipeline-mini: both paths done in {time.time() - started:.0f} s; report: {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
