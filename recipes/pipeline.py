"""Run a whole Qwen3 training path, stage after stage, with an eval after each.

    python -m recipes.pipeline pipeline=qwen3_flagship model=qwen3_32b parallel=qwen3_32b
    python -m recipes.pipeline pipeline=qwen3_small model=qwen3_0_6b teacher=runs/qwen3_32b/rl_general
    python -m recipes.pipeline pipeline=qwen3_flagship stages.rl_reasoning.trainer.max_steps=5

A pipeline file (hydra_conf/pipeline/<name>.yaml, or a path) lists `stages` in order. Each
entry names the hydra_conf/stage/ config it runs (`stage`), where its weights come from
(`init_from`: an earlier stage of the same run, or a checkpoint directory), the teacher for
distillation (`teacher`), optional teacher data to generate first (`generate`:
recipes.generate settings), changes to the pipeline's `eval` settings for its own eval
(`eval`: e.g. `{problems: null}` for a stage that has not learnt the chat format yet, or
`{enabled: false}`), and any other config key as an override for that stage alone.
`common` holds overrides for every stage. `extends: <pipeline>` starts from another pipeline
file (merged key by key: an entry of `stages` adds to the base's entry). Inside the file `${run_dir}` and
`${data_root}` (and `${run_root}`) are the run directory and data.root the stages resolve.

Command-line overrides: `stages.<stage>.<key>=<value>` goes to one stage; a key of the
pipeline file itself (`teacher=`, `eval.samples=`, `budget_curve.budgets=`) changes the
pipeline; everything else goes to every stage (and `parallel` to the evals too).

Every stage runs as its own process (`python -m recipes.<recipe>`, which re-launches itself
on trainer.nprocs ranks), unless the file says `in_process: true`: then the runner itself
runs on the stages' ranks (re-launching itself under torchrun once) and calls each stage,
its teacher-data generation and its eval in those processes, which saves an interpreter
start and the imports of torch and megatron-core per step (the miniature; every stage must
then use the same number of ranks). A stage that has finished and been evaluated has a marker,
<run dir>/pipeline/<stage>.json, written atomically, recording the checkpoint it ended with,
the checkpoint it started from and the teacher (as its own final.json reports them, with a
content fingerprint of each), and its eval. Re-running the same command skips marked stages;
a stage that crashed continues from its own `latest` checkpoint (the trainer resumes by
itself), so nothing finished is redone. Before the first stage starts, `check_plan` checks
what every stage will need (settings and layout, data, tokenizer, init_from, teacher, eval
files) and stops with one line if anything is missing. `--plan` prints each stage's
overrides, one line per stage, for slurm/submit_pipeline.sh, then runs the same checks at
`--world-size=N` (the allocation's ranks) on the stages `--only=STAGE,...` names (a chain's
--from/--to slice; no evals, which a SLURM chain does not run); `--dry-run` prints the
commands and the checks' result without running anything.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from model.config import ConfigError
from recipes import schema  # noqa: F401  (registers config.yaml's typed root before composing it)

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "hydra_conf"
# Entry keys the runner interprets; any other key of an entry is a config override.
ENTRY_KEYS = ("stage", "init_from", "teacher", "generate", "eval")
MARKERS = "pipeline"


@dataclass
class Stage:
    name: str
    order: int
    config: str                 # hydra_conf/stage/<config>.yaml
    recipe: str = ""
    overrides: list[str] = field(default_factory=list)   # entry + per-stage CLI overrides
    init_from: str | None = None
    teacher: str | None = None
    generate: dict | None = None
    eval: dict = field(default_factory=dict)   # the pipeline's eval settings with this stage's changes
    stage_dir: Path | None = None
    wandb: dict = field(default_factory=dict)   # the stage's logging.wandb, for its eval
    cfg: DictConfig | None = None   # its composed config, as its recipe will see it (checks)


@dataclass
class Plan:
    name: str
    run_dir: Path
    data_root: Path
    common: list[str]
    stages: list[Stage]
    settings: DictConfig        # the pipeline file with its CLI changes (eval, budget_curve, ...)
    in_process: bool = False    # run every step in the runner's own processes (see the docstring)
    world_size: int = 1         # with in_process: the ranks every stage runs on


# ----------------------------------------------------------------------------- overrides

_PLAIN = re.compile(r"^[\w./@+-]+$")


def override_value(value) -> str:
    """A value in Hydra's override syntax: lists and dicts in brackets, odd strings quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.match(text) and text not in ("null", "true", "false"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def flatten(node: dict, prefix: str = "") -> list[str]:
    """Nested config keys as dotted `key=value` overrides (lists stay whole)."""
    out = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out += flatten(value, path + ".")
        else:
            out.append(f"{path}={override_value(value)}")
    return out


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


