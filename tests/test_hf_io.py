"""HF safetensors I/O (model.hf_io) and the HF-name side of model.convert."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import ConfigError, from_hf_config, load_model_config, read_hf_config, to_hf_config
from model.convert import check_hf_tensors, expected_hf_names, rules
from model.hf_io import INDEX_FILE, SINGLE_FILE, HFShardWriter, HFWeights


def stored_names(d: Path) -> set[str]:
    with safe_open(d / SINGLE_FILE, "pt") as f:
        return set(f.keys())


def read_all(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(d / SINGLE_FILE, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ------------------------------------------------------------------------ shard writer


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.f32": torch.randn(4, 8, generator=g),                                  # 128 bytes
        "model.embed_tokens.weight": torch.randn(3, 5, generator=g).bfloat16(),   # 30 bytes
        "c.bf16": torch.randn(7, generator=g).bfloat16(),                         # 14 bytes
        "d.f16": torch.randn(10, generator=g).half(),                             # 20 bytes
        "e.f32.transposed": torch.randn(2, 2, generator=g).t(),                   # 16 bytes, not contiguous
    }


def test_shard_writer_splits_and_indexes(tmp_path: Path):
    tensors = sample_tensors()
    w = HFShardWriter(tmp_path, max_shard_bytes=64)
    for name, t in tensors.items():
        w.add(name, t)
    w.close()

    # a (128 B, over the cap, alone) | b+c+d (30+14+20 = 64 B, exactly the cap) | e (16 B)
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(shards + [INDEX_FILE])
    assert not (tmp_path / SINGLE_FILE).exists()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 128 + 30 + 14 + 20 + 16 == w.total_bytes
    assert index["weight_map"] == {
        "a.f32": shards[0],
        "model.embed_tokens.weight": shards[1],
        "c.bf16": shards[1],
        "d.f16": shards[1],
        "e.f32.transposed": shards[2],
    }
    assert sum((tmp_path / s).stat().st_size for s in shards) > index["metadata"]["total_size"]

    hf = HFWeights(tmp_path)
    assert hf.names() == set(tensors)
    for name, t in tensors.items():
        assert hf.has(name)
        got = hf.get(name)
        assert got.dtype == t.dtype, name
        assert torch.equal(got, t), name
    assert hf.get("model.embed_tokens.weight").dtype == torch.bfloat16
    assert hf.dtype() == torch.bfloat16
    assert not hf.has("nope")
    with pytest.raises(ConfigError, match="has no tensor nope"):
        hf.get("nope")


def test_shard_writer_single_file(tmp_path: Path):
    tensors = sample_tensors()
    w = HFShardWriter(tmp_path, max_shard_bytes=2**30)
    for name, t in tensors.items():
        w.add(name, t)
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [SINGLE_FILE]
    hf = HFWeights(tmp_path)
    assert hf.names() == set(tensors)
    for name, t in tensors.items():
        got = hf.get(name)
        assert got.dtype == t.dtype and torch.equal(got, t), name


def test_weights_dtype_needs_embedding(tmp_path: Path):
    save_file({"x": torch.zeros(2, dtype=torch.float16)}, str(tmp_path / SINGLE_FILE))
    with pytest.raises(ConfigError, match="has no model.embed_tokens.weight"):
        HFWeights(tmp_path).dtype()
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2, dtype=torch.float16)}, str(tmp_path / SINGLE_FILE))
    assert HFWeights(tmp_path).dtype() == torch.float16


# ----------------------------------------------------------------- fused expert layout


E, I, H = 4, 3, 5


def write_fused(d: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    tensors = {
        "model.embed_tokens.weight": torch.randn(16, H, generator=g).to(torch.float16),
        "model.layers.0.mlp.experts.gate_up_proj": torch.randn(E, 2 * I, H, generator=g).bfloat16(),
        "model.layers.0.mlp.experts.down_proj": torch.randn(E, H, I, generator=g).bfloat16(),
    }
    save_file(tensors, str(d / SINGLE_FILE))
    return tensors


def test_fused_experts_resolve_per_expert_names(tmp_path: Path):
    t = write_fused(tmp_path)
    gate_up, down = t["model.layers.0.mlp.experts.gate_up_proj"], t["model.layers.0.mlp.experts.down_proj"]
    hf = HFWeights(tmp_path)
    p = "model.layers.0.mlp.experts.3."
    for proj in ("gate_proj", "up_proj", "down_proj"):
        assert hf.has(p + proj + ".weight")
    gate = hf.get(p + "gate_proj.weight")
    up = hf.get(p + "up_proj.weight")
    dn = hf.get(p + "down_proj.weight")
    assert gate.shape == (I, H) and up.shape == (I, H) and dn.shape == (H, I)
    assert gate.dtype == up.dtype == dn.dtype == torch.bfloat16
    assert torch.equal(gate, gate_up[3, :I])
    assert torch.equal(up, gate_up[3, I:])
    assert torch.equal(dn, down[3])
    # Other experts come from their own slice.
    assert torch.equal(hf.get("model.layers.0.mlp.experts.0.up_proj.weight"), gate_up[0, I:])
    assert not torch.equal(hf.get("model.layers.0.mlp.experts.0.gate_proj.weight"), gate)
    # Names the fused tensor cannot provide.
    assert not hf.has("model.layers.1.mlp.experts.0.gate_proj.weight")
    assert not hf.has("model.layers.0.mlp.experts.3.gate_proj.bias")
    # Expert indices beyond the fused tensor's E are absent (not an IndexError on get).
    assert not hf.has(f"model.layers.0.mlp.experts.{E}.gate_proj.weight")
    with pytest.raises(ConfigError, match=f"has no tensor model.layers.0.mlp.experts.{E}.down_proj.weight"):
        hf.get(f"model.layers.0.mlp.experts.{E}.down_proj.weight")
    with pytest.raises(ConfigError, match="has no tensor model.layers.1.mlp.experts.0.down_proj.weight"):
        hf.get("model.layers.1.mlp.experts.0.down_proj.weight")
    assert hf.stored_names_for(p + "up_proj.weight") == "model.layers.0.mlp.experts.gate_up_proj"
    assert hf.stored_names_for(p + "down_proj.weight") == "model.layers.0.mlp.experts.down_proj"
    assert hf.stored_names_for("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert hf.dtype() == torch.float16  # the embedding's dtype, not the experts'


# ---------------------------------------------------------------------- broken dirs


def test_directory_without_weights(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"has no {SINGLE_FILE} or {INDEX_FILE}"):
        HFWeights(tmp_path)


def test_index_naming_missing_shard(tmp_path: Path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"metadata": {"total_size": 16},
             "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"index names missing shard files \['model-00002-of-00002.safetensors'\]"):
        HFWeights(tmp_path)


# -------------------------------------------------------- tiny transformers checkpoints


def save_random_hf(cfg, out: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**to_hf_config(cfg))
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    expected_cls = transformers.Qwen3MoeForCausalLM if cfg.is_moe else transformers.Qwen3ForCausalLM
    assert type(model) is expected_cls
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_random_hf(load_model_config("tiny", vocab_size=512), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory) -> Path:
    return save_random_hf(load_model_config("tiny_moe", vocab_size=512), tmp_path_factory.mktemp("tiny_moe"))


def test_tiny_dense_checkpoint_passes(tiny_dir: Path):
    cfg = load_model_config("tiny", vocab_size=512)
    hf = HFWeights(tiny_dir)
    check_hf_tensors(hf, cfg)
    assert hf.dtype() == torch.bfloat16
    # The config transformers wrote (its own 5.x spelling) reads back as the same model.
    assert from_hf_config(read_hf_config(tiny_dir), name="tiny") == cfg


def test_tiny_moe_checkpoint_passes(tiny_moe_dir: Path):
    cfg = load_model_config("tiny_moe", vocab_size=512)
    check_hf_tensors(HFWeights(tiny_moe_dir), cfg)
    assert from_hf_config(read_hf_config(tiny_moe_dir), name="tiny_moe") == cfg


def test_expected_names_match_transformers_dense(tiny_dir: Path):
    cfg = load_model_config("tiny", vocab_size=512)
    saved = stored_names(tiny_dir)
    names = expected_hf_names(cfg)
    assert names == saved - {"lm_head.weight"}
    assert "lm_head.weight" not in names  # tied
    # embed + final norm; per layer 2 norms + q/k/v/o + q/k norm + gate/up/down.
    assert len(names) == 2 + cfg.num_layers * 11 == 46


def test_expected_names_match_transformers_moe(tiny_moe_dir: Path):
    cfg = load_model_config("tiny_moe", vocab_size=512)
    saved = stored_names(tiny_moe_dir)
    names = expected_hf_names(cfg)
    assert names == saved
    assert "lm_head.weight" in names  # untied
    # embed + final norm + lm_head; per layer 8 attention/norm tensors + router + 3 per expert.
    assert len(names) == 3 + cfg.num_layers * (8 + 1 + 3 * cfg.num_experts) == 135
    # Every name comes from exactly one rule position.
    assert sum(1 for r in rules(cfg) if r.scope == "global") == 3


def rewrite(src: Path, dst: Path, drop=(), add=None) -> Path:
    tensors = {k: v for k, v in read_all(src).items() if k not in drop}
    tensors.update(add or {})
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / SINGLE_FILE))
    return dst


def test_missing_tensor_named(tiny_dir: Path, tmp_path: Path):
    cfg = load_model_config("tiny", vocab_size=512)
    d = rewrite(tiny_dir, tmp_path / "m", drop={"model.layers.1.self_attn.k_norm.weight"})
    with pytest.raises(ConfigError) as exc:
        check_hf_tensors(HFWeights(d), cfg)
    msg = str(exc.value)
    assert "1 tensors missing for tiny" in msg
    assert "model.layers.1.self_attn.k_norm.weight" in msg
    assert "\n" not in msg


def test_missing_lm_head_for_untied_model(tiny_moe_dir: Path, tmp_path: Path):
    cfg = load_model_config("tiny_moe", vocab_size=512)
    d = rewrite(tiny_moe_dir, tmp_path / "m", drop={"lm_head.weight", "model.layers.3.mlp.experts.7.up_proj.weight"})
    with pytest.raises(ConfigError, match=r"2 tensors missing for tiny_moe, e\.g\. \['lm_head.weight', "
                                          r"'model.layers.3.mlp.experts.7.up_proj.weight'\]"):
        check_hf_tensors(HFWeights(d), cfg)


def test_unexpected_tensor_named(tiny_dir: Path, tmp_path: Path):
    cfg = load_model_config("tiny", vocab_size=512)
    extra = "model.layers.0.self_attn.rotary_emb.inv_freq"
    d = rewrite(tiny_dir, tmp_path / "x", add={extra: torch.zeros(8)})
    with pytest.raises(ConfigError) as exc:
        check_hf_tensors(HFWeights(d), cfg)
    msg = str(exc.value)
    assert "1 tensors this converter does not map" in msg
    assert extra in msg


def test_layer_beyond_config_is_unexpected(tiny_dir: Path, tmp_path: Path):
    # A checkpoint with more layers than the config must not pass silently.
    cfg = load_model_config("tiny", vocab_size=512, num_layers=3)
    with pytest.raises(ConfigError, match="tensors this converter does not map, e.g. \\['model.layers.3."):
        check_hf_tensors(HFWeights(tiny_dir), cfg)


def test_tied_model_may_carry_lm_head(tiny_dir: Path, tmp_path: Path):
    cfg = load_model_config("tiny", vocab_size=512)
    emb = read_all(tiny_dir)["model.embed_tokens.weight"]
    d = rewrite(tiny_dir, tmp_path / "t", add={"lm_head.weight": emb.clone()})
    check_hf_tensors(HFWeights(d), cfg)  # no error


def test_fused_copy_of_tiny_moe_passes_and_matches(tiny_moe_dir: Path, tmp_path: Path):
    """The same tiny MoE checkpoint re-saved in transformers' fused in-memory layout."""
    cfg = load_model_config("tiny_moe", vocab_size=512)
    src = read_all(tiny_moe_dir)
    fused = {k: v for k, v in src.items() if ".mlp.experts." not in k}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.mlp.experts."
        fused[p + "gate_up_proj"] = torch.stack(
            [torch.cat([src[f"{p}{e}.gate_proj.weight"], src[f"{p}{e}.up_proj.weight"]]) for e in range(cfg.num_experts)])
        fused[p + "down_proj"] = torch.stack([src[f"{p}{e}.down_proj.weight"] for e in range(cfg.num_experts)])
    d = tmp_path / "fused"
    d.mkdir()
    save_file(fused, str(d / SINGLE_FILE))
    hf = HFWeights(d)
    check_hf_tensors(hf, cfg)
    for name in expected_hf_names(cfg):
        got = hf.get(name)
        assert got.dtype == src[name].dtype and torch.equal(got, src[name]), name

    # A fused checkpoint with fewer experts than the config must not pass the check.
    short = dict(fused)
    short["model.layers.2.mlp.experts.gate_up_proj"] = fused["model.layers.2.mlp.experts.gate_up_proj"][:6].clone()
    short["model.layers.2.mlp.experts.down_proj"] = fused["model.layers.2.mlp.experts.down_proj"][:6].clone()
    d2 = tmp_path / "fused_short"
    d2.mkdir()
    save_file(short, str(d2 / SINGLE_FILE))
    with pytest.raises(ConfigError, match=r"6 tensors missing for tiny_moe, e\.g\. "
                                          r"\['model.layers.2.mlp.experts.6.down_proj.weight'"):
        check_hf_tensors(HFWeights(d2), cfg)
