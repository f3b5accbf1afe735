"""Validated access to megatron-core indexed datasets (`{prefix}.bin` + `{prefix}.idx`).

megatron-core's `IndexedDataset` trusts its files: a truncated `.bin` is memory-mapped
anyway and fails (or returns garbage) only when a sample past the end is read, hours
into a run; a damaged `.idx` fails on a bare `assert`. `open_indexed` reads the index
header itself first and checks every size relation the format implies, so a bad file
is reported up front as a one-line `ConfigError` naming the file and the problem.

The `.idx` layout (megatron-core 0.16, little-endian), as written by its `_IndexWriter`:

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    u64       version (1)
    u8        dtype code of the tokens in `.bin` (megatron `DType`: 1 uint8 ... 8 uint16)
    u64       S, number of sequences
    u64       D, number of entries in the document index (documents + 1)
    S  x i32  sequence lengths (tokens)
    S  x i64  sequence byte offsets into `.bin`
    D  x i64  document index: sequence number at which each document starts, then S
    [S x i8   sequence modes, multimodal datasets only]
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from model.config import ConfigError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34
# megatron-core's DType codes; kept here so that validation needs no torch import.
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
               6: np.float64, 7: np.float32, 8: np.uint16}


@dataclass(frozen=True)
class IndexInfo:
    """What the header and index arrays of a valid dataset say."""

    prefix: str
    dtype: type
    sequences: int
    documents: int
    tokens: int
    bin_bytes: int


def _paths(prefix: str) -> tuple[str, str]:
    return prefix + ".bin", prefix + ".idx"


def validate(prefix: str | os.PathLike) -> IndexInfo:
    """Check `{prefix}.idx` and `{prefix}.bin` for consistency; raise ConfigError if not."""
    prefix = os.fspath(prefix)
    bin_path, idx_path = _paths(prefix)
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        raise ConfigError(f"indexed dataset {prefix}: missing {' and '.join(missing)}")

    idx_size = os.path.getsize(idx_path)
    if idx_size < HEADER_BYTES:
        raise ConfigError(f"{idx_path} is truncated: {idx_size} bytes, shorter than the "
                          f"{HEADER_BYTES}-byte header")
    with open(idx_path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if head[:len(MAGIC)] != MAGIC:
        raise ConfigError(f"{idx_path} is not a megatron-core index: bad magic {head[:len(MAGIC)]!r}")
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", head, len(MAGIC))
    if version != VERSION:
        raise ConfigError(f"{idx_path} has index version {version}, expected {VERSION}")
    if code not in DTYPE_CODES:
        raise ConfigError(f"{idx_path} has unknown token dtype code {code}")
    dtype = DTYPE_CODES[code]
    if n_doc < 1:
        raise ConfigError(f"{idx_path} has an empty document index (it must hold at least 0)")

    # Python ints: a corrupted count must not wrap around in int64 arithmetic.
    expected = HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    if idx_size < expected:
        raise ConfigError(f"{idx_path} is truncated: header declares {n_seq} sequences and "
                          f"{n_doc - 1} documents, needing {expected} bytes, file has {idx_size}")
    if idx_size == expected + n_seq and n_seq > 0:
        raise ConfigError(f"{idx_path} is a multimodal index (sequence modes present); "
                          "only text datasets are supported")
    if idx_size != expected:
        raise ConfigError(f"{idx_path} has {idx_size - expected} unexpected trailing bytes "
                          f"(header declares {n_seq} sequences, {n_doc - 1} documents)")

    mm = np.memmap(idx_path, mode="r", dtype=np.uint8)
    try:
        off = HEADER_BYTES
        lengths = np.frombuffer(mm, dtype="<i4", count=n_seq, offset=off)
        off += lengths.nbytes
        pointers = np.frombuffer(mm, dtype="<i8", count=n_seq, offset=off)
        off += pointers.nbytes
        doc_index = np.frombuffer(mm, dtype="<i8", count=n_doc, offset=off)

        if n_seq and lengths.min() < 0:
            raise ConfigError(f"{idx_path} is corrupt: negative sequence length")
        if doc_index[0] != 0 or doc_index[-1] != n_seq or (np.diff(doc_index) < 0).any():
            raise ConfigError(f"{idx_path} is corrupt: document index does not run from 0 "
                              f"to {n_seq} sequences in order")
        itemsize = np.dtype(dtype).itemsize
        byte_lengths = lengths.astype(np.int64) * itemsize
        if n_seq and (pointers[0] != 0 or (pointers[1:] != pointers[:-1] + byte_lengths[:-1]).any()):
            raise ConfigError(f"{idx_path} is corrupt: sequence offsets do not match sequence lengths")
        tokens = int(lengths.sum(dtype=np.int64))
    finally:
        del mm

    bin_expected = tokens * itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size < bin_expected:
        raise ConfigError(f"{bin_path} is truncated: index expects {bin_expected} bytes, "
                          f"file has {bin_size}")
    if bin_size > bin_expected:
        raise ConfigError(f"{bin_path} is larger than its index says: index expects "
                          f"{bin_expected} bytes, file has {bin_size}")
    return IndexInfo(prefix, dtype, n_seq, n_doc - 1, tokens, bin_size)


def open_indexed(prefix: str | os.PathLike, mmap: bool = True):
    """A megatron-core `IndexedDataset` over `prefix`, after `validate` passed."""
    validate(prefix)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(os.fspath(prefix), multimodal=False, mmap=mmap)


def describe(prefix: str | os.PathLike) -> dict:
    """Documents, sequences, tokens and token dtype of a (validated) dataset, for logs."""
    info = validate(prefix)
    return {"prefix": info.prefix, "documents": info.documents, "sequences": info.sequences,
            "tokens": info.tokens, "dtype": np.dtype(info.dtype).name, "bin_bytes": info.bin_bytes}
