"""Tokenize raw text into megatron-core indexed datasets (`{prefix}.bin` + `{prefix}.idx`).

    python -m data_pipeline.preprocess --input FILES... --output-prefix P --tokenizer DIR
        [--workers N] [--text-key text] [--length-buckets E0,E1,...,En]
        [--append-eod | --no-append-eod] [--overwrite]

Inputs (globs allowed; expanded sorted, duplicates dropped, order otherwise kept):

- `.jsonl` / `.json`: JSON Lines, one object per line, text under `--text-key`. Files are
  read as bytes and decoded line by line, so one bad line is counted, not fatal (a
  `.json` file holding one JSON array is not JSON Lines: its lines count as invalid).
- `.parquet`: rows through HF `datasets` (local files only, streamed), text column
  `--text-key`; a null cell or an absent column counts as a missing text field.
- `.txt`: the whole file is one document (suits long documents such as books or source
  files; split line-per-document text into JSONL first).

Every document is tokenized without special tokens, followed by EOD (`<|endoftext|>`,
unless `--no-append-eod`), and written as one sequence = one document. The token dtype
is megatron-core's `DType.optimal_dtype(len(tokenizer))`: int32 for Qwen3's 151,669 ids
(megatron has no uint32; uint16 only fits vocabularies below 65,500).

Every input row is either written or counted as skipped under a reason (see `REASONS`
plus the length-bucket reasons); the totals, per reason and per file, are printed at
the end and saved to `{P}.stats.json`.

`--length-buckets E0,...,En` (strictly increasing) writes, instead of `P`, one dataset
per bucket: a document of L tokens (EOD included) with E_i <= L < E_{i+1} goes to
`bucket_prefix(P, E_i, E_{i+1})` = `{P}_len{E_i}-{E_{i+1}}`; documents shorter than E0
or of En tokens or more are skipped and counted (never truncated).

Tokenization runs in N spawned worker processes over chunks of documents (a bounded
window of chunks in flight, so memory does not grow with the input); results are
consumed in submission order, so the output is byte-identical for any N. Outputs are
built under temporary names and renamed into place (`.bin`, then `.idx`) only once
complete, so an interrupted run never leaves a half-written dataset under the real name.
"""

from __future__ import annotations

import argparse
import bisect
import glob
import json
import multiprocessing as mp
import os
import signal
import sys
import time
import warnings
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from model.config import ConfigError

EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".txt": "txt"}

# Skip reasons (stable keys in `{P}.stats.json`).
BAD_UTF8 = "non-UTF-8 bytes"
BAD_JSON = "invalid JSON"
NOT_OBJECT = "JSON value is not an object"
BLANK_LINE = "blank line"
MISSING_TEXT = "missing text field"
NOT_STRING = "text field is not a string"
SURROGATES = "text has unpaired surrogates"
EMPTY_TEXT = "empty text"
REASONS = (BAD_UTF8, BAD_JSON, NOT_OBJECT, BLANK_LINE, MISSING_TEXT, NOT_STRING, SURROGATES,
           EMPTY_TEXT)

# A chunk is what one worker task tokenizes: big enough to amortise the inter-process
# round trip, small enough that progress moves and memory stays bounded.
CHUNK_DOCS = 256
CHUNK_CHARS = 1 << 19
# Chunks in flight per worker. Pool.imap would read the whole input ahead into its task
# queue (it has no back-pressure), so the window is kept by hand.
IN_FLIGHT_PER_WORKER = 3


def bucket_prefix(prefix, lo: int, hi: int) -> str:
    """Output prefix of the length bucket [lo, hi) tokens."""
    return f"{os.fspath(prefix)}_len{int(lo)}-{int(hi)}"


def below_reason(lo: int) -> str:
    return f"shorter than {lo} tokens"


def above_reason(hi: int) -> str:
    return f"{hi} tokens or longer"


