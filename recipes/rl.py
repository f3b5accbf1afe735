"""Reinforcement learning stages with GRPO: reasoning RL and general RL.

    python -m recipes.rl stage=rl_reasoning init_from=runs/qwen3_8b/sft_cold_start
    python -m recipes.rl stage=rl_general init_from=runs/qwen3_8b/sft_fusion

Both stages run the shared loop (recipes/train.py); what is theirs is the `Task`:

1. Rollout (every `rollout_size / global_batch_size` optimizer steps): the policy's own
   megatron-core weights generate `group_size` samples per prompt with the KV cache
   (recipes.generate; no second copy of the model, so no weight sync). Prompts are split
   over data-parallel ranks, and the rollout is then gathered so that every rank sees
   whole groups. Rewards come from the reward registry (recipes/rewards) through
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

Resume: the prompt cursor and the entropy coefficient are in every checkpoint. A stage
killed in the middle of a rollout's minibatches draws a fresh rollout from the restored
policy when it restarts (the unfinished rollout's samples are not kept).

External rollout engines (vLLM, SGLang) plug in at `RolloutEngine`; see docs/RL.md.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from omegaconf import DictConfig, OmegaConf

from model.config import ConfigError, from_dict
from model.parallel import padded_width
from recipes import schema  # noqa: F401  (registers config.yaml's typed root before composing it)
from recipes.grpo import GRPOConfig
from recipes.train import Settings, Task, chat_tokenizer, run

REPORT_KEYS = ("rl/pg_loss", "rl/kl", "rl/entropy", "rl/clip_fraction", "rl/ratio", "rl/logp_mismatch")


class RolloutEngine(Protocol):
    """Samples responses for prompts; returns recipes.generate.Generation per prompt.

    The built-in engine decodes with the policy's own weights. An external server (vLLM,
    SGLang) would implement this and `sync_weights`, called after every optimizer step
    that precedes a rollout, to receive the new weights (see docs/RL.md)."""

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling, budget) -> list: ...

    def sync_weights(self, chunks) -> None: ...


@dataclass
class PolicyRollout:
    chunks: list
    stop: list[int]
    vocab_limit: int

    def generate(self, prompts, max_new_tokens, sampling, budget):
        from recipes.generate import generate

        return generate(self.chunks, prompts, max_new_tokens, self.stop, sampling, budget,
                        vocab_limit=self.vocab_limit)

    def sync_weights(self, chunks) -> None:
        """Nothing to do: rollouts read the training weights themselves."""


def grpo_settings(cfg: DictConfig) -> GRPOConfig:
    from recipes.grpo import check

    if cfg.get("rl") is None:
        raise ConfigError(f"stage {cfg.stage.name} has no rl section")
    return check(from_dict(GRPOConfig, OmegaConf.to_container(cfg.rl.grpo, resolve=True), "rl.grpo"))


@dataclass
class Rollout:
    """One rollout's sequences, gathered over data-parallel ranks, groups contiguous."""
    prompts: list[list[int]] = field(default_factory=list)
    responses: list = field(default_factory=list)       # Generation per sequence
    rewards: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)   # first reward reached 1.0
    errors: int = 0
    rounds: int = 0
    dropped_groups: int = 0


