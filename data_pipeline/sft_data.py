"""SFT data: chat JSONL -> tokenized, loss-masked, packed rows, cached on disk.

Each input line is {"messages": [...], "tools": [...] (optional)} in the schema of
data_pipeline.chat. A conversation becomes next-token triples (inputs, labels, loss mask)
with loss only on assistant output, and triples are packed into rows of `seq_length`
tokens (best fit, longest first). Packed rows carry `segment_ids` so that attention stays
inside each conversation (model.packing).

Unusable rows are skipped and counted by reason (bad JSON, missing roles, empty assistant
turn, too long with overlength=drop, nothing to learn after truncation). The result is
cached under a key of the inputs, the tokenizer and the settings, written atomically, so
every rank and every restart reads the same rows.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline import chat
from model.config import ConfigError

FORMAT_VERSION = 1
OVERLENGTH = ("drop", "truncate")
_ARRAYS = ("tokens", "labels", "loss_mask", "segment_ids")


@dataclass
class SFTData:
    tokens: np.ndarray       # [rows, seq] int32
    labels: np.ndarray       # [rows, seq] int32
    loss_mask: np.ndarray    # [rows, seq] uint8
    segment_ids: np.ndarray  # [rows, seq] int32; padding is the last segment of its row
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def packed(self) -> bool:
        """Whether rows hold several conversations (sft.data.pack) or one each."""
        return bool(self.stats.get("pack", True))


def input_files(files) -> list[Path]:
    paths = [Path(str(f)) for f in ([files] if isinstance(files, (str, Path)) else list(files or []))]
    if not paths:
        raise ConfigError("sft.data.files is empty: give one or more chat JSONL files")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"SFT data file(s) not found: {', '.join(missing)}")
    return paths


def read_conversations(paths: list[Path], skipped: Counter):
    """(messages, tools) per usable line; the others are counted in `skipped` by reason."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    skipped["bad_json"] += 1
                    continue
                messages = row.get("messages") if isinstance(row, dict) else None
                reason = chat.problem(messages)
                if reason:
                    skipped[reason] += 1
                    continue
                yield messages, row.get("tools")


def next_token_triple(ids: list[int], mask: list[int], seq_length: int, overlength: str):
    """(inputs, labels, loss_mask) of at most seq_length tokens, or a skip reason."""
    if len(ids) - 1 > seq_length:
        if overlength == "drop":
            return "too_long"
        ids, mask = ids[:seq_length + 1], mask[:seq_length + 1]
    labels_mask = mask[1:]
    if not any(labels_mask):
        return "no_assistant_tokens"
    return np.asarray(ids[:-1], np.int32), np.asarray(ids[1:], np.int32), np.asarray(labels_mask, np.uint8)


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: bins (lists of item indices) of total length <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []   # (free space, bin index), sorted
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            bins.append([i])
            b, room = len(bins) - 1, capacity - lengths[i]
        else:
            room, b = free.pop(k)
            bins[b].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, b))
    return bins