def parse_length_buckets(spec) -> list[int] | None:
    """`"E0,E1,...,En"` (or a sequence of ints) -> strictly increasing edges, or None."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        edges = [int(str(x).strip()) for x in items]
    except ValueError:
        raise ConfigError(f"--length-buckets must be comma-separated integers, got {spec!r}") from None
    if len(edges) < 2:
        raise ConfigError(f"--length-buckets needs at least two edges (E0,E1), got {spec!r}")
    if edges[0] < 1:
        raise ConfigError(f"--length-buckets edges must be positive, got {spec!r}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ConfigError(f"--length-buckets edges must be strictly increasing, got {spec!r}")
    return edges


def resolve_inputs(inputs: Iterable) -> list[Path]:
    """Expand globs; check every file exists and has a known extension."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files, seen = [], set()
    for pattern in map(os.fspath, inputs):
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ConfigError(f"no input files match {pattern}")
        elif os.path.isdir(pattern):
            raise ConfigError(f"input {pattern} is a directory; pass files or a glob such as {pattern}/*.jsonl")
        elif not os.path.isfile(pattern):
            raise ConfigError(f"input file {pattern} does not exist")
        else:
            matches = [pattern]
        for m in matches:
            key = os.path.realpath(m)
            if key not in seen:
                seen.add(key)
                files.append(Path(m))
    if not files:
        raise ConfigError("no input files given")
    for f in files:
        if f.suffix.lower() not in EXTENSIONS:
            raise ConfigError(f"{f}: unknown input extension {f.suffix!r} "
                              f"(known: {', '.join(EXTENSIONS)})")
    return files


# --- readers: yield (text, None) or (None, skip reason) per input row ----------------

def _check_text(value) -> tuple[str | None, str | None]:
    if not isinstance(value, str):
        return None, NOT_STRING
    if not value.strip():
        return None, EMPTY_TEXT
    try:
        # JSON "\ud800" escapes decode to lone surrogates, which the tokenizer rejects.
        value.encode("utf-8")
    except UnicodeEncodeError:
        return None, SURROGATES
    return value, None


