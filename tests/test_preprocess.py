"""data_pipeline.preprocess / indexed: tokenized corpora in megatron-core's indexed format.

Every check reads the output back through megatron-core's own `IndexedDataset` and
compares it with the tokenizer applied directly, row by row.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_pipeline import preprocess as pp
from data_pipeline.indexed import describe, open_indexed
from data_pipeline.tokenizer import EOD_ID, load_tokenizer
from model.config import ConfigError
from tests.conftest import python_module


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir):
    return load_tokenizer(qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data_pipeline.corpus import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"), seed=0, scale=1)


def texts_of(path) -> list[str]:
    return [json.loads(line)["text"] for line in Path(path).read_text(encoding="utf-8").splitlines()]


def read_docs(prefix) -> list[list[int]]:
    ds = open_indexed(prefix)
    # One sequence per document, and the document index says so.
    assert list(ds.document_indices) == list(range(len(ds) + 1))
    return [ds[i].tolist() for i in range(len(ds))]


def run_pp(inputs, prefix, tokenizer_dir, **kw):
    return pp.preprocess(inputs, prefix, tokenizer_dir, progress=False, **kw)


def test_round_trip_and_worker_count_invariance(tmp_path, corpus, qwen3_tokenizer_dir, tok, monkeypatch):
    inputs = [corpus[k] for k in ("general", "math", "code", "long")]
    s1 = run_pp(inputs, tmp_path / "w1", qwen3_tokenizer_dir, workers=1)
    # Small chunks for the 2-worker run: many chunks in flight, results out of order
    # across workers; the output must not care.
    monkeypatch.setattr(pp, "CHUNK_DOCS", 16)
    s2 = run_pp(inputs, tmp_path / "w2", qwen3_tokenizer_dir, workers=2)

    texts = [t for f in inputs for t in texts_of(f)]
    docs = read_docs(tmp_path / "w1")
    assert len(docs) == len(texts) == s1["documents"] == s1["rows"]
    for text, doc in zip(texts, docs):
        assert doc == tok(text)["input_ids"] + [EOD_ID]
    assert s1["tokens"] == sum(map(len, docs)) and s1["skipped_total"] == 0
    # 151,669 ids do not fit uint16; megatron has no uint32.
    assert s1["dtype"] == "int32" and open_indexed(tmp_path / "w1").index.dtype == np.int32
    assert describe(tmp_path / "w1") == {
        "prefix": str(tmp_path / "w1"), "documents": len(texts), "sequences": len(texts),
        "tokens": s1["tokens"], "dtype": "int32", "bin_bytes": 4 * s1["tokens"]}

    for ext in (".bin", ".idx"):
        assert (tmp_path / f"w1{ext}").read_bytes() == (tmp_path / f"w2{ext}").read_bytes(), ext
    assert s2["documents"] == s1["documents"] and s2["workers"] == 2
    saved = json.loads((tmp_path / "w2.stats.json").read_text())
    assert saved["tokens"] == s1["tokens"] and [f["rows"] for f in saved["files"]] == [
        len(texts_of(f)) for f in inputs]


def test_parquet_and_txt_inputs(tmp_path, qwen3_tokenizer_dir, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = ["first parquet row", None, "第二行 with ünïcode", "   ", "last row\nwith two lines"]
    pq.write_table(pa.table({"content": rows, "id": list(range(len(rows)))}), tmp_path / "a.parquet")
    long_text = "A long document.\n" * 200 + "The end."
    (tmp_path / "b.txt").write_text(long_text, encoding="utf-8")
    (tmp_path / "c.txt").write_bytes(b"not \xff utf-8")

    stats = run_pp([tmp_path / "a.parquet", tmp_path / "*.txt"], tmp_path / "out", qwen3_tokenizer_dir,
                   text_key="content", append_eod=False)
    good = [rows[0], rows[2], rows[4], long_text]
    assert read_docs(tmp_path / "out") == [tok(t)["input_ids"] for t in good]  # no EOD
    assert stats["skipped"] == {pp.MISSING_TEXT: 1, pp.EMPTY_TEXT: 1, pp.BAD_UTF8: 1}
    by_file = {Path(f["path"]).name: f for f in stats["files"]}
    assert by_file["a.parquet"]["rows"] == 5 and by_file["a.parquet"]["documents"] == 3
    assert by_file["c.txt"]["skipped"] == {pp.BAD_UTF8: 1}


BAD_ROWS = [
    (b'{"text": "good one"}', None),
    (b'{"body": "no text key"}', pp.MISSING_TEXT),
    (b'{"text": 12}', pp.NOT_STRING),
    (b'{"text": "unterminated', pp.BAD_JSON),
    (b'{"text": "latin-1 caf\xe9"}', pp.BAD_UTF8),
    (b'{"text": "  \\n\\t "}', pp.EMPTY_TEXT),
    (b'', pp.BLANK_LINE),
    (b'["a", "list"]', pp.NOT_OBJECT),
    (b'{"text": "lone \\ud800 surrogate"}', pp.SURROGATES),
    (b'{"text": "good two", "extra": 1}', None),
]


def test_skipped_rows_are_counted_and_reported(tmp_path, qwen3_tokenizer_dir, tok, capsys):
    src = tmp_path / "rows.jsonl"
    src.write_bytes(b"\n".join(line for line, _ in BAD_ROWS) + b"\n")
    prefix = tmp_path / "out"
    # In-process CLI: the same argument parsing and printing as `python -m`.
    rc = pp.main(["--input", str(src), "--output-prefix", str(prefix), "--tokenizer",
                  str(qwen3_tokenizer_dir), "--workers", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out

    expected = {}
    for _, reason in BAD_ROWS:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    stats = json.loads((tmp_path / "out.stats.json").read_text())
    assert stats["skipped"] == expected and stats["skipped_total"] == len(expected)
    assert stats["rows"] == len(BAD_ROWS) and stats["documents"] == 2
    assert stats["files"][0]["skipped"] == expected
    assert read_docs(prefix) == [tok(t)["input_ids"] + [EOD_ID] for t in ("good one", "good two")]
    assert f"wrote 2 documents" in out and f"skipped {len(expected)} rows" in out
    for reason in expected:
        assert f"  {reason}: 1" in out


def test_length_buckets(tmp_path, corpus, qwen3_tokenizer_dir, tok):
    edges = [64, 128, 256]
    stats = run_pp([corpus["long"]], tmp_path / "long", qwen3_tokenizer_dir, length_buckets="64,128,256")
    lengths = [len(tok(t)["input_ids"]) + 1 for t in texts_of(corpus["long"])]
    docs = {}
    for lo, hi in zip(edges, edges[1:]):
        prefix = pp.bucket_prefix(tmp_path / "long", lo, hi)
        assert prefix == f"{tmp_path}/long_len{lo}-{hi}"
        docs[lo] = read_docs(prefix)
        expected = [n for n in lengths if lo <= n < hi]
        # The generated long corpus is made to fill both scaled-down S3 buckets.
        assert len(expected) >= 15, (lo, hi, len(expected))
        assert [len(d) for d in docs[lo]] == expected  # routed, in input order
        assert all(d[-1] == EOD_ID for d in docs[lo])
    assert not (tmp_path / "long.bin").exists()
    short = sum(n < 64 for n in lengths)
    long_ = sum(n >= 256 for n in lengths)
    assert short and long_
    assert stats["skipped"] == {pp.below_reason(64): short, pp.above_reason(256): long_}
    assert [o["documents"] for o in stats["outputs"]] == [len(docs[64]), len(docs[128])]


def test_bad_length_buckets():
    for spec in ("64", "64,64", "128,64", "a,b", "0,10"):
        with pytest.raises(ConfigError, match="--length-buckets"):
            pp.parse_length_buckets(spec)
    assert pp.parse_length_buckets("4096, 16384,32768") == [4096, 16384, 32768]


def test_refuses_overwrite_and_crash_leaves_no_dataset(tmp_path, qwen3_tokenizer_dir, monkeypatch):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(600)))
    prefix = tmp_path / "out"
    run_pp([src], prefix, qwen3_tokenizer_dir)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("out.*")}
    assert set(before) == {"out.bin", "out.idx", "out.stats.json"}
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        run_pp([src], prefix, qwen3_tokenizer_dir)

    # A reader that fails after several chunks were written: nothing may change under the
    # real names (the old dataset stays whole), and no temporary file may be left.
    def failing_reader(path, key):
        for i, item in enumerate(pp._read_jsonl(path, key)):
            if i == 500:
                raise RuntimeError("disk on fire")
            yield item

    monkeypatch.setattr(pp, "CHUNK_DOCS", 50)
    monkeypatch.setitem(pp.READERS, "jsonl", failing_reader)
    for target in (prefix, tmp_path / "fresh"):
        with pytest.raises(RuntimeError, match="disk on fire"):
            run_pp([src], target, qwen3_tokenizer_dir, overwrite=True, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out.bin", "out.idx", "out.stats.json"]
    assert {p.name: p.read_bytes() for p in tmp_path.glob("out.*")} == before


@pytest.fixture
def small_dataset(tmp_path, qwen3_tokenizer_dir):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": f"sentence {i} " * (i + 1)}) + "\n" for i in range(20)))
    run_pp([src], tmp_path / "ok", qwen3_tokenizer_dir)
    return tmp_path / "ok"


def damaged(src: Path, name: str, ext: str, edit) -> Path:
    """A copy of dataset `src` as `name`, with `edit(bytes) -> bytes` applied to one file."""
    dst = src.with_name(name)
    for e in (".bin", ".idx"):
        shutil.copy(f"{src}{e}", f"{dst}{e}")
    p = Path(f"{dst}{ext}")
    p.write_bytes(edit(p.read_bytes()))
    return dst


def test_open_indexed_detects_damage(small_dataset):
    info = describe(small_dataset)
    assert info["documents"] == 20 and len(open_indexed(small_dataset)) == 20
    nbin = 4 * info["tokens"]
    idx_size = os.path.getsize(f"{small_dataset}.idx")
    cases = {
        "short_bin": (".bin", lambda b: b[:-8],
                      rf"short_bin\.bin is truncated: index expects {nbin} bytes, file has {nbin - 8}"),
        "long_bin": (".bin", lambda b: b + b"\0" * 4, r"long_bin\.bin is larger than its index"),
        "short_idx": (".idx", lambda b: b[:-3],
                      rf"short_idx\.idx is truncated: .* needing {idx_size} bytes, file has {idx_size - 3}"),
        "header_idx": (".idx", lambda b: b[:20], r"header_idx\.idx is truncated: 20 bytes"),
        "magic_idx": (".idx", lambda b: b"XXXX" + b[4:], r"magic_idx\.idx is not a megatron-core index"),
        "dtype_idx": (".idx", lambda b: b[:17] + bytes([42]) + b[18:], r"dtype_idx\.idx has unknown token dtype code 42"),
        "count_idx": (".idx", lambda b: b[:18] + (21).to_bytes(8, "little") + b[26:], r"count_idx\.idx is truncated"),
        "tail_idx": (".idx", lambda b: b + b"\0" * 3, r"tail_idx\.idx has 3 unexpected trailing bytes"),
    }
    for name, (ext, edit, msg) in cases.items():
        bad = damaged(small_dataset, name, ext, edit)
        with pytest.raises(ConfigError, match=msg) as e:
            open_indexed(bad)
        assert "\n" not in str(e.value)
    os.remove(f"{small_dataset}.bin")
    with pytest.raises(ConfigError, match=r"missing .*ok\.bin"):
        describe(small_dataset)


def test_cli_errors_are_one_line(tmp_path, qwen3_tokenizer_dir):
    good = tmp_path / "a.jsonl"
    good.write_text('{"text": "x"}\n')
    (tmp_path / "a.csv").write_text("text\nx\n")
    base = ["--output-prefix", tmp_path / "out", "--workers", "1"]
    cases = [
        (["--input", tmp_path / "nothing*.jsonl", "--tokenizer", qwen3_tokenizer_dir], "no input files match"),
        (["--input", tmp_path / "missing.jsonl", "--tokenizer", qwen3_tokenizer_dir], "does not exist"),
        (["--input", tmp_path / "a.csv", "--tokenizer", qwen3_tokenizer_dir], "unknown input extension '.csv'"),
        (["--input", good, "--tokenizer", tmp_path / "no_tokenizer"], "tokenizer directory"),
        (["--input", good, "--tokenizer", qwen3_tokenizer_dir, "--length-buckets", "128,64"],
         "strictly increasing"),
    ]
    for args, msg in cases:
        proc = python_module("data_pipeline.preprocess", *args, *base, check=False)
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err, err
    assert not list(tmp_path.glob("out*"))