# ----------------------------------------------------------------------------- planning

def load_pipeline(name: str, seen: tuple = ()) -> DictConfig:
    """A pipeline file by name (hydra_conf/pipeline/) or path, with `extends` applied."""
    path = Path(name) if name.endswith((".yaml", ".yml")) or Path(name).is_file() else CONF / "pipeline" / f"{name}.yaml"
    if not path.is_file():
        have = " ".join(sorted(p.stem for p in (CONF / "pipeline").glob("*.yaml")))
        raise ConfigError(f"no pipeline {name!r} (have: {have})")
    if path.resolve() in seen:
        raise ConfigError(f"pipeline {path} extends itself")
    conf = OmegaConf.load(path)
    base = conf.pop("extends", None)
    if base:
        conf = OmegaConf.merge(load_pipeline(str(base), seen + (path.resolve(),)), conf)
    if not isinstance(conf.get("stages"), DictConfig) or not conf.stages:
        raise ConfigError(f"pipeline {path} has no `stages:` mapping (stage -> settings)")
    return conf


def compose_stage(config: str, overrides: list[str]) -> DictConfig:
    """The stage's full config as its recipe will see it (Hydra compose, no side effects)."""
    try:
        cfg = _compose("config", [f"stage={config}", *overrides])
    except ConfigError as e:
        raise ConfigError(f"stage {config}: {e}") from None
    OmegaConf.resolve(cfg)
    return cfg


def parse_args(argv: list[str]) -> tuple[str, list[str], dict]:
    """(pipeline name, key=value overrides, flags)."""
    flags = {"plan": False, "dry_run": False, "world_size": None, "only": None}
    name, overrides = None, []
    for arg in argv:
        if arg in ("--plan", "--dry-run"):
            flags[arg[2:].replace("-", "_")] = True
        elif arg.startswith("--world-size="):
            value = arg.split("=", 1)[1]
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"{arg}: expected a positive number of ranks")
            flags["world_size"] = int(value)
        elif arg.startswith("--only="):
            flags["only"] = set(filter(None, arg.split("=", 1)[1].split(",")))
        elif arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        elif arg.startswith("pipeline="):
            name = arg.split("=", 1)[1]
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r} (expected key=value, --plan, --dry-run, "
                              "--world-size=N or --only=STAGE,...)")
    if not name:
        raise ConfigError("pipeline= is required (e.g. pipeline=qwen3_flagship)")
    return name, overrides, flags


