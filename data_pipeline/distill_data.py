"""Teacher data for off-policy distillation: what `recipes.generate` writes with
`ids=true` and `top_k_logprobs=K`, read back as next-token rows aligned with the
teacher's top k at every response token.

For a generation output OUT:

    OUT                  JSONL, one row per (prompt, mode): the CLI's fields plus
                         "prompt_ids", "response_ids" and "topk_offset"
    OUT.topk.json        {"k": K, "temperature": T}
    OUT.topk_ids.bin     int32   [tokens, K]  the teacher's K most likely ids, most likely first
    OUT.topk_logp.bin    float16 [tokens, K]  their log-probs at temperature T

Response token j of a row has its record at `topk_offset + j`. The side files are
appended before the JSONL row that points into them, so a row on disk always has its
records; on restart the writer cuts off what no complete row points to (a kill between
the two writes), and the generation CLI regenerates that row.

Token ids, not text, travel from the teacher to the student: re-tokenizing a decoded
response can split it differently and shift every top-k record off its token.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.config import ConfigError

IDS_DTYPE, LOGP_DTYPE = np.int32, np.float16


def topk_paths(output: str | Path) -> tuple[Path, Path, Path]:
    """(meta json, ids file, log-prob file) of a generation output."""
    out = Path(output)
    return (out.with_name(out.name + ".topk.json"), out.with_name(out.name + ".topk_ids.bin"),
            out.with_name(out.name + ".topk_logp.bin"))


def read_topk_meta(output: str | Path) -> dict | None:
    meta = topk_paths(output)[0]
    return json.loads(meta.read_text()) if meta.is_file() else None


class TopKWriter:
    """Appends the teacher's top k per response token next to a generation output."""

    def __init__(self, output: Path, k: int, temperature: float, keep_tokens: int):
        meta_path, self.ids_path, self.logp_path = topk_paths(output)
        meta = {"k": k, "temperature": temperature}
        old = read_topk_meta(output)
        if old is not None and (old["k"], float(old["temperature"])) != (k, float(temperature)):
            raise ConfigError(f"{output} already holds top-k records with k={old['k']} at temperature "
                              f"{old['temperature']}; write to a new output or use the same settings")
        if old is None:
            from model.checkpoint import write_atomic

            write_atomic(meta_path, json.dumps(meta) + "\n")
        self.k, self.tokens = k, keep_tokens
        for path, dtype in ((self.ids_path, IDS_DTYPE), (self.logp_path, LOGP_DTYPE)):
            with open(path, "ab") as f:   # records no complete row points to are cut off
                f.truncate(keep_tokens * k * np.dtype(dtype).itemsize)
        self.files = open(self.ids_path, "ab"), open(self.logp_path, "ab")

    def append(self, ids: np.ndarray, logp: np.ndarray) -> int:
        """Records [n, k] for one response; returns their first record's index."""
        offset = self.tokens
        self.files[0].write(np.ascontiguousarray(ids, IDS_DTYPE).tobytes())
        self.files[1].write(np.ascontiguousarray(logp, LOGP_DTYPE).tobytes())
        self.tokens += len(ids)
        return offset

    def flush(self) -> None:
        for f in self.files:
            f.flush()

    def close(self) -> None:
        for f in self.files:
            f.close()


@dataclass
class TeacherRows:
    """Usable rows of one or more generation outputs, with memory-mapped top-k records."""
    prompt_ids: list = field(default_factory=list)
    response_ids: list = field(default_factory=list)
    records: list = field(default_factory=list)     # (file index, first record) or None
    topk: list = field(default_factory=list)        # per file: (ids [tokens, k], logp [tokens, k]) or None
    k: int = 0
    temperature: float | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)


