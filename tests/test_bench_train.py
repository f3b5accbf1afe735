"""The training benchmark's harness (bench/train.py, `make bench-train`).

One real run of the harness on `tiny` and `tiny_moe` (vocabulary 2,048, seq 32, 2 micro-
batches of 2 sequences, 2 warm-up + 2 timed steps; 1 weights + 4 worker processes): our
recipe's step and HF transformers' step start from the same safetensors and see the same
tokens, so their step-1 losses must agree to float rounding. The dense model's later
losses must agree too (both take the same Adam update with the same clipping and weight
decay); the MoE model's drift apart slightly because only our side trains the router
with the load-balancing loss (coefficient 1e-3). No timing is asserted.
"""

from __future__ import annotations

import math
import statistics

import pytest

from bench.train import BenchConfig, format_table, main, peak_tflops, run_benchmark
from model.config import load_model_config
from model.plan import flops_per_token, matmul_params

PEAK = 1e-3  # a made-up peak, to check the MFU arithmetic on CPU


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    b = BenchConfig(models=["tiny", "tiny_moe"], seq=32, mbs=2, microbatches=2, warmup=2, steps=2, vocab=2048,
                    peak_tflops=PEAK)
    return run_benchmark(b, work=tmp_path_factory.mktemp("bench_train"))


def rows(result, model):
    ours, hf = [r for r in result["rows"] if r["model"] == model]
    assert (ours["impl"], hf["impl"]) == ("ours", "HF")
    return ours, hf


@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
def test_initial_loss_matches_hf(result, model):
    ours, hf = rows(result, model)
    assert len(ours["losses"]) == len(hf["losses"]) == 4
    # Random weights over a 2,048-token vocabulary: the loss starts near ln(2048) = 7.62.
    assert 6.5 < ours["losses"][0] < 9
    assert math.isclose(ours["losses"][0], hf["losses"][0], rel_tol=1e-5), (ours["losses"], hf["losses"])


@pytest.mark.parametrize("model,rel_tol", [("tiny", 1e-5), ("tiny_moe", 1e-3)])
def test_later_steps_track_hf(result, model, rel_tol):
    ours, hf = rows(result, model)
    assert ours["losses"][-1] < ours["losses"][0]
    for a, b in zip(ours["losses"], hf["losses"]):
        assert math.isclose(a, b, rel_tol=rel_tol), (ours["losses"], hf["losses"])


@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
def test_derived_columns(result, model):
    cfg = load_model_config(model, vocab_size=2048)
    ours, hf = rows(result, model)
    for r in (ours, hf):
        assert r["tokens_per_step"] == 2 * 2 * 32
        assert len(r["step_times"]) == 2 and r["median_s"] == statistics.median(r["step_times"])
        assert math.isclose(r["tokens_per_s"], 128 / r["median_s"])
        assert r["flops_per_token"] == flops_per_token(cfg, 32)
        assert math.isclose(r["tflops"], r["flops_per_token"] * r["tokens_per_s"] / 1e12)
        assert math.isclose(r["mfu"], r["tflops"] / PEAK)
        assert r["peak_bytes"] > 0
    assert math.isclose(ours["ratio"], ours["tokens_per_s"] / hf["tokens_per_s"])
    assert hf["ratio"] is None
    assert ours["spec"] == "local" and hf["spec"] == "sdpa"


def test_report_has_one_row_per_side(result):
    table = format_table(result["rows"]).splitlines()
    assert len(table) == 1 + 4
    assert table[0].split()[:3] == ["model", "impl", "precision"]
    assert [line.split()[:2] for line in table[1:]] == [["tiny", "ours"], ["tiny", "HF"],
                                                        ["tiny_moe", "ours"], ["tiny_moe", "HF"]]
    assert table[1].rstrip().endswith("x") and not table[2].rstrip().endswith("x")


def test_table_rendering():
    row = {"model": "m", "impl": "ours", "precision": "bf16+fp8_delayed", "seq": 4096, "mbs": 1, "microbatches": 8,
           "median_s": 0.25, "tokens_per_s": 131072.0, "tflops": 512.3, "mfu": 0.5177, "peak_bytes": 3 * 2**30,
           "losses": [12.3456789], "ratio": 2.345}
    hf = dict(row, impl="HF", precision="bf16", mfu=None, ratio=None)
    header, ours_line, hf_line = format_table([row, hf]).splitlines()
    assert ours_line.split() == ["m", "ours", "bf16+fp8_delayed", "4096", "1x8", "250.0", "131072", "512", "51.8%",
                                 "3072", "12.34568", "2.35x"]
    assert hf_line.split() == ["m", "HF", "bf16", "4096", "1x8", "250.0", "131072", "512", "n/a", "3072",
                               "12.34568"]
    assert header.split() == ["model", "impl", "precision", "seq", "mbs", "x", "mb", "step", "ms", "tokens/s",
                              "TFLOP/s", "MFU", "peak", "MiB", "loss@1", "ours/HF"]


def test_flops_hand_checked():
    # tiny: h=128, 4 heads x 64 (q width 256), 2 KV heads x 64 (kv width 128), FFN 384, 4 layers,
    # vocabulary 151,936, seq 64.
    #   attention GEMMs per layer: 128*(256 + 2*128) + 256*128 = 65,536 + 32,768 = 98,304
    #   SwiGLU per layer: 3*128*384 = 147,456           -> layer 245,760, x4 = 983,040
    #   logit layer: 151,936*128 = 19,447,808           -> N_active = 20,430,848
    #   6*N = 122,585,088; attention 12*4*64*256 = 786,432
    tiny = load_model_config("tiny")
    assert matmul_params(tiny) == 20_430_848
    assert flops_per_token(tiny, 64) == 122_585_088 + 786_432
    # tiny_moe: 8 experts of FFN 64, top-2, same attention and vocabulary.
    #   MoE per layer: router 8*128 = 1,024 + 2 experts x 3*128*64 = 49,152 -> 50,176
    #   layer 98,304 + 50,176 = 148,480, x4 = 593,920; + logits 19,447,808 = 20,041,728
    moe = load_model_config("tiny_moe")
    assert matmul_params(moe) == 20_041_728
    assert flops_per_token(moe, 64) == 6 * 20_041_728 + 786_432
    # The attention term grows linearly with seq; the GEMM term does not depend on it.
    assert flops_per_token(moe, 128) - flops_per_token(moe, 64) == 786_432


def test_no_peak_on_cpu_without_override():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    assert peak_tflops(None, "bf16") is None
    assert peak_tflops(123.0, "bf16") == 123.0


@pytest.mark.parametrize("argv,message", [
    (["--seq", "0"], "--seq must be >= 1"),
    (["--recompute", "some"], "--recompute must be one of"),
    (["--model", "qwen3_nope"], "unknown model 'qwen3_nope'"),
    (["--precision", "fp16"], "--precision must be one of"),
])
def test_bad_arguments_fail_before_any_work(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
