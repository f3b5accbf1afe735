"""Layouts that need 4 processes (TP=2×PP=2, PP=2×EP=2). Slow on 2 cores: `make test-slow`."""

import math

import pytest

from tests.conftest import parity, read_json, torchrun

pytestmark = pytest.mark.slow


def test_parity_at_four_ranks(hf_dirs, converted, tmp_path):
    cases = {"dense_untied": ["tp2pp2"], "moe": ["tp2pp2", "pp2ep2"]}
    results = parity(hf_dirs, converted, cases, tmp_path / "r.json", nprocs=4)
    for variant, layouts in cases.items():
        assert sorted(results[variant]) == sorted(layouts), results
        for layout, m in results[variant].items():
            assert m["rel_diff"] <= 1e-4 and m["top1_agreement"] == 1.0, (variant, layout, m)


def test_training_step_at_four_ranks(tmp_path):
    """Same weights and global batch: the 4-rank layouts reproduce the TP=1 (DP=4) losses."""
    out = tmp_path / "r.json"
    torchrun("tests/workers/train.py", "--work", tmp_path, "--out", out,
             "--plan", "tiny=tp1,tp2pp2", "tiny_moe=tp1,pp2ep2", nprocs=4)
    r = read_json(out)
    for model, layout in (("tiny", "tp2pp2"), ("tiny_moe", "pp2ep2")):
        ref, got = r[f"{model}/tp1/plain"]["steps"], r[f"{model}/{layout}/distopt"]["steps"]
        assert math.isclose(got[0]["loss"], ref[0]["loss"], rel_tol=2e-6), (got, ref)
        assert got[1]["loss"] < got[0]["loss"]
    assert r["tiny/tp2pp2/plain"]["tp_drift"] == 0.0