class GRPOTask:
    """The RL stage's batches, loss and metrics (see the module docstring)."""

    def __init__(self, cfg: DictConfig, s: Settings, engine, g: GRPOConfig, prompts, tokenizer, reference,
                 eval_prompts=(), eval_samples: int = 1, eval_interval: int = 0):
        from megatron.core import parallel_state

        from model.context_parallel import width_multiple
        from recipes.generate import Sampling, stop_ids, thinking_budget

        self.cfg, self.s, self.engine, self.g = cfg, s, engine, g
        self.prompts, self.tokenizer, self.reference = prompts, tokenizer, reference
        self.stop = stop_ids(tokenizer)
        self.rollout_engine: RolloutEngine = PolicyRollout(engine.chunks, self.stop, len(tokenizer))
        self.budget = thinking_budget(tokenizer, g.thinking_budget)
        self.sampling = Sampling(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
        self.size = g.prompts_per_rollout * g.group_size
        self.gbs = s.trainer.global_batch_size
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_group = parallel_state.get_data_parallel_group()
        # rows are padded to what sequence and context parallelism split (and FP8 needs)
        self.width_multiple = width_multiple(engine.chunks[0].config)
        self.seed = int(cfg.seed)
        self.state = {"prompt_cursor": 0, "entropy_coef": g.entropy_coef}
        self.current: tuple[int, dict] | None = None   # (rollout index, its batch tensors)
        self.rollout_metrics: dict = {}
        self.rollout_step = False
        self.eval_prompts, self.eval_samples, self.eval_interval = list(eval_prompts), eval_samples, eval_interval
        self.pending_eval: dict = {}

    # ------------------------------------------------------------------ rollout
    def _next_prompts(self, n: int) -> list:
        """The next n prompts of a per-epoch shuffle, continuing from the saved cursor."""
        out = []
        while len(out) < n:
            cursor = self.state["prompt_cursor"]
            epoch, i = divmod(cursor, len(self.prompts))
            order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(self.prompts[int(order[i])])
            self.state["prompt_cursor"] = cursor + 1
        return out

    def _sample_groups(self, prompts, seed: int, group_size: int | None = None, engine=None,
                       sampling=None) -> Rollout:
        """This DP rank's share of `prompts`, sampled `group_size` (default G) times each by
        `engine` (default the policy's) with `sampling` (default the rollout's) and scored,
        then gathered."""
        import torch.distributed as dist

        from dataclasses import replace

        from recipes.generate import response_text
        from recipes.rewards import get_reward, safe_reward

        G = group_size or self.g.group_size
        mine = prompts[self.dp_rank::self.dp_size]
        ids = [p.ids for p in mine for _ in range(G)]
        sampling = replace(sampling or self.sampling, seed=seed * 1000 + self.dp_rank)
        gens = (engine or self.rollout_engine).generate(ids, self.g.max_new_tokens, sampling, self.budget) \
            if ids else []
        part = Rollout(prompts=ids, responses=gens)
        for k, gen in enumerate(gens):
            prompt = mine[k // G]
            text = response_text(self.tokenizer, gen, self.stop)
            total = 0.0
            for j, (name, weight, ref) in enumerate(prompt.rewards):
                value, error = safe_reward(get_reward(name), text, ref)
                part.errors += error is not None
                total += weight * value
                if j == 0:
                    part.correct.append(value >= 1.0)
            part.rewards.append(total)
        parts = [None] * self.dp_size
        dist.all_gather_object(parts, part, group=self.dp_group)
        whole = Rollout()
        for p in parts:   # group g of rank r is prompt r + dp * g: order by prompt again
            whole.errors += p.errors
        per_rank = [len(p.rewards) // G for p in parts]
        for g_index in range(max(per_rank, default=0)):
            for r, p in enumerate(parts):
                if g_index < per_rank[r]:
                    sl = slice(g_index * G, (g_index + 1) * G)
                    whole.prompts += p.prompts[sl]
                    whole.responses += p.responses[sl]
                    whole.rewards += p.rewards[sl]
                    whole.correct += p.correct[sl]
        return whole

    def _rollout(self, index: int) -> tuple[Rollout, Rollout]:
        """(the rollout to train on, everything sampled for it, dropped groups included)."""
        from recipes.grpo import informative_groups

        G, want = self.g.group_size, self.g.prompts_per_rollout
        kept, spare, seen = Rollout(), Rollout(), Rollout()
        rounds = 0
        while True:
            need = want - len(kept.rewards) // G
            batch = self._sample_groups(self._next_prompts(need), seed=self.seed + 7919 * index + rounds)
            rounds += 1
            for name in ("prompts", "responses", "rewards", "correct"):
                getattr(seen, name).extend(getattr(batch, name))
            seen.errors += batch.errors
            rewards = torch.tensor(batch.rewards).view(-1, G)
            keep = informative_groups(rewards) if self.g.dynamic_sampling else \
                torch.ones(len(rewards), dtype=torch.bool)
            for gi, ok in enumerate(keep.tolist()):
                target = kept if ok else spare
                sl = slice(gi * G, (gi + 1) * G)
                for name in ("prompts", "responses", "rewards", "correct"):
                    getattr(target, name).extend(getattr(batch, name)[sl])
            if len(kept.rewards) // G >= want or rounds > self.g.max_sampling_rounds:
                break
        dropped = len(spare.rewards) // G
        short = want - len(kept.rewards) // G
        for name in ("prompts", "responses", "rewards", "correct"):   # top up with dropped groups
            getattr(kept, name).extend(getattr(spare, name)[:short * G])
        kept.rounds, kept.dropped_groups, kept.errors = rounds, dropped, seen.errors
        return kept, seen

    def evaluate(self, updates: int) -> dict:
        """Mean reward and accuracy of the held-out prompts' samples under the current policy."""
        r = self._sample_groups(self.eval_prompts, seed=self.seed + 10 ** 6, group_size=self.eval_samples)
        return {"rl/eval_reward": sum(r.rewards) / len(r.rewards), "rl/eval_accuracy": sum(r.correct) / len(r.correct),
                "rl/eval_reward_errors": float(r.errors), "rl/eval_step": float(updates)}

    # ------------------------------------------------------------------ tensors
    def _tensors(self, r: Rollout) -> dict:
        """Padded [n, L] tensors of the whole rollout: tokens, next-token targets, response
        mask (sampled tokens only, not those the thinking budget forced), advantages and
        the rollout's own log-probs."""
        from recipes.grpo import group_advantages

        lengths = [len(p) + len(g.tokens) for p, g in zip(r.prompts, r.responses)]
        width = padded_width(max(lengths) - 1, self.width_multiple)
        n = len(r.prompts)
        tokens = torch.zeros(n, width + 1, dtype=torch.long)
        mask = torch.zeros(n, width)
        rollout_logp = torch.zeros(n, width)
        for i, (p, g) in enumerate(zip(r.prompts, r.responses)):
            seq = p + g.tokens
            tokens[i, :len(seq)] = torch.tensor(seq)
            start = len(p) - 1   # target position of the first response token
            mask[i, start:start + len(g.tokens)] = torch.tensor([0.0 if f else 1.0 for f in g.forced])
            rollout_logp[i, start:start + len(g.tokens)] = torch.tensor(g.logprobs)
        adv = group_advantages(torch.tensor(r.rewards).view(-1, self.g.group_size), self.g.normalize_std,
                               self.g.eps).reshape(-1)
        return {"tokens": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous(), "loss_mask": mask,
                "advantages": adv, "rollout_logp": rollout_logp}

    def _my_rows(self) -> list[int]:
        """Indices of the rollout's sequences this DP rank trains on, over all minibatches."""
        per_rank = self.gbs // self.dp_size
        return [m + self.dp_rank * per_rank + j for m in range(0, self.size, self.gbs) for j in range(per_rank)]

    def _logprobs(self, chunks, t: dict, rows: list[int]) -> torch.Tensor:
        """Per-token log-probs of the targets under `chunks` for `rows` (zeros off the last stage)."""
        from model.inference import forward_token_logprobs

        out = torch.zeros(len(t["tokens"]), t["tokens"].shape[1])
        mbs = self.s.trainer.micro_batch_size
        for k in range(0, len(rows), mbs):
            idx = torch.tensor(rows[k:k + mbs])
            logp = forward_token_logprobs(chunks, t["tokens"][idx], t["targets"][idx], self.g.temperature,
                                          len(self.tokenizer), t["loss_mask"][idx])
            if logp is not None:
                out[idx] = logp.float().cpu()
        return out

    def _prepare(self, index: int) -> dict:
        started = time.perf_counter()
        r, seen = self._rollout(index)
        generated = time.perf_counter() - started
        t = self._tensors(r)
        rows = self._my_rows()
        t["old_logp"] = self._logprobs(self.engine.chunks, t, rows) if self.g.recompute_old_logprobs \
            else t["rollout_logp"].clone()
        if self.reference is not None:
            t["ref_logp"] = self._logprobs(self.reference, t, rows)
        lengths = torch.tensor([float(len(g.tokens)) for g in r.responses])
        rewards = torch.tensor(r.rewards)
        self.rollout_metrics = {
            "rl/reward_mean": rewards.mean().item(), "rl/reward_std": rewards.std(unbiased=False).item(),
            "rl/accuracy": sum(seen.correct) / max(len(seen.correct), 1),
            "rl/reward_mean_sampled": sum(seen.rewards) / max(len(seen.rewards), 1),
            "rl/response_length": lengths.mean().item(), "rl/response_length_max": lengths.max().item(),
            "rl/truncated_fraction": sum(g.finish == "length" for g in r.responses) / len(r.responses),
            "rl/reward_errors": r.errors, "rl/sampling_rounds": r.rounds, "rl/dropped_groups": r.dropped_groups,
            "rl/rollout_time_s": generated, "rl/rollout_tokens_per_s": float(sum(len(g.tokens) for g in seen.responses))
            / max(generated, 1e-9)}
        return t

    # ------------------------------------------------------------------ loop hooks
    def batches(self, consumed: int) -> list[dict]:
        from recipes.grpo import loss_denominator, scale_to_minibatch

        index, offset = divmod(consumed, self.size)
        if consumed == 0 and self.eval_prompts:   # the starting policy, once (not again on resume)
            self.pending_eval = self.evaluate(0)
        self.rollout_step = self.current is None or self.current[0] != index
        if self.rollout_step:
            self.current = (index, self._prepare(index))
        t = self.current[1]
        per_rank = self.gbs // self.dp_size
        start = offset + self.dp_rank * per_rank
        mbs = self.s.trainer.micro_batch_size
        micro = []
        for m in range(start, start + per_rank, mbs):
            sl = slice(m, m + mbs)
            batch = {k: v[sl] for k, v in t.items()}
            batch["position_ids"] = torch.arange(t["tokens"].shape[1]).expand(mbs, -1)
            micro.append(batch)
        denominator = loss_denominator(t["loss_mask"][offset:offset + self.gbs], self.g.loss_agg)
        return scale_to_minibatch(micro, denominator, self.dp_size)

    def loss(self, batch: dict, logits: torch.Tensor):
        from model.inference import target_logprobs_and_entropy
        from recipes.grpo import clipped_surrogate, kl_penalty, loss_terms, scaled_loss, tis_weight

        g = self.g
        mask = batch["loss_mask"].float()
        # logits: at the response tokens only (Task.loss_positions_only), which alone carry loss
        where = mask.bool()
        logp, entropy = (torch.zeros_like(mask).masked_scatter(where, x) for x in target_logprobs_and_entropy(
            logits, batch["targets"][where], g.temperature, len(self.tokenizer)))
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
        coef = float(self.state["entropy_coef"])
        if coef:
            per_token = per_token - coef * entropy
        numerator = loss_terms(per_token, mask, g.loss_agg)
        tokens = mask.sum()

        def mean(x):
            return torch.stack([(x.detach().float() * mask).sum(), tokens])

        loss, count, lm = scaled_loss(numerator, batch)
        report = {"lm loss": lm, "rl/pg_loss": mean(pg), "rl/kl": mean(kl), "rl/entropy": mean(entropy),
                  "rl/clip_fraction": mean(clipped), "rl/ratio": mean(torch.exp(logp - old)),
                  "rl/logp_mismatch": mean((old - rollout).abs())}
        return loss, count, report

    def scheduled_eval(self, metrics: dict) -> dict:
        """The held-out evaluation when this step is due one: every eval_interval updates and
        after the last."""
        updates = int(metrics["consumed_samples"]) // self.gbs
        if self.eval_prompts and (updates == self.s.trainer.max_steps
                                  or (self.eval_interval and updates % self.eval_interval == 0)):
            return self.evaluate(updates)
        return {}

    def after_step(self, metrics: dict) -> dict:
        from recipes.grpo import next_entropy_coef

        out = {**self.rollout_metrics, "rl/entropy_coef": float(self.state["entropy_coef"]),
               "rl/new_rollout": float(self.rollout_step), **self.pending_eval}
        self.pending_eval = {}
        out.update(self.scheduled_eval(metrics))
        if "rl/entropy" in metrics:
            self.state["entropy_coef"] = next_entropy_coef(float(self.state["entropy_coef"]), metrics["rl/entropy"],
                                                           self.g)
        return out


class RL:
    name = "rl"
    module = "recipes.rl"

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

        try:
            entries = reward_entries(OmegaConf.to_container(cfg.rl.rewards, resolve=True), None,
                                     check_references=False)
        except KeyError as e:
            from recipes.rewards import REWARDS

            raise ConfigError(f"rl.rewards names unknown reward {e}; known: {', '.join(sorted(REWARDS))}")
        except ValueError as e:
            raise ConfigError(f"rl.rewards: {e}")
        check_sandbox(cfg, {name for name, _, _ in entries})

    def task(self, cfg: DictConfig, s: Settings, engine) -> Task:
        import torch.distributed as dist

        from data_pipeline.rl_data import describe, read_prompts
        from data_pipeline.tokenizer import load_tokenizer
        from model.builder import build_model
        from recipes import checkpointing as ckpt

        g = grpo_settings(cfg)
        d = cfg.rl.data
        tokenizer = load_tokenizer(cfg.tokenizer)

        def load(key: str, files, label: str = "") -> tuple[list, dict]:
            rows, skipped = read_prompts(list(files), OmegaConf.to_container(cfg.rl.rewards, resolve=True),
                                         tokenizer, s.trainer.seq_length - g.max_new_tokens, g.enable_thinking)
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
        work = GRPOTask(cfg, s, engine, g, prompts, tokenizer, reference, held, int(e.get("samples", 1)),
                        int(e.get("interval", 0)))
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