def _read_jsonl(path: Path, key: str) -> Iterator[tuple[str | None, str | None]]:
    with open(path, "rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield None, BAD_UTF8
                continue
            if not line.strip():
                yield None, BLANK_LINE
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield None, BAD_JSON
                continue
            if not isinstance(obj, dict):
                yield None, NOT_OBJECT
            elif key not in obj or obj[key] is None:
                yield None, MISSING_TEXT
            else:
                yield _check_text(obj[key])


def _read_parquet(path: Path, key: str) -> Iterator[tuple[str | None, str | None]]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    ds = datasets.load_dataset("parquet", data_files=[str(path)], split="train", streaming=True)
    for row in ds:
        if row.get(key) is None:  # absent column, or a null cell
            yield None, MISSING_TEXT
        else:
            yield _check_text(row[key])


def _read_txt(path: Path, key: str) -> Iterator[tuple[str | None, str | None]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        yield None, BAD_UTF8
        return
    yield _check_text(text)


READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet, "txt": _read_txt}


# --- worker side -----------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_json: str, eod: int | None, dtype: str) -> None:
    # One process = one core: no Rayon threads inside the tokenizer, so `--workers`
    # means what it says (and benchmarks compare like with like).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER["tok"] = Tokenizer.from_str(tokenizer_json)
    _WORKER["eod"] = eod
    _WORKER["dtype"] = np.dtype(dtype)


def _encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of all `texts` (each + EOD) concatenated, and the per-document lengths."""
    encs = _WORKER["tok"].encode_batch_fast(texts, add_special_tokens=False)
    eod = _WORKER["eod"]
    extra = 0 if eod is None else 1
    lengths = np.fromiter((len(e.ids) + extra for e in encs), dtype=np.int64, count=len(encs))
    flat = np.empty(int(lengths.sum()), dtype=_WORKER["dtype"])
    pos = 0
    for e, n in zip(encs, lengths.tolist()):
        flat[pos:pos + n - extra] = e.ids
        if extra:
            flat[pos + n - 1] = eod
        pos += n
    return flat, lengths


# --- main side -------------------------------------------------------------------

class _Output:
    """One dataset being built under a temporary name."""

    def __init__(self, prefix: str, lo: int | None, hi: int | None, dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix, self.lo, self.hi = prefix, lo, hi
        self.tmp = f"{prefix}.tmp-{os.getpid()}"
        self.builder = IndexedDatasetBuilder(self.tmp + ".bin", dtype=dtype)
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.builder.add_document(tokens, [len(tokens)])
        self.documents += 1
        self.tokens += len(tokens)

    def finalize(self) -> None:
        self.builder.finalize(self.tmp + ".idx")

    def commit(self) -> None:
        # A stale .idx must not sit beside the new .bin even for an instant; then .bin,
        # and the .idx last: an .idx under the real name means the pair is complete.
        if os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")
        os.replace(self.tmp + ".bin", self.prefix + ".bin")
        os.replace(self.tmp + ".idx", self.prefix + ".idx")

    def discard(self) -> None:
        try:
            self.builder.data_file.close()
        except Exception:
            pass
        for ext in (".bin", ".idx"):
            try:
                os.remove(self.tmp + ext)
            except FileNotFoundError:
                pass

    def summary(self) -> dict:
        return {"prefix": self.prefix, "min_tokens": self.lo, "max_tokens": self.hi,
                "documents": self.documents, "tokens": self.tokens}


def _chunks(files: list[Path], text_key: str, stats: dict) -> Iterator[tuple[list[str], list[int]]]:
    """(texts, file numbers) chunks of valid documents; skipped rows are counted here."""
    texts, owners, chars = [], [], 0
    for i, path in enumerate(files):
        fstats = stats["files"][i]
        for text, reason in READERS[EXTENSIONS[path.suffix.lower()]](path, text_key):
            fstats["rows"] += 1
            if reason is not None:
                fstats["skipped"][reason] += 1
                continue
            texts.append(text)
            owners.append(i)
            chars += len(text)
            if len(texts) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
                yield texts, owners
                texts, owners, chars = [], [], 0
    if texts:
        yield texts, owners


def preprocess(inputs, output_prefix, tokenizer_dir, workers: int = 1, text_key: str = "text",
               length_buckets=None, append_eod: bool = True, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Tokenize `inputs` into indexed dataset(s) at `output_prefix`; return the stats."""
    files = resolve_inputs(inputs)
    edges = parse_length_buckets(length_buckets)
    if int(workers) < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    workers = int(workers)
    if not Path(tokenizer_dir).is_dir():
        raise ConfigError(f"tokenizer directory {tokenizer_dir} does not exist")
    prefix = os.fspath(output_prefix)
    if edges:
        targets = [(bucket_prefix(prefix, lo, hi), lo, hi) for lo, hi in zip(edges, edges[1:])]
    else:
        targets = [(prefix, None, None)]
    stats_path = prefix + ".stats.json"
    if not overwrite:
        for p in [t + ext for t, _, _ in targets for ext in (".bin", ".idx")] + [stats_path]:
            if os.path.exists(p):
                raise ConfigError(f"{p} exists; pass --overwrite to replace it")
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)

    # Heavy imports only now, so that bad arguments fail fast. megatron.core warns on
    # import about missing Transformer Engine/Apex, which do not matter here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType

    from data_pipeline.tokenizer import eod_id, load_tokenizer

    t_setup = time.perf_counter()
    tok = load_tokenizer(tokenizer_dir)
    eod = eod_id(tok) if append_eod else None
    dtype = DType.optimal_dtype(len(tok))
    # Workers rebuild the exact backend the transformers wrapper uses (no transformers
    # import in them, so they start in a fraction of a second).
    tok_json = tok.backend_tokenizer.to_str()
    setup_s = time.perf_counter() - t_setup

    stats = {
        "output_prefix": prefix, "tokenizer": os.fspath(tokenizer_dir), "vocab_size": len(tok),
        "eod_id": eod, "append_eod": bool(append_eod), "dtype": np.dtype(dtype).name,
        "text_key": text_key, "workers": workers, "length_buckets": edges,
        "files": [{"path": str(f), "rows": 0, "documents": 0, "tokens": 0, "skipped": Counter()}
                  for f in files],
    }
    outputs: list[_Output] = []
    counts = {"documents": 0, "tokens": 0}
    bar = pool = None
    t0 = time.perf_counter()

    def route(flat: np.ndarray, lengths: np.ndarray, owners: list[int]) -> None:
        """Send each tokenized document to its output, or count why it has none."""
        pos = 0
        for n, owner in zip(lengths.tolist(), owners):
            fstats = stats["files"][owner]
            doc = flat[pos:pos + n]
            pos += n
            if edges:
                if n < edges[0]:
                    fstats["skipped"][below_reason(edges[0])] += 1
                    continue
                if n >= edges[-1]:
                    fstats["skipped"][above_reason(edges[-1])] += 1
                    continue
                out = outputs[bisect.bisect_right(edges, n) - 1]
            else:
                out = outputs[0]
            out.add(doc)
            fstats["documents"] += 1
            fstats["tokens"] += n
            counts["documents"] += 1
            counts["tokens"] += n
        bar.update(len(owners))
        rate = counts["tokens"] / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)

    try:
        from tqdm import tqdm

        for p, lo, hi in targets:
            outputs.append(_Output(p, lo, hi, dtype))
        bar = tqdm(unit="doc", desc="tokenize", disable=not progress, file=sys.stderr,
                   mininterval=0.5, smoothing=0.1)
        # spawn: forking a process that has imported torch/megatron is not safe. A process
        # pool executor rather than multiprocessing.Pool: when a worker dies (OOM killer)
        # Pool waits forever for its lost task; the executor raises BrokenProcessPool.
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                   initializer=_init_worker,
                                   initargs=(tok_json, eod, np.dtype(dtype).name))
        pending: deque = deque()
        for texts, owners in _chunks(files, text_key, stats):
            pending.append((pool.submit(_encode, texts), owners))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                future, owners = pending.popleft()
                route(*future.result(), owners)
        while pending:
            future, owners = pending.popleft()
            route(*future.result(), owners)
        for out in outputs:
            out.finalize()
    except BaseException:
        for out in outputs:
            out.discard()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    for out in outputs:
        out.commit()
    docs, tokens = counts["documents"], counts["tokens"]
    seconds = time.perf_counter() - t0

    skipped = Counter()
    for f in stats["files"]:
        skipped.update(f["skipped"])
        f["skipped"] = dict(sorted(f["skipped"].items()))
        # The invariant the whole design rests on: nothing is dropped silently.
        assert f["rows"] == f["documents"] + sum(f["skipped"].values()), f
    stats.update({
        "rows": sum(f["rows"] for f in stats["files"]),
        "documents": docs, "tokens": tokens,
        "skipped_total": sum(skipped.values()), "skipped": dict(sorted(skipped.items())),
        "seconds": round(seconds, 3), "setup_seconds": round(setup_s, 3),
        "docs_per_s": round(docs / seconds, 1) if seconds > 0 else None,
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
        "outputs": [o.summary() for o in outputs],
    })
    tmp = f"{stats_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(stats, f, indent=2)
        f.write("\n")
    os.replace(tmp, stats_path)
    stats["stats_path"] = stats_path
    return stats


