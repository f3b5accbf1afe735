"""Model configs (model.config): Hydra yaml files and the HF config.json mapping."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from model.config import (
    ConfigError,
    ModelConfig,
    available_models,
    from_hf_config,
    load_model_config,
    model_config_from_dict,
    model_config_to_dict,
    padded_vocab_size,
    read_hf_config,
    to_hf_config,
)
from tests.conftest import REPO, config_error

# name: (hidden, ffn or moe ffn, layers, q heads, kv heads, tied, moe)
TABLE = {
    "qwen3_0_6b": (1024, 3072, 28, 16, 8, True, False),
    "qwen3_1_7b": (2048, 6144, 28, 16, 8, True, False),
    "qwen3_4b": (2560, 9728, 36, 32, 8, True, False),
    "qwen3_8b": (4096, 12288, 36, 32, 8, False, False),
    "qwen3_14b": (5120, 17408, 40, 40, 8, False, False),
    "qwen3_32b": (5120, 25600, 64, 64, 8, False, False),
    "qwen3_30b_a3b": (2048, 768, 48, 32, 4, False, True),
    "qwen3_235b_a22b": (4096, 1536, 94, 64, 4, False, True),
}
# HF intermediate_size of the MoE models (unused dense width, kept for round-tripping).
MOE_DENSE_FFN = {"qwen3_30b_a3b": 6144, "qwen3_235b_a22b": 12288}

# Published Qwen/Qwen3-30B-A3B config.json.
QWEN3_30B_A3B_HF = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 6144,
    "max_position_embeddings": 40960,
    "max_window_layers": 48,
    "mlp_only_layers": [],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 768,
    "norm_topk_prob": True,
    "num_attention_heads": 32,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 48,
    "num_key_value_heads": 4,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# Published Qwen/Qwen3-8B config.json (rope_theta is an integer there).
QWEN3_8B_HF = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 12288,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


def without_name(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("name")
    return d


def transformers5_config(name: str):
    """A transformers 5.x config object with the published sizes of `name` (from TABLE)."""
    hidden, ffn, layers, heads, kv, tied, moe = TABLE[name]
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, head_dim=128, vocab_size=151936, tie_word_embeddings=tied,
                  max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                  initializer_range=0.02)
    if moe:
        return transformers.Qwen3MoeConfig(
            **common, intermediate_size=MOE_DENSE_FFN[name], moe_intermediate_size=ffn,
            num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, router_aux_loss_coef=0.001,
            decoder_sparse_step=1, mlp_only_layers=[])
    return transformers.Qwen3Config(**common, intermediate_size=ffn)


# ------------------------------------------------------------------------ hydra files


def test_available_models():
    assert available_models() == sorted([*TABLE, "tiny", "tiny_moe", "mini", "mini_moe"])


def vocab_from_tokenizer(name: str) -> bool:
    """Whether the model's yaml leaves vocab_size to the tokenizer (null)."""
    from omegaconf import OmegaConf

    return OmegaConf.load(REPO / "hydra_conf" / "model" / f"{name}.yaml").vocab_size is None


