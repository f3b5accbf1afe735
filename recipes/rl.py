"""Reinforcement learning stages with GRPO: reasoning RL and general RL.

    python -m recipes.rl stage=rl_reasoning init_from=runs/qwen3_8b/sft_cold_start
    python -m recipes.rl stage=rl_general init_from=runs/qwen3_8b/sft_fusion

Both stages run the shared loop (recipes/train.py); what is theirs is the `Task`:

1. Rollout (every `rollout_size / global_batch_size` optimizer steps): `group_size`
   samples per prompt from the engine `rl.rollout.backend` picks (recipes/rollout): the
   policy's own megatron-core weights (`megatron`, the default), or vLLM (`vllm`), which
   receives the policy's weights in memory before every rollout that follows an update.
   Prompts are split over data-parallel ranks, and the rollout is then gathered so that
   every rank sees whole groups. Rewards come from the reward registry (recipes/rewards) through
   `safe_reward`: a failing verifier costs one sample's reward and is counted.
2. Dynamic sampling: groups whose rewards are all equal carry no gradient; they are
   dropped and more prompts sampled, up to `max_sampling_rounds` extra rounds, after which
   the rollout is topped up with dropped groups (zero advantage: only KL and entropy).
3. Old log-probs (the training forward before any update, or the rollout's own) and the
   reference policy's log-probs, per token, for this rank's share of the rollout.
4. Optimizer minibatches of `trainer.global_batch_size` sequences with the GRPO loss
   (recipes/grpo.py), then per-step metrics: reward, accuracy, response length, entropy,
   KL, clip fraction, rollout/training log-prob mismatch, and (MoE) load balance.
5. Held-out evaluation (`rl.eval.files`): the mean reward of `rl.eval.samples` rollouts per
   held-out prompt, before the first update, every `rl.eval.interval` steps and after the
   last, logged as rl/eval_reward and rl/eval_accuracy with rl/eval_step (the updates the
   policy had). Every evaluation uses the same seed, so two of them differ by the policy.

The prompt order, the sampling (1, 2) and the minibatches (4) are the parts in
recipes/rl_parts.py (`PromptStream`, `RolloutSampler`, `MicroBatcher`), which on-policy
distillation composes too; `GRPOTask` composes them with what is GRPO's own: advantages,
old and reference log-probs, the loss (`grpo_loss`), the metrics, the held-out
evaluation and the entropy controller.

Resume: the prompt cursor and the entropy coefficient are in every checkpoint. A stage
killed in the middle of a rollout's minibatches draws a fresh rollout from the restored
policy when it restarts (the unfinished rollout's samples are not kept).

Another engine (SGLang, say) plugs in at `recipes.rollout.BACKENDS`; see docs/RL.md.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from model.config import ConfigError, from_dict
from recipes import schema  # noqa: F401  (registers config.yaml's typed root before composing it)
from recipes.grpo import GRPOConfig
from recipes.rl_parts import HeldOutSchedule, MicroBatcher, Policy, PromptStream, RolloutSampler
from recipes.train import Settings, Task, chat_tokenizer, run

REPORT_KEYS = ("rl/pg_loss", "rl/kl", "rl/entropy", "rl/clip_fraction", "rl/ratio", "rl/logp_mismatch")


def grpo_settings(cfg: DictConfig) -> GRPOConfig:
    from recipes.grpo import check

    if cfg.get("rl") is None:
        raise ConfigError(f"stage {cfg.stage.name} has no rl section")
    return check(from_dict(GRPOConfig, OmegaConf.to_container(cfg.rl.grpo, resolve=True), "rl.grpo"))


class GRPOTask:
    """The RL stage's batches, loss and metrics (see the module docstring). The prompts,
    the sampling and the micro-batches are the parts of recipes/rl_parts.py; what is GRPO's
    is here: advantages, old and reference log-probs, the loss, the RL metrics, the
    held-out reward and the entropy controller."""

    def __init__(self, g: GRPOConfig, tokenizer, policy: Policy, prompts: list, seed: int, sampler: RolloutSampler,
                 batcher: MicroBatcher, reference=None, eval_prompts=(), eval_samples: int = 1,
                 eval_interval: int = 0, max_steps: int = 0):
        self.g, self.tokenizer, self.policy, self.reference = g, tokenizer, policy, reference
        self.state = {"prompt_cursor": 0, "entropy_coef": g.entropy_coef}   # rides in every checkpoint
        self.stream = PromptStream(prompts, seed, self.state)
        self.sampler, self.batcher = sampler, batcher
        self.eval_prompts, self.eval_samples = list(eval_prompts), eval_samples
        self.held_out = HeldOutSchedule(self.evaluate if self.eval_prompts else None, eval_interval, max_steps,
                                        batcher.global_batch_size)
        self.rollout_metrics: dict = {}

    def evaluate(self, updates: int) -> dict:
        """Mean reward and accuracy of the held-out prompts' samples under the current policy."""
        r = self.sampler.held_out(self.eval_prompts, self.eval_samples)
        return {"rl/eval_reward": sum(r.rewards) / len(r.rewards), "rl/eval_accuracy": sum(r.correct) / len(r.correct),
                "rl/eval_reward_errors": float(r.errors), "rl/eval_step": float(updates)}

    # ------------------------------------------------------------------ a rollout's tensors
    def _logprobs(self, chunks, t: dict, rows: list[int]) -> torch.Tensor:
        """Per-token log-probs of the targets under `chunks` for `rows` (zeros off the last stage)."""
        from model.inference import forward_token_logprobs

        out = torch.zeros(len(t["tokens"]), t["tokens"].shape[1])
        for idx in self.batcher.in_micro_batches(rows):
            logp = forward_token_logprobs(chunks, t["tokens"][idx], t["targets"][idx], self.g.temperature,
                                          len(self.tokenizer), t["loss_mask"][idx])
            if logp is not None:
                out[idx] = logp.float().cpu()
        return out

    def _prepare(self, index: int) -> dict:
        """Rollout `index` as tensors: the batcher's, the group advantages, and the old and
        reference log-probs of this rank's rows."""
        from recipes.grpo import group_advantages

        r, seen = self.sampler.rollout(self.stream, index)
        t = self.batcher.tensors(r)
        t["advantages"] = group_advantages(torch.tensor(r.rewards).view(-1, self.g.group_size), self.g.normalize_std,
                                           self.g.eps).reshape(-1)
        rows = self.batcher.rows()
        t["old_logp"] = self._logprobs(self.policy.chunks, t, rows) if self.g.recompute_old_logprobs \
            else t["rollout_logp"].clone()
        if self.reference is not None:
            t["ref_logp"] = self._logprobs(self.reference, t, rows)
        rewards = torch.tensor(r.rewards)
        self.rollout_metrics = {
            "rl/reward_mean": rewards.mean().item(), "rl/reward_std": rewards.std(unbiased=False).item(),
            "rl/accuracy": sum(seen.correct) / max(len(seen.correct), 1),
            "rl/reward_mean_sampled": sum(seen.rewards) / max(len(seen.rewards), 1),
            **r.response_metrics("rl"),
            "rl/reward_errors": r.errors, "rl/sampling_rounds": r.rounds, "rl/dropped_groups": r.dropped_groups,
            "rl/rollout_time_s": r.seconds,
            "rl/rollout_tokens_per_s": float(sum(len(g.tokens) for g in seen.responses)) / max(r.seconds, 1e-9)}
        return t

    # ------------------------------------------------------------------ loop hooks
    def batches(self, consumed: int) -> list[dict]:
        self.held_out.start(consumed)   # the starting policy, once (not again on resume)
        return self.batcher.batches(consumed, self._prepare, self.g.loss_agg)

    def loss(self, batch: dict, logits: torch.Tensor):
        return grpo_loss(batch, logits, self.g, float(self.state["entropy_coef"]), len(self.tokenizer))

    def after_step(self, metrics: dict) -> dict:
        from recipes.grpo import next_entropy_coef

        self.sampler.weights_changed()   # an optimizer step changed the policy
        out = {**self.rollout_metrics, "rl/entropy_coef": float(self.state["entropy_coef"]),
               "rl/new_rollout": float(self.batcher.new_rollout), **self.held_out.after_step(metrics)}
        if "rl/entropy" in metrics:
            self.state["entropy_coef"] = next_entropy_coef(float(self.state["entropy_coef"]), metrics["rl/entropy"],
                                                           self.g)
        return out


