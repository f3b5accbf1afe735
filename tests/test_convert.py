"""HF <-> megatron-core conversion through the real CLI: bit-exact round trips,
resharding, transformers compatibility of the export, and one-line errors."""

import json
import shutil

import pytest
import torch

from model.hf_io import HFWeights
from tests.conftest import make_hf_model, python_module


def assert_same_tensors(a_dir, b_dir):
    a, b = HFWeights(a_dir), HFWeights(b_dir)
    assert a.names() == b.names()
    for name in sorted(a.names()):
        x, y = a.get(name), b.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        # Bitwise: compare the raw bytes, so -0.0 vs 0.0 or NaN payloads would count too.
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), name


def to_hf(ckpt, out, *extra):
    python_module("model.convert", "mcore-to-hf", "--ckpt", ckpt, "--out", out, *extra)
    return out


@pytest.mark.parametrize("variant", ["dense_tied", "dense_untied", "moe", "dense_bf16", "moe_bf16", "dense_full_vocab"])
def test_round_trip_is_bitwise(hf_dirs, converted, tmp_path, variant):
    out = to_hf(converted[variant], tmp_path / "back")
    assert_same_tensors(hf_dirs[variant], out)
    # Atomic write: nothing is left under a temporary name.
    assert not (tmp_path / "back.tmp").exists()
    assert not converted[variant].with_name(converted[variant].name + ".tmp").exists()


@pytest.mark.parametrize("variant,layout", [("moe", ["--tp", "2", "--ep", "2"]),
                                            pytest.param("dense_tied", ["--pp", "2"], marks=pytest.mark.slow)])
def test_round_trip_from_sharded_checkpoint(hf_dirs, tmp_path, variant, layout):
    """Written by 2 ranks at TP=2/EP=2 (MoE export with EP>1) or PP=2 with tied embeddings."""
    ckpt = tmp_path / "ckpt"
    python_module("model.convert", "hf-to-mcore", "--hf-dir", hf_dirs[variant], "--out", ckpt, *layout)
    assert_same_tensors(hf_dirs[variant], to_hf(ckpt, tmp_path / "back"))


def test_export_loads_in_transformers_with_identical_logits(hf_dirs, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    out = to_hf(converted["moe"], tmp_path / "back")
    original = AutoModelForCausalLM.from_pretrained(hf_dirs["moe"])
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert type(exported).__name__ == "Qwen3MoeForCausalLM"
    assert exported.config.num_experts == original.config.num_experts
    assert exported.config.norm_topk_prob is True
    tokens = torch.randint(0, 2048, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(tokens).logits, exported(tokens).logits)
    # Files next to the weights (here the generation config) travel through the checkpoint.
    assert (out / "generation_config.json").is_file()


def test_sharded_hf_directories(tmp_path):
    """An index-sharded HF input converts, and the export shards by --max-shard-gb."""
    from transformers import AutoModelForCausalLM

    src = make_hf_model(tmp_path / "src", "tiny_moe")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="2MB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ckpt = tmp_path / "ckpt"
    python_module("model.convert", "hf-to-mcore", "--hf-dir", sharded, "--out", ckpt)
    out = to_hf(ckpt, tmp_path / "back", "--max-shard-gb", "0.002")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_same_tensors(src, out)


def test_published_config_spelling(hf_dirs, tmp_path):
    """config.json as the published checkpoints write it (rope_theta, num_experts)."""
    from model.config import ModelConfig, read_hf_config

    src = tmp_path / "published"
    shutil.copytree(hf_dirs["moe"], src)
    hf = read_hf_config(src)
    assert "num_local_experts" in hf and "rope_parameters" in hf  # transformers 5 wrote these
    hf["num_experts"] = hf.pop("num_local_experts")
    hf["rope_theta"] = hf.pop("rope_parameters")["rope_theta"]
    (src / "config.json").write_text(json.dumps(hf))
    ckpt = tmp_path / "ckpt"
    python_module("model.convert", "hf-to-mcore", "--hf-dir", src, "--out", ckpt)
    meta = json.loads((ckpt / "qwen3_model.json").read_text())["model"]
    assert ModelConfig(**meta).num_experts == 8 and meta["rope_theta"] == 1e6


def one_line_error(proc):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_invalid_layout_fails_before_any_work(hf_dirs, tmp_path):
    proc = python_module("model.convert", "hf-to-mcore", "--hf-dir", hf_dirs["moe"], "--out", tmp_path / "x",
                         "--tp", "3", check=False)
    msg = one_line_error(proc)
    assert "num_attention_heads=4 is not divisible by tp=3" in msg
    assert not (tmp_path / "x").exists()


def test_missing_tensor_is_named_and_nothing_is_written(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "broken"
    shutil.copytree(hf_dirs["dense_untied"], src)
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_norm.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    proc = python_module("model.convert", "hf-to-mcore", "--hf-dir", src, "--out", tmp_path / "x", check=False)
    assert "model.layers.1.self_attn.k_norm.weight" in one_line_error(proc)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tmp").exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = python_module("model.convert", "mcore-to-hf", "--ckpt", tmp_path / "empty", "--out", tmp_path / "o",
                         "--model", "tiny", check=False)
    assert "not a megatron-core distributed checkpoint" in one_line_error(proc)
    proc = python_module("model.convert", "hf-to-mcore", "--hf-dir", tmp_path / "empty", "--out", tmp_path / "o",
                         check=False)
    assert "config.json" in one_line_error(proc)


def test_existing_output_is_kept_unless_overwrite(hf_dirs, converted, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = python_module("model.convert", "mcore-to-hf", "--ckpt", converted["moe"], "--out", out, check=False)
    assert "--overwrite" in one_line_error(proc)
    assert (out / "precious.txt").read_text() == "keep me"
    python_module("model.convert", "mcore-to-hf", "--ckpt", converted["moe"], "--out", out, "--overwrite")
    assert_same_tensors(hf_dirs["moe"], out)
