"""Context parallelism that splits the sequence (model.context_parallel, model.cp_attention).

The layout each rank holds is megatron-core's own; on two gloo ranks, CP=2 gives the
logits, log-probs, losses, logged means and gradients of CP=1 on the same weights and
batches, dense and MoE, plain and packed rows (tests/workers/context_parallel.py); S3
trains at CP=2 and resumes bit for bit. The 4-rank layouts (TP=2 x CP=2, PP=2 x CP=2) are
`slow`. The THD split of packed rows on the TE path can only be compared with TE's own on
a GPU (`gpu`).
"""

import shutil

import numpy as np
import pytest
import torch

from model.context_parallel import balanced_positions, document_positions
from recipes.run_log import read_metrics
from tests.conftest import config_error, pretrain, pretrain_command, read_json, torchrun

GATE = 1e-5   # fp32, relative to the largest reference value


class _Group:
    """What megatron-core reads of a CP process group."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


@pytest.mark.parametrize("cp", [2, 4])
def test_positions_are_megatron_cores_load_balanced_split(cp, monkeypatch):
    """balanced_positions picks what get_batch_on_this_cp_rank gives each rank, and the
    ranks together hold every position once."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    length = 8 * cp
    row = torch.arange(length)[None]
    owned = [balanced_positions(length, cp, r) for r in range(cp)]
    for r in range(cp):
        theirs = get_batch_on_this_cp_rank({"tokens": row.clone()}, cp_group=_Group(cp, r))["tokens"][0]
        assert torch.equal(owned[r], theirs)
    assert torch.equal(torch.cat(owned).sort().values, torch.arange(length))
    assert balanced_positions(8, 2, 0).tolist() == [0, 1, 6, 7] and balanced_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="multiple of 2\\*cp=4"):
        balanced_positions(10, 2, 0)


def test_thd_positions_split_each_document():
    """Packed rows on the THD path: every document split over the ranks as a row is."""
    cu = torch.tensor([0, 8, 12, 20], dtype=torch.int32)
    assert document_positions(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 18, 19]
    assert document_positions(cu, 2, 1).tolist() == [2, 3, 4, 5, 9, 10, 14, 15, 16, 17]
    with pytest.raises(ValueError, match="6 tokens"):
        document_positions(torch.tensor([0, 6, 8]), 2, 0)


