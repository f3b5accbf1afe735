"""The vLLM rollout engine (recipes/rollout/vllm_engine.py) against the built-in engine, the
trainer and transformers, on vLLM's CPU build.

vLLM is the reference here: greedy tokens from the same converted checkpoint must match the
megatron-core model's, and after an optimizer step and an in-memory sync, vLLM's log-probs
of a fixed sequence must match the trainer's (fp32, ≤1e-4), while before the sync they must
not (so the sync is what moved them). Each test starts its engines in its own processes
(vLLM allows one per process); the worker's engine is reused across layouts through
`sync_weights` (tests/workers/vllm_rollout.py). The default suite runs the dense layouts, the
GRPO run and the refusals; the MoE layout, the generate CLI and the HF export are `slow`.
"""

import json

import pytest

from tests.conftest import built_once, make_hf_model, python_module, read_json, run, torchrun

pytest.importorskip("vllm", reason="vLLM's CPU build comes from requirements-vllm.txt (make setup)")


@pytest.fixture(scope="module")
def mini_vocab_checkpoints(tmp_path_factory):
    """A dense (tied) and a MoE random checkpoint at the mini tokenizer's 4,096 ids, head
    size 64 (vLLM's CPU attention takes 64 or 128), converted from HF by the CLI."""
    from data_pipeline.tokenizer import MINI_VOCAB

    def build(root):
        for name, model in (("dense", "tiny"), ("moe", "tiny_moe")):
            hf = make_hf_model(root / f"{name}_hf", model, vocab_size=MINI_VOCAB, seed=3)
            python_module("model.convert", "hf-to-mcore", "--hf-dir", hf, "--out", root / name)
        return root

    root = built_once(tmp_path_factory, "vllm_ckpts", build)
    return {"dense": root / "dense", "moe": root / "moe", "dense_hf": root / "dense_hf"}


# dense (TP=2, PP=2) in the default suite; MoE (EP=2) is `slow` (make test-slow)
@pytest.mark.parametrize("arch, layouts", [("dense", {"dense/tp2", "dense/pp2"}),
                                           pytest.param("moe", {"moe/ep2"}, marks=pytest.mark.slow)])
def test_vllm_matches_megatron_and_takes_synced_weights(arch, layouts, mini_vocab_checkpoints, mini_tokenizer_dir,
                                                         tmp_path):
    out = tmp_path / "r.json"
    torchrun("tests/workers/vllm_rollout.py", "--tokenizer", mini_tokenizer_dir, "--arch", arch,
             "--ckpt", mini_vocab_checkpoints[arch], "--out", out, timeout=600)
    r = read_json(out)
    assert set(r) == layouts
    for layout, m in r.items():
        for case in ("plain", "budget"):
            assert m[case]["same_tokens"] and m[case]["same_forced"], (layout, case, m[case])
            assert m[case]["logprob_diff"] < 1e-4, (layout, case, m[case])
        # the budget of 3 thinking tokens ran out in both think-opening prompts
        assert m["budget"]["budget_stopped"] == [True, True], (layout, m["budget"])
        u = m["update"]
        assert u["update_successful"]
        assert u["synced_diff"] <= 1e-4, (layout, u)
        assert u["stale_diff"] > 1e-2, (layout, u)   # the step moved them: the sync carried it


def test_grpo_with_vllm_rollouts_trains_and_logprobs_agree(tmp_path, mini_tokenizer_dir, arith_cold_start, arith_task):
    """Two processes, `rl.rollout.backend=vllm`: two GRPO steps, each on a new rollout, so the
    second rollout comes from vLLM after the first update's sync. `rl/logp_mismatch` is the
    mean |trainer log-prob - rollout log-prob| over the sampled tokens (recompute_old_logprobs)."""
    from tests.test_rl import rl_command

    data = arith_task / "rl_vllm.jsonl"
    rows = [json.loads(line) for line in (arith_task / "held.jsonl").read_text().splitlines()]
    data.write_text("".join(json.dumps({"messages": r["messages"], "reference": r["reference"]}) + "\n"
                            for r in rows[:16]))
    proc = run(rl_command(tmp_path, mini_tokenizer_dir, data, "run.name=vllm", "trainer.nprocs=2",
                          f"init_from={arith_cold_start}", "trainer.max_steps=2", "trainer.save_interval=2",
                          "trainer.global_batch_size=16", "trainer.micro_batch_size=8",
                          "rl.grpo.prompts_per_rollout=4", "rl.grpo.group_size=4", "rl.grpo.max_new_tokens=24",
                          "rl.grpo.dynamic_sampling=false", "rl.rollout.backend=vllm"), timeout=1200)
    from recipes.run_log import read_metrics

    steps = read_metrics(tmp_path / "runs" / "vllm" / "rl_reasoning")
    assert sorted(steps) == [1, 2], proc.stdout[-2000:]
    for step, m in steps.items():
        assert m["update_successful"] and m["rl/new_rollout"] == 1.0
        assert all(isinstance(v, (int, float)) and v == v for v in m.values() if not isinstance(v, str)), m
        assert m["rl/logp_mismatch"] <= 1e-4, (step, m["rl/logp_mismatch"])


