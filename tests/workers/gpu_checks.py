"""Single-process worker: the GPU (Transformer Engine) path's checks on one GPU, in one
process, for tests/test_gpu.py. A check that raises records its error and the others run.

    python tests/workers/gpu_checks.py --dense HF_DIR --moe HF_DIR --work DIR --out R.json CHECK...

The HF directories are conftest's random `tiny` and `tiny_moe` (`dense_tied`, `moe`: fp32,
the tests' 2,048-entry vocabulary, weights wider than HF's init so that the loss is far
from ln(vocabulary) and a wrong token or label would show).

  spec      te_available(), the TE modules of a built model, and what build_engine turned
            on (the fusions, gradient-accumulation fusion, DDP's overlap)
  train     tiny and tiny_moe: 3 steps of our bf16 training step against HF transformers in
            fp32, same weights and batch (bench.train's two workers, in this process)
  fp8       tiny: the same 3 steps with FP8 delayed, tensorwise (current scaling) and
            blockwise scaling, beside bf16; blockwise records why it cannot run where
            recipes.train.resolve_precision refuses it
  specs     checkpoints between the specs, fp32: saved by the local spec and loaded by the
            TE spec, and the reverse; the logits of the loaded model against the saver's
  generate  greedy decoding with megatron-core's static KV cache against recomputing the
            prefix (recipes.generate.generate), in bf16 and FP8 (tensorwise); where a row's
            tokens first differ, the recompute path's logit gap between the two tokens
"""

import argparse
import json
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from model.config import ConfigError, ParallelConfig, load_model_config, model_config_to_dict  # noqa: E402
from model.parallel import destroy_distributed, init_distributed, process_group, te_available  # noqa: E402
from tests.conftest import TEST_VOCAB  # noqa: E402

STEPS, SEQ, MBS = 3, 128, 2   # 256 tokens a micro-batch: FP8 GEMMs want rows in multiples of 16
FP8 = ("fp8_delayed", "fp8_tensorwise", "fp8_blockwise")


def config(name: str):
    return load_model_config(name, vocab_size=TEST_VOCAB)


def job(name: str, hf_dir: str, work: Path) -> dict:
    """bench.train's worker job: model, weights, token batch, steps."""
    tokens = work / "tokens.pt"
    if not tokens.exists():
        g = torch.Generator().manual_seed(0)
        torch.save(torch.randint(0, TEST_VOCAB, (1, MBS, SEQ + 1), generator=g), tokens)
    return {"model": model_config_to_dict(config(name)), "hf_dir": hf_dir, "tokens": str(tokens), "seed": 1,
            "warmup": 0, "steps": STEPS, "recompute": "none", "threads": 1}


def check_spec(hf: dict, work: Path) -> dict:
    from model.builder import wgrad_fusion_available
    from recipes.engine import OptimConfig, build_engine

    cfg = config("tiny_moe")
    init_distributed(ParallelConfig(), seed=1, model=cfg)
    engine = build_engine(cfg, ParallelConfig(), OptimConfig(), dtype=torch.bfloat16)
    gpt, ddp = engine.chunks[0].module, engine.chunks[0].ddp_config
    layer = gpt.decoder.layers[0]
    c = gpt.config
    out = {"te_available": te_available(), "linear_qkv": type(layer.self_attention.linear_qkv).__name__,
           "core_attention": type(layer.self_attention.core_attention).__name__,
           "experts": type(layer.mlp.experts).__name__,
           "fusions": {k: getattr(c, k) for k in ("bias_activation_fusion", "apply_rope_fusion", "moe_permute_fusion",
                                                  "cross_entropy_loss_fusion", "bias_dropout_fusion")},
           "gradient_accumulation_fusion": c.gradient_accumulation_fusion,
           "wgrad_fusion_available": wgrad_fusion_available(),
           "overlap_grad_reduce": ddp.overlap_grad_reduce, "overlap_param_gather": ddp.overlap_param_gather,
           "no_sync_func": c.no_sync_func is not None}
    destroy_distributed()
    return out


def check_train(hf: dict, work: Path) -> dict:
    from bench.train import hf_worker, ours_worker

    out = {}
    for name, hf_dir in (("tiny", hf["dense"]), ("tiny_moe", hf["moe"])):
        j = job(name, hf_dir, work)
        out[name] = {"hf_fp32": hf_worker({**j, "hf_dtype": "fp32"})["losses"]}
        ours = ours_worker({**j, "precision": "bf16"})
        out[name].update(ours_bf16=ours["losses"], spec=ours["spec"], dtype=ours["dtype"])
    return out


