"""A finished stage's model as an HF directory: `<stage dir>/hf/`.

recipes.train writes it at the end of a stage, from the final checkpoint, on rank 0 alone:

- the weights (safetensors) and `config.json`, by `model.convert.mcore_to_hf` (the
  converter's rules, as every export);
- `generation_config.json` as Qwen3 publishes it: bos and pad `<|endoftext|>`, eos
  `<|im_end|>` and `<|endoftext|>` (the ids generation stops at, `recipes.generate.stop_ids`),
  and thinking mode's sampling (temperature 0.6, top-p 0.95, top-k 20);
- the stage's tokenizer (`tokenizer=`) with the chat template the stage trained on
  (`data_pipeline.chat.CHAT_TEMPLATE`, which `render` matches), so that
  `AutoTokenizer.from_pretrained(hf).apply_chat_template` gives the training format;
- `export.json`, last: the checkpoint exported and its fingerprint.

All of it is written into `hf.tmp/` and renamed to `hf/` once complete, and an older
export being replaced loses its `export.json` first: whatever a crash leaves, an `hf/` with
`export.json` is complete. A finished stage that runs again (a resume, a re-run) finds
`export.json` naming its final checkpoint and writes nothing.

Which stages: `trainer.export_hf`. `auto` (the default) exports post-training stages
(`Recipe.post_training`: SFT, RL, distillation), whose final checkpoints are models to
use; a pretraining stage's is a step on the way, and its export would cost a copy of the
weights. `true` / `false`: every stage / none. A DeepSpeed checkpoint is not exported in
the job (its ZeRO partitions need gathering first): `true` with `trainer.backend=deepspeed`
is refused before launch, and `auto` logs the two commands that do it.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

HF_DIR = "hf"
MARKER = "export.json"
MODES = ("auto", "true", "false")
# Qwen3's published generation_config.json: its recommended sampling for thinking mode.
QWEN3_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}


def _mode(export_hf) -> str:
    # a YAML or command-line `true` reaches the str field as "True"
    return str(export_hf).lower()


def export_problems(trainer) -> list[str]:
    """Why `trainer.export_hf` cannot be honoured (a recipes.train.TrainerConfig), before launch."""
    mode = _mode(trainer.export_hf)
    if mode not in MODES:
        return [f"trainer.export_hf={trainer.export_hf!r} must be auto, true or false"]
    if mode == "true" and trainer.backend == "deepspeed":
        return ["trainer.export_hf=true needs trainer.backend=megatron: a DeepSpeed checkpoint is converted "
                "after the stage (python -m model.convert ds-to-mcore, then mcore-to-hf)"]
    return []


def wants_export(export_hf, post_training: bool) -> bool:
    """Whether a stage writes `hf/`: `trainer.export_hf`, where `auto` means post-training stages."""
    mode = _mode(export_hf)
    return mode == "true" or (mode == "auto" and post_training)


def generation_config(tokenizer) -> dict:
    """`generation_config.json` for a model with this (Qwen3 chat) tokenizer."""
    from data_pipeline.tokenizer import eod_id
    from recipes.generate import stop_ids

    eod = eod_id(tokenizer)
    # Qwen3's tokenizer has no bos token; its published configs name <|endoftext|>.
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eod
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eod
    return {"bos_token_id": bos, "eos_token_id": stop_ids(tokenizer), "pad_token_id": pad, **QWEN3_SAMPLING}


def _record(stage_dir: Path, ckpt: Path) -> dict:
    from recipes.checkpointing import fingerprint

    # the fingerprint tells a stage trained again into the same iter_N name from the export
    return {"checkpoint": str(ckpt.relative_to(stage_dir)), "fingerprint": fingerprint(ckpt)}


def _marker(out: Path) -> dict | None:
    marker = out / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def exported(stage_dir: Path, ckpt: Path) -> bool:
    """Whether `<stage dir>/hf/` is a complete export of checkpoint `ckpt`."""
    return _marker(Path(stage_dir) / HF_DIR) == _record(Path(stage_dir), Path(ckpt))


def export_stage(stage_dir: Path, ckpt: Path, tokenizer_dir) -> str:
    """Write `<stage dir>/hf/` from the stage's checkpoint `ckpt` unless it already holds it
    (one process; no process group needed); the line for the job's log."""
    from data_pipeline.chat import CHAT_TEMPLATE
    from data_pipeline.tokenizer import load_tokenizer
    from model.convert import mcore_to_hf
    from model.ds_convert import is_deepspeed_checkpoint

    stage_dir, ckpt = Path(stage_dir), Path(ckpt)
    out = stage_dir / HF_DIR
    if is_deepspeed_checkpoint(ckpt):
        return (f"not exported to {out}: {ckpt} is a DeepSpeed checkpoint; python -m model.convert ds-to-mcore "
                f"--ckpt {ckpt} --out CKPT, then mcore-to-hf --ckpt CKPT --out {out}")
    started = time.perf_counter()
    record = _record(stage_dir, ckpt)
    if _marker(out) == record:
        return f"{out} already holds {ckpt.name} as an HF model; not exported again"
    # An older export loses its marker first: mcore_to_hf deletes it before the rename, and
    # a crash in between must not leave a marked, partly deleted directory.
    (out / MARKER).unlink(missing_ok=True)
    # load_tokenizer's object is shared by every caller: the template goes on a copy
    tokenizer = copy.deepcopy(load_tokenizer(tokenizer_dir))
    tokenizer.chat_template = CHAT_TEMPLATE

    def finish(directory: Path) -> None:
        tokenizer.save_pretrained(str(directory))
        (directory / "generation_config.json").write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n")
        (directory / MARKER).write_text(json.dumps(record, indent=2) + "\n")

    mcore_to_hf(ckpt, out, progress=False, finish=finish)
    return f"exported HF model to {out} in {time.perf_counter() - started:.1f} s"
