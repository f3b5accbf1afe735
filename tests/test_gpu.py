"""GPU path: Transformer Engine spec on one GPU (skipped without CUDA).

A checkpoint converted on CPU (local spec) must load into the TE spec and match HF.
Run with `make test-all` on a GPU machine.
"""

import pytest
import torch

from tests.conftest import parity

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and Transformer Engine")]


def test_te_spec_is_selected():
    from model.parallel import te_available

    assert te_available(), "CUDA is present but transformer_engine does not import"


@pytest.mark.parametrize("variant,gate", [("dense_untied", 1e-3), ("moe", 1e-3), ("dense_bf16", 5e-2),
                                          ("moe_bf16", 5e-2)])
def test_te_logits_match_hf(hf_dirs, converted, tmp_path, variant, gate):
    m = parity(hf_dirs, converted, {variant: ["tp1"]}, tmp_path / "r.json", nprocs=1)[variant]["tp1"]
    assert m["rel_diff"] <= gate, m
    assert m["top1_agreement"] >= 0.95, m
