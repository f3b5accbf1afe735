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


def model_device(chunks) -> torch.device:
    return next(chunks[0].parameters()).device


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


@torch.no_grad()
def forward_logits(chunks, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits [batch, seq, vocab] on last-pipeline-stage ranks, None on the others."""
    for c in chunks:
        c.eval()
    tokens = tokens.to(model_device(chunks))
    # The interleaved (VPP) schedule needs a multiple of pp micro-batches: feed one sequence each.
    microbatches = list(tokens.split(1)) if len(chunks) > 1 else [tokens]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch, position_ids_for(batch), attention_mask=None)

        def collect(output_tensor, non_loss_data=False):
            return gather_from_tensor_model_parallel_region(output_tensor)

        return output, collect

    data = iter(microbatches) if len(chunks) == 1 else [iter(microbatches) for _ in chunks]
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
