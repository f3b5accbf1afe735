"""Compare our megatron-core Qwen3 against HF transformers on the same tokens.

    python -m model.compare_hf --hf-dir DIR --ckpt CKPT [--tp N --pp N --cp N --ep N] [--text "..."]

Loads the HF model with transformers (Qwen3ForCausalLM / Qwen3MoeForCausalLM), our
model from the megatron-core checkpoint at the given layout, runs both on the same
tokens and prints max |Δlogit|, its ratio to max |logit|, the mean per-token cosine
similarity and the top-1 (greedy next token) agreement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from model.config import ConfigError, ParallelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_logits(hf_dir: str | Path, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def logit_metrics(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    """Agreement of two [batch, seq, vocab] logit tensors (computed in float32)."""
    ours, ref = ours.float(), ref.float()
    diff = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=-1).mean().item()
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return {"max_abs_diff": diff, "max_abs_logit": scale, "rel_diff": diff / max(scale, 1e-30),
            "cosine": cosine, "top1_agreement": top1}


def sample_tokens(vocab_size: int, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab_size, 151_643), (batch, seq), generator=g)


def is_reporting_rank() -> bool:
    """The one rank that reports the full logits: last PP stage, TP, CP and DP rank 0."""
    from megatron.core import parallel_state as ps

    return (ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0)


def compare(hf_dir: str | Path, ckpt: str | Path, par: ParallelConfig, tokens: torch.Tensor,
            dtype: torch.dtype | None = None) -> dict | None:
    """Collective. Metrics on the reporting rank, None elsewhere."""
    from model.builder import build_model
    from model.checkpoint import checkpoint_dtype, load_model, read_model_config
    from model.inference import forward_logits
    from model.parallel import init_distributed

    cfg = read_model_config(ckpt)
    if dtype is None:
        dtype = checkpoint_dtype(ckpt)
    init_distributed(par, model=cfg)
    chunks = build_model(cfg, par, dtype=dtype, perform_initialization=False)
    load_model(chunks, ckpt)
    ours = forward_logits(chunks, tokens)
    if not is_reporting_rank():
        return None
    return logit_metrics(ours.cpu(), hf_logits(hf_dir, tokens, dtype))


def format_metrics(m: dict) -> str:
    return "\n".join([
        f"max |Δlogit|        {m['max_abs_diff']:.3e}",
        f"max |logit|         {m['max_abs_logit']:.3e}",
        f"max |Δ| / max |l|   {m['rel_diff']:.3e}",
        f"mean cosine         {m['cosine']:.8f}",
        f"top-1 agreement     {m['top1_agreement'] * 100:.2f}%",
    ])


def main(argv=None) -> int:
    from model.launch import relaunch_if_needed
    from model.parallel import minimum_world_size, validate_layout

    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m model.compare_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1, help="context parallelism: each rank runs its share of the sequence")
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's")
    p.add_argument("--text", default=None, help="prompt to tokenize with the HF dir's tokenizer")
    p.add_argument("--seq", type=int, default=32, help="random-token sequence length when no --text")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the metrics to this file")
    args = p.parse_args(argv)
    try:
        from model.checkpoint import read_model_config

        cfg = read_model_config(args.ckpt)
        par = ParallelConfig(tp=args.tp, pp=args.pp, cp=args.cp, ep=args.ep, etp=1 if args.ep > 1 else None,
                             sp=args.tp > 1)
        validate_layout(cfg, par)
        relaunch_if_needed("model.compare_hf", argv, minimum_world_size(par))
        if args.text:
            from transformers import AutoTokenizer

            tokens = AutoTokenizer.from_pretrained(args.hf_dir)(args.text, return_tensors="pt").input_ids
        else:
            tokens = sample_tokens(cfg.vocab_size, args.batch, args.seq)
        metrics = compare(args.hf_dir, args.ckpt, par, tokens, DTYPES.get(args.dtype))
        from model.parallel import destroy_distributed

        destroy_distributed()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if metrics is not None:
        print(format_metrics(metrics))
        if args.json:
            Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
