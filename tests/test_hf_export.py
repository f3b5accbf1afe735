"""A stage's final checkpoint as an HF directory, `<stage dir>/hf/` (recipes/hf_export.py).

The post-training check reads the export the arithmetic cold start (the session's SFT
stage, tests/conftest.py) wrote at its end, so it adds no stage run: transformers loads the
tokenizer, whose chat template renders as data_pipeline.chat does, and the model, whose
greedy continuations are the megatron-core checkpoint's (`recipes.generate` on the stage);
generation_config.json stops at both of Qwen3's end tokens. Which stages export, the
atomic write and the skip of an export already done are checked on their own.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import config_error, python_module, read_json, write_jsonl

# a system turn, history with reasoning (dropped before the last query) and a final answer
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 52+23?"},
    {"role": "assistant", "reasoning_content": "2+3=5, 5\n5+2=7, 75", "content": "\\boxed{75}"},
    {"role": "user", "content": "And 10+31?"},
    {"role": "assistant", "reasoning_content": "0+1=1, 1\n1+3=4, 41", "content": "\\boxed{41}"},
]


def test_post_training_stage_exports_a_working_hf_model(arith_cold_start, arith_task, mini_tokenizer_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_pipeline.chat import render
    from data_pipeline.tokenizer import load_tokenizer

    hf = arith_cold_start / "hf"
    final = read_json(arith_cold_start / "final.json")["checkpoint"]
    assert read_json(hf / "export.json")["checkpoint"] == final
    assert not (arith_cold_start / "hf.tmp").exists()

    tok = AutoTokenizer.from_pretrained(str(hf), local_files_only=True)
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == render(CONVERSATION).text
    for thinking in (True, False):
        assert tok.apply_chat_template(CONVERSATION[:-1], tokenize=False, add_generation_prompt=True,
                                       enable_thinking=thinking) == render(
            CONVERSATION[:-1], add_generation_prompt=True, enable_thinking=thinking).text

    stage_tok = load_tokenizer(mini_tokenizer_dir)
    ends = stage_tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    gen = read_json(hf / "generation_config.json")
    assert gen["eos_token_id"] == ends and gen["pad_token_id"] == gen["bos_token_id"] == ends[1]
    assert (gen["do_sample"], gen["temperature"], gen["top_p"], gen["top_k"]) == (True, 0.6, 0.95, 20)

    # Greedy continuations of held-out prompts: megatron-core on the stage's checkpoint (one rank)...
    held = [json.loads(line) for line in (arith_task / "held.jsonl").read_text().splitlines()[:3]]
    prompts = arith_task / "hf_export_prompts.jsonl"
    write_jsonl(prompts, [{"id": i, "prompt": r["messages"][0]["content"]} for i, r in enumerate(held)])
    out = arith_task / "hf_export_greedy.jsonl"
    out.unlink(missing_ok=True)
    python_module("recipes.generate", f"checkpoint={arith_cold_start}", f"tokenizer={mini_tokenizer_dir}",
                  f"input={prompts}", f"output={out}", "max_new_tokens=40", "ids=true", "progress=false")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(held) and any(r["finish"] == "stop" for r in rows)   # the end tokens are met
    # ...and transformers on the export, prompted through the exported chat template.
    model = AutoModelForCausalLM.from_pretrained(str(hf), local_files_only=True, dtype=torch.float32).eval()
    for row in rows:
        ids = tok.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
        assert list(ids) == row["prompt_ids"]
        with torch.no_grad():
            got = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, top_p=None, top_k=None,
                                 temperature=None)[0, len(ids):].tolist()
        assert got == row["response_ids"], (row["response"], tok.decode(got))


@pytest.mark.parametrize("module, post_training", [
    ("recipes.pretrain", False), ("recipes.sft", True), ("recipes.rl", True), ("recipes.distill", True)])
def test_which_stages_export(module, post_training):
    import importlib

    from model.launch import compose
    from recipes.hf_export import wants_export
    from recipes.train import TrainerConfig

    recipe = importlib.import_module(module).RECIPE
    assert recipe.post_training is post_training
    assert wants_export(TrainerConfig().export_hf, recipe.post_training) is post_training   # the default: auto
    for value, wanted in (("true", True), ("false", False), ("auto", post_training)):
        composed = compose("config", [f"trainer.export_hf={value}"]).trainer.export_hf   # YAML's true is "True"
        assert wants_export(composed, recipe.post_training) is wanted


def test_bad_export_settings_fail_before_launch(tmp_path):
    from recipes.hf_export import export_problems
    from recipes.train import TrainerConfig

    assert "trainer.export_hf='maybe' must be auto, true or false" in config_error(
        ["python", "-m", "recipes.pretrain", "model=tiny", f"run.root={tmp_path}", "trainer.export_hf=maybe"])
    # a DeepSpeed checkpoint needs its ZeRO partitions gathered first: not in the job
    assert export_problems(TrainerConfig(backend="deepspeed", export_hf="True"))[0].startswith(
        "trainer.export_hf=true needs trainer.backend=megatron")
    assert export_problems(TrainerConfig(backend="deepspeed")) == []   # auto: logs the commands instead


def test_export_is_atomic_and_not_redone(arith_task, mini_tokenizer_dir, tmp_path, monkeypatch):
    from recipes import hf_export

    stage = tmp_path / "stage"
    ckpt = stage / "checkpoints" / "iter_0000001"
    ckpt.parent.mkdir(parents=True)
    ckpt.symlink_to(arith_task / "base")

    def crash(tokenizer):
        raise RuntimeError("killed mid-export")

    with monkeypatch.context() as m:   # dies after the weights, before the directory is complete
        m.setattr(hf_export, "generation_config", crash)
        with pytest.raises(RuntimeError):
            hf_export.export_stage(stage, ckpt, mini_tokenizer_dir)
    assert not (stage / "hf").exists() and not hf_export.exported(stage, ckpt)

    line = hf_export.export_stage(stage, ckpt, mini_tokenizer_dir)
    assert line.startswith(f"exported HF model to {stage / 'hf'} in ")
    assert hf_export.exported(stage, ckpt) and not (stage / "hf.tmp").exists()
    weights = stage / "hf" / "model.safetensors"
    written = os.stat(weights).st_mtime_ns
    assert "not exported again" in hf_export.export_stage(stage, ckpt, mini_tokenizer_dir)
    assert os.stat(weights).st_mtime_ns == written

    later = stage / "checkpoints" / "iter_0000002"   # the stage went on: its new final checkpoint replaces it
    later.symlink_to(arith_task / "base")
    assert hf_export.export_stage(stage, later, mini_tokenizer_dir).startswith("exported HF model to ")
    assert hf_export.exported(stage, later) and not hf_export.exported(stage, ckpt)
