"""torchrun worker: packed rows give the same per-token logits as each document alone.

    torchrun --nproc-per-node 2 tests/workers/packed.py --out R.json [--plan tiny:tp1 ...] [--dtype bf16]

For tiny (TP=1 x DP=2 and TP=2) and tiny_moe (TP=1): three random documents and padding
are packed into one row with `segment_ids`; its logits (model.inference.forward_logits)
and per-token losses (the training forward, as recipes.engine calls it) are compared with
those of every document run on its own. Without the block mask a later document would
attend to the earlier ones and differ. `--plan` and `--dtype` choose other cases (the GPU
suite runs tiny and tiny_moe at TP=1 in bf16 on one GPU: Transformer Engine's THD attention
has no fp32 kernel).

At tiny/TP=1 the same three documents are also SFT rows with `sft.data.pack=false` (one
document per row, padded; data_pipeline.sft_data's `assemble` and `SFTSamples`, batched by
recipes.data.SampleBatches as the SFT stage does): the LM loss of the training forward
(recipes.engine.forward_per_token, loss positions only) over micro-batches of 2 rows equals
that over micro-batches of 1, and whether any batch handed to the model has `segment_ids`
(which on the TE path mean THD, one row per micro-batch) is recorded.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.config import load_model_config  # noqa: E402
from model.parallel import destroy_distributed, init_distributed, reset_model_parallel, te_available  # noqa: E402
from tests.workers.layouts import LAYOUTS  # noqa: E402

PLAN = [("tiny", "tp1"), ("tiny", "tp2"), ("tiny_moe", "tp1")]
# even lengths: with TP=2 and sequence parallelism a sequence must split over 2 ranks
DOC_LENGTHS, ROW = (8, 12, 6), 30   # 26 tokens of documents, 4 of padding
VOCAB = 2048


def unpacked_sft(model, docs) -> dict:
    """Unpacked SFT rows at micro-batch 2 against micro-batch 1 (the module docstring)."""
    from data_pipeline.sft_data import SFTData, SFTSamples, assemble
    from recipes.data import SampleBatches
    from recipes.engine import forward_per_token, masked_lm_loss

    # loss on the second half of each document, as on an assistant turn after its prompt
    triples = [(d[:-1].numpy(), d[1:].numpy(), (torch.arange(len(d) - 1) >= len(d) // 2).numpy()) for d in docs]
    rows = assemble(triples, [[i] for i in range(len(docs))] * 2, ROW, pad_id=0)   # 6 rows, each document twice
    samples = SFTSamples(SFTData(**rows, stats={"pack": False}), seed=0)
    out = {"segment_ids": False}
    for mbs in (1, 2):
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for batch in SampleBatches(samples, [], 6, mbs, 0, 1)(0):
                out["segment_ids"] |= "segment_ids" in batch
                batch, per_token = forward_per_token(model, batch, loss_positions_only=True)
                loss_sum, tokens, _ = masked_lm_loss(batch, per_token)
                total += torch.tensor([loss_sum.item(), float(tokens)], dtype=torch.float64)
        out[f"loss_mbs{mbs}"] = (total[0] / total[1]).item()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--plan", nargs="*", default=None, help="MODEL:LAYOUT cases replacing PLAN")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = p.parse_args()
    plan = PLAN if not args.plan else [tuple(case.split(":")) for case in args.plan]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    from model.builder import build_model
    from model.inference import forward_logits
    from model.packing import attention_inputs, segment_positions

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, VOCAB, (n,), generator=g) for n in DOC_LENGTHS]
    pad = ROW - sum(DOC_LENGTHS)
    row = torch.cat(docs + [torch.zeros(pad, dtype=torch.long)])[None]
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(DOC_LENGTHS + (pad,))])[None]
    labels = torch.roll(row, -1, 1)
    results = {}
    for model_name, layout in plan:
        cfg = dataclasses.replace(load_model_config(model_name), vocab_size=VOCAB)
        torch.manual_seed(3)
        init_distributed(LAYOUTS[layout], seed=3, model=cfg)
        chunks = build_model(cfg, LAYOUTS[layout], dtype=dtype)
        packed = forward_logits(chunks, row, segments)[0]
        alone = [forward_logits(chunks, d[None])[0] for d in docs]
        starts = [sum(DOC_LENGTHS[:i]) for i in range(len(docs))]
        logit_diff = max((packed[s:s + len(d)] - a).abs().max().item() for s, d, a in zip(starts, docs, alone))
        unmasked = forward_logits(chunks, row)[0]   # the same row as one causal document
        unmasked_diff = max((unmasked[s:s + len(d)] - a).abs().max().item()
                            for s, d, a in zip(starts, docs, alone))

        # the training forward: per-token loss with the packed mask vs each document alone
        model = chunks[0]
        model.eval()
        mask, packed_params = attention_inputs(segments, use_te=te_available())
        with torch.no_grad():
            loss_packed = model(row, segment_positions(segments), mask, labels=labels,
                                packed_seq_params=packed_params)[0]
            loss_diff = 0.0
            for s, d in zip(starts, docs):
                lab = labels[:, s:s + len(d)].clone()
                alone_loss = model(d[None], torch.arange(len(d))[None], None, labels=lab)[0]
                # the last token's label crosses into the next document; compare the rest
                loss_diff = max(loss_diff, (loss_packed[s:s + len(d) - 1] - alone_loss[:-1]).abs().max().item())
        if (model_name, layout) == PLAN[0]:
            results["unpacked_sft"] = unpacked_sft(model, docs)
        if dist.get_rank() == 0:
            results[f"{model_name}/{layout}"] = {
                "logit_diff": logit_diff, "unmasked_diff": unmasked_diff, "loss_diff": loss_diff,
                "logit_scale": max(a.abs().max().item() for a in alone)}
        reset_model_parallel()
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    destroy_distributed()


if __name__ == "__main__":
    main()