def make_plan(name: str, overrides: list[str]) -> Plan:
    """Every stage's config composed with its overrides, all sharing one run directory
    (ConfigError otherwise); `check_plan` then checks what the stages will need."""
    conf = load_pipeline(name)
    own = set(conf.keys()) - {"stages"}
    common, per_stage, pipeline_changes = [], {}, []
    for o in overrides:
        key = _key(o)
        head = key.split(".", 1)[0]
        if head == "stages":
            parts = key.split(".", 2)
            if len(parts) < 3 or parts[1] not in conf.stages:
                raise ConfigError(f"{o}: expected stages.<stage>.<key>=<value> with a stage of this pipeline "
                                  f"({', '.join(conf.stages)})")
            if parts[2].split(".", 1)[0] in ENTRY_KEYS:
                pipeline_changes.append(o)   # e.g. stages.sft_fusion.init_from=...
            else:
                per_stage.setdefault(parts[1], []).append(f"{parts[2]}={o.split('=', 1)[1]}")
        elif head in own:
            pipeline_changes.append(o)
        else:
            common.append(o)
    if pipeline_changes:
        conf = OmegaConf.merge(conf, OmegaConf.from_dotlist(pipeline_changes))
    # the file's own overrides for every stage come first: the command line wins
    if conf.get("common"):
        common = flatten(OmegaConf.to_container(conf.common, resolve=True)) + common

    entries = list(conf.stages.items())
    first = entries[0][1]
    base = compose_stage(str(first.get("stage", entries[0][0])), common)
    run_dir = Path(str(base.run.root)) / str(base.run.name)
    data_root = Path(str(base.data.root))
    if "teacher" in conf and OmegaConf.is_missing(conf, "teacher"):
        raise ConfigError(f"pipeline {name} needs teacher=<the flagship's final stage directory, "
                          "or a converted HF Qwen3 checkpoint>")
    conf = OmegaConf.merge(conf, {"run_dir": str(run_dir), "run_root": str(base.run.root),
                                  "data_root": str(data_root)})
    try:
        OmegaConf.resolve(conf)
    except OmegaConfBaseException as e:
        raise ConfigError(f"pipeline {name}: {str(e).strip().splitlines()[0]}") from None

    stages, earlier, worlds = [], [], {}
    for order, (key, entry) in enumerate(conf.stages.items()):
        entry = OmegaConf.to_container(entry) if entry is not None else {}
        config = str(entry.get("stage", key))
        rest = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
        own_overrides = flatten(rest) + per_stage.get(key, [])
        init_from, teacher = entry.get("init_from"), entry.get("teacher")
        if init_from and "/" not in str(init_from) and init_from not in earlier:
            raise ConfigError(f"stage {key}: init_from={init_from} is not an earlier stage of {name} "
                              f"({', '.join(earlier) or 'none'}) nor a path")
        wiring = [f"init_from={override_value(init_from)}"] if init_from else []
        wiring += [f"teacher={override_value(teacher)}"] if teacher else []
        cfg = compose_stage(config, [*common, *own_overrides, *wiring])
        if str(cfg.stage.name) != key:
            own_overrides.append(f"stage.name={key}")
            cfg.stage.name = key
        worlds[key] = _world_size(cfg)
        stage_run = Path(str(cfg.run.root)) / str(cfg.run.name)
        if stage_run != run_dir:
            raise ConfigError(f"stage {key} would write to {stage_run}, not the pipeline's run directory "
                              f"{run_dir}: override run.root/run.name for every stage, not one")
        evaluation = OmegaConf.to_container(OmegaConf.merge(conf.get("eval") or {}, entry.get("eval") or {}))
        stages.append(Stage(key, order, config, str(cfg.stage.recipe), own_overrides + wiring,
                            str(init_from) if init_from else None, str(teacher) if teacher else None,
                            entry.get("generate"), evaluation, run_dir / key,
                            OmegaConf.to_container(cfg.logging.wandb, resolve=True), cfg))
        earlier.append(key)
    in_process = bool(conf.get("in_process", False))
    if in_process and len(set(worlds.values())) > 1:
        raise ConfigError(f"pipeline {name} runs in_process, so every stage needs the same number of ranks "
                          f"(trainer.nprocs), not {worlds}")
    return Plan(name, run_dir, data_root, common, stages, conf, in_process, next(iter(worlds.values())))


def _layout_ranks(parallel: DictConfig) -> int:
    """The fewest ranks a `parallel:` layout runs on."""
    from model.config import ParallelConfig, from_dict
    from model.parallel import minimum_world_size

    return minimum_world_size(from_dict(ParallelConfig, OmegaConf.to_container(parallel, resolve=True), "parallel"))