def grpo_loss(batch: dict, logits: torch.Tensor, g: GRPOConfig, entropy_coef: float, vocab_limit: int):
    """(loss, count, report) of one micro-batch of `MicroBatcher.batches` for megatron-core's
    schedule; `logits` are the vocab-parallel logits at the response tokens only
    (Task.loss_positions_only), which alone carry loss."""
    from model.inference import target_logprobs_and_entropy
    from recipes.grpo import clipped_surrogate, kl_penalty, loss_terms, scaled_loss, tis_weight

    mask = batch["loss_mask"].float()
    where = mask.bool()
    logp, entropy = (torch.zeros_like(mask).masked_scatter(where, x) for x in target_logprobs_and_entropy(
        logits, batch["targets"][where], g.temperature, vocab_limit))
    # Off the response the stored log-probs are not used; zero them so that no
    # exp() of a padding position's log-prob can overflow into inf * 0 = nan.
    old, rollout = (torch.where(where, batch[k], 0.0) for k in ("old_logp", "rollout_logp"))
    pg, clipped = clipped_surrogate(logp, old, batch["advantages"][:, None].float(),
                                    g.clip_low, g.clip_high, g.dual_clip)
    if g.recompute_old_logprobs:
        pg = pg * tis_weight(old, rollout, g.tis_cap)
    per_token, kl = pg, torch.zeros_like(logp)
    if "ref_logp" in batch:
        kl = kl_penalty(logp, torch.where(where, batch["ref_logp"], 0.0), g.kl_estimator)
        per_token = per_token + g.kl_coef * kl
    if entropy_coef:
        per_token = per_token - entropy_coef * entropy
    numerator = loss_terms(per_token, mask, g.loss_agg)
    tokens = mask.sum()

    def mean(x):
        return torch.stack([(x.detach().float() * mask).sum(), tokens])

    loss, count, lm = scaled_loss(numerator, batch)
    report = {"lm loss": lm, "rl/pg_loss": mean(pg), "rl/kl": mean(kl), "rl/entropy": mean(entropy),
              "rl/clip_fraction": mean(clipped), "rl/ratio": mean(torch.exp(logp - old)),
              "rl/logp_mismatch": mean((old - rollout).abs())}
    return loss, count, report