def check_fp8(hf: dict, work: Path) -> dict:
    from bench.train import ours_worker

    j = job("tiny", hf["dense"], work)
    out = {"bf16": ours_worker({**j, "precision": "bf16"})["losses"]}
    for precision in FP8:
        try:
            r = ours_worker({**j, "precision": precision})
            out[precision] = {"losses": r["losses"], "fp8_recipe": r["fp8_recipe"]}
        except ConfigError as e:   # resolve_precision: this GPU / TE cannot run the recipe
            out[precision] = {"skipped": str(e)}
            destroy_distributed()
    return out


def check_specs(hf: dict, work: Path) -> dict:
    from model.builder import build_model
    from model.checkpoint import load_model, save_model
    from model.inference import forward_logits

    out = {}
    tokens = torch.randint(0, TEST_VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    for name in ("tiny", "tiny_moe"):
        cfg, par = config(name), ParallelConfig()
        init_distributed(par, seed=2, model=cfg)
        for saver, loader in (("local", "te"), ("te", "local")):
            source = build_model(cfg, par, dtype=torch.float32, use_te=saver == "te")
            ckpt = work / f"{name}_{saver}"
            save_model(source, ckpt, cfg)
            target = build_model(cfg, par, dtype=torch.float32, use_te=loader == "te")
            load_model(target, ckpt)
            want, got = forward_logits(source, tokens), forward_logits(target, tokens)
            out[f"{name}/{saver}_to_{loader}"] = {
                "rel_diff": ((got - want).abs().max() / want.abs().max()).item(),
                "top1_agreement": (got.argmax(-1) == want.argmax(-1)).float().mean().item(),
                "modules": [type(m.decoder.layers[0].self_attention.linear_qkv).__name__
                            for m in (source[0], target[0])]}
        destroy_distributed()
    return out


def check_generate(hf: dict, work: Path) -> dict:
    from model.builder import build_model
    from model.convert import fill_from_hf
    from model.hf_io import HFWeights
    from model.inference import forward_logits
    from recipes.generate import generate, kv_cache_usable
    from recipes.train import resolve_precision

    cfg, par = config("tiny"), ParallelConfig()
    g = torch.Generator().manual_seed(3)
    # 16 prompts of 16 tokens: every FP8 GEMM, prompt or one decoded token per row, has a
    # multiple of 16 rows
    prompts = torch.randint(0, TEST_VOCAB, (16, 16), generator=g).tolist()
    out = {}
    for precision in ("bf16", "fp8_tensorwise"):
        init_distributed(par, seed=3, model=cfg)
        _, fp8, _ = resolve_precision(precision, True, True)
        chunks = build_model(cfg, par, dtype=torch.bfloat16, perform_initialization=False, **fp8)
        fill_from_hf(chunks, HFWeights(hf["dense"]), cfg)
        cached = generate(chunks, prompts, 24, stop=[], use_cache=True)
        again = generate(chunks, prompts, 24, stop=[], use_cache=False)
        r = {"kv_cache_usable": kv_cache_usable(chunks), "rows": len(prompts), "identical_rows": 0,
             "first_differences": []}
        for i, (a, b) in enumerate(zip(cached, again)):
            if a.tokens == b.tokens:
                r["identical_rows"] += 1
                continue
            at = next(k for k, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y)
            logits = forward_logits(chunks, torch.tensor([prompts[i] + b.tokens[:at]]))[0, -1].float()
            gap = (logits[b.tokens[at]] - logits[a.tokens[at]]).item()
            r["first_differences"].append({"row": i, "at": at, "gap": gap, "logit_std": logits.std().item()})
        out[precision] = r
        destroy_distributed()
    return out


CHECKS = {"spec": check_spec, "train": check_train, "fp8": check_fp8, "specs": check_specs, "generate": check_generate}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dense", required=True)
    p.add_argument("--moe", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("checks", nargs="+", choices=sorted(CHECKS))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf = {"dense": args.dense, "moe": args.moe}
    results = {}
    # One process group for every check: each starts and ends its own megatron-core layout.
    with process_group():
        for name in args.checks:
            try:
                results[name] = CHECKS[name](hf, work)
            except Exception:
                results[name] = {"error": traceback.format_exc()[-4000:]}
                destroy_distributed()
            Path(args.out).write_text(json.dumps(results, indent=2))   # what is done so far, if a later check crashes


if __name__ == "__main__":
    main()
