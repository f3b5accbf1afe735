"""Logits parity: our megatron-core Qwen3 vs HF transformers, at TP/PP/EP layouts on gloo.

Reference: transformers' Qwen3ForCausalLM / Qwen3MoeForCausalLM with random weights,
converted by `python -m model.convert` and run through `model.compare_hf.compare` (the
same code as `python -m model.compare_hf`) under torchrun with 2 CPU processes, every
variant and layout in one launch.

Gates. float32: max |Δlogit| <= 1e-4 * max |logit| and identical greedy tokens.
bfloat16: both sides compute in bf16 with different kernels and reduction orders, and
the error compounds over layers; the gate is max |Δlogit| <= 5e-2 * max |logit|, mean
per-token cosine >= 0.999 and >= 95% identical greedy tokens.
"""

import pytest

from tests.conftest import parity

FP32_GATE = 1e-4
BF16_GATE, BF16_COSINE, BF16_TOP1 = 5e-2, 0.999, 0.95

# cp2: context parallelism, each rank running its half of the sequence (model.cp_attention)
DENSE_LAYOUTS = ["tp1", "tp2", "pp2", "pp2vpp2", "cp2"]
MOE_LAYOUTS = ["tp1", "tp2", "pp2", "ep2", "tp2ep2", "cp2"]
CASES = {  # HF variant -> layouts
    "dense_tied": DENSE_LAYOUTS,
    "dense_untied": DENSE_LAYOUTS,
    "moe": MOE_LAYOUTS,
    "moe_nonorm": ["tp1", "ep2"],
    "dense_bf16": ["tp1", "tp2"],
    "moe_bf16": ["tp1", "ep2"],
    "dense_full_vocab": ["tp1", "tp2"],   # the others run at conftest.TEST_VOCAB
}


@pytest.fixture(scope="module")
def results(hf_dirs, converted, tmp_path_factory):
    """{variant: {layout: metrics}}, every case in one torchrun launch."""
    return parity(hf_dirs, converted, CASES, tmp_path_factory.mktemp("parity") / "parity.json")


@pytest.mark.parametrize("variant,layout", [(v, l) for v in ("dense_tied", "dense_untied", "moe", "moe_nonorm",
                                                                "dense_full_vocab") for l in CASES[v]])
def test_float32_logits_match_hf(results, variant, layout):
    m = results[variant][layout]
    assert m["rel_diff"] <= FP32_GATE, m
    assert m["top1_agreement"] == 1.0, m
    # Guard against a vacuous pass: the reference logits must not be all zeros.
    assert m["max_abs_logit"] > 1.0, m


@pytest.mark.parametrize("variant,layout", [(v, l) for v in ("dense_bf16", "moe_bf16") for l in CASES[v]])
def test_bfloat16_logits_match_hf(results, variant, layout):
    m = results[variant][layout]
    assert m["rel_diff"] <= BF16_GATE, m
    assert m["cosine"] >= BF16_COSINE, m
    assert m["top1_agreement"] >= BF16_TOP1, m


@pytest.mark.slow   # ~17 s each; the logits comparison itself is in the default suite
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--cp", "2"]])
def test_compare_hf_cli_reports_metrics(hf_dirs, converted, layout):
    """The user-facing command prints the metrics (here at TP=2 or CP=2, re-launching itself;
    at CP=2 on 18 tokens, which the ranks' share of the sequence pads to 20)."""
    from tests.conftest import python_module

    out = python_module("model.compare_hf", "--hf-dir", hf_dirs["moe"], "--ckpt", converted["moe"],
                        *layout, "--seq", "18").stdout
    lines = {line.split("  ")[0].strip(): line.split()[-1] for line in out.splitlines() if line.strip()}
    assert float(lines["max |Δ| / max |l|"]) <= FP32_GATE, out
    assert lines["top-1 agreement"] == "100.00%", out
