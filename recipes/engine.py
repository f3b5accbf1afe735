"""The Megatron training engine: model + DDP + optimizer, and one training step.

Every stage trains through `Engine.train_step`: megatron-core's
`get_forward_backward_func` (no-pipelining, 1F1B or interleaved, chosen from the
parallel state), megatron-core DDP, and megatron-core's optimizer (distributed or
not). Stages differ only in the batches they feed and the `loss_fn` they pass.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import track_moe_metrics
from megatron.core.utils import get_attr_wrapped_model

from model.builder import TRAINING_DEFAULTS, build_model, training_overrides
from model.config import ModelConfig, ParallelConfig
from model.context_parallel import model_inputs
from model.inference import logits_at, position_ids_for
from model.parallel import te_available
# The `optim:` section lives with the config schema, which must not import megatron-core.
from recipes.schema import OptimConfig  # noqa: F401  (re-exported)


def lm_batch(tokens: torch.Tensor) -> dict:
    """Next-token batch from [b, s+1] token ids: predict tokens[:, 1:] from tokens[:, :-1]."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    return {"tokens": inputs, "labels": labels, "loss_mask": torch.ones_like(labels, dtype=torch.float),
            "position_ids": position_ids_for(inputs)}


def forward_per_token(model, batch: dict, loss_positions_only: bool = False) -> tuple[dict, torch.Tensor]:
    """(the batch on the model's device, per-token LM loss [b, s]) for one micro-batch;
    a batch without `labels` (RL, distillation) gets vocab-parallel logits instead:
    [b, s, vocab / tp], or with `loss_positions_only` those at its `loss_mask` positions,
    [n, vocab / tp] (model.inference.logits_at; the per-token loss is then 0 off the mask).

    Shared by both training engines, so that they see the same model inputs. With context
    parallelism the model runs on this rank's share of the sequence (model.context_parallel)
    and its output is gathered back into the whole micro-batch's order: every CP rank then
    computes the loss of the whole micro-batch, as at cp=1 (`Engine` scales it for DDP).
    """
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    # Packed rows (SFT) keep their documents apart; plain rows are causal over the row.
    x = model_inputs(batch["tokens"], batch["position_ids"], batch.get("segment_ids"), use_te=te_available())
    inputs, labels = (x.tokens, x.position_ids, x.attention_mask), batch.get("labels")
    gpt = get_attr_wrapped_model(model, "post_process", return_model_obj=True)
    shard = x.shard if gpt.post_process else None   # earlier stages hand on hidden states as they are
    if not loss_positions_only:
        output = model(*inputs, labels=None if labels is None else x.take(labels),
                       packed_seq_params=x.packed_seq_params)
        return batch, output if shard is None else shard.gather(output)
    where = batch["loss_mask"].bool()
    mine = x.take(where)
    with logits_at(model, mine) as picked:
        output = picked(model(*inputs, packed_seq_params=x.packed_seq_params))
    if labels is None or not gpt.post_process:
        return batch, output if shard is None else shard.gather_rows(output, where)
    # megatron-core's own loss ([s, b] layout: the n positions as one row), then back to [b, s]
    loss = gpt.compute_language_model_loss(x.take(labels)[mine].unsqueeze(0), output.unsqueeze(1))
    per_token = torch.zeros(mine.shape, dtype=loss.dtype, device=device).masked_scatter(mine, loss[0])
    return batch, per_token if shard is None else shard.gather(per_token)


