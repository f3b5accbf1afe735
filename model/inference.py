"""Full-vocabulary logits from megatron-core model chunks, at any TP/PP/EP layout.

Runs megatron-core's own pipeline schedule in forward-only mode, so pipeline stages
exchange activations exactly as in training, then gathers the vocab-parallel logits
over TP. Every rank must call it with the same tokens.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from model.packing import attention_inputs, segment_positions
from model.parallel import te_available


def model_device(chunks) -> torch.device:
    return next(chunks[0].parameters()).device


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


@torch.no_grad()
def forward_logits(chunks, tokens: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Logits [batch, seq, vocab] on last-pipeline-stage ranks, None on the others.

    `segment_ids` [batch, seq] marks packed documents (model.packing); None: one causal row.
    """
    outputs = forward_only(chunks, tokens, segment_ids, gather_from_tensor_model_parallel_region)
    return None if outputs is None else torch.cat(outputs, dim=0)


@torch.no_grad()
def forward_token_logprobs(chunks, tokens: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                           vocab_limit: int | None = None, mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """log p(targets | prefix) [batch, seq] at `temperature`, on last-pipeline-stage ranks
    (None on the others), without gathering the vocabulary over TP. With `mask`, only the
    masked positions are computed (the others are 0)."""
    device = model_device(chunks)
    targets = targets.to(device)
    mask = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.to(device).bool()
    rows = iter(zip(targets.split(1), mask.split(1)) if len(chunks) > 1 else [(targets, mask)])

    def logprobs(logits):
        t, m = next(rows)
        logp = target_logprobs_and_entropy(logits[m], t[m], temperature, vocab_limit)[0]
        return torch.zeros(m.shape, dtype=logp.dtype, device=logp.device).masked_scatter(m, logp)

    outputs = forward_only(chunks, tokens, None, logprobs)
    return None if outputs is None else torch.cat(outputs, dim=0)


def forward_only(chunks, tokens: torch.Tensor, segment_ids: torch.Tensor | None, collect) -> list | None:
    """megatron-core's pipeline schedule in forward-only mode: `collect(vocab-parallel
    logits)` per micro-batch, in order, on last-pipeline-stage ranks; None on the others."""
    for c in chunks:
        c.eval()
    device = model_device(chunks)
    tokens = tokens.to(device)
    segments = segment_ids.to(device) if segment_ids is not None else torch.zeros_like(tokens)
    # The interleaved (VPP) schedule needs a multiple of pp micro-batches: feed one sequence each.
    pairs = list(zip(tokens.split(1), segments.split(1))) if len(chunks) > 1 else [(tokens, segments)]
    microbatches = [p[0] for p in pairs]

    def forward_step(data_iterator, model):
        batch, seg = next(data_iterator)
        if segment_ids is None:
            mask, packed, positions = None, None, position_ids_for(batch)
        else:
            mask, packed = attention_inputs(seg, use_te=te_available())
            positions = segment_positions(seg)
        output = model(batch, positions, attention_mask=mask, packed_seq_params=packed)

        def collect_output(output_tensor, non_loss_data=False):
            return collect(output_tensor)

        return output, collect_output

    data = iter(pairs) if len(chunks) == 1 else [iter(pairs) for _ in chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=tokens.shape[1],
        micro_batch_size=microbatches[0].shape[0],
        forward_only=True,
        collect_non_loss_data=True,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return outputs


def target_logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                                vocab_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target), entropy), each [batch, seq], from vocab-parallel logits [batch, seq,
    vocab / tp] of softmax(logits / temperature), differentiable. `vocab_limit` leaves the
    padded rows past the tokenizer's vocabulary out, as sampling does (recipes.generate).

    Each TP rank holds a contiguous slice of the vocabulary; the softmax normaliser, the
    target's logit and the entropy's sum are reduced over TP with megatron-core's
    all-reduce whose backward is the identity, so every rank's slice gets its gradient.
    """
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region as tp_sum

    z = logits.float() / temperature
    local = z.shape[-1]
    first = parallel_state.get_tensor_model_parallel_rank() * local
    if vocab_limit is not None and first + local > vocab_limit:
        padded = torch.arange(first, first + local, device=z.device) >= vocab_limit
        z = z.masked_fill(padded, -1e30)   # not -inf: exp(z) * z must stay 0, not nan
    peak = z.detach().max(-1, keepdim=True).values
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_tensor_model_parallel_group())
    z = z - peak
    index = targets.to(z.device) - first
    mine = (index >= 0) & (index < local)
    target_z = tp_sum(torch.where(mine, z.gather(-1, index.clamp(0, local - 1).unsqueeze(-1)).squeeze(-1),
                                  torch.zeros((), device=z.device)))
    exp = z.exp()
    total = tp_sum(exp.sum(-1))
    log_total = total.log()
    entropy = log_total - tp_sum((exp * z).sum(-1)) / total
    return target_z - log_total, entropy
