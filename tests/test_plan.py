"""The memory and layout planner (model/plan.py).

* Arithmetic on hand-checked cases: parameter bytes of a dense model under TP x PP,
  expert sharding under EP, optimizer sharding under DP (distributed optimizer) and
  expert DP, activations of a TE-spec layer, pipeline micro-batches in flight, step time.
* Parameter totals and active counts equal those read off the built megatron-core models
  (`python -m model.params`, an independent count).
* Layout rejection goes through model.parallel.layout_problems: the same reasons, and
  NVIDIA's published layouts survive.
* Estimate vs measurement: `python -m bench.memory` takes a real training step on CPU and
  measures parameters, fp32 main grads, optimizer state and the tensors autograd saves
  in the forward; the planner's `spec=local` estimate must be within the stated error.
"""

from __future__ import annotations

import json
import math

import pytest

from model.config import ParallelConfig, load_model_config, load_parallel_config
from model.parallel import layout_problems, minimum_world_size
from model.plan import (GIB, Setting, activation_bytes, dp_comm_seconds, estimate, flops_per_token, layer_terms, main,
                        microbatches_in_flight, optimizer_save_bytes, param_counts, param_state_bytes, parse_size, plan,
                        rank_params, terms_bytes)
from tests.conftest import python_module

# --------------------------------------------------------------- hand-checked arithmetic

# qwen3_8b: h=4096, 32 heads x 128 (q width 4096), 8 KV heads x 128 (kv width 1024),
# FFN 12,288, 36 layers, vocabulary 151,936, untied.
# Per layer at TP=4: attention GEMMs (4096*(4096 + 2*1024) + 4096*4096) / 4 = 10,485,760,
# norms 2*4096 + 2*128 = 8,448 (replicated), SwiGLU 3*4096*12,288 / 4 = 37,748,736;
# together 48,242,944. PP=2 puts 18 layers on each rank: 868,372,992.
# Embedding / output layer at TP=4: 151,936*4096 / 4 = 155,582,464 each.
LAYERS_8B = 18 * (10_485_760 + 8_448 + 37_748_736)
VOCAB_8B = 151_936 * 4096 // 4


def test_dense_params_under_tp_and_pp():
    m = load_model_config("qwen3_8b")
    par = ParallelConfig(tp=4, pp=2, sp=True)
    first, last = rank_params(m, par, first=True, last=False), rank_params(m, par, first=False, last=True)
    assert LAYERS_8B == 868_372_992
    assert first.total == LAYERS_8B + VOCAB_8B
    assert last.total == LAYERS_8B + 4096 + VOCAB_8B  # + final norm + output layer
    assert first.expert == last.expert == 0


