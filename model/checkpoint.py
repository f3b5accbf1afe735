"""Model weights in megatron-core's distributed checkpoint format (torch_dist).

A checkpoint directory holds global tensors (layers stacked, experts stacked, TP
shards merged), so it loads at any TP/PP/EP layout. Next to megatron-core's files we
keep `qwen3_model.json`, the ModelConfig that built it, so tools need no flags to
know the architecture.

Saves are atomic: everything is written to `<dir>.tmp` and renamed into place only
once complete, so a crash never leaves a half-written checkpoint under the real name.
The last file written before the rename is `manifest.json`: every other file's size and
SHA-256, so that damage done later (a truncated copy, a failing disk) is found before a
resume trusts the checkpoint (`verify_manifest`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.mapping import (LocalNonpersistentObject, ShardedObject, ShardedTensor,
                                                     ShardedTensorFactory)
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from model.config import ConfigError, ModelConfig, model_config_from_dict, model_config_to_dict

MODEL_CONFIG_FILE = "qwen3_model.json"
MANIFEST_FILE = "manifest.json"


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "metadata.json").is_file()


def write_atomic(path: str | Path, text: str) -> None:
    """`text` as the whole of `path` or not at all: written beside it and renamed over it."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def model_sharded_state_dict(chunks) -> dict:
    """Sharded state dict of all model chunks, nested the way Megatron-LM nests it."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def iter_sharded_tensors(sharded_sd: dict) -> Iterator[ShardedTensor]:
    """Every ShardedTensor, with factories (SwiGLU fc1) expanded into their parts.

    The parts' `.data` are views of the parameters, so writing into them fills the model.
    """
    for value in nested_values(sharded_sd):
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from (built if isinstance(built, list) else nested_values(built))
        elif isinstance(value, ShardedTensor):
            yield value


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_model(chunks, ckpt_dir: str | Path, model_cfg: ModelConfig, extra: dict | None = None) -> Path:
    """Collective: write the model chunks' weights to `ckpt_dir` atomically."""
    return save_sharded(model_sharded_state_dict(chunks), ckpt_dir, model_cfg, extra)