def assemble(triples: list, bins: list[list[int]], seq_length: int, pad_id: int, document_multiple: int = 1) -> dict:
    """Rows of `seq_length` from the packed `bins`. Each conversation takes a multiple of
    `document_multiple` positions: its padding (no loss) joins its segment, so that every
    document boundary falls on a multiple; causal attention keeps it from the tokens before."""
    rows = len(bins)
    out = {"tokens": np.full((rows, seq_length), pad_id, np.int32),
           "labels": np.full((rows, seq_length), pad_id, np.int32),
           "loss_mask": np.zeros((rows, seq_length), np.uint8),
           "segment_ids": np.zeros((rows, seq_length), np.int32)}
    for r, items in enumerate(bins):
        at = 0
        for seg, i in enumerate(items):
            inputs, labels, mask = triples[i]
            n = len(inputs)
            out["tokens"][r, at:at + n] = inputs
            out["labels"][r, at:at + n] = labels
            out["loss_mask"][r, at:at + n] = mask
            span = -(-n // document_multiple) * document_multiple
            out["segment_ids"][r, at:at + span] = seg
            at += span
        out["segment_ids"][r, at:] = len(items)
    return out


def _fingerprint(paths: list[Path], tokenizer_dir: Path, settings: dict) -> str:
    h = hashlib.sha256(json.dumps({"version": FORMAT_VERSION, **settings}, sort_keys=True).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    for name in sorted(os.listdir(tokenizer_dir)):
        if name.endswith((".json", ".jinja")):
            h.update((Path(tokenizer_dir) / name).read_bytes())
    return h.hexdigest()[:16]


def build(files, tokenizer_dir, seq_length: int, cache_dir, overlength: str = "drop", pack_rows: bool = True,
          progress: bool = True, document_multiple: int = 1) -> tuple[SFTData, Path]:
    """Tokenize and pack (or load the cached result). Returns the data and its cache dir.

    `document_multiple`: every packed conversation is padded to a multiple of it (context
    parallelism on the THD path splits each document into 2*cp chunks; the caller's
    model.parallel.sequence_multiple)."""
    from data_pipeline.tokenizer import eod_id, load_tokenizer

    paths = input_files(files)
    if overlength not in OVERLENGTH:
        raise ConfigError(f"sft.data.overlength={overlength!r} must be one of {OVERLENGTH}")
    if seq_length % document_multiple:
        raise ConfigError(f"seq_length={seq_length} is not a multiple of the document multiple {document_multiple}")
    settings = {"seq_length": seq_length, "overlength": overlength, "pack": pack_rows}
    if document_multiple > 1:   # absent otherwise, so that earlier caches keep their keys
        settings["document_multiple"] = document_multiple
    key = _fingerprint(paths, Path(tokenizer_dir), settings)
    target = Path(cache_dir) / f"sft_{key}"
    if (target / "stats.json").is_file():
        return load(target), target

    tokenizer = load_tokenizer(tokenizer_dir)
    skipped: Counter = Counter()
    triples, conversations = [], 0
    rows = read_conversations(paths, skipped)
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc="tokenizing SFT data", unit=" conv")
    for messages, tools in rows:
        conversations += 1
        ids, mask = chat.encode(tokenizer, messages, tools=tools)
        triple = next_token_triple(ids, mask, seq_length, overlength)
        if isinstance(triple, str):
            skipped[triple] += 1
        else:
            triples.append(triple)
    unreadable = sum(skipped.values()) - (conversations - len(triples))
    if not triples:
        raise ConfigError(f"no usable SFT conversations in {', '.join(map(str, paths))} "
                          f"(skipped: {dict(skipped)})")
    lengths = [len(t[0]) for t in triples]
    spans = [-(-n // document_multiple) * document_multiple for n in lengths]
    bins = pack(spans, seq_length) if pack_rows else [[i] for i in range(len(triples))]
    arrays = assemble(triples, bins, seq_length, eod_id(tokenizer), document_multiple)
    stats = {
        "conversations_read": conversations + unreadable,
        "conversations_used": len(triples),
        "skipped": dict(sorted(skipped.items())),
        "rows": len(bins),
        "seq_length": seq_length,
        "tokens": int(sum(lengths)),
        "loss_tokens": int(sum(int(t[2].sum()) for t in triples)),
        # non-pad tokens over all tokens in the rows
        "packing_efficiency": sum(lengths) / (len(bins) * seq_length),
        **settings,
    }
    _save(target, arrays, stats)
    return load(target), target


def _save(target: Path, arrays: dict, stats: dict) -> None:
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in _ARRAYS:
        np.save(tmp / f"{name}.npy", arrays[name])
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same cache first
        shutil.rmtree(tmp, ignore_errors=True)


def load(target: Path) -> SFTData:
    arrays = {name: np.load(target / f"{name}.npy", mmap_mode="r") for name in _ARRAYS}
    return SFTData(**arrays, stats=json.loads((target / "stats.json").read_text()))


def describe(stats: dict) -> str:
    skipped = ", ".join(f"{k}={v}" for k, v in stats["skipped"].items()) or "none"
    return (f"SFT data: {stats['conversations_used']} conversations in {stats['rows']} rows of "
            f"{stats['seq_length']} tokens, packing efficiency {stats['packing_efficiency']:.1%}, "
            f"skipped: {skipped}")


class SFTSamples:
    """Row i of an endless, epoch-wise reshuffled stream over the rows (packed rows with
    their `segment_ids`; unpacked rows without).

    Sample index -> row is a pure function of (index, seed), so a resumed run sees
    exactly the rows an uninterrupted one would.
    """

    def __init__(self, data: SFTData, seed: int):
        self.data, self.seed = data, seed
        self._perm: dict[int, np.ndarray] = {}

    def _row(self, index: int) -> int:
        epoch, k = divmod(index, len(self.data))
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.data))}
        return int(self._perm[epoch][k])

    def __getitem__(self, index: int) -> dict:
        import torch

        from model.packing import segment_positions

        r = self._row(index)
        row = {"tokens": np.array(self.data.tokens[r], np.int64),
               "labels": np.array(self.data.labels[r], np.int64),
               "loss_mask": np.array(self.data.loss_mask[r], np.float32)}
        if not self.data.packed:
            # One conversation, then padding without loss: plain causal attention keeps the
            # padding out of every loss position, so the row needs no segment_ids, and no
            # THD on the TE path, which would allow only one row per micro-batch.
            return {**row, "position_ids": np.arange(len(row["tokens"]))}
        segments = torch.from_numpy(np.array(self.data.segment_ids[r], np.int64))
        return {**row, "segment_ids": segments.numpy(),
                "position_ids": segment_positions(segments.unsqueeze(0))[0].numpy()}