class RL:
    name = "rl"
    module = "recipes.rl"
    post_training = True

    def validate(self, cfg: DictConfig, s: Settings) -> None:
        g = grpo_settings(cfg)
        d = cfg.rl.get("data")
        if d is None or not d.get("files"):
            raise ConfigError(f"stage {cfg.stage.name} has no rl.data.files")
        e = cfg.rl.get("eval") or {}
        for key, files in (("rl.data.files", d.files), ("rl.eval.files", e.get("files") or ())):
            missing = [str(f) for f in files if not Path(str(f)).is_file()]
            if missing:
                raise ConfigError(f"{key}: {', '.join(missing)} not found")
        if int(e.get("samples", 1)) < 1 or int(e.get("interval", 0)) < 0:
            raise ConfigError(f"rl.eval.samples={e.get('samples')} must be >= 1 and rl.eval.interval="
                              f"{e.get('interval')} >= 0")
        t = s.trainer
        if (g.prompts_per_rollout * g.group_size) % t.global_batch_size:
            raise ConfigError(f"a rollout of rl.grpo.prompts_per_rollout*group_size={g.prompts_per_rollout}*"
                              f"{g.group_size} sequences is not a whole number of trainer.global_batch_size="
                              f"{t.global_batch_size} minibatches")
        if g.max_new_tokens >= t.seq_length:
            raise ConfigError(f"rl.grpo.max_new_tokens={g.max_new_tokens} leaves no room for a prompt in "
                              f"trainer.seq_length={t.seq_length}")
        if g.uses_reference and not (cfg.get("init_from") or cfg.stage.get("init_from")):
            raise ConfigError("the KL reference is the stage's starting weights: set init_from=, "
                              "or rl.grpo.kl_coef=0 / rl.grpo.reference=false")
        chat_tokenizer(cfg, s)
        from data_pipeline.rl_data import reward_entries
        from recipes.rewards import REWARDS

        try:
            entries = reward_entries(OmegaConf.to_container(cfg.rl.rewards, resolve=True), None, known=REWARDS)
        except KeyError as e:
            raise ConfigError(f"rl.rewards names unknown reward {e}; known: {', '.join(sorted(REWARDS))}")
        except ValueError as e:
            raise ConfigError(f"rl.rewards: {e}")
        check_sandbox(cfg, {name for name, _, _ in entries})
        from recipes.rollout import launch_problem, settings_from

        problem = launch_problem(settings_from(cfg.rl.rollout), s.model, s.trainer.backend)
        if problem:
            raise ConfigError(problem)

    def task(self, cfg: DictConfig, s: Settings, engine) -> Task:
        import torch.distributed as dist

        from data_pipeline.rl_data import describe, read_prompts
        from data_pipeline.tokenizer import load_tokenizer
        from model.builder import build_model
        from recipes import checkpointing as ckpt
        from recipes.rewards import REWARDS, reference_problem

        g = grpo_settings(cfg)
        d = cfg.rl.data
        tokenizer = load_tokenizer(cfg.tokenizer)

        def load(key: str, files, label: str = "") -> tuple[list, dict]:
            rows, skipped = read_prompts(list(files), OmegaConf.to_container(cfg.rl.rewards, resolve=True),
                                         tokenizer, s.trainer.seq_length - g.max_new_tokens, g.enable_thinking,
                                         known=REWARDS, reference_problem=reference_problem)
            if dist.get_rank() == 0:
                print(label + describe(rows, skipped), flush=True)
            if not rows:
                raise ConfigError(f"{key} hold no usable prompt ({describe(rows, skipped)})")
            return rows, skipped

        prompts, skipped = load("rl.data.files", d.files)
        e = cfg.rl.get("eval") or {}
        held = load("rl.eval.files", e.files, "held-out ")[0] if e.get("files") else []
        check_sandbox(cfg, {name for p in prompts + held for name, _, _ in p.rewards})  # rows name their own
        reference = None
        if g.uses_reference:
            # The stage's starting weights, also after a resume (which loads the policy from
            # the stage's own checkpoint instead).
            source = ckpt.resolve_init_from(str(cfg.get("init_from") or cfg.stage.init_from), s.run_dir)
            reference = build_model(s.model, s.parallel, dtype=next(engine.chunks[0].parameters()).dtype)
            ckpt.load_weights(reference, source)
            for c in reference:
                c.eval().requires_grad_(False)
        install_model_rewards(cfg, s, tokenizer)
        from recipes.rl_parts import DataParallel
        from recipes.rollout import settings_from

        dp, seed = DataParallel.current(), int(cfg.seed)
        sampler = RolloutSampler(g, engine, tokenizer, settings_from(cfg.rl.rollout), s.model, s.trainer.seq_length,
                                 seed, dp)
        batcher = MicroBatcher.for_policy(g.prompts_per_rollout * g.group_size, s.trainer, engine, dp)
        work = GRPOTask(g, tokenizer, engine, prompts, seed, sampler, batcher, reference, held,
                        int(e.get("samples", 1)), int(e.get("interval", 0)), s.trainer.max_steps)
        counts = {"data/skipped_rows": float(sum(skipped.values())), "data/prompts": float(len(prompts))}
        return Task(batches=work.batches, loss_fn=work.loss, after_step=work.after_step, loss_positions_only=True,
                    report_keys=REPORT_KEYS, state=work.state, summarize=lambda _: counts,
                    tokens_per_step=s.trainer.global_batch_size * s.trainer.seq_length)