def masked_lm_loss(batch: dict, per_token_loss: torch.Tensor):
    """Sum of per-token losses under the mask, its token count, and what to log."""
    mask = batch["loss_mask"].float()
    loss_sum = (per_token_loss.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def expert_load_ratio(chunks) -> torch.Tensor | None:
    """Worst layer's max/mean tokens per expert, from the routers' global-batch counts.

    One tensor, no host sync here; MoEMetrics._expert_load reads it once per step.
    """
    ratios = [counts.max() / counts.mean().clamp(min=1e-9)
              for chunk in chunks for module in chunk.modules()
              if (counts := getattr(module, "global_tokens_per_expert", None)) is not None]
    return torch.stack(ratios).max() if ratios else None


def drop_routing_graphs(chunks) -> None:
    """Forget the autograd graphs that megatron-core's MoE token dispatchers keep from the
    last forward (the routing probabilities), once the step's backward is done.

    Such a graph reaches the router weights' grad-accumulator nodes, whose DDP hooks hold
    the model: a cycle through autograd's C++ objects that Python's gc cannot free. Kept,
    every MoE engine (weights, optimizer state, and process groups whose gloo threads keep
    polling) lived until the process ended. The next forward sets them again.
    """
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, MoELayer) and module.token_dispatcher is not None:
                state = vars(module.token_dispatcher)
                for name in [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.grad_fn is not None]:
                    state[name] = None


class MoEMetrics:
    """Per-step MoE metrics, shared by both engines (they provide model_cfg, chunks,
    steps and _load_ratio)."""

    def _moe_metrics(self, num_microbatches: int) -> dict:
        totals: dict = {}
        # Reduces megatron-core's per-layer aux-loss tracker over PP/DP and clears it.
        track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=self.steps, total_loss_dict=totals,
                          num_layers=self.model_cfg.num_layers)
        metrics = {f"moe/{k}": float(v) for k, v in totals.items()}
        metrics.update(self._expert_load())
        return metrics

    def _expert_load(self) -> dict:
        """Max/mean tokens per expert over this step's global batch, worst layer."""
        if self.model_cfg.moe_aux_loss_type != "global_aux_loss":
            return {}
        device = next(self.chunks[0].parameters()).device
        # -1: no counts on this stage. The routers count only while the balancing loss's
        # coefficient is > 0; with none anywhere the load is left out, not logged as 0.
        worst = (self._load_ratio if self._load_ratio is not None else torch.full((), -1.0)).to(device, torch.float64)
        worst = worst.reshape(1)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=parallel_state.get_pipeline_model_parallel_group())
        return {"moe/expert_load_max_over_mean": worst.item()} if worst.item() >= 0 else {}


@dataclass
class Engine(MoEMetrics):
    model_cfg: ModelConfig
    parallel: ParallelConfig
    chunks: list                       # DDP-wrapped GPTModel per virtual pipeline stage
    optimizer: object
    scheduler: OptimizerParamScheduler
    loss_fn: Callable = field(default=masked_lm_loss)
    # Entries of loss_fn's report, each [sum, count], averaged over the global batch and
    # logged under their own name ("lm loss" is logged as "loss").
    report_keys: tuple = ("lm loss",)
    # the output layer at loss_mask positions only (forward_per_token), set from the Task
    loss_positions_only: bool = False
    steps: int = 0
    _load_ratio: torch.Tensor | None = None   # set by finalize_grads for the MoE metric

    def _forward_step(self, data_iterator, model):
        batch, per_token = forward_per_token(model, next(data_iterator), self.loss_positions_only)
        return per_token, lambda output: _over_context_parallel(self.loss_fn(batch, output))

    def train_step(self, microbatches: list[dict]) -> dict:
        """One optimizer step over this data-parallel rank's micro-batches.

        Returns metrics identical on every rank: loss (token-weighted mean over the whole
        global batch), grad_norm, lr, update_successful and, for MoE, the balancing loss
        and expert load. A NaN/Inf loss skips the update (`skipped=True`): weights,
        optimizer state and schedule stay untouched.
        """
        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro = microbatches[0]["tokens"]
        data = iter(microbatches) if len(self.chunks) == 1 else [iter(microbatches) for _ in self.chunks]
        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=data,
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(microbatches),
            seq_length=micro.shape[1],
            micro_batch_size=micro.shape[0],
            forward_only=False,
        )
        if self.model_cfg.is_moe:
            drop_routing_graphs(self.chunks)
        device = next(self.chunks[0].parameters()).device
        means = _global_means(losses, device, self.report_keys)
        loss = means.pop("lm loss")
        metrics = {"loss": loss, **means, "lr": self.optimizer.param_groups[0]["lr"]}
        if self.model_cfg.is_moe:
            metrics.update(self._moe_metrics(len(microbatches)))
        if not math.isfinite(loss):
            # Every rank knows the loss, so all skip together; grads are dropped next step.
            return {**metrics, "grad_norm": float("nan"), "update_successful": False, "skipped": True}
        update_successful, grad_norm, _ = self.optimizer.step()
        if update_successful:
            self.scheduler.step(increment=1)
        self.steps += 1
        return {**metrics, "grad_norm": float(grad_norm or 0.0), "update_successful": bool(update_successful),
                "skipped": False}

    def finalize_grads(self, model, *args, **kwargs):
        """megatron-core's finalize_model_grads, after noting the expert loads.

        The routers count tokens per expert over the global batch (reduced over DP) for the
        global balancing loss, and finalize_model_grads clears those counts; this is the
        last moment they can be read.
        """
        self._load_ratio = expert_load_ratio(self.chunks)
        return finalize_model_grads(model, *args, **kwargs)

    def gather_params(self) -> None:
        """Complete the distributed optimizer's parameter all-gather now. Under
        overlap_param_gather an optimizer step updates only this rank's shard of the weights
        and leaves the rest to the next forward, whose pre-hooks wait for each bucket (so
        evaluation and rollouts see fresh weights); anything that reads the weights
        without a forward (a checkpoint) must call this first."""
        for chunk in self.chunks:
            if chunk.ddp_config.overlap_param_gather:
                chunk.start_param_sync(force_sync=True)