def save_sharded(sharded_sd: dict, ckpt_dir: str | Path, model_cfg: ModelConfig,
                 extra: dict | None = None) -> Path:
    """Collective: write a sharded state dict (the model's, possibly with optimizer and
    training state beside it) to `ckpt_dir` atomically, with `qwen3_model.json`."""
    final = Path(ckpt_dir)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(sharded_sd, str(tmp))
    _barrier()
    if _rank() == 0:
        meta = {"model": model_config_to_dict(model_cfg), **(extra or {})}
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    _barrier()
    write_manifest(tmp)
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()
    return final


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checksums(root: Path, names: list[str]) -> dict[str, str]:
    """Collective when torch.distributed is up: the files' SHA-256, each rank hashing every
    world-size-th file, so that a multi-TB checkpoint costs each rank its share of the
    reading, not rank 0 all of it."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {name: _sha256(root / name) for name in names[rank::world]}
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {name: digest for part in parts for name, digest in part.items()}


def write_manifest(directory: str | Path) -> None:
    """Collective: record every file under `directory` (size, SHA-256) in its manifest,
    written by rank 0 atomically. Call it on the complete `.tmp` directory, before the
    rename that publishes it."""
    root = Path(directory)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)
    digests = _checksums(root, names)
    if _rank() == 0:
        files = {name: {"size": (root / name).stat().st_size, "sha256": digests[name]} for name in names}
        write_atomic(root / MANIFEST_FILE, json.dumps({"files": files}, indent=1) + "\n")
    _barrier()


def verify_manifest(directory: str | Path, checksums: bool = True) -> str | None:
    """Why the checkpoint in `directory` does not match its manifest (None when it does, or
    when it has none: written before manifests, or by another tool). Sizes first, which is
    cheap and what a truncated copy shows; then, with `checksums`, the contents, which is
    collective when torch.distributed is up (every rank must call it)."""
    root = Path(directory)
    try:
        files = json.loads((root / MANIFEST_FILE).read_text())["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return f"its {MANIFEST_FILE} is unreadable"
    for name, entry in sorted(files.items()):
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes where {entry['size']} were written"
    if checksums:
        digests = _checksums(root, sorted(files))
        for name in sorted(files):
            if digests[name] != files[name]["sha256"]:
                return f"{name} does not match its checksum"
    return None


def load_model(chunks, ckpt_dir: str | Path) -> None:
    """Collective: load weights from `ckpt_dir` into the model chunks (any layout)."""
    if not is_checkpoint(ckpt_dir):
        raise ConfigError(f"{ckpt_dir} is not a megatron-core distributed checkpoint (no metadata.json)")
    apply_model_state(chunks, load_sharded(model_sharded_state_dict(chunks), ckpt_dir))


def load_sharded(sharded_sd: dict, ckpt_dir: str | Path) -> dict:
    """Collective: megatron-core's load of `sharded_sd` (a model's, possibly with optimizer
    and training state beside it) from `ckpt_dir`, where the extra states only Transformer
    Engine's standalone norms keep (model.spec.TE_NORM_EXTRA_STATES) may be absent: a
    checkpoint of the local spec then loads into the TE spec, those norms getting no extra
    state (what TE's own set_extra_state(None) means: nothing to restore). Anything else
    the request holds and the checkpoint lacks still fails the load."""
    from model.spec import TE_NORM_EXTRA_STATES

    wanted = [v for v in nested_values(sharded_sd)
              if isinstance(v, ShardedObject) and v.key.endswith(TE_NORM_EXTRA_STATES)]
    if wanted:   # only the TE spec asks for them: read which the checkpoint has (metadata only)
        stored = {v.key for v in load_sharded_metadata(str(ckpt_dir)).values()}
        absent = {id(v) for v in wanted if v.key not in stored}
        dict_list_map_inplace(lambda v: LocalNonpersistentObject(None) if id(v) in absent else v, sharded_sd)
    return dist_checkpointing.load(sharded_sd, str(ckpt_dir))


def load_for_inference(ckpt_dir: str | Path, par, model_cfg: ModelConfig | None = None) -> list:
    """Collective: model chunks for this rank built from the checkpoint's own config (or
    `model_cfg`) and loaded, in the inference dtype (bf16 on GPU, fp32 on CPU), eval mode."""
    from model.builder import build_model

    cfg = model_cfg or read_model_config(ckpt_dir)
    chunks = build_model(cfg, par, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    load_model(chunks, ckpt_dir)
    for c in chunks:
        c.eval()
    return chunks


def apply_model_state(chunks, loaded: dict) -> None:
    """Copy the model entries of a loaded state dict into the chunks."""
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"], strict=True)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded[f"model{i}"], strict=True)


def read_model_config(ckpt_dir: str | Path) -> ModelConfig:
    path = Path(ckpt_dir) / MODEL_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"{ckpt_dir} has no {MODEL_CONFIG_FILE}; pass the architecture with --model NAME")
    return model_config_from_dict(json.loads(path.read_text())["model"])


def checkpoint_dtype(ckpt_dir: str | Path) -> torch.dtype:
    """Storage dtype of the weights (that of the word embedding)."""
    return tensor_shapes(ckpt_dir)["embedding.word_embeddings.weight"][1]


def tensor_shapes(ckpt_dir: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor in the checkpoint (reads metadata only)."""
    meta = FileSystemReader(str(ckpt_dir)).read_metadata().state_dict_metadata
    return {k: (tuple(v.size), v.properties.dtype) for k, v in meta.items()
            if isinstance(v, TensorStorageMetadata)}


def load_tensors(ckpt_dir: str | Path, requests: dict[str, tuple[tuple[int, ...], torch.dtype, tuple[int, ...]]]
                 ) -> dict[str, torch.Tensor]:
    """Load slices of global tensors without building a model or a process group.

    `requests` maps key -> (global shape, dtype, leading indices): with indices (i,) the
    result is global[i], with () the whole tensor. Only the stored chunks that overlap the
    slice are read. (megatron-core's own loader cannot do this in one process: it expects
    the other ranks of a regular sharding grid to read the rest.)
    """
    buffers, offsets = {}, {}
    for key, (shape, dtype, index) in requests.items():
        buffers[key] = torch.empty((1,) * len(index) + tuple(shape[len(index):]), dtype=dtype)
        offsets[key] = tuple(index) + (0,) * (len(shape) - len(index))
    dcp_load(buffers, storage_reader=FileSystemReader(str(ckpt_dir)), planner=_SlicePlanner(offsets),
             no_dist=True)
    return {k: v.reshape(v.shape[len(requests[k][2]):]) for k, v in buffers.items()}


class _SlicePlanner(DefaultLoadPlanner):
    """DCP load planner that reads each requested tensor as a box at a global offset."""

    def __init__(self, offsets: dict[str, tuple[int, ...]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.offsets = offsets

    def create_local_plan(self):
        items = []
        for key, tensor in self.state_dict.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[key]), sizes=tensor.size())
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def lookup_tensor(self, index):
        # The buffer *is* the requested box; read items address it relative to it.
        return self.state_dict[index.fqn]