def test_thd_inputs_of_each_rank(monkeypatch):
    """The TE path's packed row at CP=2 (what runs on a GPU, prepared here without one):
    each rank's tokens are its chunks of every document, and TE gets the whole row's
    document bounds, padded bounds included."""
    from megatron.core import parallel_state

    from model.context_parallel import model_inputs
    from model.packing import segment_positions

    segments = torch.tensor([[0] * 8 + [1] * 4 + [2] * 8])
    tokens = torch.arange(20)[None] + 100
    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: 2)
    for rank in range(2):
        monkeypatch.setattr(parallel_state, "get_context_parallel_group", lambda: _Group(2, rank))
        x = model_inputs(tokens, segment_positions(segments), segments, use_te=True)
        cu = torch.tensor([0, 8, 12, 20], dtype=torch.int32)
        assert torch.equal(x.tokens[0], 100 + document_positions(cu, 2, rank))
        assert x.attention_mask is None and x.packed_seq_params.qkv_format == "thd"
        for name in ("cu_seqlens_q", "cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            assert torch.equal(getattr(x.packed_seq_params, name), cu), name
        assert x.packed_seq_params.max_seqlen_q == 8


def test_packed_documents_are_padded_to_the_multiple():
    """With a document multiple every conversation's segment spans a multiple of it (its
    padding without loss), so that the THD split never cuts across a boundary."""
    from data_pipeline.sft_data import assemble

    def triple(n, first):
        ids = np.arange(first, first + n, dtype=np.int32)
        return ids, ids + 1, np.ones(n, np.uint8)

    out = assemble([triple(5, 10), triple(3, 50)], [[0, 1]], 16, pad_id=0, document_multiple=4)
    assert out["segment_ids"][0].tolist() == [0] * 8 + [1] * 4 + [2] * 4
    assert out["loss_mask"][0].tolist() == [1] * 5 + [0] * 3 + [1] * 3 + [0] * 5
    assert out["tokens"][0, :5].tolist() == [10, 11, 12, 13, 14] and out["tokens"][0, 8:11].tolist() == [50, 51, 52]
    assert assemble([triple(5, 10)], [[0]], 8, pad_id=0)["segment_ids"][0].tolist() == [0] * 5 + [1] * 3


QUANTITIES = ["logits/plain", "logits/packed", "logprobs/masked"] + [
    f"{kind}/{what}" for kind in ("pretrain", "sft", "rl") for what in ("step1", "grads", "step2")]


def check(results: dict, key: str):
    r = results[key]
    assert r["loss"] > 5.0, r   # a real loss, near ln(vocabulary): nothing vacuous
    expected = [q for q in QUANTITIES if not (key.startswith("tiny_moe/") and q.startswith("rl/"))]
    assert sorted(q for q in r if q != "loss") == sorted(expected), r
    bad = {q: r[q] for q in expected if not r[q] <= GATE}
    assert not bad, (key, bad)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """CP=2 against CP=1 (DP=2) for tiny and tiny_moe, in one launch."""
    work = tmp_path_factory.mktemp("cp")
    torchrun("tests/workers/context_parallel.py", "--work", work, "--out", work / "r.json",
             "--plan", "tiny=tp1:cp2", "tiny_moe=tp1:cp2")
    return read_json(work / "r.json")


@pytest.mark.parametrize("model", ["tiny", "tiny_moe"])
def test_cp2_equals_cp1(two_ranks, model):
    """Logits (plain and packed rows), masked log-probs, and two training steps on plain,
    packed-SFT and (dense) RL-style logits-loss batches: loss, logged means, grad norm, MoE
    balance, every gradient and the next step's loss."""
    check(two_ranks, f"{model}/cp2")


@pytest.mark.slow
def test_four_rank_layouts_equal_cp1(tmp_path):
    """TP=2 x CP=2 against TP=2 (DP=2), and PP=2 x CP=2 against PP=2 (the p2p shapes of
    a rank's share of the sequence)."""
    torchrun("tests/workers/context_parallel.py", "--work", tmp_path, "--out", tmp_path / "r.json",
             "--plan", "tiny=tp2:tp2cp2", "tiny_moe=tp2:tp2cp2", "tiny=pp2:pp2cp2", nprocs=4, timeout=1500)
    results = read_json(tmp_path / "r.json")
    for key in ("tiny/tp2cp2", "tiny_moe/tp2cp2", "tiny/pp2cp2"):
        check(results, key)


def test_width_that_cannot_be_split_is_refused_before_launch(tmp_path, mini_pretrain_data):
    """Pretraining samples are seq_length wide and cannot be padded: one line, before launch."""
    error = config_error(pretrain_command(tmp_path, mini_pretrain_data, "model=mini", "parallel.cp=2",
                                          "trainer.seq_length=66"))
    assert "seq_length=66 is not divisible by 4 (required by cp)" in error, error


# `mini` (tiny's body at the mini tokenizer's 4,096 ids, ~45 s); `tiny` at the real
# vocabulary is its slower twin (~80 s, most of it the 151,936-row output layer). Both are
# `slow`: the default suite's CP checks are test_cp2_equals_cp1 (training steps at CP=2
# against CP=1), which keeps it within its time budget.
@pytest.mark.slow
@pytest.mark.parametrize("model,data", [("mini", "mini_pretrain_data"), ("tiny", "pretrain_data")])
def test_s3_at_cp2_trains_and_resumes_exactly(tmp_path, request, model, data):
    """The long-context stage at CP=2 on two ranks: the loss falls, and a run resumed from
    its step-2 checkpoint (model, optimizer, RNG and data position) logs the uninterrupted
    run's losses bit for bit."""
    data = request.getfixturevalue(data)
    common = [f"model={model}", "stage=pretrain_s3", "stage.init_from=null", "parallel.cp=2",
              "trainer.seq_length=128", "data.length_mix.buckets=[64,128,256]", "trainer.max_steps=4",
              "trainer.save_interval=2"]
    pretrain(tmp_path, data, *common, nprocs=2)
    stage = tmp_path / model / "pretrain_s3"
    expected = {step: m["loss"] for step, m in read_metrics(stage).items()}
    assert sorted(expected) == [1, 2, 3, 4] and expected[4] < expected[1], expected
    # back to step 2, as if the job had died after it
    shutil.rmtree(stage / "checkpoints" / "iter_0000004")
    (stage / "latest").write_text("iter_0000002")
    (stage / "final.json").unlink()
    proc = pretrain(tmp_path, data, *common, nprocs=2)
    assert "resumed pretrain_s3 from" in proc.stderr and "at step 2" in proc.stderr, proc.stderr[-3000:]
    got = {step: m["loss"] for step, m in read_metrics(stage).items()}
    assert {s: got[s] for s in (3, 4)} == {s: expected[s] for s in (3, 4)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Transformer Engine")
def test_thd_positions_are_transformer_engines():
    """document_positions is TE's thd_get_partitioned_indices (what megatron-core's
    get_thd_batch_on_this_cp_rank slices packed rows with)."""
    import transformer_engine_torch as tex

    cu = torch.tensor([0, 8, 16, 24, 48], dtype=torch.int32, device="cuda")
    for cp in (2, 4):
        for rank in range(cp):
            theirs = tex.thd_get_partitioned_indices(cu, 48, cp, rank).cpu()
            assert torch.equal(document_positions(cu.cpu(), cp, rank), theirs.long())