def format_summary(stats: dict) -> str:
    """Human-readable end-of-run summary."""
    lines = [f"wrote {stats['documents']:,} documents, {stats['tokens']:,} tokens "
             f"({stats['dtype']}) from {stats['rows']:,} rows in {len(stats['files'])} file(s) "
             f"in {stats['seconds']:.1f} s: {stats['tokens_per_s'] or 0:,.0f} tokens/s, "
             f"{stats['docs_per_s'] or 0:,.0f} docs/s, {stats['workers']} worker(s)"]
    for o in stats["outputs"]:
        rng = "" if o["min_tokens"] is None else f"  [{o['min_tokens']}, {o['max_tokens']}) tokens"
        empty = "  (EMPTY)" if o["documents"] == 0 else ""
        lines.append(f"  {o['prefix']}.bin/.idx: {o['documents']:,} documents, "
                     f"{o['tokens']:,} tokens{rng}{empty}")
    if stats["skipped_total"]:
        lines.append(f"skipped {stats['skipped_total']:,} rows:")
        for reason, n in stats["skipped"].items():
            lines.append(f"  {reason}: {n:,}")
            for f in stats["files"]:
                if len(stats["files"]) > 1 and f["skipped"].get(reason):
                    lines.append(f"    {f['path']}: {f['skipped'][reason]:,}")
    else:
        lines.append("skipped 0 rows")
    lines.append(f"stats: {stats['stats_path']}")
    return "\n".join(lines)


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.preprocess",
                                description="Tokenize JSONL/parquet/txt into megatron-core indexed datasets.")
    p.add_argument("--input", nargs="+", required=True, help="files or globs (.jsonl .json .parquet .txt)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx/.stats.json")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory")
    p.add_argument("--workers", type=int, default=_default_workers(),
                   help="tokenizer processes (default: available CPUs); output does not depend on it")
    p.add_argument("--text-key", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("--length-buckets", default=None, metavar="E0,E1,...,En",
                   help="split output by token length into PREFIX_len{Ei}-{Ei+1}")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="end every document with <|endoftext|> (default: on)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    # SIGTERM (Slurm time limit, `kill`) as an exception, so that temporary outputs are
    # removed on the way out like on Ctrl-C.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        stats = preprocess(args.input, args.output_prefix, args.tokenizer, workers=args.workers,
                           text_key=args.text_key, length_buckets=args.length_buckets,
                           append_eod=args.append_eod, overwrite=args.overwrite,
                           progress=not args.no_progress)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_summary(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