def _over_context_parallel(result: tuple) -> tuple:
    """loss_fn's (loss, tokens, report) for megatron-core's schedule under context parallelism.

    Every CP rank computes the same loss, of the whole micro-batch (forward_per_token), and
    back-propagates it into its own positions only; DDP then averages the gradients over
    DP x CP ranks. The sum over CP ranks is the cp=1 gradient, so each rank's loss is scaled
    by cp to undo the average's 1/cp. The report (the logged sums and counts) stays as it is:
    it is reduced over DP ranks only (`_global_means`).
    """
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return result
    loss, tokens, report = result
    return loss * cp, tokens, report


def _global_means(losses: list, device: torch.device, keys: tuple) -> dict[str, float]:
    """Each report key's sum / count over micro-batches and DP ranks, known to every rank.
    (Context-parallel ranks hold the same whole-micro-batch reports: not summed over CP.)"""
    total = torch.zeros(len(keys), 2, dtype=torch.float64, device=device)  # on the device NCCL reduces
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for entry in losses:
            for i, key in enumerate(keys):
                total[i] += entry[key].to(device, torch.float64)
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
    # Only the last stage has the losses; a sum over the pipeline group broadcasts them.
    dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return {key: (total[i, 0] / total[i, 1].clamp(min=1e-12)).item() for i, key in enumerate(keys)}


