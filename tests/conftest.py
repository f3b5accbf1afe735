"""Shared fixtures: tiny random HF Qwen3 models and multi-process launches.

The reference models are HF transformers' own Qwen3ForCausalLM / Qwen3MoeForCausalLM
with random weights (no hub download). Multi-process checks run real megatron-core
under torchrun with gloo; each launch costs several seconds of interpreter start, so
workers loop over layouts inside one launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TEST_VOCAB = 2048  # small vocabulary keeps the HF references fast; tiny's own is 151,936


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run(cmd: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command from the repo root; on failure show the end of its output."""
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{tail}")
    return proc


def python_module(module: str, *args, **kw) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", module, *map(str, args)], **kw)


def torchrun(script: str, *args, nprocs: int = 2, timeout: int = 900) -> subprocess.CompletedProcess:
    # With CUDA every rank needs its own GPU (NCCL); without it, ranks share the CPU (gloo).
    if torch.cuda.is_available() and torch.cuda.device_count() < nprocs:
        pytest.skip(f"needs {nprocs} GPUs, found {torch.cuda.device_count()}")
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nprocs}", str(REPO / script), *map(str, args)], timeout=timeout)


def make_hf_model(out: Path, model: str, dtype: torch.dtype = torch.float32, seed: int = 0,
                  **overrides) -> Path:
    """Save a random HF Qwen3 model built from our hydra config `model` (+ overrides).

    Weights are drawn wider than HF's init so that logits and MoE routing are far from
    uniform, and norm weights are not all ones, so that every tensor matters.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from model.config import load_model_config, to_hf_config

    cfg = load_model_config(model, **{"vocab_size": TEST_VOCAB, **overrides})
    hf_cfg = AutoConfig.for_model(**to_hf_config(cfg, str(dtype).removeprefix("torch.")))
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(hf_cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
            elif "mlp.gate." in name:  # router: confident, varied expert choice
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.08)
    m.to(dtype).save_pretrained(out)
    return out


HF_VARIANTS = {
    # name: (hydra model, dtype, overrides)
    "dense_tied": ("tiny", torch.float32, {}),
    "dense_untied": ("tiny", torch.float32, {"tie_word_embeddings": False}),
    "moe": ("tiny_moe", torch.float32, {}),
    # norm_topk_prob=false: top-k of the softmax over all experts, not renormalised.
    "moe_nonorm": ("tiny_moe", torch.float32, {"moe_norm_topk_prob": False}),
    "dense_bf16": ("tiny", torch.bfloat16, {}),
    "moe_bf16": ("tiny_moe", torch.bfloat16, {}),
}


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf_model(root / name, model, dtype, **over)
            for name, (model, dtype, over) in HF_VARIANTS.items()}


@pytest.fixture(scope="session")
def converted(hf_dirs, tmp_path_factory) -> dict[str, Path]:
    """Each HF variant converted by the CLI at TP=PP=EP=1."""
    root = tmp_path_factory.mktemp("mcore")
    out = {}
    for name, hf in hf_dirs.items():
        out[name] = root / name
        python_module("model.convert", "hf-to-mcore", "--hf-dir", hf, "--out", out[name])
    return out


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
