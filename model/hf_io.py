"""Reading and writing HF safetensors checkpoints (single file or sharded with an index).

Tensors are read lazily, one at a time, so converting a large model never holds
more than the tensors in flight.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from model.config import ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files copied alongside the weights so that a converted directory is a complete HF model.
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
             "special_tokens_map.json", "added_tokens.json", "generation_config.json",
             "chat_template.jinja")

# transformers' in-memory MoE layout (fused experts); published checkpoints store per-expert
# tensors, but accept the fused form too in case a tool saved it that way.
_EXPERT_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class HFWeights:
    """Lazy access to the tensors of an HF model directory."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / SINGLE_FILE).is_file():
            with safe_open(self.dir / SINGLE_FILE, "pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise ConfigError(f"{self.dir} has no {SINGLE_FILE} or {INDEX_FILE}")
        missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise ConfigError(f"{self.dir}: index names missing shard files {missing[:3]}")
        self._where = weight_map
        self._handles: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self._where)

    def _open(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(self.dir / file, "pt")
        return self._handles[file]

    def has(self, name: str) -> bool:
        return name in self._where or self._fused_source(name) is not None

    def _fused_source(self, name: str):
        m = _EXPERT_KEY.match(name)
        if not m:
            return None
        prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
        fused = f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}"
        if fused not in self._where:
            return None
        # An expert index beyond the fused tensor's first dimension is absent, not an IndexError later.
        if expert >= self._open(self._where[fused]).get_slice(fused).get_shape()[0]:
            return None
        return fused, expert, proj

    def get(self, name: str) -> torch.Tensor:
        if name in self._where:
            return self._open(self._where[name]).get_tensor(name)
        source = self._fused_source(name)
        if source is None:
            raise ConfigError(f"{self.dir} has no tensor {name}")
        fused, expert, proj = source
        t = self._open(self._where[fused]).get_slice(fused)[expert]
        if proj == "gate_proj":
            return t[: t.shape[0] // 2].contiguous()
        if proj == "up_proj":
            return t[t.shape[0] // 2:].contiguous()
        return t

    def stored_names_for(self, name: str) -> str:
        """The on-disk name that holds `name` (itself, or the fused expert tensor)."""
        source = self._fused_source(name) if name not in self._where else None
        return source[0] if source else name

    def dtype(self) -> torch.dtype:
        """Storage dtype of the checkpoint (that of the embedding)."""
        name = "model.embed_tokens.weight"
        if name not in self._where:
            raise ConfigError(f"{self.dir} has no {name}")
        code = self._open(self._where[name]).get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise ConfigError(f"{self.dir}: unsupported weight dtype {code} (expected BF16, F16 or F32)")
        return _SAFETENSORS_DTYPES[code]


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class HFShardWriter:
    """Writes tensors into size-capped safetensors shards plus the HF index."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        if not self._pending:
            return
        tmp = self.dir / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(tmp), metadata={"format": "pt"})
        self._shards.append(sorted(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if not self._pending and not self._shards:
            raise ValueError("no tensors were written")
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.dir / ".shard-00000.safetensors", self.dir / SINGLE_FILE)
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f".shard-{i:05d}.safetensors", self.dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
