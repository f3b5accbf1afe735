"""The parts the on-policy stages are built from: GRPO (recipes/rl.py) and distillation
(recipes/distill.py) compose them, each adding only its own loss, metrics and evaluation.

- `PromptStream`: the prompts in a fresh shuffle every epoch, from a cursor that rides in
  the stage's checkpoint (`state["prompt_cursor"]`), so a resumed stage draws the prompts
  an uninterrupted one would have.
- `RolloutSampler`: this data-parallel rank's share of some prompts, sampled by the
  rollout engine (recipes.rollout.make_engine) and scored through the reward registry
  (`safe_reward`), gathered back into whole groups in prompt order; dynamic sampling's
  rounds; and the rule that the engine gets the policy's weights before the first
  rollout after an optimizer step.
- `MicroBatcher`: a rollout as padded tensors (widths a multiple of what sequence and
  context parallelism split), the rows this rank trains on, and the minibatches of
  `trainer.global_batch_size` sequences cut into this rank's micro-batches with the loss
  scale of `recipes.grpo.scale_to_minibatch`.
- `HeldOutSchedule`: when a stage's held-out evaluation runs.

This module sits between the engines (recipes/rollout, recipes/generate.py) and the
objectives (recipes/grpo.py) and the two recipes: it imports neither recipe, and
megatron-core only inside the functions that need it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Protocol

import torch

from model.parallel import padded_width
from recipes.grpo import GRPOConfig
from recipes.rollout import RolloutConfig, RolloutEngine, make_engine

ROLLOUT_LISTS = ("prompts", "responses", "rewards", "correct")
EVAL_SEED = 10 ** 6   # held-out samples draw from seed + EVAL_SEED, every time


class Policy(Protocol):
    """The training engine as the parts see it (recipes.engine.Engine)."""

    chunks: list

    def gather_params(self) -> None:
        """Complete the parameters' all-gather, for readers that run no forward."""
        ...


@dataclass(frozen=True)
class DataParallel:
    """This rank's place among the data-parallel ranks."""

    rank: int = 0
    size: int = 1
    group: object = None

    @classmethod
    def current(cls) -> "DataParallel":
        from megatron.core import parallel_state

        return cls(parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_group())


@dataclass
class Rollout:
    """Sampled sequences, gathered over data-parallel ranks, groups contiguous."""

    prompts: list[list[int]] = field(default_factory=list)
    responses: list = field(default_factory=list)       # recipes.generate.Generation per sequence
    rewards: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)   # first reward reached 1.0
    errors: int = 0
    rounds: int = 0
    dropped_groups: int = 0
    seconds: float = 0.0   # RolloutSampler.rollout: the time it took

    def add(self, other: "Rollout", rows: slice = slice(None)) -> None:
        """Append `rows` of `other`'s sequences (not its counters)."""
        for name in ROLLOUT_LISTS:
            getattr(self, name).extend(getattr(other, name)[rows])

    def response_metrics(self, prefix: str) -> dict:
        """Mean and longest response length and the share cut at max_new_tokens."""
        lengths = torch.tensor([float(len(g.tokens)) for g in self.responses])
        return {f"{prefix}/response_length": lengths.mean().item(),
                f"{prefix}/response_length_max": lengths.max().item(),
                f"{prefix}/truncated_fraction": sum(g.finish == "length" for g in self.responses) / len(self.responses)}


# ---------------------------------------------------------------------- prompts

class PromptStream:
    """The prompts in a per-epoch shuffle (epoch e: `randperm` seeded by seed + e), taken
    from the cursor kept at `state["prompt_cursor"]`. `state` is the Task's checkpointed
    state, which the loop restores in place on resume."""

    def __init__(self, prompts: list, seed: int, state: dict):
        self.prompts, self.seed, self.state = prompts, seed, state
        state.setdefault("prompt_cursor", 0)

    def take(self, n: int) -> list:
        out = []
        while len(out) < n:
            cursor = self.state["prompt_cursor"]
            epoch, i = divmod(cursor, len(self.prompts))
            order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + epoch))
            out.append(self.prompts[int(order[i])])
            self.state["prompt_cursor"] = cursor + 1
        return out


# ---------------------------------------------------------------------- sampling