def build_engine(model_cfg: ModelConfig, par: ParallelConfig, optim: OptimConfig | None = None,
                 dtype: torch.dtype = torch.float32, init: Callable[[list], None] | None = None,
                 max_steps: int | None = None, **config_overrides) -> Engine:
    """Model chunks wrapped in megatron-core DDP, megatron-core's optimizer and its LR
    schedule over `max_steps` steps.

    `init(chunks)` runs on the bare model before wrapping (e.g. loading weights).
    `config_overrides` reach the TransformerConfig (FP8 recipe, activation recompute).
    Call model.parallel.init_distributed first.
    """
    optim = (optim or OptimConfig()).check()
    use_te = te_available()
    chunks = build_model(model_cfg, par, dtype=dtype, **{**training_overrides(use_te), **config_overrides})
    if init is not None:
        init(chunks)
    ddp = ddp_config(par, optim.use_distributed_optimizer, use_te)
    ddp_chunks = [
        DistributedDataParallel(config=c.config, ddp_config=ddp, module=c,
                                disable_bucketing=i > 0)  # only the first chunk's grads overlap
        for i, c in enumerate(chunks)
    ]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=optim.use_distributed_optimizer,
            overlap_param_gather=ddp.overlap_param_gather,   # megatron-core wants both to agree
        ),
        ddp_chunks,
    )
    engine = Engine(model_cfg, par, ddp_chunks, optimizer, lr_scheduler(optimizer, optim, max_steps or 1))
    # Weak references: the model's config is reachable from the grad-accumulator hooks that
    # megatron-core's DDP registers, which autograd holds where Python's gc cannot see. A
    # strong reference from the config to the engine or its optimizer closes a cycle gc never
    # frees, and every engine (weights, optimizer state, buffers, and process groups whose
    # gloo threads keep polling) lived until the process ended.
    engine_ref = weakref.ref(engine)
    config = ddp_chunks[0].config
    config.grad_scale_func = lambda loss: engine_ref().optimizer.scale_loss(loss)
    config.finalize_model_grads_func = lambda *args, **kwargs: engine_ref().finalize_grads(*args, **kwargs)
    n = range(len(ddp_chunks))
    if ddp.overlap_grad_reduce:
        # The schedules run every micro-batch but the last inside no_sync, so that a bucket's
        # reduction starts once, when the last micro-batch's backward has filled it.
        syncs = [lambda i=i: engine_ref().chunks[i].no_sync() for i in n]
        config.no_sync_func = syncs[0] if len(syncs) == 1 else syncs
    if ddp.align_param_gather:
        # The interleaved schedule starts each chunk's parameter all-gathers itself, at the same
        # micro-batch on every pipeline stage (megatron-core's param_sync_func).
        config.param_sync_func = [lambda params, i=i: engine_ref().chunks[i].start_param_sync() for i in n]
    return engine


def ddp_config(par: ParallelConfig, use_distributed_optimizer: bool, use_te: bool) -> DistributedDataParallelConfig:
    """megatron-core DDP's settings for this layout on this path (model.builder.TRAINING_DEFAULTS)."""
    d = TRAINING_DEFAULTS[use_te]
    gather = d.overlap_param_gather and use_distributed_optimizer
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=d.overlap_grad_reduce,
        overlap_param_gather=gather,
        # Only the interleaved schedule dispatches gathers per chunk (param_sync_func); with one
        # chunk per stage each bucket's gather, awaited by a forward pre-hook, starts the next.
        align_param_gather=gather and par.vpp is not None,
        use_distributed_optimizer=use_distributed_optimizer,
        # bucket_size: megatron-core's default, max(4e7, 1e6 * DP) parameters per bucket under
        # overlap (one bucket without it); the dp_reshardable optimizer checkpoint follows them.
    )


def lr_scheduler(optimizer, optim: OptimConfig, max_steps: int) -> OptimizerParamScheduler:
    """Warmup then the configured decay, stepped once per optimizer step."""
    return OptimizerParamScheduler(optimizer, **schedule_settings(optim, max_steps))


def schedule_settings(optim: OptimConfig, max_steps: int) -> dict:
    """megatron-core's OptimizerParamScheduler arguments for `optim` over `max_steps`
    (its state_dict keeps the same names, which a resume compares)."""
    warmup_steps, decay_steps = optim.schedule(max_steps)
    wsd = optim.decay_style == "WSD"
    return dict(
        init_lr=0.0 if warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=optim.decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, round(decay_steps * optim.wsd_decay_fraction)) if wsd else None,
        lr_wsd_decay_style=optim.wsd_decay_style if wsd else None,
    )


def split_for_data_parallel(global_batch: Iterable[dict]) -> list[dict]:
    """This DP rank's share of a list of micro-batches (round-robin by DP rank)."""
    rank = parallel_state.get_data_parallel_rank()
    size = parallel_state.get_data_parallel_world_size()
    batches = list(global_batch)
    if len(batches) % size:
        raise ValueError(f"{len(batches)} micro-batches cannot be split over data-parallel size {size}")
    return batches[rank::size]
