"""Full-vocabulary logits from megatron-core model chunks, at any TP/PP/CP/EP layout.

Runs megatron-core's own pipeline schedule in forward-only mode, so pipeline stages
exchange activations exactly as in training, then gathers the vocab-parallel logits
over TP (and, with context parallelism, each rank's share of the sequence over CP).
Every rank must call it with the same tokens.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, gather_from_tensor_model_parallel_region

from model.context_parallel import model_inputs, width_multiple
from model.packing import segment_positions
from model.parallel import padded_width, te_available


def model_device(chunks) -> torch.device:
    return next(chunks[0].parameters()).device


def decode_rows(config, rows: int) -> int:
    """The batch rows a KV-cache decode of `rows` sequences runs as. A decode step feeds one
    token per row, so the row count is every GEMM's token count, which FP8 GEMMs need to be
    a multiple of megatron-core's `get_fp8_align_size` (16; 32 for MXFP8); the caller adds
    idle rows up to it and drops their logits. (Forwards over whole rows, `forward_only`,
    pad the width instead.)"""
    if not config.fp8:
        return rows
    from megatron.core.fp8_utils import get_fp8_align_size

    return padded_width(rows, get_fp8_align_size(config.fp8_recipe))


def kv_cache_bytes_per_row(layers: int, query_groups: int, tp: int, kv_channels: int, length: int,
                           element_size: int) -> int:
    """Bytes one row of megatron-core's static KV cache takes on one rank: K and V, each
    [length, query_groups / tp, kv_channels] per attention layer of this pipeline stage, in
    the activations' dtype (`Attention._allocate_memory`)."""
    return 2 * layers * (query_groups // tp) * kv_channels * length * element_size


# The attributes through which megatron-core modules (and Transformer Engine's linears)
# keep their own copy of the sequence-parallel setting; megatron-core's inference flips the
# same ones (megatron.core.transformer.utils.set_model_to_sequence_parallel).
_SEQUENCE_PARALLEL_FLAGS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


@contextmanager
def sequence_parallel_off(chunks):
    """Within it, `chunks` run tensor-parallel without sequence parallelism: every module
    and every TransformerConfig that holds the flag has it off, and each gets back exactly
    what it had on exit, also when the body raises.

    Why: a KV-cache decode step feeds one token per row, which cannot be split over TP
    ranks. TP without SP is the same math (each linear all-reduces instead of gathering
    and reduce-scattering); MoE layers, whose dispatchers gather the tokens over the
    expert groups either way, then route every TP rank's (identical) tokens and hand each
    rank its own back. megatron-core's inference does the same, through a module cache
    keyed by `id(model)` that holds the modules for good; this walks the modules each time
    and keeps nothing, so a finished layout's model is not kept alive.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    flipped, seen = [], set()
    for chunk in chunks:
        for module in chunk.modules():
            own = vars(module)   # the module's own attributes, not its submodules or parameters
            targets = [(module, name) for name in _SEQUENCE_PARALLEL_FLAGS if own.get(name) is True]
            config = own.get("config")
            if isinstance(config, TransformerConfig) and config.sequence_parallel:
                targets.append((config, "sequence_parallel"))
            for obj, name in targets:
                if (id(obj), name) not in seen:
                    seen.add((id(obj), name))
                    flipped.append((obj, name))
    try:
        for obj, name in flipped:
            setattr(obj, name, False)
        yield
    finally:
        for obj, name in flipped:
            setattr(obj, name, True)


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


@contextmanager
def logits_at(model, mask: torch.Tensor):
    """Within it, `model` (a GPTModel, wrapped or not, called without labels) projects only
    the positions where `mask` [batch, seq] is true onto the vocabulary. Yields
    `picked(output)`: on the last pipeline stage, vocab-parallel logits [n, vocab / tp] in
    the order of `x[mask]`; elsewhere the output (hidden states for the next stage) as is.

    Why: at Qwen3's 151,936-row vocabulary the output layer, and the softmax-sized work
    after it, are most of a small model's step, and SFT, RL, distillation and scoring use
    logits at response tokens only. A row's logits do not depend on the other rows, so
    this changes only how much is computed.

    How: a pre-hook on megatron-core's output layer hands it the selected hidden states as
    a sequence of n positions and one row. Under sequence parallelism they are first
    gathered over TP and the layer runs without its own gather for that call, as
    megatron-core does for last-token logits in inference; the gather's gradient is split
    back (not reduce-scattered), since the layer then all-reduces its input gradient
    itself. With context parallelism `mask` is this rank's share of the rows
    (model.context_parallel.ModelInputs.take).
    """
    from megatron.core.utils import get_attr_wrapped_model

    inner = get_attr_wrapped_model(model, "post_process", return_model_obj=True)
    if not inner.post_process:
        yield lambda output: output
        return
    layer, gathered = inner.output_layer, []

    def select(module, args, kwargs):
        hidden = args[0]   # [seq (/ tp under SP), batch, hidden]
        if module.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False,
                                                          group=getattr(module, "tp_group", None))
            module.sequence_parallel = False
            gathered.append(True)
        return (hidden.transpose(0, 1)[mask].unsqueeze(1), *args[1:]), kwargs

    def restore(module, args, kwargs, output):
        if gathered:
            module.sequence_parallel = True
            gathered.clear()

    hooks = [layer.register_forward_pre_hook(select, with_kwargs=True),
             layer.register_forward_hook(restore, with_kwargs=True)]
    try:
        yield lambda logits: logits[0]   # GPTModel returns [1, n, vocab / tp]
    finally:
        for h in hooks:
            h.remove()
        restore(layer, (), {}, None)   # if the forward failed in between


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
    targets = targets.to(model_device(chunks))
    mask = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask

    def logprobs(logits, rows, m):
        return target_logprobs_and_entropy(logits, targets[rows][m], temperature, vocab_limit)[0]

    return forward_masked(chunks, tokens, mask, logprobs)


@torch.no_grad()
def forward_masked(chunks, tokens: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor | None:
    """`fn(vocab-parallel logits at the masked positions [n, vocab / tp], rows, row mask)`
    per micro-batch, scattered back to [batch, seq, ...] (zeros off the mask), on
    last-pipeline-stage ranks; None on the others. `rows` is the slice of `tokens` the
    micro-batch holds and `row mask` its part of `mask`, for indexing per-token inputs.

    Only the masked positions reach the output layer and the softmax-sized work in `fn`
    (see `logits_at`)."""
    device = model_device(chunks)
    mask = mask.to(device).bool()
    # forward_only feeds the whole batch at once, or one row at a time with several chunks (VPP)
    step = 1 if len(chunks) > 1 else len(tokens)
    parts = iter([(slice(i, i + step), mask[i:i + step]) for i in range(0, len(tokens), step)])

    def collect(logits):
        rows, m = next(parts)
        values = fn(logits, rows, m)
        out = torch.zeros(*m.shape, *values.shape[1:], dtype=values.dtype, device=values.device)
        out[m] = values
        return out

    outputs = forward_only(chunks, tokens, None, collect, mask=mask)
    return None if outputs is None else torch.cat(outputs, dim=0)


def forward_only(chunks, tokens: torch.Tensor, segment_ids: torch.Tensor | None, collect,
                 mask: torch.Tensor | None = None) -> list | None:
    """megatron-core's pipeline schedule in forward-only mode: `collect(vocab-parallel
    logits)` per micro-batch, in order, on last-pipeline-stage ranks; None on the others.
    The logits are [batch, seq, vocab / tp], or with `mask` [batch, seq] those at its
    positions only, [n, vocab / tp] (`logits_at`).

    Rows of any width: they are padded at the end to what sequence and context parallelism
    split (`model.context_parallel.width_multiple`), which causal attention keeps from
    changing any earlier position, and the logits are cut back. With context parallelism
    each rank runs its share of the sequence and the logits are gathered back into the
    rows' order (model.context_parallel), equal to cp=1's."""
    for c in chunks:
        c.eval()
    device = model_device(chunks)
    width = tokens.shape[1]
    padded = padded_width(width, width_multiple(chunks[0].config))
    tokens = F.pad(tokens.to(device), (0, padded - width))
    # the padding is a document of its own in packed rows; in plain rows causality keeps it out
    segments = None if segment_ids is None else torch.cat(
        [segment_ids.to(device), (segment_ids.max() + 1).to(device).expand(len(tokens), padded - width)], 1)
    pick = mask is not None
    masks = F.pad(mask.to(device).bool(), (0, padded - width)) if pick else torch.ones_like(tokens, dtype=torch.bool)
    # The interleaved (VPP) schedule needs a multiple of pp micro-batches: feed one sequence each.
    rows = torch.arange(len(tokens)).split(1) if len(chunks) > 1 else [torch.arange(len(tokens))]

    def forward_step(data_iterator, model):
        r = next(data_iterator)
        seg = None if segments is None else segments[r]
        positions = position_ids_for(tokens[r]) if seg is None else segment_positions(seg)
        x = model_inputs(tokens[r], positions, seg, use_te=te_available())
        where = masks[r]
        inputs = dict(attention_mask=x.attention_mask, packed_seq_params=x.packed_seq_params)
        if not pick:
            output = model(x.tokens, x.position_ids, **inputs)
        else:
            with logits_at(model, x.take(where)) as picked:
                output = picked(model(x.tokens, x.position_ids, **inputs))

        def collect_output(logits, non_loss_data=False):
            if x.shard is not None:
                logits = x.shard.gather_rows(logits, where) if pick else x.shard.gather(logits)
            return collect(logits if pick else logits[:, :width])

        return output, collect_output

    data = iter(rows) if len(chunks) == 1 else [iter(rows) for _ in chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(rows),
        seq_length=padded,
        micro_batch_size=len(rows[0]),
        forward_only=True,
        collect_non_loss_data=True,
    )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return outputs


def _normalised(logits: torch.Tensor, temperature: float, vocab_limit: int | None):
    """(logits / temperature less their maximum over the whole vocabulary, their exp, the
    softmax normaliser, the first vocabulary id of this TP rank's slice, the slice's size)
    from vocab-parallel logits [..., vocab / tp]. Rows past `vocab_limit` (the model's
    padding beyond the tokenizer) get no mass, as in sampling (recipes.generate)."""
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
    exp = z.exp()
    return z, exp, tp_sum(exp.sum(-1)), first, local


def _at(z: torch.Tensor, first: int, local: int, ids: torch.Tensor) -> torch.Tensor:
    """z at vocabulary ids [..., k]: each TP rank contributes the ids in its slice, summed
    with megatron-core's all-reduce whose backward is the identity."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region as tp_sum

    index = ids.to(z.device).long() - first
    mine = (index >= 0) & (index < local)
    return tp_sum(torch.where(mine, z.gather(-1, index.clamp(0, local - 1)), torch.zeros((), device=z.device)))


def _valid(logits: torch.Tensor, temperature: float, vocab_limit: int | None) -> tuple[torch.Tensor, int]:
    """(logits / temperature of this TP rank's slice, cut before the padded rows past
    `vocab_limit`, as a view where possible; the slice's first vocabulary id)."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    first = parallel_state.get_tensor_model_parallel_rank() * z.shape[-1]
    if vocab_limit is not None and first < vocab_limit < first + z.shape[-1]:
        z = z[..., :vocab_limit - first]
    return z, first


def _logsumexp(z: torch.Tensor) -> torch.Tensor:
    """log of the softmax normaliser over the whole vocabulary from each TP rank's slice,
    differentiable: one fused pass per rank, then the ranks' partial sums combined."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region as tp_sum

    lse = torch.logsumexp(z, -1)
    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return lse
    peak = lse.detach().clone()
    torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_tensor_model_parallel_group())
    # megatron-core's all-reduce works in place: the clone keeps exp's output, which exp's
    # backward reads, from being overwritten by the sum
    return tp_sum((lse - peak).exp().clone()).log() + peak


def logprobs_at(logits: torch.Tensor, indices: torch.Tensor, temperature: float = 1.0,
                vocab_limit: int | None = None) -> torch.Tensor:
    """log softmax(logits / temperature) at vocabulary ids `indices` [..., k] (below
    `vocab_limit`), from vocab-parallel logits [..., vocab / tp], differentiable.

    The distillation loss runs this on every response position at the full vocabulary,
    so it makes as few vocabulary-sized passes as it can: no copy for the padded rows
    (a view cuts them off) or for temperature 1, and a fused logsumexp."""
    z, first = _valid(logits, temperature, vocab_limit)
    return _at(z, first, z.shape[-1], indices) - _logsumexp(z).unsqueeze(-1)


@torch.no_grad()
def topk_logprobs(logits: torch.Tensor, k: int, temperature: float = 1.0,
                  vocab_limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, vocabulary ids) of the k most likely tokens of softmax(logits /
    temperature), most likely first, [..., k] each, from vocab-parallel logits: every TP
    rank's own top k, gathered, then the top k of those."""
    z, first = _valid(logits, temperature, vocab_limit)
    values, index = z.topk(min(k, z.shape[-1]), -1)
    values, index = values - _logsumexp(z).unsqueeze(-1), index + first
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        short = min(k, logits.shape[-1]) - values.shape[-1]   # the rank cut short by the padding
        if short:   # every rank gathers the same size; these never win
            values = torch.cat([values, values.new_full((*values.shape[:-1], short), -float("inf"))], -1)
            index = torch.cat([index, index.new_zeros((*index.shape[:-1], short))], -1)
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(values) for _ in range(tp)], [torch.empty_like(index) for _ in range(tp)]
        torch.distributed.all_gather(parts[0], values.contiguous(), group=group)
        torch.distributed.all_gather(parts[1], index.contiguous(), group=group)
        values, index = torch.cat(parts[0], -1), torch.cat(parts[1], -1)
    values, order = values.topk(min(k, values.shape[-1]), -1)
    return values, index.gather(-1, order)


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

    z, exp, total, first, local = _normalised(logits, temperature, vocab_limit)
    target_z = _at(z, first, local, targets.unsqueeze(-1)).squeeze(-1)
    log_total = total.log()
    entropy = log_total - tp_sum((exp * z).sum(-1)) / total
    return target_z - log_total, entropy