def read_teacher_rows(files, seq_length: int, need_topk: bool) -> tuple[TeacherRows, Counter]:
    """Every usable row of `files` and the skipped rows by reason. With `need_topk`, every
    file must carry top-k records of one k and temperature (ConfigError otherwise)."""
    data, skipped = TeacherRows(), Counter()
    metas = []
    for i, file in enumerate(files):
        path = Path(str(file))
        meta = read_topk_meta(path)
        if need_topk and meta is None:
            raise ConfigError(f"{path} has no teacher top-k records ({topk_paths(path)[0].name}): generate it with "
                              "top_k_logprobs=K, or give the stage a teacher= to score online")
        mapped = None
        if meta is not None:
            metas.append((meta["k"], float(meta["temperature"])))
            _, ids_path, logp_path = topk_paths(path)
            k = int(meta["k"])
            mapped = tuple(np.memmap(p, dtype=d, mode="r").reshape(-1, k) if p.stat().st_size else
                           np.zeros((0, k), d) for p, d in ((ids_path, IDS_DTYPE), (logp_path, LOGP_DTYPE)))
        data.topk.append(mapped)
        for line in path.read_text(encoding="utf-8").split("\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt, response = list(map(int, row["prompt_ids"])), list(map(int, row["response_ids"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                skipped["unreadable row or no token ids"] += 1
                continue
            if not prompt or not response:
                skipped["empty prompt or response"] += 1
                continue
            if len(prompt) + len(response) - 1 > seq_length:
                skipped["longer than seq_length"] += 1
                continue
            record = None
            if mapped is not None:
                offset = row.get("topk_offset")
                if not isinstance(offset, int) or offset < 0 or offset + len(response) > len(mapped[0]):
                    skipped["no teacher top-k records"] += 1
                    continue
                record = (i, offset)
            data.prompt_ids.append(prompt)
            data.response_ids.append(response)
            data.records.append(record)
    if len(set(metas)) > 1:
        raise ConfigError(f"the teacher files' top-k records differ in (k, temperature): {sorted(set(metas))}")
    if metas:
        data.k, data.temperature = metas[0]
    return data, skipped


def describe(data: TeacherRows, skipped: Counter) -> str:
    text = f"teacher data: {len(data)} responses"
    if data.k:
        text += f", top-{data.k} log-probs at temperature {data.temperature:g}"
    if skipped:
        text += f"; skipped {sum(skipped.values())} rows (" + ", ".join(
            f"{reason}: {count}" for reason, count in sorted(skipped.items())) + ")"
    return text


class DistillSamples:
    """Row i of an endless, epoch-wise reshuffled stream of teacher rows, padded to
    `seq_length`: tokens, targets, loss mask on the response, positions and, with
    `top_k`, the teacher's first top_k records at every response target."""

    def __init__(self, data: TeacherRows, seq_length: int, seed: int, top_k: int = 0):
        from data_pipeline.sft_data import SFTSamples

        self.data, self.seq_length, self.top_k = data, seq_length, top_k
        self.order = SFTSamples(data, seed)   # the same resumable epoch order as SFT

    def __getitem__(self, index: int) -> dict:
        r = self.order._row(index)
        prompt, response = self.data.prompt_ids[r], self.data.response_ids[r]
        seq = np.asarray(prompt + response, np.int64)
        L, n = self.seq_length, len(seq) - 1
        tokens, targets, mask = np.zeros(L, np.int64), np.zeros(L, np.int64), np.zeros(L, np.float32)
        tokens[:n], targets[:n] = seq[:-1], seq[1:]
        start = len(prompt) - 1   # the position whose target is the first response token
        mask[start:n] = 1.0
        out = {"tokens": tokens, "targets": targets, "loss_mask": mask, "position_ids": np.arange(L)}
        if self.top_k:
            f, offset = self.data.records[r]
            ids, logp = self.data.topk[f]
            out["teacher_ids"] = np.zeros((L, self.top_k), np.int64)
            out["teacher_logp"] = np.zeros((L, self.top_k), np.float32)
            out["teacher_ids"][start:n] = ids[offset:offset + len(response), :self.top_k]
            out["teacher_logp"][start:n] = logp[offset:offset + len(response), :self.top_k]
        return out
