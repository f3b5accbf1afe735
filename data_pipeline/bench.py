"""Preprocessing throughput with 1 and more tokenizer workers (`make bench-data`).

    python -m data_pipeline.bench [--scale 20] [--workers 1,2] [--tokenizer DIR] [--seed 0]
                                  [--no-ceiling]

Generates the project's corpus (`data_pipeline.corpus`) at `--scale` into a temporary
directory, preprocesses all of it once per worker count, and prints one row per run:
documents, tokens, seconds, tokens/s, the ratio to the 1-worker run measured in the
same invocation (so both sides see the same machine and the same load), and the cores
the run actually got (CPU seconds / wall seconds). Seconds cover the whole `preprocess`
pass after the tokenizer is loaded: worker start-up, reading and JSON decoding,
tokenization and writing. Every run must write byte-identical files (exit status 1 if
not). Without `--tokenizer`, the Qwen3 tokenizer is built offline first.

The ceiling rows run the bare tokenizer in k independent processes on in-memory text
(no I/O, no pipeline), started together: what this machine can give k processes right
now. On a shared machine the worker speed-up can only be read against them.
"""

from __future__ import annotations

# Only light imports at module level: worker processes are spawned, and spawn re-imports
# the main module (this one, under `python -m`) in every worker.
import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 256  # documents per encode_batch call, as in preprocess


def _digest(prefix: str) -> str:
    h = hashlib.sha256()
    for ext in (".bin", ".idx"):
        h.update(Path(prefix + ext).read_bytes())
    return h.hexdigest()


def _cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the workers, after each run)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _ceiling_part(tokenizer_json: str, files: list[str], k: int, part: int, barrier, results) -> None:
    """One of k processes: tokenize every k-th document, timed from a common start."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    texts = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            texts.extend(json.loads(line)["text"] for line in fh)
    texts = texts[part::k]
    barrier.wait()
    t = time.perf_counter()
    n = 0
    for i in range(0, len(texts), CHUNK):
        n += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i:i + CHUNK], add_special_tokens=False))
    results.put((n, time.perf_counter() - t))


def ceiling(tokenizer_json: str, files: list[str], k: int) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_ceiling_part, args=(tokenizer_json, files, k, i, barrier, results))
             for i in range(k)]
    for p in procs:
        p.start()
    parts = [results.get() for _ in procs]
    for p in procs:
        p.join()
    tokens, seconds = sum(n for n, _ in parts), max(s for _, s in parts)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def run(scale: int, workers: list[int], tokenizer: str | None, seed: int = 0,
        with_ceiling: bool = True) -> tuple[list[dict], list[dict]]:
    import warnings

    from data_pipeline.corpus import write_corpus
    from data_pipeline.preprocess import preprocess

    # Pay the one-off imports before any measurement (their CPU time would count as the
    # first run's).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import megatron.core.datasets.indexed_dataset  # noqa: F401
    from data_pipeline.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = Path(tmp)
        if tokenizer is None:
            from data_pipeline.tokenizer import save_qwen3_tokenizer

            t = time.perf_counter()
            tokenizer = str(save_qwen3_tokenizer(root / "tokenizer"))
            print(f"built the Qwen3 tokenizer in {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        files = write_corpus(root / "corpus", seed=seed, scale=scale)
        mb = sum(p.stat().st_size for p in files.values()) / 1e6
        print(f"corpus scale {scale}: {mb:.1f} MB of JSONL in {time.perf_counter() - t:.1f} s",
              flush=True)
        rows, ceil = [], []
        for n in workers:
            prefix = str(root / f"out_w{n}")
            cpu0 = _cpu_seconds()
            stats = preprocess(list(files.values()), prefix, tokenizer, workers=n, progress=False)
            # setup_seconds: the tokenizer load before the timed part (single-threaded).
            cpu = _cpu_seconds() - cpu0 - stats["setup_seconds"]
            rows.append({"workers": n, "documents": stats["documents"], "tokens": stats["tokens"],
                         "seconds": stats["seconds"], "tokens_per_s": stats["tokens"] / stats["seconds"],
                         "cores_used": cpu / stats["seconds"], "digest": _digest(prefix)})
            print(f"  preprocess, {n} worker(s): {stats['seconds']:.1f} s", flush=True)
        if with_ceiling:
            tok_json = load_tokenizer(tokenizer).backend_tokenizer.to_str()
            for k in workers:
                ceil.append({"processes": k, **ceiling(tok_json, [str(p) for p in files.values()], k)})
                print(f"  ceiling, {k} process(es): {ceil[-1]['seconds']:.1f} s", flush=True)
    for group in (rows, ceil):
        key = "workers" if group is rows else "processes"
        base = next((r["tokens_per_s"] for r in group if r[key] == 1), group[0]["tokens_per_s"] if group else 1)
        for r in group:
            r["ratio"] = r["tokens_per_s"] / base
    return rows, ceil


def format_table(rows: list[dict], ceil: list[dict] | None = None, load: float | None = None) -> str:
    head = (f"{'workers':>7}  {'documents':>9}  {'tokens':>11}  {'seconds':>7}  {'tokens/s':>10}  "
            f"{'vs 1':>5}  {'cores used':>10}")
    lines = ["preprocess (read + tokenize + write):", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['workers']:>7}  {r['documents']:>9,}  {r['tokens']:>11,}  {r['seconds']:>7.1f}  "
                     f"{r['tokens_per_s']:>10,.0f}  {r['ratio']:>5.2f}  {r['cores_used']:>10.2f}")
    lines.append("cores used = CPU seconds of the run (main process + workers) / wall seconds")
    if ceil:
        lines.append("ceiling (bare tokenizer in k independent processes, text in memory):")
        h2 = f"{'procs':>7}  {'tokens':>11}  {'seconds':>7}  {'tokens/s':>10}  {'vs 1':>5}"
        lines += [h2, "-" * len(h2)]
        for c in ceil:
            lines.append(f"{c['processes']:>7}  {c['tokens']:>11,}  {c['seconds']:>7.1f}  "
                         f"{c['tokens_per_s']:>10,.0f}  {c['ratio']:>5.2f}")
    note = "" if load is None else f"; 1-minute load average before the benchmark: {load:.2f}"
    lines.append(f"CPUs available: {_cpus()}{note}")
    same = len({r["digest"] for r in rows}) == 1
    lines.append(f"outputs byte-identical across worker counts: {'yes' if same else 'NO'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.bench", description=__doc__.split("\n")[0])
    p.add_argument("--scale", type=int, default=20, help="corpus scale (20: about 5.5M tokens)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer directory (default: build Qwen3's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ceiling", action="store_true", help="skip the bare-tokenizer ceiling rows")
    args = p.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",")]
        if not workers or min(workers) < 1 or args.scale < 1:
            raise ValueError
    except ValueError:
        print("error: --workers must be positive integers like 1,2 and --scale >= 1", file=sys.stderr)
        return 2
    # Other processes on the machine take cores from the workers; the load says how busy
    # it was before this benchmark added its own.
    load = os.getloadavg()[0]
    rows, ceil = run(args.scale, workers, args.tokenizer, args.seed, with_ceiling=not args.no_ceiling)
    print(format_table(rows, ceil, load))
    return 0 if len({r["digest"] for r in rows}) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
