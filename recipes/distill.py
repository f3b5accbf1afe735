"""Strong-to-weak distillation (Qwen3 report section 4.5): the lightweight models learn
from a flagship teacher instead of running the four post-training stages.

    # teacher responses in both thinking modes, with its top-64 log-probs per token
    python -m recipes.generate checkpoint=<teacher> tokenizer=data/tokenizer input=data/distill/prompts.jsonl \\
        output=data/distill/teacher.jsonl modes=[think,no_think] top_k_logprobs=64
    # off-policy: the student learns the teacher's responses and distributions
    python -m recipes.distill stage=distill_off_policy model=qwen3_0_6b init_from=runs/qwen3_0_6b/pretrain_s3
    # on-policy: the student samples, the teacher scores the same tokens
    python -m recipes.distill stage=distill_on_policy model=qwen3_0_6b teacher=<teacher>

Both phases run the shared loop (recipes/train.py) with this module's `Task`; the loss is
recipes/distill_loss.py: ce_weight * CE + kl_weight * T^2 * divergence(teacher, student)
on the teacher's top k (`distill.loss`).

- Off-policy (`distill.phase=off_policy`): rows written by recipes.generate (token ids
  and the teacher's top-k records; data_pipeline/distill_data.py), one response per row,
  loss on the response. Files written without records are scored by the teacher in the
  job (`teacher=`) instead.
- On-policy (`distill.phase=on_policy`): every step, the current student samples one
  response per prompt (prompts in the RL format, in each of `distill.rollout.modes`), the
  frozen teacher computes its top k at every sampled token, and the student minimises the
  divergence there (reverse KL by default). The rollout machinery is the RL stage's
  parts (recipes/rl_parts.py: the prompt stream, the sampler over data-parallel ranks
  with verifier scores, padding and micro-batches), composed here with the teacher, the
  loss and the metrics, which are this module's.

Teacher and student share the job, the tokenizer and the parallel layout (TP/PP/CP/EP).
The teacher is built from its own checkpoint's model config, frozen and in eval mode, with
no optimizer. A different teacher layout (`distill.teacher_parallel`) is refused with a
clear error in this version: see docs/DISTILL.md.

Held-out evaluation (`distill.eval.files`, RL-format prompts): in each mode, the student's
responses (at `distill.eval.temperature`, 0: greedy; one fixed seed), their verifier
accuracy and length, and the
mean per-token reverse KL(student || teacher) at temperature 1 on the teacher's top k,
before the first update, every `interval` steps and after the last; the teacher's own
accuracy once, at the start.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from model.config import ConfigError, from_dict
from recipes.distill_loss import DistillLoss
from recipes.generate import stop_ids
from recipes.grpo import scaled_loss
from recipes.rl_parts import HeldOutSchedule, MicroBatcher, Policy, PromptStream, RolloutSampler
from recipes.rollout.megatron_engine import MegatronEngine
from recipes.schema import RolloutSettings
from recipes.train import Settings, Task, chat_tokenizer, run

PHASES = ("off_policy", "on_policy")
REPORT_KEYS = ("distill/kl", "distill/ce")


def _section(cfg: DictConfig):
    if cfg.get("distill") is None:
        raise ConfigError(f"stage {cfg.stage.name} has no distill section")
    return cfg.distill


def _typed(cls, node, where: str):
    return from_dict(cls, OmegaConf.to_container(node, resolve=True) if node is not None else {}, where)


def loss_settings(cfg: DictConfig) -> DistillLoss:
    c = _typed(DistillLoss, _section(cfg).get("loss"), "distill.loss")
    if problems := c.problems():
        raise ConfigError("; ".join(problems))
    return c


def teacher_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """The teacher's checkpoint: top-level `teacher=`, else `distill.teacher`; a stage of
    this run, a stage directory or a checkpoint directory (e.g. an HF model converted by
    model.convert hf-to-mcore)."""
    from recipes.checkpointing import resolve_init_from

    source = cfg.get("teacher") or _section(cfg).get("teacher")
    if not source:
        return None
    try:
        return resolve_init_from(str(source), run_dir)
    except ConfigError:
        raise ConfigError(f"teacher={source!r} is neither a stage of run {run_dir} nor a checkpoint directory "
                          "(no metadata.json)") from None


def teacher_problems(cfg: DictConfig, s: Settings, ckpt: Path) -> list[str]:
    """Why this teacher cannot run beside this student (empty: it can)."""
    from model.checkpoint import read_model_config
    from model.config import ParallelConfig
    from model.parallel import layout_problems

    teacher = read_model_config(ckpt)
    p = []
    if teacher.vocab_size != s.model.vocab_size:
        p.append(f"the teacher's vocab_size={teacher.vocab_size} differs from the student's "
                 f"model.vocab_size={s.model.vocab_size}: teacher and student must share the tokenizer")
    wanted = _section(cfg).get("teacher_parallel")
    if wanted:
        layout = from_dict(ParallelConfig, {**asdict(s.parallel), **OmegaConf.to_container(wanted, resolve=True)},
                           "distill.teacher_parallel")
        if layout != s.parallel:
            differ = {k: v for k, v in asdict(layout).items() if getattr(s.parallel, k) != v}
            p.append(f"distill.teacher_parallel {differ} differs from the student's layout: in this version the "
                     "teacher runs in the student's TP/PP/CP/EP layout (docs/DISTILL.md); set "
                     "distill.teacher_parallel=null")
    p += [f"teacher ({teacher.name}): {x}" for x in layout_problems(teacher, s.parallel, None, s.trainer.seq_length)]
    return p


def records_on_disk(files) -> bool:
    """Whether every teacher file carries top-k records (then the off-policy phase reads
    them, and a teacher in the job only evaluates)."""
    from data_pipeline.distill_data import read_topk_meta

    return all(read_topk_meta(str(f)) is not None for f in files)


def mode_prompts(files, rewards, tokenizer, max_prompt_tokens: int, r: RolloutSettings
                 ) -> tuple[dict[str, list], Counter]:
    """RL-format prompts rendered in each mode ({mode: prompts}) and the skipped rows."""
    from data_pipeline.chat import prompt_ids
    from data_pipeline.fusion import in_mode
    from data_pipeline.rl_data import read_prompts
    from recipes.rewards import REWARDS, reference_problem

    out, skipped = {}, Counter()
    for mode in r.modes:
        rows, skips = read_prompts(list(files), rewards, tokenizer, max_prompt_tokens, mode == "think",
                                   known=REWARDS, reference_problem=reference_problem)
        skipped += skips
        out[mode] = []
        for p in rows:
            p.enable_thinking = mode == "think"   # the mode decides, not the row
            p.messages = in_mode(p.messages, mode, r.flags)
            p.ids = prompt_ids(tokenizer, p.messages, p.enable_thinking)
            if len(p.ids) > max_prompt_tokens:
                skipped["prompt too long"] += 1
            else:
                out[mode].append(p)
    return out, skipped


class DistillTask:
    """The distillation stage's batches, loss and metrics (see the module docstring). On
    policy, the prompts, the student's samples and the micro-batches are the parts of
    recipes/rl_parts.py (one sample per prompt); off policy, the rows come from
    `samples` (recipes.data.SampleBatches over the teacher data). The teacher's top k, the
    loss and the held-out accuracy and KL are this task's."""

    def __init__(self, c: DistillLoss, phase: str, tokenizer, policy: Policy, batcher: MicroBatcher,
                 sampler: RolloutSampler | None, teacher=None, prompts: list = (), seed: int = 0, *,
                 eval_sets: dict | None = None, eval_samples: int = 1, eval_interval: int = 0,
                 eval_temperature: float = 0.0, max_steps: int = 0, samples=None, score_online: bool = False):
        """`sampler`: the student's, None when the stage samples nothing (off policy
        without held-out prompts). `samples(consumed)`: off policy, this rank's
        micro-batches; `score_online`: their teacher records are scored here, not read."""
        self.c, self.phase, self.tokenizer, self.policy, self.teacher = c, phase, tokenizer, policy, teacher
        self.batcher, self.sampler, self.dp = batcher, sampler, batcher.dp
        # the keys distillation checkpoints have always held (entropy_coef is RL's, unused here)
        self.state = {"prompt_cursor": 0, "entropy_coef": 0.0}
        self.stream = PromptStream(list(prompts), seed, self.state)
        self.samples, self.score_online = samples, score_online
        self.eval_sets, self.eval_samples, self.eval_temperature = eval_sets or {}, eval_samples, eval_temperature
        held = any(self.eval_sets.values())
        self.held_out = HeldOutSchedule(self.evaluate if held else None, eval_interval, max_steps,
                                        batcher.global_batch_size)
        self.teacher_rollout = MegatronEngine(teacher, stop_ids(tokenizer), len(tokenizer)) if teacher is not None else None
        self.rollout_metrics: dict = {}

    # ------------------------------------------------------------------ teacher
    def _teacher_topk(self, tokens: torch.Tensor, mask: torch.Tensor, k: int | None = None,
                      temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k log-probs and ids [b, L, k] at the masked positions (zeros
        elsewhere, and on ranks off the last pipeline stage)."""
        from model.inference import forward_masked, topk_logprobs

        k = k or self.c.top_k
        T = self.c.temperature if temperature is None else temperature
        logp = torch.zeros(*tokens.shape, k)
        ids = torch.zeros(*tokens.shape, k, dtype=torch.int32)
        mbs = self.batcher.micro_batch_size
        for start in range(0, len(tokens), mbs):
            sl = slice(start, start + mbs)

            def top(logits, rows, m):
                values, index = topk_logprobs(logits, k, T, len(self.tokenizer))
                return torch.cat([values, index.float()], -1)   # ids < 2^24 are exact in float32

            out = forward_masked(self.teacher, tokens[sl], mask[sl], top)
            if out is not None:
                logp[sl], ids[sl] = out[..., :k].float().cpu(), out[..., k:].round().int().cpu()
        return logp, ids

    # ------------------------------------------------------------------ batches
    def batches(self, consumed: int) -> list[dict]:
        self.held_out.start(consumed)   # the starting student, once (not again on resume)
        if self.phase == "on_policy":
            # both phases: the token mean over the whole global batch
            return self.batcher.batches(consumed, self._prepare, "token-mean")
        micro = self.batcher.trim(self.samples(consumed))
        if self.score_online:
            for b in micro:
                b["teacher_logp"], b["teacher_ids"] = self._teacher_topk(b["tokens"], b["loss_mask"])
        return self.batcher.scale(micro, self._global_tokens(micro))

    def _global_tokens(self, micro: list[dict]) -> float:
        """The response tokens of the whole global batch: every DP rank's micro-batches.
        The objective is their token mean, as on-policy and as logged."""
        import torch.distributed as dist

        from model.inference import model_device

        total = torch.stack([b["loss_mask"].sum() for b in micro]).sum().to(model_device(self.policy.chunks),
                                                                           torch.float64)
        dist.all_reduce(total, group=self.dp.group)
        return total.item()

    def _prepare(self, index: int) -> dict:
        """A fresh on-policy batch: the student's samples and the teacher's top k on them."""
        r, _ = self.sampler.rollout(self.stream, index)
        t = self.batcher.tensors(r)
        rows = torch.tensor(self.batcher.rows())
        t["teacher_logp"] = torch.zeros(*t["tokens"].shape, self.c.top_k)
        t["teacher_ids"] = torch.zeros(*t["tokens"].shape, self.c.top_k, dtype=torch.int32)
        t["teacher_logp"][rows], t["teacher_ids"][rows] = self._teacher_topk(t["tokens"][rows], t["loss_mask"][rows])
        self.rollout_metrics = {**r.response_metrics("distill"),
                                "distill/accuracy": sum(r.correct) / max(len(r.correct), 1),
                                "distill/reward_errors": float(r.errors), "distill/rollout_time_s": r.seconds}
        return t

    # ------------------------------------------------------------------ loss
    def loss(self, batch: dict, logits: torch.Tensor):
        from recipes.distill_loss import per_token

        mask = batch["loss_mask"].float()
        where = mask.bool()
        # logits: at the loss positions only (Task.loss_positions_only)
        loss, ce, div = per_token(logits, batch["targets"][where], batch["teacher_logp"][where],
                                  batch["teacher_ids"][where], self.c, len(self.tokenizer))
        tokens = mask.sum()
        report = {"distill/kl": torch.stack([div.sum(), tokens]), "distill/ce": torch.stack([ce.sum(), tokens])}
        # both phases: the token mean over the whole global batch (scale_to_minibatch)
        scaled, count, report["lm loss"] = scaled_loss(loss.sum(), batch)
        return scaled, count, report

    # ------------------------------------------------------------------ evaluation
    def _reverse_kl(self, r) -> torch.Tensor:
        """[sum over response tokens of KL(student || teacher) at T=1, tokens] of a rollout,
        each DP rank scoring its share of the rows."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        from model.inference import forward_masked, logprobs_at
        from recipes.distill_loss import divergence

        t = self.batcher.tensors(r)
        total = torch.zeros(2, dtype=torch.float64)
        for idx in self.batcher.in_micro_batches(list(range(self.dp.rank, len(r.prompts), self.dp.size))):
            tokens, mask = t["tokens"][idx], t["loss_mask"][idx].bool()
            t_logp, t_ids = self._teacher_topk(tokens, mask, temperature=1.0)

            def kl(logits, sl, m):
                s_logp = logprobs_at(logits, t_ids[sl].to(m.device)[m], 1.0, len(self.tokenizer))
                return divergence(t_logp[sl].to(m.device)[m], s_logp, "reverse")

            out = forward_masked(self.policy.chunks, tokens, mask, kl)
            if out is not None:
                total += torch.tensor([out.sum().item(), float(mask.sum())], dtype=torch.float64)
        device = next(self.policy.chunks[0].parameters()).device
        total = total.to(device)
        dist.all_reduce(total, group=self.dp.group)
        # only the last pipeline stage scored: a sum over the pipeline group tells every stage
        dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        return total.cpu()

    def evaluate(self, updates: int) -> dict:
        from dataclasses import replace

        out, kl = {"distill/eval_step": float(updates)}, torch.zeros(2, dtype=torch.float64)
        sampling = replace(self.sampler.sampling, temperature=self.eval_temperature)
        for mode, prompts in self.eval_sets.items():
            r = self.sampler.held_out(prompts, self.eval_samples, sampling)
            part = self._reverse_kl(r)
            kl += part
            out[f"distill/eval_kl_{mode}"] = (part[0] / part[1].clamp(min=1)).item()
            out[f"distill/eval_accuracy_{mode}"] = sum(r.correct) / len(r.correct)
            out[f"distill/eval_response_length_{mode}"] = sum(len(g.tokens) for g in r.responses) / len(r.responses)
            if updates == 0 and self.teacher_rollout is not None:
                tr = self.sampler.held_out(prompts, self.eval_samples, sampling, engine=self.teacher_rollout)
                out[f"distill/teacher_eval_accuracy_{mode}"] = sum(tr.correct) / len(tr.correct)
        out["distill/eval_kl"] = (kl[0] / kl[1].clamp(min=1)).item()
        return out

    def after_step(self, metrics: dict) -> dict:
        if self.sampler is not None:
            self.sampler.weights_changed()   # an optimizer step changed the student
        return {**self.rollout_metrics, **self.held_out.after_step(metrics)}


class Distill:
    name = "distill"
    module = "recipes.distill"
    post_training = True

    def validate(self, cfg: DictConfig, s: Settings) -> None:
        from data_pipeline.distill_data import read_topk_meta

        d = _section(cfg)
        phase = str(d.get("phase"))
        if phase not in PHASES:
            raise ConfigError(f"distill.phase={phase!r} must be one of {', '.join(PHASES)}")
        c = loss_settings(cfg)
        r = _typed(RolloutSettings, d.get("rollout"), "distill.rollout")
        problems = r.problems(s.trainer.seq_length)
        from recipes.rollout import launch_problem

        if problem := launch_problem(r.engine(), s.model, s.trainer.backend):
            problems.append(problem)
        e = d.get("eval") or {}
        files = list((d.get("data") or {}).get("files") or [])
        if not files:
            problems.append(f"stage {cfg.stage.name} has no distill.data.files")
        for key, group in (("distill.data.files", files), ("distill.eval.files", e.get("files") or ())):
            missing = [str(f) for f in group if not Path(str(f)).is_file()]
            if missing:
                problems.append(f"{key}: {', '.join(missing)} not found")
        if int(e.get("samples", 1)) < 1 or int(e.get("interval", 0)) < 0 or float(e.get("temperature", 0)) < 0:
            problems.append(f"distill.eval.samples={e.get('samples')} must be >= 1, distill.eval.interval="
                            f"{e.get('interval')} >= 0 and distill.eval.temperature={e.get('temperature')} >= 0")
        if phase == "on_policy" and r.prompts_per_step != s.trainer.global_batch_size:
            problems.append(f"distill.rollout.prompts_per_step={r.prompts_per_step} must equal trainer."
                            f"global_batch_size={s.trainer.global_batch_size}: on-policy samples are drawn fresh "
                            "for every step")
        if problems:
            raise ConfigError("; ".join(problems))
        tokenizer = chat_tokenizer(cfg, s)
        if c.top_k > len(tokenizer):
            raise ConfigError(f"distill.loss.top_k={c.top_k} is more than the tokenizer's {len(tokenizer)} tokens")
        ckpt = teacher_checkpoint(cfg, s.run_dir)
        if ckpt is None and (phase == "on_policy" or e.get("files")):
            raise ConfigError(f"the {'on-policy phase' if phase == 'on_policy' else 'held-out evaluation'} needs "
                              "the teacher in the job: set teacher=<checkpoint or stage>")
        if phase == "off_policy" and records_on_disk(files):
            for f in files:
                meta = read_topk_meta(f)
                if meta["k"] < c.top_k or float(meta["temperature"]) != c.temperature:
                    raise ConfigError(f"{f} holds top-{meta['k']} log-probs at temperature {meta['temperature']}; "
                                      f"distill.loss wants top_k <= {meta['k']} at temperature {c.temperature}")
        elif ckpt is None:
            raise ConfigError("distill.data.files have no teacher top-k records (generate them with "
                              "top_k_logprobs=K), and no teacher= is given to score them in the job")
        if ckpt is not None and (problems := teacher_problems(cfg, s, ckpt)):
            raise ConfigError("; ".join(problems))
        from data_pipeline.rl_data import reward_entries
        from recipes.rewards import REWARDS

        try:
            reward_entries(OmegaConf.to_container(d.rewards, resolve=True), None, known=REWARDS)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"distill.rewards: {err}")

    def task(self, cfg: DictConfig, s: Settings, engine) -> Task:
        import torch.distributed as dist
        from megatron.core import parallel_state

        from data_pipeline import distill_data
        from data_pipeline.rl_data import describe
        from data_pipeline.tokenizer import load_tokenizer
        from model.builder import build_model
        from model.checkpoint import read_model_config
        from recipes import checkpointing as ckpt
        from recipes.data import SampleBatches

        d = _section(cfg)
        phase, c = str(d.phase), loss_settings(cfg)
        r = _typed(RolloutSettings, d.get("rollout"), "distill.rollout")
        tokenizer = load_tokenizer(cfg.tokenizer)
        rank0 = dist.get_rank() == 0
        rewards = OmegaConf.to_container(d.rewards, resolve=True)
        max_prompt = s.trainer.seq_length - r.max_new_tokens

        teacher = None
        source = teacher_checkpoint(cfg, s.run_dir)
        if source is not None:
            teacher = build_model(read_model_config(source), s.parallel,
                                  dtype=next(engine.chunks[0].parameters()).dtype)
            ckpt.load_weights(teacher, source)
            for chunk in teacher:
                chunk.eval().requires_grad_(False)
            if rank0:
                print(f"teacher: {source}", flush=True)

        e = d.get("eval") or {}
        eval_sets = {}
        if e.get("files"):
            eval_sets, skipped = mode_prompts(e.files, rewards, tokenizer, max_prompt, r)
            if rank0:
                print("held-out " + describe([p for ps in eval_sets.values() for p in ps], skipped), flush=True)
        counts, prompts, samples, on_disk = {}, [], None, False
        if phase == "on_policy":
            sets, skipped = mode_prompts(d.data.files, rewards, tokenizer, max_prompt, r)
            prompts = [p for ps in sets.values() for p in ps]
            if rank0:
                print(describe(prompts, skipped), flush=True)
            if not prompts:
                raise ConfigError(f"distill.data.files hold no usable prompt ({describe(prompts, skipped)})")
            counts = {"data/prompts": float(len(prompts))}
        else:
            on_disk = records_on_disk(d.data.files)
            data, skipped = distill_data.read_teacher_rows(list(d.data.files), s.trainer.seq_length,
                                                           need_topk=on_disk)
            if rank0:
                print(distill_data.describe(data, skipped), flush=True)
            if not len(data):
                raise ConfigError(f"distill.data.files hold no usable response ({distill_data.describe(data, skipped)})")
            rows = distill_data.DistillSamples(data, s.trainer.seq_length, int(cfg.seed),
                                               top_k=c.top_k if on_disk else 0)
            t = s.trainer
            samples = SampleBatches(rows, [], t.global_batch_size, t.micro_batch_size,
                                    parallel_state.get_data_parallel_rank(),
                                    parallel_state.get_data_parallel_world_size())
            counts = {"data/responses": float(len(data))}
        counts["data/skipped_rows"] = float(sum(skipped.values()))
        from recipes.rl_parts import DataParallel

        g, dp, seed = r.sampler(), DataParallel.current(), int(cfg.seed)   # the RL sampler, one sample per prompt
        sampler = None
        if phase == "on_policy" or any(eval_sets.values()):
            sampler = RolloutSampler(g, engine, tokenizer, r.engine(), s.model, s.trainer.seq_length, seed, dp)
        batcher = MicroBatcher.for_policy(g.prompts_per_rollout * g.group_size, s.trainer, engine, dp)
        work = DistillTask(c, phase, tokenizer, engine, batcher, sampler, teacher, prompts, seed, eval_sets=eval_sets,
                           eval_samples=int(e.get("samples", 1)), eval_interval=int(e.get("interval", 0)),
                           eval_temperature=float(e.get("temperature", 0.0)), max_steps=s.trainer.max_steps,
                           samples=samples, score_online=phase == "off_policy" and not on_disk)
        return Task(batches=work.batches, loss_fn=work.loss, after_step=work.after_step, report_keys=REPORT_KEYS,
                    loss_positions_only=True,
                    state=work.state, summarize=lambda _: counts,
                    tokens_per_step=s.trainer.global_batch_size * s.trainer.seq_length,
                    sources={"teacher": source.resolve()} if source is not None else {})


# What `stage.recipe: distill` runs (recipes.train.recipe_for).
RECIPE = Distill()


def main() -> None:
    from model.launch import hydra_cli

    hydra_cli("config", lambda cfg: run(cfg, RECIPE), usage=__doc__)


if __name__ == "__main__":
    main()