def _world_size(cfg: DictConfig) -> int:
    """The ranks a stage launches with: trainer.nprocs, or what its layout needs."""
    return int(cfg.trainer.nprocs) if cfg.trainer.get("nprocs") else _layout_ranks(cfg.parallel)


def check_plan(plan: Plan, world_size: int | None = None, only: set[str] | None = None, evals: bool = True) -> None:
    """Everything every stage will need, before the first one starts (or, from
    slurm/submit_pipeline.sh, before the first job is submitted), as one ConfigError line:
    each stage's settings at the ranks it will have (`world_size`, the allocation's; else
    what the stage launches with locally), its data (S3's length buckets included), the
    tokenizer, where its weights come from and its teacher, as its recipe checks them at
    launch, and (with `evals`) the evals' files. What an earlier step of the chain writes (a
    stage's final checkpoint, teacher data) is taken as given, and so is every stage outside
    `only` (the part of a chain being run)."""
    from recipes.train import check_settings, recipe_for, settings_from

    def each_stage(check) -> None:
        earlier: list[str] = []
        for stage in plan.stages:
            if only is not None and stage.name not in only:
                earlier.append(stage.name)
                continue
            try:
                check(stage, stage.cfg, settings_from(stage.cfg), earlier)
            except ConfigError as e:
                raise ConfigError(f"stage {stage.name}: {e}") from None
            earlier.append(stage.name)

    def settings(stage: Stage, cfg: DictConfig, s, earlier: list) -> None:
        check_settings(s, world_size or _world_size(cfg), stage.recipe)

    def inputs(stage: Stage, cfg: DictConfig, s, earlier: list) -> None:
        for what, source in (("init_from", stage.init_from), ("teacher", stage.teacher)):
            if source and source not in earlier:
                from recipes.checkpointing import resolve_init_from   # (imports megatron-core: only when needed)

                try:
                    resolve_init_from(source, plan.run_dir)
                except ConfigError:
                    raise ConfigError(f"{what}={source} is neither an earlier stage of {plan.name} nor a "
                                      "checkpoint or stage directory") from None
        if stage.generate:
            # its training data is the teacher's output, written by the job before it
            prompts = stage.generate.get("input")
            if prompts and not Path(str(prompts)).is_file():
                raise ConfigError(f"generate.input={prompts} (the teacher's prompts) not found")
            from data_pipeline.tokenizer import load_tokenizer

            load_tokenizer(cfg.tokenizer)
        elif not (stage.teacher and stage.teacher in earlier):   # else its recipe would look for that teacher
            recipe_for(stage.recipe).validate(cfg, s)
        for key in ("lm_data", "problems") if evals else ():
            path = stage.eval.get(key)
            if stage.eval.get("enabled", True) and path and not Path(str(path)).is_file():
                raise ConfigError(f"eval.{key}={path} not found (or set eval.enabled=false)")

    # every stage's settings first: a typing mistake in the last stage's overrides is
    # reported as such, not hidden behind the first stage's missing data
    each_stage(settings)
    each_stage(inputs)


# ----------------------------------------------------------------------------- running

def stage_command(plan: Plan, stage: Stage) -> list[str]:
    return [sys.executable, "-m", f"recipes.{stage.recipe}", f"stage={stage.config}", *plan.common,
            *stage.overrides]


def generate_command(plan: Plan, stage: Stage) -> list[str]:
    """recipes.generate for the teacher data a stage trains on (resumable: rows already
    written are skipped)."""
    g = dict(stage.generate)
    g.setdefault("checkpoint", stage.teacher)
    g.setdefault("tokenizer", str(plan.data_root / "tokenizer"))
    g.setdefault("progress", False)
    return [sys.executable, "-m", "recipes.generate", *flatten(g), *_parallel(plan.common)]


def _parallel(overrides: list[str]) -> list[str]:
    return [o for o in overrides if _key(o).split(".", 1)[0] == "parallel"]


