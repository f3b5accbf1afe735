"""Context parallelism: this rank's share of a micro-batch's sequence, and the way back.

megatron-core splits a causal row over the CP group in 2*cp chunks, rank r holding chunks
r and 2*cp-1-r (`megatron.core.utils.get_batch_on_this_cp_rank`), so that every rank gets
as much causal attention work as the others; its rotary embedding cuts its table the same
way (`get_pos_emb_on_this_cp_rank`), so the model must be fed exactly these positions.
Packed rows on the Transformer Engine path (THD) are cut document by document in the same
pattern (what TE's `thd_get_partitioned_indices` computes for
`megatron.core.utils.get_thd_batch_on_this_cp_rank`), which needs every document to be a
multiple of 2*cp long: the SFT packer pads them (`data_pipeline.sft_data`).

Every micro-batch passes through `model_inputs` on its way into the model, in training
(`recipes.engine.forward_per_token`, both engines) and in forward-only scoring and
generation (`model.inference.forward_only`). What comes out of the last stage (per-token
losses or logits) is put back in the row's order by `SequenceShard.gather` /
`gather_rows`, so that every loss, log-prob and logged mean is computed from the whole
micro-batch exactly as at cp=1. The attention itself sees the other ranks' keys and values
through `model.cp_attention` (local spec) or TE's context-parallel attention.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from model.packing import attention_inputs, thd_params


def balanced_positions(length: int, cp: int, rank: int) -> torch.Tensor:
    """Positions [length / cp] of a `length`-token sequence that CP rank `rank` of `cp`
    holds: chunks rank and 2*cp-1-rank of 2*cp equal chunks, in that order."""
    if length % (2 * cp):
        raise ValueError(f"a sequence of {length} tokens cannot be split over cp={cp}: "
                         f"it must be a multiple of 2*cp={2 * cp}")
    chunks = torch.arange(length).view(2 * cp, length // (2 * cp))
    return chunks[[rank, 2 * cp - 1 - rank]].reshape(-1)


def document_positions(cu_seqlens: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """THD: positions of a packed row that CP rank `rank` holds, each document (bounded
    by `cu_seqlens`) split as `balanced_positions` splits a row, documents in order."""
    bounds = cu_seqlens.tolist()
    return torch.cat([start + balanced_positions(end - start, cp, rank)
                      for start, end in zip(bounds[:-1], bounds[1:])])


class SequenceShard:
    """The positions of a micro-batch's rows that each rank of the CP group holds, with the
    inputs cut to this rank's share (`take`) and the ranks' outputs put back in row order
    (`gather`, `gather_rows`).

    The gathers return the same tensor on every CP rank and their backward hands each rank
    the gradient of its own part: every rank computes the whole micro-batch's loss from
    them, and each rank's model gets exactly the gradient of its own positions.
    """

    def __init__(self, owned: list[torch.Tensor], group):
        self.owned, self.group = owned, group
        self.mine = owned[group.rank()]
        self.length = sum(len(o) for o in owned)
        self._row_order = torch.argsort(torch.cat(owned))   # rank-major gathered rows -> row order

    def take(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's positions of `x` along its sequence dimension `dim`."""
        return x.index_select(dim, self.mine.to(x.device))

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Every rank's `x` [.., length / cp, ..] (sequence along `dim`) as [.., length, ..] in row order."""
        full = gather_from_sequence_parallel_region(x.movedim(dim, 0).contiguous(), tensor_parallel_output_grad=False,
                                                    group=self.group)
        return full.index_select(0, self._row_order.to(x.device)).movedim(0, dim)

    def gather_rows(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` [n_rank, ...] at `self.take(mask)` (its positions where the
        full-row `mask` [b, length] is true, in x[mask] order) as [n, ...] in `x[mask]`
        order of the whole rows."""
        mask = mask.bool().cpu()   # every rank's count sizes the gather: known from the full mask, no collective
        rows = torch.arange(mask.shape[0])[:, None] * self.length
        keys = [(rows + pos[None, :])[mask[:, pos]] for pos in self.owned]   # flat row-major index
        most = max(len(k) for k in keys)
        if most == 0:
            return x
        if len(x) < most:   # the gather needs one size on every rank
            x = torch.cat([x, x.new_zeros(most - len(x), *x.shape[1:])])
        full = gather_from_sequence_parallel_region(x.contiguous(), tensor_parallel_output_grad=False,
                                                    group=self.group)
        slots = torch.cat([r * most + torch.arange(len(k)) for r, k in enumerate(keys)])
        return full.index_select(0, slots[torch.argsort(torch.cat(keys))].to(full.device))


@dataclasses.dataclass
class ModelInputs:
    """What GPTModel.forward takes for one micro-batch on this rank (`shard`: None at cp=1)."""

    tokens: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    packed_seq_params: object
    shard: SequenceShard | None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """A per-position tensor [b, s, ...] (labels, a loss mask) cut as the tokens are."""
        return x if self.shard is None else self.shard.take(x)


def model_inputs(tokens: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor | None,
                 use_te: bool) -> ModelInputs:
    """Model inputs [b, s] for this rank: the attention mask or THD parameters of packed
    rows (`segment_ids`, model.packing), and with context parallelism the rank's share of
    the sequence."""
    mask, packed = attention_inputs(segment_ids, use_te)
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return ModelInputs(tokens, position_ids, mask, packed, None)
    group = parallel_state.get_context_parallel_group()
    if packed is not None:
        cu = packed.cu_seqlens_q.cpu()
        owned = [document_positions(cu, cp, r) for r in range(cp)]
        # documents carry their own padding (sft_data), so the padded bounds are the bounds
        packed = dataclasses.replace(packed, cu_seqlens_q_padded=packed.cu_seqlens_q,
                                     cu_seqlens_kv_padded=packed.cu_seqlens_kv)
    else:
        owned = [balanced_positions(tokens.shape[1], cp, r) for r in range(cp)]
    shard = SequenceShard(owned, group)
    # the block mask keeps every key column (model.cp_attention gathers all keys) and this
    # rank's query rows
    mask = None if mask is None else shard.take(mask, dim=2)
    return ModelInputs(shard.take(tokens), shard.take(position_ids), mask, packed, shard)


def width_multiple(config) -> int:
    """`model.parallel.sequence_multiple` for a built model (its TransformerConfig)."""
    from megatron.core.fp8_utils import get_fp8_align_size

    from model.parallel import sequence_multiple

    return sequence_multiple(config.tensor_model_parallel_size, config.context_parallel_size,
                             config.sequence_parallel, get_fp8_align_size(config.fp8_recipe) if config.fp8 else 1)
