"""GPU path: the Transformer Engine spec on one GPU (every test skips without CUDA).

`make test-gpu` runs them with the container's Python through tests/gpu_smoke.sh, which
prints a line per check and the totals; on one H100/H200 the whole file is meant to take
under 10 minutes (tiny models, few steps, the checks that need no launcher of their own
in one process: tests/workers/gpu_checks.py).

- the TE spec is what a CUDA machine builds (no silent fallback), with the GPU path's
  fusions, gradient-accumulation fusion (when apex's kernel imports) and DDP overlap;
- an HF checkpoint converted by the CLI, in the TE spec, matches HF transformers (fp32 and bf16);
- `tiny` and `tiny_moe`: 3 training steps in bf16 against HF in fp32 (step-1 loss within
  1%); FP8 delayed, tensorwise and blockwise within 3% of bf16 (blockwise skips, with TE's
  reason, where the GPU or TE lacks it);
- checkpoints saved by the local spec load into the TE spec and back, same logits;
- greedy decoding with the KV cache equals recomputing the prefix, in bf16 and FP8, up to
  near-ties of the arithmetic;
- THD-packed rows equal each document alone (tests/workers/packed.py);
- SIGKILL then resume on TE is bit-exact (conftest.sigkill_resume, as tests/test_resume.py
  on CPU);
- `bench.train` rows for qwen3_0_6b at seq 4096 in bf16 and FP8, with MFU.
"""

import json
import sys

import pytest
import torch

from tests.conftest import parity, python_module, read_json, run, sigkill_resume, torchrun

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Transformer Engine")]


def test_te_spec_is_selected(monkeypatch):
    from model.parallel import te_available

    assert te_available(), "CUDA is present but the local spec was chosen"   # a broken TE raises instead
    monkeypatch.setenv("QWEN3_LOCAL_SPEC", "1")
    assert not te_available()   # the local spec on a GPU only when asked for


@pytest.fixture(scope="module")
def gpu(hf_dirs, tmp_path_factory) -> dict:
    """The worker's results; a crash that killed it leaves those of the checks before it."""
    work = tmp_path_factory.mktemp("gpu_checks")
    proc = run([sys.executable, "tests/workers/gpu_checks.py", "--dense", hf_dirs["dense_tied"], "--moe",
                hf_dirs["moe"], "--work", work, "--out", work / "r.json", "spec", "train", "fp8", "specs", "generate"],
               timeout=900, check=False)
    done = read_json(work / "r.json") if (work / "r.json").exists() else {}
    return {**done, "exit": f"exit code {proc.returncode}: {(proc.stdout + proc.stderr)[-4000:]}"}


def result(gpu: dict, check: str) -> dict:
    assert check in gpu, f"the worker ended before this check; {gpu['exit']}"
    r = gpu[check]
    assert "error" not in r, r.get("error")
    return r


def test_te_modules_and_performance_settings(gpu):
    r = result(gpu, "spec")
    print(json.dumps(r))
    assert r["te_available"] and r["linear_qkv"].startswith("TE") and r["core_attention"].startswith("TE"), r
    assert r["experts"] == "TEGroupedMLP", r
    assert all(r["fusions"].values()), r
    assert r["gradient_accumulation_fusion"] == r["wgrad_fusion_available"], r   # on whenever apex's kernel imports
    assert r["overlap_grad_reduce"] and r["overlap_param_gather"] and r["no_sync_func"], r


@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
def test_bf16_training_matches_hf_fp32(gpu, model):
    r = result(gpu, "train")[model]
    print(f"{model}: ours bf16 {r['ours_bf16']}, HF fp32 {r['hf_fp32']}")
    assert r["spec"] == "te" and r["dtype"] == "bf16", r
    ours, hf = r["ours_bf16"], r["hf_fp32"]
    assert abs(ours[0] - hf[0]) <= 0.01 * hf[0], r
    assert ours[-1] < ours[0] and hf[-1] < hf[0], r   # both train


@pytest.mark.parametrize("precision", ["fp8_delayed", "fp8_tensorwise", "fp8_blockwise"])
def test_fp8_training_tracks_bf16(gpu, precision):
    r = result(gpu, "fp8")
    if "skipped" in r[precision]:
        pytest.skip(r[precision]["skipped"])
    fp8, bf16 = r[precision]["losses"], r["bf16"]
    print(f"tiny {precision}: {fp8}, bf16: {bf16}")
    assert r[precision]["fp8_recipe"] == precision.removeprefix("fp8_")
    assert all(abs(a - b) <= 0.03 * b for a, b in zip(fp8, bf16)), r