def eval_command(plan: Plan, stage: Stage, checkpoint: Path, budgets: list | None) -> list[str]:
    # wandb: the runner logs every stage's eval into one run of its own (run_pipeline)
    args = {"checkpoint": str(checkpoint), "output": str(stage.stage_dir / "eval.json"),
            "name": f"{plan.run_dir.name}/{stage.name}", "tokenizer": str(plan.data_root / "tokenizer"),
            "progress": False, "wandb": {"mode": "disabled"}}
    args.update({k: v for k, v in stage.eval.items() if k != "enabled"})
    if budgets:
        args["thinking_budgets"] = list(budgets)
    return [sys.executable, "-m", "recipes.eval", *flatten(args), *_parallel(plan.common)]


# The environment stages start in: the runner's own, before an in-process eval set the
# single-process rendezvous variables, which a stage would take for a launcher's.
_LAUNCH_ENV = dict(os.environ)


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    """hydra_conf/<config_name>.yaml with overrides, as that CLI would see it (checked the
    same way: a ConfigError of one line)."""
    from model.launch import compose

    return compose(config_name, overrides)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _agree(value):
    """Rank 0's `value` on every rank: the runner's decisions come from the run directory,
    which rank 0 alone reads and writes."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _say(text: str, error: bool = False) -> None:
    if _rank() == 0:
        print(text, file=sys.stderr if error else sys.stdout, flush=True)


class _Tee:
    """A text stream that writes to several (the console and a step's log)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def isatty(self) -> bool:
        return False


def _here(step, log: Path, what: str) -> int:
    """Run `step()` (an exit code) in this process, rank 0's output also into `log`. If it
    raises on one rank of several, the process exits at once: torchrun then stops the
    other ranks, which would otherwise wait in a collective until the timeout."""
    import contextlib
    import traceback

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") if _rank() == 0 else contextlib.nullcontext() as f:
        try:
            if f is None:
                return step()
            f.write(f"# in process: {what}\n")
            with contextlib.redirect_stdout(_Tee(sys.stdout, f)), contextlib.redirect_stderr(_Tee(sys.stderr, f)):
                return step()
        except Exception:
            import torch.distributed as dist

            if not dist.is_initialized() or dist.get_world_size() == 1:
                raise
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)


def _eval(plan: Plan, cmd: list[str], log: Path) -> int:
    """The eval: in this process when the pipeline runs in process, or when it needs one
    rank (no interpreter start, no second import of torch and megatron-core per stage),
    otherwise as its own launch."""
    from recipes import eval as evaluation

    cfg = _compose("eval", cmd[3:])
    if plan.in_process:
        return _here(lambda: evaluation.run_cli(cfg), log, "eval")
    if _layout_ranks(cfg.parallel) > 1 or "WORLD_SIZE" in _LAUNCH_ENV:
        return _run(cmd, log)
    try:
        return evaluation.run_cli(cfg)
    finally:   # the next eval picks a fresh rendezvous port
        for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
            if key not in _LAUNCH_ENV:
                os.environ.pop(key, None)


def _train(plan: Plan, stage: Stage, log: Path) -> int:
    if not plan.in_process:
        return _run(stage_command(plan, stage), log)
    from recipes.train import recipe_for, run

    cfg = compose_stage(stage.config, [*plan.common, *stage.overrides])
    return _here(lambda: run(cfg, recipe_for(stage.recipe)), log, f"stage {stage.name}")


def _generate(plan: Plan, stage: Stage, log: Path) -> int:
    cmd = generate_command(plan, stage)
    if not plan.in_process:
        return _run(cmd, log)
    from recipes import generate

    cfg = _compose("generate", cmd[3:])
    return _here(lambda: generate.run_cli(cfg), log, f"teacher data for {stage.name}")