@pytest.mark.parametrize("name", available_models())
def test_every_hydra_model_config_loads(name):
    from data_pipeline.tokenizer import MINI_VOCAB

    overrides = {}
    if vocab_from_tokenizer(name):
        # unusable until a tokenizer fills it in, and it says so
        with pytest.raises(ConfigError, match=f"model {name}: vocab_size is null") as e:
            load_model_config(name)
        assert "\n" not in str(e.value)
        overrides = {"vocab_size": padded_vocab_size(MINI_VOCAB)}   # as recipes.train fills it
    cfg = load_model_config(name, **overrides)
    assert cfg.name == name
    assert cfg.check() is cfg
    # model_config_to_dict / from_dict round-trip (used for checkpoint metadata).
    assert model_config_from_dict(model_config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("name", sorted(TABLE))
def test_published_sizes(name):
    hidden, ffn, layers, heads, kv, tied, moe = TABLE[name]
    cfg = load_model_config(name)
    assert cfg.hidden_size == hidden
    assert cfg.num_layers == layers
    assert cfg.num_attention_heads == heads
    assert cfg.num_query_groups == kv
    assert cfg.tie_word_embeddings is tied
    assert cfg.kv_channels == 128
    assert cfg.vocab_size == 151936
    assert cfg.rope_theta == 1_000_000.0
    assert cfg.max_position_embeddings == 40960
    assert cfg.norm_eps == 1e-6
    assert cfg.is_moe is moe
    if moe:
        assert cfg.moe_ffn_hidden_size == ffn
        assert cfg.ffn_hidden_size == MOE_DENSE_FFN[name]
        assert cfg.num_experts == 128
        assert cfg.moe_router_topk == 8
        assert cfg.moe_norm_topk_prob is True
        assert cfg.moe_aux_loss_type == "global_aux_loss"
        assert cfg.moe_aux_loss_coeff == 1e-3
    else:
        assert cfg.ffn_hidden_size == ffn
        assert cfg.num_experts == 0


def test_overrides_apply_and_are_checked():
    cfg = load_model_config("tiny", vocab_size=512, num_layers=2)
    assert (cfg.vocab_size, cfg.num_layers, cfg.hidden_size) == (512, 2, 128)
    with pytest.raises(ConfigError, match="model.num_layers must be positive, got 0"):
        load_model_config("tiny", num_layers=0)


def test_load_model_config_from_path(tmp_path: Path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nhidden_size: 32\nnum_layers: 1\nvocab_size: 64\n")
    cfg = load_model_config(str(p))
    assert (cfg.name, cfg.hidden_size, cfg.num_layers, cfg.vocab_size) == ("mine", 32, 1, 64)
    assert cfg.ffn_hidden_size == ModelConfig().ffn_hidden_size


# ------------------------------------------------------------------------ vocabulary


@pytest.mark.parametrize("tokens, tp, padded", [
    (1, 1, 128), (4096, 1, 4096), (4097, 1, 4224), (151669, 1, 151680),
    (4096, 2, 4096), (4097, 2, 4224),
    (4096, 3, 4224), (100, 3, 384), (151669, 3, 151680),   # multiples of 384: of 128 and of 3
    (4000, 8, 4096), (4096, 8, 4096), (4097, 8, 4224),   # 8 divides 128: no extra padding
])
def test_padded_vocab_size(tokens, tp, padded):
    assert padded_vocab_size(tokens, tp) == padded


@pytest.mark.parametrize("tp, step", [(1, 128), (2, 128), (3, 384), (8, 128)])   # step: lcm(128, tp)
def test_padded_vocab_size_is_the_next_multiple(tp, step):
    for tokens in [*range(1, 800), 4070, 151643, 151669]:
        padded = padded_vocab_size(tokens, tp)
        assert padded >= tokens and padded % step == 0, (tokens, tp)
        assert padded - tokens < step, (tokens, tp)   # the next multiple, not a later one


def composed(*overrides):
    from model.launch import compose   # as the stage CLIs compose (schema registered by tests.conftest)

    return compose("config", list(overrides))


@pytest.mark.parametrize("model", ["mini", "mini_moe"])
def test_null_vocab_is_the_tokenizers_padded(mini_tokenizer_dir, tmp_path, model):
    from data_pipeline.tokenizer import load_tokenizer
    from recipes.train import settings_from

    tokens = len(load_tokenizer(mini_tokenizer_dir))
    s = settings_from(composed(f"model={model}", f"tokenizer={mini_tokenizer_dir}"))
    assert s.model.vocab_size == tokens == 4096   # already a multiple of 128
    s = settings_from(composed(f"model={model}", f"tokenizer={mini_tokenizer_dir}", "parallel.tp=3"))
    assert s.model.vocab_size == 4224   # 11 x 384: splits over 3 TP ranks
    # without tokenizer=, the data root's tokenizer/ is the one
    (tmp_path / "tokenizer").symlink_to(mini_tokenizer_dir, target_is_directory=True)
    s = settings_from(composed(f"model={model}", f"data.root={tmp_path}"))
    assert s.model.vocab_size == 4096


def test_set_vocab_needs_no_tokenizer(tmp_path):
    from recipes.train import settings_from

    s = settings_from(composed("model=mini", "model.vocab_size=1000", f"tokenizer={tmp_path / 'none'}"))
    assert s.model.vocab_size == 1000   # taken as given: not read from, nor padded to, a tokenizer


@pytest.mark.parametrize("where", ["tokenizer", "data.root"])
def test_null_vocab_without_tokenizer_is_one_clear_error(tmp_path, where):
    missing = tmp_path / "nowhere"
    message = config_error([sys.executable, "-m", "recipes.pretrain", "model=mini", f"{where}={missing}"])
    expected = missing if where == "tokenizer" else missing / "tokenizer"
    assert f"tokenizer directory {expected} does not exist" in message
    assert "python -m data_pipeline.tokenizer" in message


# ------------------------------------------------------------------- from_hf_config


@pytest.mark.parametrize("hf, name", [(QWEN3_30B_A3B_HF, "qwen3_30b_a3b"), (QWEN3_8B_HF, "qwen3_8b")])
def test_from_hf_config_published_spelling(hf, name):
    cfg = from_hf_config(copy.deepcopy(hf), name="x")
    assert cfg.name == "x"
    assert without_name(cfg) == without_name(load_model_config(name))
    assert isinstance(cfg.rope_theta, float)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_from_hf_config_transformers5_spelling(name):
    d = transformers5_config(name).to_dict()
    # Make sure this really is the other spelling.
    assert "rope_theta" not in d and d["rope_parameters"]["rope_theta"] == 1_000_000.0
    if TABLE[name][-1]:
        assert "num_experts" not in d and d["num_local_experts"] == 128
    cfg = from_hf_config(d, name=name)
    assert cfg == load_model_config(name)


def test_from_hf_config_reads_saved_transformers5_config_json(tmp_path: Path):
    transformers5_config("qwen3_30b_a3b").save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in on_disk and "num_local_experts" in on_disk
    cfg = from_hf_config(read_hf_config(tmp_path), name="qwen3_30b_a3b")
    assert cfg == load_model_config("qwen3_30b_a3b")


def test_from_hf_config_defaults_head_dim_and_kv_heads():
    hf = {k: v for k, v in QWEN3_8B_HF.items() if k not in ("head_dim", "num_key_value_heads")}
    cfg = from_hf_config(hf)
    assert cfg.kv_channels == 4096 // 32
    assert cfg.num_query_groups == 32


def test_from_hf_config_non_default_rope_theta_both_spellings():
    pub = dict(QWEN3_8B_HF, rope_theta=5_000_000)
    assert from_hf_config(pub).rope_theta == 5_000_000.0
    t5 = transformers.Qwen3Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                  vocab_size=256, rope_theta=250_000.0).to_dict()
    assert from_hf_config(t5).rope_theta == 250_000.0


# --------------------------------------------------------------------- to_hf_config


@pytest.mark.parametrize("name, overrides", [
    ("tiny", {}), ("tiny_moe", {}), ("tiny", {"vocab_size": 512}), ("qwen3_8b", {}),
    ("qwen3_30b_a3b", {}), ("qwen3_0_6b", {}),
])
def test_to_hf_config_loads_in_transformers(name, overrides):
    cfg = load_model_config(name, **overrides)
    d = to_hf_config(cfg)
    json.dumps(d)  # must be JSON-serialisable as written to config.json
    hf = transformers.AutoConfig.for_model(**copy.deepcopy(d))
    expected_cls = transformers.Qwen3MoeConfig if cfg.is_moe else transformers.Qwen3Config
    assert type(hf) is expected_cls
    assert hf.hidden_size == cfg.hidden_size
    assert hf.intermediate_size == cfg.ffn_hidden_size
    assert hf.num_hidden_layers == cfg.num_layers
    assert hf.num_attention_heads == cfg.num_attention_heads
    assert hf.num_key_value_heads == cfg.num_query_groups
    assert hf.head_dim == cfg.kv_channels
    assert hf.vocab_size == cfg.vocab_size
    assert hf.tie_word_embeddings is cfg.tie_word_embeddings
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    assert hf.rope_parameters.get("rope_type", "default") == "default"
    assert hf.max_position_embeddings == cfg.max_position_embeddings
    assert hf.rms_norm_eps == cfg.norm_eps
    assert hf.attention_bias is False
    if cfg.is_moe:
        assert hf.num_local_experts == cfg.num_experts
        assert hf.moe_intermediate_size == cfg.moe_ffn_hidden_size
        assert hf.num_experts_per_tok == cfg.moe_router_topk
        # transformers' default is False; the published models (and we) renormalise.
        assert hf.norm_topk_prob is True
        assert hf.router_aux_loss_coef == cfg.moe_aux_loss_coeff
        assert hf.mlp_only_layers == [] and hf.decoder_sparse_step == 1
    if cfg.vocab_size > 151645:
        assert (hf.bos_token_id, hf.eos_token_id) == (151643, 151645)
    else:
        assert hf.bos_token_id is None and hf.eos_token_id is None
    # Both directions: our spelling and transformers' own re-export.
    assert without_name(from_hf_config(d)) == without_name(cfg)
    assert without_name(from_hf_config(hf.to_dict())) == without_name(cfg)


def test_to_hf_config_matches_published_8b_and_30b():
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "rope_theta",
            "rope_scaling", "max_position_embeddings", "rms_norm_eps", "model_type", "architectures",
            "bos_token_id", "eos_token_id", "use_sliding_window", "attention_bias", "hidden_act"]
    moe_keys = ["num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                "router_aux_loss_coef", "decoder_sparse_step", "mlp_only_layers"]
    ours = to_hf_config(load_model_config("qwen3_8b"))
    assert {k: ours[k] for k in keys} == {k: QWEN3_8B_HF[k] for k in keys}
    ours = to_hf_config(load_model_config("qwen3_30b_a3b"))
    assert {k: ours[k] for k in keys + moe_keys} == {k: QWEN3_30B_A3B_HF[k] for k in keys + moe_keys}
    assert ours["torch_dtype"] == "bfloat16"
    assert to_hf_config(load_model_config("tiny"), dtype="float32")["torch_dtype"] == "float32"


# -------------------------------------------------------------------------- errors


def test_wrong_model_type():
    with pytest.raises(ConfigError, match=r"config.json has model_type='llama'; expected qwen3 or qwen3_moe"):
        from_hf_config(dict(QWEN3_8B_HF, model_type="llama"))
    hf = dict(QWEN3_8B_HF)
    del hf["model_type"]
    with pytest.raises(ConfigError, match="model_type=None"):
        from_hf_config(hf)


def test_attention_bias_rejected():
    with pytest.raises(ConfigError, match="attention_bias=true; Qwen3 has no QKV bias"):
        from_hf_config(dict(QWEN3_8B_HF, attention_bias=True))


def test_other_activation_rejected():
    with pytest.raises(ConfigError, match="hidden_act='gelu'; Qwen3 uses silu"):
        from_hf_config(dict(QWEN3_8B_HF, hidden_act="gelu"))


def test_sliding_window_rejected():
    with pytest.raises(ConfigError, match="sliding-window"):
        from_hf_config(dict(QWEN3_8B_HF, use_sliding_window=True, sliding_window=4096))


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def test_yarn_rope_scaling_read_published_spelling():
    cfg = from_hf_config(dict(QWEN3_30B_A3B_HF, rope_scaling=YARN))
    assert (cfg.yarn, cfg.yarn_factor, cfg.yarn_original_max_position_embeddings) == (True, 4.0, 32768)
    assert to_hf_config(cfg)["rope_scaling"] == YARN
    # Other scaling schemes are not Qwen3's and are refused.
    with pytest.raises(ConfigError, match="only plain RoPE and YaRN"):
        from_hf_config(dict(QWEN3_8B_HF, rope_scaling={"type": "linear", "factor": 4.0}))


def test_yarn_rope_scaling_read_transformers5_spelling():
    d = transformers5_config("qwen3_8b").to_dict()
    d["rope_parameters"] = {**YARN, "rope_theta": 1_000_000.0}
    cfg = from_hf_config(d)
    assert cfg.yarn and cfg.yarn_factor == 4.0 and cfg.rope_theta == 1_000_000.0


def test_yarn_switch_exports_rope_scaling_that_transformers_applies():
    """transformers, not us, reads the exported config and builds YaRN's inverse frequencies."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    plain = load_model_config("tiny")
    yarn = load_model_config("tiny", yarn=True)
    freqs = {}
    for name, cfg in (("plain", plain), ("yarn", yarn)):
        hf = AutoConfig.for_model(**to_hf_config(cfg, "float32"))
        kind = hf.rope_parameters["rope_type"]
        fn = ROPE_INIT_FUNCTIONS[kind] if kind != "default" else None
        freqs[name] = (kind, fn(hf, "cpu")[0] if fn else None)
    assert freqs["plain"][0] == "default" and to_hf_config(plain)["rope_scaling"] is None
    kind, inv_freq = freqs["yarn"]
    assert kind == "yarn" and hf.rope_parameters["factor"] == 4.0 and hf.max_position_embeddings == 131072
    # YaRN keeps the high frequencies and slows the low ones by up to the factor.
    base = 1.0 / (yarn.rope_theta ** (torch.arange(0, yarn.kv_channels, 2).float() / yarn.kv_channels))
    assert torch.allclose(inv_freq[0], base[0]) and torch.allclose(inv_freq[-1], base[-1] / 4.0, rtol=1e-3)
    with pytest.raises(ConfigError, match="yarn_factor > 1"):
        load_model_config("tiny", yarn=True, yarn_factor=1.0)


def test_default_rope_scaling_accepted():
    cfg = from_hf_config(dict(QWEN3_8B_HF, rope_scaling={"rope_type": "default"}))
    assert cfg.rope_theta == 1_000_000.0


def test_mixed_dense_and_moe_layers_rejected():
    with pytest.raises(ConfigError, match="mlp_only_layers/decoder_sparse_step"):
        from_hf_config(dict(QWEN3_30B_A3B_HF, mlp_only_layers=[0, 47]))
    with pytest.raises(ConfigError, match="Qwen3-MoE has every layer MoE"):
        from_hf_config(dict(QWEN3_30B_A3B_HF, decoder_sparse_step=2))


def test_from_hf_config_runs_check():
    with pytest.raises(ConfigError, match="moe_router_topk=200 must be in \\[1, num_experts=128\\]"):
        from_hf_config(dict(QWEN3_30B_A3B_HF, num_experts_per_tok=200))
    with pytest.raises(ConfigError, match="num_attention_heads=32 is not a multiple of model.num_query_groups=6"):
        from_hf_config(dict(QWEN3_8B_HF, num_key_value_heads=6))


def test_unknown_yaml_keys(tmp_path: Path):
    p = tmp_path / "typo.yaml"
    p.write_text("name: typo\nhidden_size: 64\nnum_heads: 4\nffn_size: 128\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: unknown keys \['ffn_size', 'num_heads'\]"):
        load_model_config(str(p))


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"unknown keys \['num_heads'\]"):
        load_model_config("tiny", num_heads=4)


def test_unknown_model_name_lists_available():
    with pytest.raises(ConfigError) as exc:
        load_model_config("qwen3_7b")
    msg = str(exc.value)
    assert msg == "unknown model 'qwen3_7b'; available: " + ", ".join(available_models())
    assert "qwen3_8b" in msg and "tiny_moe" in msg


def test_missing_yaml_path():
    with pytest.raises(ConfigError, match="no config file"):
        load_model_config("/nonexistent/dir/model.yaml")


def test_read_hf_config_without_config_json(tmp_path: Path):
    with pytest.raises(ConfigError, match="has no config.json"):
        read_hf_config(tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_size=0), "model.hidden_size must be positive, got 0"),
    (dict(num_query_groups=3), "model.num_attention_heads=4 is not a multiple of model.num_query_groups=3 (GQA)"),
    (dict(ffn_hidden_size=0), "a dense model needs model.ffn_hidden_size > 0"),
])
def test_check_dense(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_model_config("tiny", **overrides)
    assert str(exc.value) == message


@pytest.mark.parametrize("overrides, message", [
    (dict(moe_ffn_hidden_size=0), "an MoE model needs model.moe_ffn_hidden_size > 0"),
    (dict(moe_router_topk=9), "model.moe_router_topk=9 must be in [1, num_experts=8]"),
    (dict(moe_aux_loss_type="z_loss"),
     "model.moe_aux_loss_type='z_loss' is not one of ('global_aux_loss', 'aux_loss', 'seq_aux_loss', 'none')"),
])
def test_check_moe(overrides, message):
    with pytest.raises(ConfigError) as exc:
        load_model_config("tiny_moe", **overrides)
    assert str(exc.value) == message