@pytest.mark.slow
def test_generate_cli_vllm_equals_megatron(mini_vocab_checkpoints, mini_tokenizer_dir, tmp_path):
    """`python -m recipes.generate ... ids=true backend=vllm` and `backend=megatron` write the
    same greedy response ids for the same converted checkpoint."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                               for i, p in enumerate(["What is 2+3?", "Name a colour.", "Count to five, please."])))
    ids = {}
    for backend in ("megatron", "vllm"):
        out = tmp_path / f"{backend}.jsonl"
        python_module("recipes.generate", f"checkpoint={mini_vocab_checkpoints['dense']}",
                      f"tokenizer={mini_tokenizer_dir}", f"input={prompts}", f"output={out}", "ids=true",
                      "max_new_tokens=12", "progress=false", f"backend={backend}")
        ids[backend] = [json.loads(line)["response_ids"] for line in out.read_text().splitlines()]
    assert len(ids["vllm"]) == 3 and all(len(r) > 0 for r in ids["vllm"])
    assert ids["vllm"] == ids["megatron"]


def test_vllm_backend_refuses_a_head_size_its_cpu_attention_lacks(tmp_path, mini_tokenizer_dir):
    from model.config import load_model_config
    from recipes.rollout import launch_problem, settings_from

    cfg = load_model_config("tiny", kv_channels=24)
    problem = launch_problem(settings_from({"backend": "vllm"}), cfg)
    assert problem is not None and "head size of 64 or 128" in problem
    assert launch_problem(settings_from({"backend": "vllm"}), load_model_config("tiny")) is None
    assert "trainer.backend=deepspeed" in launch_problem(settings_from({"backend": "vllm"}), cfg, "deepspeed")
    from model.config import ConfigError

    with pytest.raises(ConfigError, match="rl.rollout.backend='sglang' is not one of megatron, vllm"):
        settings_from({"backend": "sglang"})


VLLM_CHAT = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    hf, prompts = sys.argv[1], json.loads(sys.argv[2])
    # the export as a user serves it: its own tokenizer and chat template, its generation_config
    # ignored only for greedy decoding
    llm = LLM(model=hf, dtype="float32", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=64 << 20,
              distributed_executor_backend="uni")
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                    SamplingParams(temperature=0, max_tokens=40, skip_special_tokens=False), use_tqdm=False)
    print(json.dumps([[list(o.prompt_token_ids), list(o.outputs[0].token_ids)] for o in outs]))
"""


@pytest.mark.slow
def test_stage_hf_export_loads_in_vllm_with_its_tokenizer(arith_cold_start, arith_task, mini_tokenizer_dir, tmp_path):
    """The cold-start stage's `hf/` (recipes/hf_export.py) served by vLLM as it is, prompted
    through its own chat template, continues held-out prompts as the megatron-core
    checkpoint does (`recipes.generate`, one rank)."""
    import sys

    held = [json.loads(line) for line in (arith_task / "held.jsonl").read_text().splitlines()[:3]]
    prompts = [r["messages"][0]["content"] for r in held]
    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    out = tmp_path / "megatron.jsonl"
    python_module("recipes.generate", f"checkpoint={arith_cold_start}", f"tokenizer={mini_tokenizer_dir}",
                  f"input={src}", f"output={out}", "max_new_tokens=40", "ids=true", "progress=false")
    ours = [json.loads(line) for line in out.read_text().splitlines()]
    proc = run([sys.executable, "-c", VLLM_CHAT, str(arith_cold_start / "hf"), json.dumps(prompts)], timeout=600)
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(r["finish"] == "stop" for r in ours)
    for row, (prompt_ids, response_ids) in zip(ours, theirs):
        assert prompt_ids == row["prompt_ids"]
        # vLLM stops at the model's end token and keeps it, as the checkpoint's generation does
        assert response_ids == row["response_ids"], (row["response"], response_ids)


@pytest.mark.slow
def test_eval_cli_vllm_equals_megatron(arith_cold_start, arith_task, mini_tokenizer_dir, tmp_path):
    """`python -m recipes.eval ... backend=vllm` answers the held-out problems as the built-in
    engine does: the same accuracy, format rate and lengths per mode, and the same
    thinking-budget curve (greedy, the forced stop phrase included)."""
    metrics = {}
    for backend in ("megatron", "vllm"):
        out = tmp_path / f"{backend}.json"
        python_module("recipes.eval", f"checkpoint={arith_cold_start}", f"tokenizer={mini_tokenizer_dir}",
                      f"problems={arith_task / 'held.jsonl'}", "samples=12", "max_new_tokens=40",
                      "thinking_budgets=[2,null]", f"output={out}", "progress=false", "wandb.mode=disabled",
                      f"backend={backend}")
        metrics[backend] = read_json(out)["metrics"]
    ours, theirs = metrics["megatron"], metrics["vllm"]
    assert ours["accuracy_think"] > 0   # the checkpoint solves some: the comparison means something
    for key in ("accuracy_think", "accuracy_no_think", "format_think", "format_no_think",
                "response_tokens_think", "response_tokens_no_think", "budget_curve"):
        assert theirs[key] == ours[key], (key, ours[key], theirs[key])