@pytest.mark.parametrize("case", [f"{m}/{d}" for m in ("tiny", "tiny_moe") for d in ("local_to_te", "te_to_local")])
def test_checkpoints_move_between_local_and_te_specs(gpu, case):
    r = result(gpu, "specs")[case]
    print(f"{case}: {r}")
    assert r["modules"][0] != r["modules"][1], r   # one spec saved, the other loaded
    assert r["rel_diff"] <= 1e-3 and r["top1_agreement"] >= 0.95, r   # fp32, as the TE-vs-HF gate


# A row's greedy tokens must be identical on both paths, or first differ where the two
# tokens' logits are a near-tie of the arithmetic (bf16, or FP8's coarser quantization of
# activations that the cache quantizes one position at a time).
NEAR_TIE = {"bf16": 0.05, "fp8_tensorwise": 0.25}   # x the logits' standard deviation there


@pytest.mark.parametrize("precision", ["bf16", "fp8_tensorwise"])
def test_kv_cache_generation_matches_recompute(gpu, precision):
    r = result(gpu, "generate")[precision]
    print(f"{precision}: {r['identical_rows']}/{r['rows']} rows identical, first differences {r['first_differences']}")
    assert r["kv_cache_usable"], r
    for d in r["first_differences"]:
        assert abs(d["gap"]) <= NEAR_TIE[precision] * d["logit_std"], r
    if precision == "bf16":
        assert r["identical_rows"] >= r["rows"] // 2, r


@pytest.fixture(scope="module")
def packed_te(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("packed") / "r.json"
    torchrun("tests/workers/packed.py", "--out", out, "--plan", "tiny:tp1", "tiny_moe:tp1", "--dtype", "bf16",
             nprocs=1)
    return read_json(out)


@pytest.mark.parametrize("case", ["tiny/tp1", "tiny_moe/tp1"])
def test_thd_packed_rows_equal_each_document_alone(packed_te, case):
    r = packed_te[case]
    print(f"{case}: {r}")
    gate = 2e-2 * max(1.0, r["logit_scale"])   # bf16: THD and single-document kernels round differently
    assert r["logit_diff"] <= gate and r["loss_diff"] <= 5e-2, r
    assert r["unmasked_diff"] > gate, r   # without the document boundaries it differs: the check can fail


def test_sigkill_resume_is_bit_exact_on_te(tmp_path, pretrain_data, monkeypatch):
    from megatron.core import dist_checkpointing

    from recipes.checkpointing import latest_checkpoint

    # deterministic TE attention backward, so that two runs can agree bit for bit at all
    monkeypatch.setenv("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
    r = sigkill_resume(tmp_path, pretrain_data, "tiny", "trainer.save_interval=2", "trainer.micro_batch_size=2")
    assert "resumed pretrain_s1 from" in r["stderr"]
    got, expected = r["got"], r["expected"]
    print(f"resumed from step {r['resumed_from']}: {got}")
    assert sorted(got) == sorted(expected)
    after = [s for s in got if s > r["resumed_from"]]
    assert after and {s: got[s] for s in after} == {s: expected[s] for s in after}   # bit for bit
    # saved in the GPU recipe's format (model.builder.TRAINING_DEFAULTS)
    common = dist_checkpointing.load_common_state_dict(str(latest_checkpoint(r["stage"])))
    assert common["train_state"]["optimizer"]["format"] == "dp_reshardable"


@pytest.mark.parametrize("precision", ["bf16", "fp8_tensorwise"])
def test_bench_train_qwen3_0_6b_at_4096(tmp_path, precision):
    out = tmp_path / "bench.json"
    proc = python_module("bench.train", "--model", "qwen3_0_6b", "--seq", 4096, "--mbs", 1, "--microbatches", 1,
                         "--precision", precision, "--warmup", 1, "--steps", 2, "--json", out, timeout=900)
    print(proc.stdout)   # the rows, for docs/PERFORMANCE.md
    ours, hf = read_json(out)["rows"]
    assert ours["impl"] == "ours" and ours["spec"] == "te" and hf["impl"] == "HF"
    assert ours["mfu"] is not None and 0 < ours["mfu"] < 1, ours
    assert abs(ours["losses"][0] - hf["losses"][0]) <= 0.01 * hf["losses"][0], (ours["losses"], hf["losses"])


@pytest.fixture(scope="module")
def te_parity(hf_dirs, converted, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("parity") / "r.json"
    return parity(hf_dirs, converted, {v: ["tp1"] for v in ("dense_untied", "moe", "dense_bf16", "moe_bf16")}, out,
                  nprocs=1)


@pytest.mark.parametrize("variant,gate", [("dense_untied", 1e-3), ("moe", 1e-3), ("dense_bf16", 5e-2),
                                          ("moe_bf16", 5e-2)])
def test_te_logits_match_hf(te_parity, variant, gate):
    m = te_parity[variant]["tp1"]
    assert m["rel_diff"] <= gate, m
    assert m["top1_agreement"] >= 0.95, m
