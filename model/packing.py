"""Attention inputs for packed sequences: several documents in one row, none seeing another.

A packed row carries `segment_ids` [b, s]: the index of the document each token belongs
to (padding is a segment of its own). From it:

- GPU (Transformer Engine spec): THD layout through megatron-core's PackedSeqParams, i.e.
  cumulative sequence lengths; TE's fused attention restarts causal attention and RoPE
  positions at every boundary. THD needs one row per micro-batch.
- CPU (megatron-core local spec): a block-diagonal causal mask [b, 1, s, s] (True =
  masked). The local attention applies RoPE at absolute positions, which gives the same
  attention scores as restarted positions: RoPE scores depend only on the distance
  between query and key, and the mask keeps every pair inside one document.
  tests/test_sft.py checks packed logits against each document run alone.

`position_ids` restarting per document are built either way, for anything that reads
absolute positions. With context parallelism, model.context_parallel cuts both to each
rank's share of the row (THD: of every document).
"""

from __future__ import annotations

import torch


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """Bool [b, s]: True where a new segment begins (and at position 0)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token within its segment, [b, s]."""
    s = segment_ids.shape[1]
    index = torch.arange(s, device=segment_ids.device).expand_as(segment_ids)
    start_index = torch.where(segment_starts(segment_ids), index, torch.zeros_like(index))
    return index - torch.cummax(start_index, dim=1).values


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where attention is NOT allowed."""
    s = segment_ids.shape[1]
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


def thd_params(segment_ids: torch.Tensor):
    """megatron-core PackedSeqParams (THD) for a single packed row."""
    from megatron.core.packed_seq_params import PackedSeqParams

    if segment_ids.shape[0] != 1:
        raise ValueError("packed sequences on the TE path need micro_batch_size=1 (THD layout)")
    starts = torch.nonzero(segment_starts(segment_ids)[0]).flatten()
    total = torch.tensor([segment_ids.shape[1]], device=segment_ids.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def attention_inputs(segment_ids: torch.Tensor | None, use_te: bool) -> tuple:
    """(attention_mask, packed_seq_params) for GPTModel.forward; (None, None) when unpacked."""
    if segment_ids is None:
        return None, None
    if use_te:
        return None, thd_params(segment_ids)
    return block_causal_mask(segment_ids), None
