"""Core attention with context parallelism for the local (CPU) spec.

megatron-core's local `DotProductAttention` refuses context_parallel_size > 1 (only TE's
attention implements it). This one runs anywhere: each CP rank holds the queries, keys and
values of its share of the sequence (model.context_parallel: chunks r and 2*cp-1-r of
2*cp); it all-gathers the keys and values over the CP group, puts them back in the row's
order and attends with the causal mask of its queries' positions in the row, or with the
block-diagonal document mask of packed rows, whose key columns are the whole row.

The gather's backward reduce-scatters, so the gradient of every key and value, from the
queries of all ranks, goes back to the rank that owns it. All-gathering K/V is what TE's
`cp_comm_type="all_gather"` does; it costs memory for the whole row's K/V on every rank,
which is what the CPU runtime (tests, small models) can afford. `model.spec` selects it
when context_parallel_size > 1.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide

from model.context_parallel import balanced_positions


class ContextParallelAttention(MegatronModule):
    """Takes query [sq, b, heads / tp, d] and key, value [sq, b, groups / tp, d] of this
    CP rank's positions; returns [sq, b, heads / tp * d], as DotProductAttention does."""

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        # the arguments SelfAttention passes every core attention; the causal mask is built
        # here from the chunks' positions, and the K/V exchange is always an all-gather
        super().__init__(config=config)
        tp_group = pg_collection.tp if pg_collection is not None else parallel_state.get_tensor_model_parallel_group()
        self.cp_group = pg_collection.cp if pg_collection is not None else parallel_state.get_context_parallel_group()
        tp = tp_group.size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        # apply_query_key_layer_scaling divides the scores by the layer number and the
        # softmax multiplies them back: the same probabilities, so it needs nothing here.
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("context-parallel attention on the local spec takes packed rows as a block mask "
                             "(model.packing), and no attention bias")
        cp, rank = self.cp_group.size(), self.cp_group.rank()
        sq, b = query.shape[:2]
        length = sq * cp
        # [s, b, groups, d] of every rank, rank-major -> the row's order
        owned = torch.cat([balanced_positions(length, cp, r) for r in range(cp)])
        order = torch.argsort(owned).to(key.device)
        key, value = (tensor_parallel.gather_from_sequence_parallel_region(
            x, tensor_parallel_output_grad=True, group=self.cp_group).index_select(0, order) for x in (key, value))
        if attention_mask is None:   # causal over the row: keys at or before each query's position
            mine = balanced_positions(length, cp, rank).to(query.device)
            masked = torch.arange(length, device=query.device)[None, :] > mine[:, None]   # [sq, length]
        else:
            masked = attention_mask   # [b, 1, sq, length], True = masked
        # [s, b, n, d] -> [b, n, s, d]; each key/value group serves heads / groups queries (GQA)
        q = query.permute(1, 2, 0, 3)
        k, v = (x.permute(1, 2, 0, 3).repeat_interleave(self.heads // self.groups, dim=1) for x in (key, value))
        dropout = self.dropout if self.training else 0.0
        # as DotProductAttention: without SP each TP rank draws its heads' dropout from its own stream
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout and not self.config.sequence_parallel \
            else contextlib.nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=~masked, dropout_p=dropout, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * query.shape[-1])