SANDBOXED_REWARDS = {"code", "code_all"}


def check_sandbox(cfg: DictConfig, reward_names) -> None:
    """A stage that runs model-written programs refuses to start where the sandbox's kernel
    isolation is unavailable, unless `rl.sandbox.require_isolation` is false."""
    if not SANDBOXED_REWARDS & set(reward_names):
        return
    if not bool(OmegaConf.select(cfg, "rl.sandbox.require_isolation", default=True)):
        return
    from recipes.rewards.sandbox import isolation_problem

    problem = isolation_problem()
    if problem is not None:
        raise ConfigError(f"the code rewards need the sandbox's isolation, unavailable here: {problem}; "
                          "set rl.sandbox.require_isolation=false to run them without it")


def install_model_rewards(cfg: DictConfig, s: Settings, tokenizer) -> None:
    """The models behind the `reward_model` and `judge` rewards, when the stage names them."""
    from recipes.rewards import model_based

    if cfg.rl.get("reward_model"):
        model_based.use_reward_model(model_based.ModelReward(str(cfg.rl.reward_model), tokenizer))
    if cfg.rl.get("judge") and cfg.rl.judge.get("checkpoint"):
        from model.checkpoint import load_for_inference
        from recipes.checkpointing import resolve_init_from

        chunks = load_for_inference(resolve_init_from(str(cfg.rl.judge.checkpoint), s.run_dir), s.parallel)
        model_based.use_judge(model_based.GenerativeJudge(chunks, tokenizer,
                                                          max_new_tokens=int(cfg.rl.judge.max_new_tokens)))


# What `stage.recipe: rl` runs (recipes.train.recipe_for).
RECIPE = RL()


def main() -> None:
    from model.launch import hydra_cli

    hydra_cli("config", lambda cfg: run(cfg, RECIPE), usage=__doc__)


if __name__ == "__main__":
    main()
