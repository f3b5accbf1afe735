"""The rollout benchmark (bench/rollout.py, `make bench-rollout`) runs and reports.

One real run at tiny settings (tiny, 2 prompts of 8 tokens, 8 new tokens, 1 repeat; one
process, about 10 s of CPU): the table has a greedy and a sampled row per path with the
numbers the harness derives, and the KV cache's greedy tokens equal recomputation's. No
timing is asserted. The layout checks of rollouts (TP, PP, EP) live with the generation
tests in test_sft_data.py.
"""

from __future__ import annotations

import json

from tests.conftest import python_module


def test_bench_rollout_prints_both_paths_and_identical_tokens(tmp_path):
    out = tmp_path / "rollout.json"
    proc = python_module("bench.rollout", "--batch", 2, "--prompt-len", 8, "--new-tokens", 8, "--repeats", 1,
                         "--json", out)
    lines = proc.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("decoding"))
    assert lines[head].split()[:2] == ["decoding", "path"]
    rows = [line.split() for line in lines[head + 1:head + 5]]
    assert [r[:3] for r in rows] == [["greedy", "KV", "cache"], ["greedy", "recompute", "2x8"],
                                     ["sampled", "KV", "cache"], ["sampled", "recompute", "2x8"]]
    assert rows[0][-1].endswith("x") and rows[1][-1] != "x"   # the speed-up sits on the cache row
    assert "greedy tokens identical (KV cache vs recompute): True" in proc.stdout

    result = json.loads(out.read_text())
    for r in result["rows"]:
        assert r["generated"] == 2 * 8   # no stop token: every row generates all its tokens
        assert r["tokens_per_s"] == r["generated"] / r["median_s"] and r["peak_bytes"] > 0
    cached, full = result["rows"][:2]
    assert cached["speedup"] == cached["tokens_per_s"] / full["tokens_per_s"]
    assert result["checks"]["greedy"]["max_logprob_diff"] < 1e-4


def test_bench_rollout_rejects_bad_options():
    proc = python_module("bench.rollout", "--batch", 0, "--new-tokens", 50000, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --batch must be >= 1, got 0"]
    proc = python_module("bench.rollout", "--prompt-len", 40000, "--new-tokens", 1000, check=False)
    assert proc.returncode == 2 and "max_position_embeddings 40960" in proc.stderr
