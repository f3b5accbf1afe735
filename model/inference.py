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

        def collect(output_tensor, non_loss_data=False):
            return gather_from_tensor_model_parallel_region(output_tensor)

        return output, collect

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
    return torch.cat(outputs, dim=0)