def _run(cmd: list[str], log: Path) -> int:
    """Run one step, its output both on the console and in the pipeline's log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=Path.cwd(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, env={**_LAUNCH_ENV, "PYTHONPATH": f"{REPO}{os.pathsep}"
                                                                             f"{_LAUNCH_ENV.get('PYTHONPATH', '')}"})
        for line in proc.stdout:
            sys.stdout.write(line)
            f.write(line)
        return proc.wait()


def marker_path(plan: Plan, stage: Stage) -> Path:
    return plan.run_dir / MARKERS / f"{stage.name}.json"


def _source(path: str | None) -> tuple[str | None, str | None]:
    from recipes.checkpointing import fingerprint

    if not path:
        return None, None
    return path, fingerprint(Path(path)) if Path(path).is_dir() else None


def finish_stage(plan: Plan, stage: Stage, started: float, budgets: list | None) -> dict | None:
    """Evaluate the finished stage and write its marker (atomically, last); the marker, on
    rank 0 (None on the other ranks of an in-process run, which take part in the eval)."""
    from model.checkpoint import write_atomic
    from recipes.checkpointing import FINAL, fingerprint
    from recipes.run_log import read_metrics

    final = _agree(json.loads((stage.stage_dir / FINAL).read_text()) if _rank() == 0 else None)
    checkpoint = (stage.stage_dir / final["checkpoint"]).resolve()
    metrics = {}
    if stage.eval.get("enabled", True):
        code = _eval(plan, eval_command(plan, stage, checkpoint, budgets), plan.run_dir / MARKERS / f"{stage.name}.log")
        if code != 0:
            raise RuntimeError(f"the eval after stage {stage.name} failed (exit {code})")
        if _rank() == 0:
            metrics = json.loads((stage.stage_dir / "eval.json").read_text())["metrics"]
    if _rank() != 0:
        return None
    curve = metrics.pop("budget_curve", None)
    if curve is not None:
        write_atomic(plan.run_dir / "budget_curve.json", json.dumps(
            {"stage": stage.name, "checkpoint": str(checkpoint), "points": curve}, indent=2) + "\n")
    init_from, init_fp = _source(final.get("init_from"))
    teacher, teacher_fp = _source(final.get("teacher"))
    steps = read_metrics(stage.stage_dir)
    marker = {"stage": stage.name, "order": stage.order, "config": stage.config, "recipe": stage.recipe,
              "checkpoint": str(checkpoint), "fingerprint": fingerprint(checkpoint), "step": final.get("step"),
              "init_from": init_from, "init_fingerprint": init_fp, "teacher": teacher,
              "teacher_fingerprint": teacher_fp, "wall_s": round(time.time() - started, 1),
              "train_s": round(sum(r.get("step_time_s", 0.0) for r in steps.values()), 1), "eval": metrics}
    write_atomic(marker_path(plan, stage), json.dumps(marker, indent=2, allow_nan=True) + "\n")
    return marker


def run_pipeline(plan: Plan, dry_run: bool = False) -> int:
    """Run (or with dry_run, print) the stages without a marker. In an in-process plan every
    rank calls this; rank 0 reads and writes the run directory and tells the others."""
    from recipes.checkpointing import FINAL, latest_checkpoint
    from recipes.eval import log_to_wandb

    curve = plan.settings.get("budget_curve") or {}
    _say(f"pipeline {plan.name}: {len(plan.stages)} stages into {plan.run_dir}")
    if not dry_run and _rank() == 0:
        from model.checkpoint import write_atomic

        (plan.run_dir / MARKERS).mkdir(parents=True, exist_ok=True)
        write_atomic(plan.run_dir / MARKERS / "plan.json", json.dumps(
            {"pipeline": plan.name, "stages": [s.name for s in plan.stages]}, indent=2) + "\n")
    for stage in plan.stages:
        marker = marker_path(plan, stage)
        prefix = f"[{stage.order + 1}/{len(plan.stages)}] {stage.name}"
        if _agree(marker.is_file()):
            _say(f"{prefix}: done earlier ({marker}), skipped")
            continue
        budgets = list(curve.get("budgets") or []) if curve.get("stage") == stage.name else None
        log = plan.run_dir / MARKERS / f"{stage.name}.log"
        if dry_run:
            if stage.generate:
                print("$ " + " ".join(generate_command(plan, stage)))
            print("$ " + " ".join(stage_command(plan, stage)))
            continue
        started = time.time()
        if not _agree((stage.stage_dir / FINAL).is_file()):
            latest = _agree(latest_checkpoint(stage.stage_dir))
            _say(f"{prefix}: {'resuming from ' + str(latest) if latest is not None else 'starting'}")
            if stage.generate and latest is None:
                code = _generate(plan, stage, log)
                if code != 0:
                    _say(f"error: generating {stage.name}'s teacher data failed (exit {code}); re-run the same "
                         "command to continue", error=True)
                    return code or 1
            code = _train(plan, stage, log)
            if code != 0 or not _agree((stage.stage_dir / FINAL).is_file()):
                _say(f"error: stage {stage.name} stopped (exit {code}); re-run the same command to continue it "
                     f"from its latest checkpoint (log: {log})", error=True)
                return code or 1
        done = finish_stage(plan, stage, started, budgets)
        if done is None:
            continue
        log_to_wandb(stage.wandb, f"{plan.run_dir.name}/pipeline", done["eval"],
                     plan.run_dir / MARKERS, step=stage.order)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in done["eval"].items() if isinstance(v, float))
        print(f"{prefix}: finished at step {done['step']} in {done['wall_s']:.0f} s; {shown}", flush=True)
    if not dry_run:
        _say(f"pipeline {plan.name}: all stages done ({plan.run_dir / MARKERS})")
    return 0


def run_in_process(plan: Plan, argv: list[str], module: str = "recipes.pipeline") -> int:
    """An in-process plan: re-run `module` with `argv` under torchrun on the stages' ranks
    (unless launched already), then every step in these processes."""
    from model.launch import relaunch_if_needed
    from model.parallel import process_group

    relaunch_if_needed(module, argv, plan.world_size)   # exits with the workers' code
    with process_group():
        return run_pipeline(plan)


def print_plan(plan: Plan) -> None:
    """One line per job for slurm/submit_pipeline.sh, tab separated: `stage NAME CONFIG
    override...` (the stage's complete overrides but `stage=`, which its template sets) or,
    before a stage with teacher data to write, `generate NAME generate override...`."""
    for stage in plan.stages:
        if stage.generate:
            print("\t".join(["generate", stage.name, "generate", *generate_command(plan, stage)[3:]]))
        print("\t".join(["stage", stage.name, stage.config, *plan.common, *stage.overrides]))


def main(argv: list[str] | None = None) -> int:
    try:
        name, overrides, flags = parse_args(sys.argv[1:] if argv is None else argv)
        plan = make_plan(name, overrides)
        if flags["only"] is not None and (unknown := flags["only"] - {s.name for s in plan.stages}):
            raise ConfigError(f"--only: {', '.join(sorted(unknown))} not a stage of {name}")
        # stages finished and marked earlier need nothing any more
        todo = {s.name for s in plan.stages if not marker_path(plan, s).is_file()}
        only = todo if flags["only"] is None else flags["only"]
        if flags["plan"] or flags["dry_run"]:
            # the plan first, then the checks' verdict: a dry run shows both. A SLURM chain
            # (--plan) runs no evals.
            print_plan(plan) if flags["plan"] else run_pipeline(plan, dry_run=True)
            sys.stdout.flush()
            check_plan(plan, flags["world_size"], only, evals=not flags["plan"])
            if flags["dry_run"]:
                print(f"pipeline {name}: dry run; every stage's checks passed, nothing was run")
            return 0
        check_plan(plan, only=only)
        if plan.in_process:
            return run_in_process(plan, sys.argv[1:] if argv is None else argv)
        return run_pipeline(plan)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
