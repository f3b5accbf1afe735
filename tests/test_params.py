"""Parameter counts of the built megatron-core models against the Qwen3 model cards.

The counting runs in subprocesses (`python -m model.params`): building the model needs
torch.distributed and megatron-core's parallel state, which must not be left initialised
in the pytest process that other test files share.
"""

import json
import math
import subprocess
import sys

import pytest

from model.config import REPO_ROOT, available_models
from model.params import PUBLISHED

# What each HF model card prints ("Number of Parameters", "Non-Embedding", "activated"),
# in billions, with the number of decimals the card prints.
# model: (total, non_embedding, active); None where the card states nothing.
CARDS = {
    "qwen3_0_6b": ((0.6, 1), (0.44, 2), None),
    "qwen3_1_7b": ((1.7, 1), (1.4, 1), None),
    "qwen3_4b": ((4.0, 1), (3.6, 1), None),
    "qwen3_8b": ((8.2, 1), (6.95, 2), None),
    "qwen3_14b": ((14.8, 1), (13.2, 1), None),
    "qwen3_32b": ((32.8, 1), (31.2, 1), None),
    "qwen3_30b_a3b": ((30.5, 1), (29.9, 1), (3.3, 1)),
    "qwen3_235b_a22b": ((235, 0), (234, 0), (22, 0)),
}


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "model.params", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def counts() -> dict:
    return {row["model"]: row for row in json.loads(_run("--json"))}


def test_published_list_matches_the_configs():
    # A new qwen3_* config must not silently drop out of the table.
    assert set(PUBLISHED) == {m for m in available_models() if m.startswith("qwen3_")}


@pytest.mark.parametrize("name", list(CARDS))
def test_counts_match_model_card(counts, name):
    row = counts[name]
    for key, card in zip(("total", "non_embedding", "active"), CARDS[name]):
        if card is None:
            continue
        value, digits = card
        got = row[key] / 1e9
        if (name, key) == ("qwen3_30b_a3b", "active"):
            # The card truncates here: the model has 3.353B active parameters (also by the
            # plain HF count: 48 layers x (attention + router + 8 experts) + embedding +
            # lm_head), which rounds to 3.4. Everywhere else the cards round (235B-A22B's
            # 233.85B non-embedding is printed 234), so only this value is compared truncated.
            assert math.floor(got * 10) / 10 == value, (name, key, got)
        else:
            assert round(got, digits) == value, (name, key, got)


@pytest.mark.parametrize("name", list(CARDS))
def test_count_invariants(counts, name):
    row = counts[name]
    assert 0 < row["non_embedding"] < row["total"]
    if name.startswith("qwen3_30b") or name.startswith("qwen3_235b"):
        assert row["active"] < row["non_embedding"]
    else:
        assert row["active"] == row["total"]


def test_cli_table(counts):
    # The table must list the eight sizes in order and agree with the JSON counts.
    lines = _run().strip().splitlines()
    header, rows = lines[0], lines[1:]
    assert header.split()[0] == "model"
    assert [r.split()[0] for r in rows] == list(PUBLISHED)
    for r in rows:
        cells = r.split()
        want = counts[cells[0]]
        assert cells[1:4] == [f"{want[k] / 1e9:.3f}" for k in ("total", "non_embedding", "active")]
        assert cells[4:7] == [f"{want[k]:,}" for k in ("total", "non_embedding", "active")]
