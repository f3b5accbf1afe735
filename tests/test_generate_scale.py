"""`recipes.generate.generate` at scale: the KV cache under sequence and pipeline
parallelism, rows decoded in chunks whose cache fits a memory budget, expert-parallel
ranks that decode in lockstep, and one host transfer per decode step.

The two-rank checks run in one torchrun launch (tests/workers/generate_scale.py); each
test reads its part of the JSON the worker writes. A check that hangs ends at the
worker's 2-minute process-group timeout, or at this launch's own, which kills the whole
process group: the checks before it still report."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from tests.conftest import REPO, _env, read_json

LAUNCH_TIMEOUT = 420
pytestmark = pytest.mark.timeout(LAUNCH_TIMEOUT + 120)   # a hang fails the test instead of blocking the suite


def _launch(script: str, *args, timeout: int) -> tuple[int | None, str]:
    """(exit code, None on timeout; the output's end) of `script` on 2 ranks under torchrun,
    started in a session of its own so that a timeout kills torchrun and its ranks alike."""
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / script), *map(str, args)]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        log.seek(0)
        return code, log.read()[-4000:]


@pytest.fixture(scope="module")
def scale(tmp_path_factory, qwen3_tokenizer_dir):
    out = tmp_path_factory.mktemp("generate_scale") / "r.json"
    code, tail = _launch("tests/workers/generate_scale.py", "--tokenizer", qwen3_tokenizer_dir, "--out", out,
                         timeout=LAUNCH_TIMEOUT)
    how = f"the worker {'timed out' if code is None else f'exited with {code}'}; its output ends:\n{tail}"
    return (read_json(out) if out.exists() else {}), how


def _result(scale, name: str) -> dict:
    results, how = scale
    if name not in results:
        pytest.fail(f"no result for {name}: {how}")
    if "error" in results[name]:
        pytest.fail(f"{name} raised:\n{results[name]['error']}")
    return results[name]


def _same(a: list[dict], b: list[dict], name: str, atol: float = 1e-5) -> None:
    """Greedy/sampled tokens identical, log-probs within `atol`, the budget's records equal."""
    assert len(a) == len(b), name
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"], name
        assert x["forced"] == y["forced"] and x["finish"] == y["finish"], name
        assert x["budget_stopped"] == y["budget_stopped"], name
        assert np.allclose(x["logprobs"], y["logprobs"], rtol=0, atol=atol), name
        assert x["top_ids"] == y["top_ids"], name
        assert np.allclose(np.array(x["top_logprobs"]), np.array(y["top_logprobs"]), rtol=0, atol=atol), name


def _decoded_with_cache(widths: list[int], prompt_lengths: list[int], new_tokens: int) -> None:
    """The model saw the shortest prompt once, then one token per step: the KV cache ran."""
    assert widths == [min(prompt_lengths)] + [1] * (max(prompt_lengths) + new_tokens - min(prompt_lengths) - 1)


@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
def test_kv_cache_with_sequence_parallelism_equals_recompute(scale, model):
    """TP=2 with SP: the cache is used (sequence parallelism off for the decode), greedy
    decoding with a thinking budget of 3 (forced tokens included) gives the recomputed
    path's tokens and log-probs, and every sequence-parallel flag is back on afterwards,
    also after a decode that raised in its third forward."""
    r, lengths = _result(scale, f"sp/{model}"), scale[0]["prompt_lengths"]
    assert r["kv_cache_usable"] and r["lockstep_ranks"] is None   # EP=1: no lockstep
    _decoded_with_cache(r["greedy_widths"], lengths, 8)
    _same(r["greedy"], r["greedy_recompute"], model)
    assert any(any(g["forced"]) for g in r["greedy"])   # the budget inserted its stop phrase
    assert r["raised"] and all(r["sp_flags"]["before"]) and r["sp_flags"]["after_error"] == r["sp_flags"]["before"]


def test_kv_cache_at_pp2_equals_recompute(scale):
    """PP=2: each stage keeps its own layers' cache and hands its hidden states on."""
    r, lengths = _result(scale, "pp2"), scale[0]["prompt_lengths"]
    assert r["kv_cache_usable"]
    for widths in r["greedy_widths_per_stage"]:
        _decoded_with_cache(widths, lengths, 8)
    _same(r["greedy"], r["greedy_recompute"], "pp2")
    # the random model's log-probs move from step to step: a stage that saw a wrong prefix
    # would not match them
    assert all(np.ptp(g["logprobs"]) > 1e-2 for g in r["greedy"])


def test_chunked_decode_equals_one_chunk(scale):
    """5 prompts with a budget of 2 rows' decode state decode in 3 chunks: the same greedy
    tokens, forced tokens and top-k records as one chunk, and the same samples for a seed
    (each row's uniforms depend on its position and row only)."""
    r = _result(scale, "chunks")
    assert r["greedy_prefills"] == r["sampled_prefills"] == 3
    _same(r["greedy"], r["greedy_chunked"], "greedy")
    _same(r["sampled"], r["sampled_chunked"], "sampled")
    assert any(any(g["forced"]) for g in r["greedy"])
    assert all(len(g["top_ids"]) == len(g["tokens"]) for g in r["greedy"])
    s1, s2 = r["sampled"][:2]
    assert s1["tokens"] != s2["tokens"]


def test_fp8_chunks_are_padded_to_the_fp8_multiple(scale):
    """Under FP8, 20 prompts with a budget of 16 rows decode in 2 chunks of 10, each run as
    16 rows (FP8's row multiple); every prompt's results are those of the unpadded decode."""
    r = _result(scale, "chunks")
    assert r["fp8_rows"] == [16] and r["fp8_prefills"] == 2
    _same(r["greedy"] * 4, r["fp8_chunked"], "fp8")


def test_chunk_rows_at_qwen3_1_7b_scale():
    """Qwen3-1.7B (28 layers, 8 KV groups of 128 channels, bf16) with 256 rows of a
    2,048-token prompt plus 30,720 new tokens: one cache for all rows would be 962 GB;
    a 40 GB budget decodes 10 rows at a time (26 chunks), and 10 rows fit where 11 do not."""
    from recipes.generate import chunk_rows
    from model.inference import kv_cache_bytes_per_row

    per_row = kv_cache_bytes_per_row(layers=28, query_groups=8, tp=1, kv_channels=128, length=2048 + 30720,
                                     element_size=2)
    assert per_row == 2 * 28 * 8 * 128 * 32768 * 2 == 3_758_096_384
    assert 256 * per_row == 962_072_674_304
    budget = 40 * 10**9
    rows = chunk_rows(per_row, budget)
    assert rows == 10 and rows * per_row <= budget < (rows + 1) * per_row
    assert -(-256 // rows) == 26
    # TP=2 halves the KV groups per rank; FP8 rounds down to its multiple of 16, and a chunk
    # is never smaller than one padded chunk
    assert chunk_rows(kv_cache_bytes_per_row(28, 8, 2, 128, 32768, 2), budget) == 21
    assert chunk_rows(per_row, 200 * 10**9, 16) == 48
    assert chunk_rows(per_row, budget, 16) == 16
    assert chunk_rows(per_row, 1) == 1


def test_expert_parallel_ranks_decode_in_lockstep(scale):
    """EP=2 over DP=2: rank 0 decodes one short prompt, rank 1 three longer ones (in 2
    chunks to rank 0's 1 with a 2-row budget), or rank 0 none at all: both ranks make the
    same number of forwards (rank 0's last ones idle) and each gets the results of its
    prompts decoded alone, cached or recomputed."""
    r = _result(scale, "ep2")
    assert r["lockstep_ranks"] == [0, 1]
    for name in ("cached", "recompute", "chunked", "no_prompts_on_rank0"):
        rank0, rank1 = r[name]
        assert rank0["forwards"] == rank1["forwards"], name
        _same(rank1["gens"], r["reference"][1], name)
        if name == "no_prompts_on_rank0":
            assert rank0["gens"] == []
        else:
            _same(rank0["gens"], r["reference"][0], name)
    assert [share["prefills"] for share in r["chunked"]] == [1, 2]


def test_one_host_transfer_per_decode_step(scale):
    """Calls from recipes/generate.py that copy a tensor's value to the host: one per
    forward (whether rows still run), plus a few per chunk (its records) and one for the
    chunk size, none per row and token."""
    r = _result(scale, "chunks")
    for name, count in r["transfers"].items():
        assert count["forwards"] >= 10, name
        assert count["transfers"] - count["forwards"] <= 1 + 8 * count["chunks"], (name, count)