def test_param_grad_optimizer_bytes_and_dp_sharding():
    m = load_model_config("qwen3_8b")
    par = ParallelConfig(tp=4, pp=2, sp=True)
    p = LAYERS_8B + VOCAB_8B
    # 64 GPUs at TP=4 x PP=2: DP = 8. bf16 weights, fp32 main grads, fp32 master + Adam m, v.
    assert param_state_bytes(m, par, 64, "bf16", distopt=True, first=True, last=False) == (2 * p, 4 * p, 12 * p // 8)
    assert param_state_bytes(m, par, 64, "bf16", distopt=False, first=True, last=False) == (2 * p, 4 * p, 12 * p)
    # fp32 weights: no master copy, so Adam's m and v only.
    assert param_state_bytes(m, par, 64, "fp32", distopt=True, first=True, last=False) == (4 * p, 4 * p, 8 * p // 8)
    # CP shares the optimizer shards with DP: 64 GPUs at TP=4 x PP=2 x CP=2 -> DP*CP = 8.
    cp = ParallelConfig(tp=4, pp=2, cp=2, sp=True)
    assert param_state_bytes(m, cp, 64, "bf16", distopt=True, first=True, last=False)[2] == 12 * p // 8


def test_fp8_keeps_a_cast_copy_of_each_gemm_weight():
    m = load_model_config("qwen3_8b")
    par = ParallelConfig(tp=4, pp=2, sp=True)
    gemm = 18 * (10_485_760 + 37_748_736)  # attention + MLP GEMM weights; not norms, embedding or output
    bf16 = param_state_bytes(m, par, 64, "bf16", True, first=True, last=False)
    fp8 = param_state_bytes(m, par, 64, "fp8", True, first=True, last=False)
    assert fp8[0] - bf16[0] == 2 * gemm and fp8[1:] == bf16[1:]


def test_moe_params_and_expert_optimizer_sharding():
    # qwen3_30b_a3b: h=2048, 32 heads x 128 (q 4096), 4 KV heads (kv 512), 128 experts of FFN 768,
    # 48 layers, untied; TP=2, EP=8, ETP=1 on 16 GPUs -> DP = 8, expert DP = 16/(1*8) = 2.
    m = load_model_config("qwen3_30b_a3b")
    par = ParallelConfig(tp=2, ep=8, etp=1, sp=True)
    r = rank_params(m, par)
    experts = 48 * (128 // 8) * 3 * 2048 * 768
    # attention (2048*(4096 + 2*512) + 4096*2048) / 2 = 9,437,184; norms 2*2048 + 2*128 = 4,352;
    # router 128*2048 = 262,144 (replicated): 9,703,680 per layer.
    dense = 48 * 9_703_680 + 2 * (151_936 * 2048 // 2) + 2048
    assert (r.expert, r.dense) == (experts, dense) == (3_623_878_656, 776_943_616)
    _, _, optimizer = param_state_bytes(m, par, 16, "bf16", distopt=True)
    assert optimizer == 12 * dense // 8 + 12 * experts // 2


def test_tied_output_layer_is_a_second_copy_only_across_pipeline_ranks():
    m = load_model_config("qwen3_1_7b")  # tied
    one = rank_params(m, ParallelConfig())
    assert one.total == param_counts(m)["total"]
    first = rank_params(m, ParallelConfig(pp=2), first=True, last=False)
    last = rank_params(m, ParallelConfig(pp=2), first=False, last=True)
    vocab = 151_936 * 2048
    assert first.total + last.total == one.total + vocab


def test_te_layer_activations_hand_checked():
    # qwen3_1_7b at seq 4096, mbs 1, one GPU, bf16: h=2048, q=2048 (16x128), kv=1024 (8x128), FFN 6144.
    # Bytes per token, term by term as in model.plan.ACTIVATION_TERMS["te"] (bf16 = 2, fp32 = 4):
    #   attention: norm input h, 1/rms (fp32), norm output h, QKV output q + 2kv, q regrouped (a copy:
    #   8 KV groups on the rank), QK-norm 1/rms per head (fp32), q and k after norm + RoPE, flash
    #   output q, flash statistics per head (fp32);
    #   MLP: norm input, 1/rms, norm output, fc1 output 2f, SwiGLU output f;
    #   logits: final norm input, 1/rms, output-GEMM input, fp32 softmax over the vocabulary, target
    #   ids (int64) and their in-slice mask (bool); inputs: token ids (int64).
    attention = (2048 * 2 + 4 + 2048 * 2 + (2048 + 2 * 1024) * 2 + 2048 * 2 + (16 + 8) * 4 + (2048 + 1024) * 2
                 + 2048 * 2 + 16 * 4)
    mlp = 2048 * 2 + 4 + 2048 * 2 + 2 * 6144 * 2 + 6144 * 2
    logits = 2048 * 2 + 4 + 2048 * 2 + 151_936 * 4 + 8 + 1
    inputs = 8
    assert (attention, mlp) == (30_884, 45_060)
    m = load_model_config("qwen3_1_7b")
    act = activation_bytes(m, ParallelConfig(), 4096, 1, 1, "bf16")
    assert act.saved == 4096 * (28 * (attention + mlp) + inputs + logits) == 11_232_825_344
    assert act.transient == 4096 * 151_936 * 4  # fp32 logit gradient
    # Sequence parallelism at TP=2 halves every per-token term but the token and target ids.
    sp = activation_bytes(m, ParallelConfig(tp=2, sp=True), 4096, 1, 1, "bf16")
    assert sp.saved == (act.saved - 4096 * (8 + 9)) // 2 + 4096 * (8 + 9)
    # Full recompute keeps each layer's bf16 input and the RoPE table, plus the logits' softmax.
    full = activation_bytes(m, ParallelConfig(), 4096, 1, 1, "bf16", recompute="full")
    assert full.saved == 28 * 4096 * 2048 * 2 + 4096 * 128 * 2 + 4096 * (inputs + logits)
    assert full.transient == max(4096 * (attention + mlp), 4096 * 151_936 * 4)


def test_pipeline_microbatches_in_flight():
    # 1F1B: the first of 4 ranks holds 4 micro-batches (when there are at least 4), the last 1.
    assert microbatches_in_flight(ParallelConfig(pp=4), 8, 0) == 4
    assert microbatches_in_flight(ParallelConfig(pp=4), 2, 0) == 2
    assert microbatches_in_flight(ParallelConfig(pp=4), 8, 3) == 1
    # Interleaved, pp=4 x vpp=2: rank 0 warms up 2*(4-1) + (2-1)*4 + 1 = 11 chunks of half its layers.
    assert microbatches_in_flight(ParallelConfig(pp=4, vpp=2), 8, 0) == 5.5
    m = load_model_config("qwen3_1_7b")  # 28 layers -> 7 per rank at PP=4
    per_layer = terms_bytes(layer_terms(m, "te", "none"), m, ParallelConfig(), 4096, 1, "bf16")
    first = activation_bytes(m, ParallelConfig(pp=4), 4096, 1, 8, "bf16", first=True, last=False)
    assert first.saved == (7 * per_layer + 4096 * 8) * 4  # + the token ids of each micro-batch


def test_step_time_counts_bubble_and_recompute():
    m = load_model_config("qwen3_1_7b")
    s = Setting(model=m, gpus=8, gpu_mem=80 * GIB, seq=4096, gbs=32, mfu=0.5)
    flops = 32 * 4096 * flops_per_token(m, 4096)
    peak = 8 * 989.5e12 * 0.5
    # PP=2 on 8 GPUs: DP=4, 32 / (1*4) = 8 micro-batches, bubble (2-1)/8.
    row = estimate(s, ParallelConfig(pp=2), distopt=True, recompute="none")
    assert math.isclose(row.step_s, flops / peak * (1 + 1 / 8))
    assert math.isclose(row.mfu, 0.5 / (1 + 1 / 8))
    # Full recompute runs every layer's forward once more: + 2*N_layers + the attention forward.
    full = estimate(s, ParallelConfig(), distopt=True, recompute="full")
    n_layers = 28 * (2048 * (2048 + 2 * 1024) + 2048 * 2048 + 3 * 2048 * 6144)
    extra = 32 * 4096 * (2 * n_layers + 4 * 28 * 4096 * 2048)
    assert math.isclose(full.step_s, (flops + extra) / peak)


# qwen3_8b at TP=4 on one pipeline rank: 36 layers, embedding and output layer, final norm.
RANK_8B_TP4 = 36 * (10_485_760 + 8_448 + 37_748_736) + 2 * VOCAB_8B + 4096


def test_optimizer_save_memory_by_checkpoint_format():
    m, par = load_model_config("qwen3_8b"), ParallelConfig(tp=4, sp=True)
    assert rank_params(m, par).total == RANK_8B_TP4 == 2_047_915_008
    # fully_reshardable: every rank gathers fp32 master weights + Adam m, v of its whole shard into
    # host memory (the ~24 GB per GPU of 8B at TP=4), one fp32 bucket gather at a time on the GPU
    # (DP=16: 4e7-parameter buckets under overlap, the whole buffer without), + this rank's 1/16.
    assert optimizer_save_bytes(m, par, 64, True, "fully_reshardable") == (4 * 40_000_000 * 17 // 16, 12 * RANK_8B_TP4)
    assert 12 * RANK_8B_TP4 / 1e9 == pytest.approx(24.6, abs=0.05)
    assert optimizer_save_bytes(m, par, 64, True, "fully_reshardable", overlap=False)[0] == 4 * RANK_8B_TP4 * 17 // 16
    # dp_reshardable (the GPU recipe's) and the plain optimizer write what each rank holds
    assert optimizer_save_bytes(m, par, 64, True, "dp_reshardable") == (0, 0)
    assert optimizer_save_bytes(m, par, 64, False, "fully_reshardable") == (0, 0)
    # A save runs between steps: the peak is the larger of activations and the save's buffers.
    s = Setting(model=m, gpus=64, gpu_mem=80 * GIB, seq=128, gbs=16, max_tp=4, optim_ckpt="fully_reshardable",
                overlap=False)
    row = estimate(s, par, distopt=True, recompute="full")
    mem = row.memory
    assert mem.save == 4 * RANK_8B_TP4 * 17 // 16 > mem.activations.total and mem.save_host == 12 * RANK_8B_TP4
    assert mem.total == mem.params + mem.grads + mem.optimizer + mem.save
    quiet = estimate(Setting(model=m, gpus=64, gpu_mem=80 * GIB, seq=128, gbs=16, max_tp=4), par, True, "full")
    assert quiet.memory.total == mem.total - mem.save + mem.activations.total


def test_overlap_hides_data_parallel_communication():
    m, par = load_model_config("qwen3_8b"), ParallelConfig(tp=4, sp=True)
    # DP = 64/4 = 16 over the network (64 GPUs are 8 nodes): a ring moves 15/16 of the buffer.
    # Distributed optimizer: fp32 gradients reduce-scattered, bf16 parameters all-gathered.
    bw = 0.8 * 50e9
    reduce, gather = dp_comm_seconds(m, par, 64, "bf16", True, bw)
    assert reduce == pytest.approx(4 * RANK_8B_TP4 * 15 / 16 / bw) and gather == pytest.approx(reduce / 2)
    assert dp_comm_seconds(m, par, 64, "bf16", False, bw) == (pytest.approx(2 * reduce), 0.0)   # all-reduce
    # One micro-batch (gbs 16 = mbs 1 x DP 16): its backward (2/3 of the compute) hides
    # part of the reduction, its forward (1/3) part of the gather; without overlap nothing is hidden.
    compute = 16 * 4096 * flops_per_token(m, 4096) / (64 * 989.5e12 * 0.4)
    on = estimate(Setting(model=m, gpus=64, gpu_mem=80 * GIB, seq=4096, gbs=16), par, True, "none")
    off = estimate(Setting(model=m, gpus=64, gpu_mem=80 * GIB, seq=4096, gbs=16, overlap=False), par, True, "none")
    assert off.dp_comm_s == pytest.approx(reduce + gather) and off.step_s == pytest.approx(compute + reduce + gather)
    assert on.dp_comm_s == pytest.approx(reduce - 2 * compute / 3 + gather - compute / 3) and on.dp_comm_s > 0
    assert on.step_s == pytest.approx(compute + on.dp_comm_s) and on.mfu > off.mfu
    # 16 micro-batches: the step is 16x longer, but only the last micro-batch's backward and the
    # first one's forward overlap the traffic, so the same part of it stays exposed.
    many = estimate(Setting(model=m, gpus=64, gpu_mem=80 * GIB, seq=4096, gbs=256), par, True, "none")
    assert many.dp_comm_s == pytest.approx(reduce - 2 * compute / 3 + gather - compute / 3)
    # Inside one node (NVLink) the same model's traffic hides entirely behind one micro-batch.
    node = estimate(Setting(model=m, gpus=8, gpu_mem=80 * GIB, seq=4096, gbs=2), par, True, "none")
    assert node.dp_comm_s == 0.0


# ------------------------------------------------------------- against the built models


@pytest.fixture(scope="module")
def built_counts() -> dict:
    names = ["tiny", "tiny_moe", "qwen3_0_6b", "qwen3_8b", "qwen3_30b_a3b"]
    args = [a for n in names for a in ("--model", n)]
    out = python_module("model.params", "--json", *args).stdout
    return {row["model"]: row for row in json.loads(out)}


@pytest.mark.parametrize("name", ["tiny", "tiny_moe", "qwen3_0_6b", "qwen3_8b", "qwen3_30b_a3b"])
def test_param_arithmetic_matches_built_model(built_counts, name):
    ours = param_counts(load_model_config(name))
    assert ours["total"] == built_counts[name]["total"]
    assert ours["active"] == built_counts[name]["active"]


# -------------------------------------------------------------------------- rejection


def small_setting(**kw) -> Setting:
    return Setting(**{"model": load_model_config("qwen3_235b_a22b"), "gpus": 256, "gpu_mem": 80 * GIB,
                      "seq": 4096, "gbs": 1024, **kw})


@pytest.fixture(scope="module")
def plan_235b():
    return plan(small_setting())


def test_rejections_are_layout_problems(plan_235b):
    rows, rejected = plan_235b
    s = small_setting()
    assert rows and rejected
    for par, problems in rejected:
        expected = layout_problems(s.model, par, s.gpus, s.seq)
        assert problems == (expected or [f"gbs={s.gbs} is not divisible by mbs*dp=1*{s.gpus // (par.tp * par.pp * par.cp)}"])
    for row in rows:
        assert layout_problems(s.model, row.parallel, s.gpus, s.seq) == []
    # 94 layers do not split over PP=16 unless embedding and loss count as layers (96 = 16 x 6).
    plain = ParallelConfig(tp=4, pp=16, cp=2, ep=8, etp=1, sp=True)
    reasons = {str(par): p for par, p in rejected}
    assert reasons[str(plain)] == ["layers=94 is not divisible by pp*vpp=16*1=16"]


def test_published_layout_is_planned_and_fits(plan_235b):
    rows, _ = plan_235b
    nvidia = load_parallel_config("qwen3_235b_a22b")
    mine = [r for r in rows if r.parallel == nvidia]
    assert len(mine) == 6  # x distributed optimizer on/off x recompute none/selective/full
    assert any(r.fits for r in mine if r.distopt)


def test_rows_sorted_fitting_first_then_faster(plan_235b):
    rows, _ = plan_235b
    fits = [r.fits for r in rows]
    assert fits == sorted(fits, reverse=True)
    fitting = [round(r.step_s, 6) for r in rows if r.fits]   # plan's key: equal to the microsecond ties
    assert fitting == sorted(fitting)


def test_nothing_fits_on_too_little_memory():
    rows, _ = plan(Setting(model=load_model_config("qwen3_8b"), gpus=1, gpu_mem=16 * GIB, seq=4096, gbs=8))
    assert rows and not any(r.fits for r in rows)
    rows, _ = plan(Setting(model=load_model_config("qwen3_0_6b"), gpus=1, gpu_mem=80 * GIB, seq=4096, gbs=8))
    assert all(r.fits for r in rows)


@pytest.mark.parametrize("name", ["qwen3_1_7b", "qwen3_30b_a3b"])
def test_default_layouts_are_valid_in_the_planner(name):
    m, par = load_model_config(name), load_parallel_config(name)
    world = minimum_world_size(par) * 2
    rows, _ = plan(Setting(model=m, gpus=world, gpu_mem=80 * GIB, seq=4096, gbs=64))
    assert any(r.parallel == par for r in rows)


# ------------------------------------------------------------------------------- CLI


def test_cli_prints_table(capsys):
    assert main(["model=qwen3_1_7b", "gpus=8", "gpu_mem=80GiB", "seq=4096", "gbs=64", "top=3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("qwen3_1_7b on 8 x h100 (80.0 GiB")
    header = out[3].split()
    assert header[:3] == ["tp", "pp", "vpp"] and header[-1] == "fits"
    assert len(out) >= 7 and all(line.split()[-1] == "yes" for line in out[4:7])


@pytest.mark.parametrize("argv,message", [
    (["model=qwen3_8b", "gpus=8"], "missing seq"),
    (["model=nope", "gpus=8", "seq=4096"], "unknown model 'nope'"),
    (["model=qwen3_8b", "gpus=8", "seq=4096", "gpu_mem=80"], "cannot read size '80'"),
    (["model=qwen3_8b", "gpus=0", "seq=4096"], "gpus=0 must be >= 1"),
    (["model=qwen3_8b", "gpus=8", "seq=4096", "precision=fp16"], "precision='fp16'"),
    (["model=qwen3_8b", "gpus=8", "seq=4096", "colour=blue"], "argument 'colour=blue'"),
    (["model=qwen3_8b", "gpus=8", "seq=4096", "overlap=yes"], "overlap='yes' must be on or off"),
    (["model=qwen3_8b", "gpus=8", "seq=4096", "optim_ckpt=zero"], "optim_ckpt='zero'"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_cli_help_prints_usage(flag, capsys):
    assert main([flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m model.plan model=") and "show=fit|all|invalid]" in out


def test_parse_size():
    assert parse_size("80GiB") == 80 * 2**30
    assert parse_size("141GB") == 141 * 10**9
    assert parse_size("0.5 TiB") == 2**39


# ----------------------------------------------------------------- against measurement

# Stated error of the estimate against a real CPU training step (docs/PERFORMANCE.md).
STATE_TOLERANCE = 0.005          # parameters, fp32 main grads, optimizer state
ACTIVATION_TOLERANCE = {"fp32": 0.01, "bf16": 0.10}


def check_measured(results: list[dict]) -> None:
    assert results
    for r in results:
        precision = r["case"].split()[1]
        for key in ("params", "grads", "optimizer", "activations"):
            est, got = r["estimated"][key], r["measured"][key]
            tol = ACTIVATION_TOLERANCE[precision] if key == "activations" else STATE_TOLERANCE
            assert got > 0 and abs(est - got) <= tol * got, (r["case"], key, est, got)


def test_estimate_matches_measured_memory_on_cpu(tmp_path):
    out = tmp_path / "memory.json"
    python_module("bench.memory", "--vocab", 4096, "--json", out)
    check_measured(json.loads(out.read_text()))


@pytest.mark.slow
def test_estimate_matches_measured_memory_on_two_ranks(tmp_path):
    out = tmp_path / "memory.json"
    python_module("bench.memory", "--cases", "two_ranks", "--vocab", 4096, "--json", out)
    results = json.loads(out.read_text())
    assert {r["world"] for r in results} == {2}
    check_measured(results)
