"""Parameter counts of the published Qwen3 sizes, read off the megatron-core model.

    python -m model.params                    # table of the eight published sizes
    python -m model.params --model qwen3_8b   # one (or, repeated, several) configs
    python -m model.params --json             # same rows as JSON

The numbers are not a formula restating the architecture: every count comes from the
GPTModel that `model.builder.build_model` builds (the same code path as training), on the
meta device so nothing is allocated. The full model is built, not extrapolated from one
and two layers: on 2 CPU cores the meta build of the largest config (235B-A22B, 94 layers
x 128 experts = 24k parameter tensors) measured ~4 s and all eight sizes together ~7 s,
well under the ~15 s per model at which extrapolation would have been worth its extra
assumptions.

  total          unique parameters of the model (tied embedding/output weight once);
  non_embedding  total minus the word embedding and, when untied, the output layer;
  active         parameters one token uses: total minus, in every MoE layer, the experts
                 the router does not pick ((num_experts - topk) x one expert's size, read
                 from the built layer). Equals total for dense models.

Counts are for the whole, unsharded model: they are taken in a single-process world
(tp = pp = ep = 1).
"""

from __future__ import annotations

import argparse
import json
import sys

from model.config import ConfigError, ModelConfig, ParallelConfig, load_model_config

# The published sizes, in the order the model cards list them (dense, then MoE).
PUBLISHED = ("qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b",
             "qwen3_30b_a3b", "qwen3_235b_a22b")


def _ensure_single_rank_world() -> None:
    """Start (once) the single-process world that build_model needs, and refuse sharding.

    Under TP/PP/EP > 1 the built module holds one rank's shard, so its count would not be
    the model's size.
    """
    from megatron.core import parallel_state

    from model.parallel import init_distributed

    if not parallel_state.model_parallel_is_initialized():
        init_distributed(ParallelConfig())
    sizes = (parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_expert_model_parallel_world_size())
    if sizes != (1, 1, 1):
        raise RuntimeError(f"count_params needs tp=pp=ep=1, parallel state has {sizes}")


def _numel(params) -> int:
    # Deduplicate by identity so that a parameter reachable twice (a tied weight) counts once.
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def count_params(cfg: ModelConfig) -> dict:
    """Integer counts {total, non_embedding, active} of the model build_model builds for cfg."""
    from model.builder import build_model

    _ensure_single_rank_world()
    # The meta build uses the local spec: same parameters as the TE spec (identical
    # checkpoint keys, see model.spec) with one module per expert, which `active` reads.
    (gpt,) = build_model(cfg, ParallelConfig(), meta=True)

    total = _numel(gpt.parameters())

    embedding = gpt.embedding.word_embeddings.weight.numel()
    # With tied embeddings megatron-core gives the output layer no weight of its own (it
    # reads the embedding's), so only an untied output weight is subtracted again.
    output = gpt.output_layer.weight
    untied_output = 0
    if output is not None and not gpt.share_embeddings_and_output_weights:
        untied_output = output.numel()
    non_embedding = total - embedding - untied_output

    inactive = 0
    if cfg.is_moe:
        for layer in gpt.decoder.layers:
            experts = layer.mlp.experts.local_experts
            # With ep=1 every expert is local; the router then runs topk of them per token.
            assert len(experts) == cfg.num_experts, (len(experts), cfg.num_experts)
            inactive += (len(experts) - layer.mlp.router.topk) * _numel(experts[0].parameters())
    return {"total": total, "non_embedding": non_embedding, "active": total - inactive}


def _billions(n: int) -> str:
    return f"{n / 1e9:.3f}"


def format_table(rows: list[dict]) -> str:
    """Fixed-width table: counts in billions (3 decimals), then exact counts."""
    head = ("model", "total (B)", "non-emb (B)", "active (B)", "total", "non-embedding", "active")
    lines = [f"{head[0]:<16} {head[1]:>10} {head[2]:>12} {head[3]:>11} "
             f"{head[4]:>16} {head[5]:>16} {head[6]:>16}"]
    for r in rows:
        lines.append(
            f"{r['model']:<16} {_billions(r['total']):>10} {_billions(r['non_embedding']):>12} "
            f"{_billions(r['active']):>11} {r['total']:>16,} {r['non_embedding']:>16,} "
            f"{r['active']:>16,}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.params", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", metavar="NAME",
                        help="hydra_conf/model config name (repeatable); default: the published sizes")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)

    # Load every config before the (slow) megatron import so a typo fails fast.
    try:
        configs = [load_model_config(name) for name in (args.model or PUBLISHED)]
    except ConfigError as e:
        parser.error(str(e))
    rows = [{"model": cfg.name, **count_params(cfg)} for cfg in configs]
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))

    from model.parallel import destroy_distributed

    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