class RolloutSampler:
    """Whole groups of samples: each data-parallel rank samples its share of the prompts
    (prompt r, r + dp, ...) `group_size` times with the rollout engine, scores them, and
    every rank gets the gathered rollout in prompt order. `g` gives the sampling settings
    (temperature, top-p/k, max_new_tokens, thinking budget), the group size and dynamic
    sampling; seeds are explicit, so a rollout is a function of its index.

    Collective: every rank calls each method together."""

    def __init__(self, g: GRPOConfig, policy: Policy, tokenizer, rollout: RolloutConfig, model_cfg, max_length: int,
                 seed: int, dp: DataParallel):
        from recipes.generate import Sampling, stop_ids, thinking_budget

        self.g, self.policy, self.tokenizer, self.seed, self.dp = g, policy, tokenizer, seed, dp
        self.stop = stop_ids(tokenizer)
        self.engine: RolloutEngine = make_engine(rollout, policy.chunks, model_cfg, tokenizer, max_length, seed)
        self.weights_synced = True   # the engine holds the policy's current weights
        self.budget = thinking_budget(tokenizer, g.thinking_budget)
        self.sampling = Sampling(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)

    def weights_changed(self) -> None:
        """An optimizer step changed the policy: sync the engine before its next rollout."""
        self.weights_synced = False

    def sample(self, prompts: list, seed: int, group_size: int | None = None, sampling=None,
               engine: RolloutEngine | None = None) -> Rollout:
        """This rank's share of `prompts`, sampled `group_size` (default G) times each with
        `sampling` (default the rollout's) by the policy's engine, or by `engine` (another
        model's, holding its own weights), scored, then gathered."""
        import torch.distributed as dist

        from recipes.generate import response_text
        from recipes.rewards import get_reward, safe_reward

        G = group_size or self.g.group_size
        mine = prompts[self.dp.rank::self.dp.size]
        ids = [p.ids for p in mine for _ in range(G)]
        sampling = replace(sampling or self.sampling, seed=seed * 1000 + self.dp.rank)
        if engine is None and not self.weights_synced:
            self.policy.gather_params()   # the weights are read without a forward (see Engine.gather_params)
            self.engine.sync_weights(self.policy.chunks)
            self.weights_synced = True
        # every rank calls the engine, even with no prompts: under expert parallelism the
        # built-in engine's idle forwards keep the MoE all-to-alls of the other ranks matched
        gens = (engine or self.engine).generate(ids, self.g.max_new_tokens, sampling, self.budget)
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
        parts = [None] * self.dp.size
        dist.all_gather_object(parts, part, group=self.dp.group)
        whole = Rollout(errors=sum(p.errors for p in parts))
        per_rank = [len(p.rewards) // G for p in parts]
        for g_index in range(max(per_rank, default=0)):   # group g of rank r is prompt r + dp * g
            for r, p in enumerate(parts):
                if g_index < per_rank[r]:
                    whole.add(p, slice(g_index * G, (g_index + 1) * G))
        return whole

    def held_out(self, prompts: list, samples: int, sampling=None, engine: RolloutEngine | None = None) -> Rollout:
        """`samples` per held-out prompt, with the one seed every evaluation uses (two of
        them differ by the policy, not the dice)."""
        return self.sample(prompts, seed=self.seed + EVAL_SEED, group_size=samples, sampling=sampling, engine=engine)

    def rollout(self, stream: PromptStream, index: int) -> tuple[Rollout, Rollout]:
        """Rollout `index`: (the `prompts_per_rollout` groups to train on, everything
        sampled for it, dropped groups included). With dynamic sampling, groups whose
        rewards are all equal are dropped and more prompts sampled, up to
        `max_sampling_rounds` extra rounds; a rollout still short is topped up with dropped
        groups."""
        from recipes.grpo import informative_groups

        started = time.perf_counter()
        G, want = self.g.group_size, self.g.prompts_per_rollout
        kept, spare, seen = Rollout(), Rollout(), Rollout()
        rounds = 0
        while True:
            need = want - len(kept.rewards) // G
            batch = self.sample(stream.take(need), seed=self.seed + 7919 * index + rounds)
            rounds += 1
            seen.add(batch)
            seen.errors += batch.errors
            rewards = torch.tensor(batch.rewards).view(-1, G)
            keep = informative_groups(rewards) if self.g.dynamic_sampling else \
                torch.ones(len(rewards), dtype=torch.bool)
            for gi, ok in enumerate(keep.tolist()):
                (kept if ok else spare).add(batch, slice(gi * G, (gi + 1) * G))
            if len(kept.rewards) // G >= want or rounds > self.g.max_sampling_rounds:
                break
        dropped = len(spare.rewards) // G
        short = want - len(kept.rewards) // G
        kept.add(spare, slice(None, short * G))   # top up with dropped groups
        kept.rounds, kept.dropped_groups, kept.errors = rounds, dropped, seen.errors
        kept.seconds = time.perf_counter() - started
        return kept, seen


# ---------------------------------------------------------------------- tensors and micro-batches

class MicroBatcher:
    """A rollout of `rollout_size` sequences as tensors, cut into optimizer minibatches of
    `global_batch_size` sequences; each data-parallel rank trains on its contiguous share
    of every minibatch, in micro-batches of `micro_batch_size` rows. Rows are padded to a
    multiple of `width_multiple` (model.context_parallel.width_multiple)."""

    def __init__(self, rollout_size: int, global_batch_size: int, micro_batch_size: int, width_multiple: int,
                 dp: DataParallel):
        self.rollout_size, self.global_batch_size, self.micro_batch_size = rollout_size, global_batch_size, \
            micro_batch_size
        self.width_multiple, self.dp = width_multiple, dp
        self.per_rank = global_batch_size // dp.size
        self.current: tuple[int, dict] | None = None   # (rollout index, its tensors)
        self.new_rollout = False   # the last `batches` call made a rollout

    @classmethod
    def for_policy(cls, rollout_size: int, trainer, policy: Policy, dp: DataParallel) -> "MicroBatcher":
        """With the width the policy's layout needs and `trainer`'s batch sizes."""
        from model.context_parallel import width_multiple

        return cls(rollout_size, trainer.global_batch_size, trainer.micro_batch_size,
                   width_multiple(policy.chunks[0].config), dp)

    def tensors(self, r: Rollout) -> dict:
        """Padded [n, L] tensors of the whole rollout: tokens, next-token targets, the loss
        mask (sampled response tokens only, not those the thinking budget forced) and the
        rollout's own log-probs."""
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
        return {"tokens": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous(), "loss_mask": mask,
                "rollout_logp": rollout_logp}

    def rows(self) -> list[int]:
        """The rollout's rows this rank trains on, over all its minibatches."""
        return [m + self.dp.rank * self.per_rank + j
                for m in range(0, self.rollout_size, self.global_batch_size) for j in range(self.per_rank)]

    def in_micro_batches(self, rows: list[int]) -> Iterator[torch.Tensor]:
        """`rows` as index tensors of at most micro_batch_size (for forward-only scoring)."""
        for k in range(0, len(rows), self.micro_batch_size):
            yield torch.tensor(rows[k:k + self.micro_batch_size])

    def batches(self, consumed: int, prepare: Callable[[int], dict], loss_agg: str) -> list[dict]:
        """This rank's micro-batches of the minibatch that starts at sample `consumed`, from
        the rollout that holds it; `prepare(index)` makes rollout `index`'s tensors when it
        is not the one in hand (a new rollout, or the first minibatch after a resume). The
        loss is scaled to `loss_agg` over the whole minibatch (recipes.grpo)."""
        index, offset = divmod(consumed, self.rollout_size)
        self.new_rollout = self.current is None or self.current[0] != index
        if self.new_rollout:
            self.current = (index, prepare(index))
        return self.minibatch(self.current[1], offset, loss_agg)

    def minibatch(self, t: dict, offset: int, loss_agg: str) -> list[dict]:
        from recipes.grpo import loss_denominator

        start = offset + self.dp.rank * self.per_rank
        mbs = self.micro_batch_size
        micro = []
        for m in range(start, start + self.per_rank, mbs):
            sl = slice(m, m + mbs)
            batch = {k: v[sl] for k, v in t.items()}
            batch["position_ids"] = torch.arange(t["tokens"].shape[1]).expand(mbs, -1)
            micro.append(batch)
        return self.scale(micro, loss_denominator(t["loss_mask"][offset:offset + self.global_batch_size], loss_agg))

    def scale(self, micro: list[dict], denominator: float) -> list[dict]:
        """`micro` with the loss scale that makes the objective the sum of every rank's
        numerators over `denominator` (recipes.grpo.scale_to_minibatch)."""
        from recipes.grpo import scale_to_minibatch

        return scale_to_minibatch(micro, denominator, self.dp.size)

    def trim(self, micro: list[dict]) -> list[dict]:
        """Micro-batches cut after the last loss position of their longest row (rows padded
        to seq_length would cost a vocabulary projection per padding position), the width
        still a multiple of `width_multiple`."""
        used = [int(m.nonzero()[:, 1].max()) + 1 for b in micro if (m := b["loss_mask"]).any()]
        width = min(padded_width(max(used, default=1), self.width_multiple), micro[0]["tokens"].shape[1])
        return [{k: v[:, :width] for k, v in b.items()} for b in micro]


# ---------------------------------------------------------------------- held-out evaluation

class HeldOutSchedule:
    """When the held-out evaluation runs: before the first update (once; not again on
    resume), every `interval` updates (0: no others) and after the last (`max_steps`).
    `evaluate(updates) -> metrics`; None: the stage has no held-out prompts."""

    def __init__(self, evaluate: Callable[[int], dict] | None, interval: int, max_steps: int,
                 global_batch_size: int):
        self.evaluate, self.interval, self.max_steps, self.global_batch_size = evaluate, interval, max_steps, \
            global_batch_size
        self.pending: dict = {}   # the starting policy's, logged with the first step

    def start(self, consumed: int) -> None:
        """Called before each step's batches are made."""
        if consumed == 0 and self.evaluate is not None:
            self.pending = self.evaluate(0)

    def after_step(self, metrics: dict) -> dict:
        """The evaluation metrics to log with this step."""
        out, self.pending = self.pending, {}
        updates = int(metrics["consumed_samples"]) // self.global_batch_size
        if self.evaluate is not None and (updates == self.max_steps
                                          or (self.interval and updates % self.interval == 0)):
            out = {**out, **self.evaluate(updates)}
        return out
