"""Every dataset the miniature pipeline (`make pipeline-mini`) reads, generated offline.

    python -m data_pipeline.mini --out DIR [--seed N] [--problems N] [--held-out N] [--tokenizer mini|qwen3] [--quiet]

writes under DIR the layout the stage configs expect by default, so that each stage needs
only `data.root=DIR`:

    tokenizer/                   the mini tokenizer (data_pipeline.tokenizer --mini: Qwen3's format,
                                 4,096 ids), or with --tokenizer qwen3 the real one
    corpus/*.jsonl               the generated pretraining text (data_pipeline.corpus, scale 1)
    general, code, math          preprocessed datasets ({name}.bin/.idx/.stats.json), the
                                 S1/S2 blend's names
    long_len64-128, long_len128-256
                                 `long` split into the length buckets [64,128) and [128,256)
                                 (S3 with data.length_mix.buckets=[64,128,256])
    sft/cold_start.jsonl         additions of two 1- to 3-digit numbers with carries, more of
                                 the longer ones (corpus.TRAIN_DIGITS), the column sums in
                                 the think block
    rl/reasoning.jsonl           RL prompts {"messages", "reference"} (data_pipeline.rl_data)
    sft/fusion.jsonl             the thinking-mode fusion mix (data_pipeline.fusion.build): a
                                 quarter thinking rows of every size, the rest the easy
                                 problems (1 and 2 digits) answered directly; its inputs are
                                 sft/fusion_inputs/*.jsonl
    rl/general.jsonl             RL prompts, half ending in /think and half (easy ones) in
                                 /no_think (fusion.in_mode), each with its own reward list
    distill/prompts.jsonl        RL prompts: the teacher's generation input (off-policy) and
                                 the student's prompts (on-policy)
    eval/held.jsonl              `held_out` RL-format problems that no training file holds, as
                                 many of each size
    eval/lm.jsonl                held-out {"text"} documents for LM loss (another corpus seed)
    mini.json                    written last: the parameters and every output with its rows

Each training file draws `problems` problems (fusion: `problems` rows in all); the
training sets may share problems, never with eval/held.jsonl. A second call with the
same parameters returns at once; a call with other parameters removes mini.json first
and rebuilds what they change (the tokenizer and the pretraining data are kept when only
`problems` or `held_out` change; `.mini-steps.json` records the steps already complete,
so a run stopped half-way continues where it stopped). Every file is written under a
temporary name and renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

VERSION = 2
CORPUS_SCALE = 1
LONG_BUCKETS = [64, 128, 256]
PRETRAIN = ("general", "code", "math")
LM_DOCS = {"prose": 12, "math": 10, "code": 10}   # eval/lm.jsonl: 32 documents
# Fusion: the share of thinking rows. The rest answer directly, and only the easy sizes:
# a model this small cannot add three digits without its column sums, and rows it cannot
# learn would only teach it to guess.
FUSION_RATIO = 0.25
EASY_DIGITS = (1, 2)
# The chat format's flags as the eval writes them: at the end of the user turn.
FUSION_FLAGS = {"system_prob": 0.0, "unflagged_thinking_prob": 0.3, "repeat_prob": 0.0}
TOKENIZERS = ("mini", "qwen3")
PROBLEMS, HELD_OUT = 8000, 60   # per training file; held out: 20 of each size
# Rewards of rl/general.jsonl rows, by mode: the format each mode asks for, and the answer.
GENERAL_REWARDS = {"think": [{"name": "format_think", "weight": 0.2}, {"name": "math", "weight": 1.0}],
                   "no_think": [{"name": "no_think", "weight": 0.2}, {"name": "math", "weight": 1.0}]}
# Independent problem streams (data_pipeline.corpus.addition_problems seeds).
_STREAMS = {"held": 1, "cold_start": 0, "rl_reasoning": 2, "fusion_thinking": 3, "fusion_plain": 4,
            "rl_general": 5, "distill": 6, "rl_general_easy": 7}
MANIFEST = "mini.json"
JOURNAL = ".mini-steps.json"   # the steps done so far (see write_mini_data)
# Stdlib files a generated document comes from: "# File: Lib/x.py" headers (general, long)
# and the "# x.py" first line of a code document.
_FILE_HEADER = re.compile(r"^# File: Lib/(\S+)$", re.M)
_CODE_HEADER = re.compile(r"\A# (\S+\.py)\n")

# Outputs: name -> (path relative to root, kind, the step that writes it).
OUTPUTS = {
    "tokenizer": ("tokenizer", "tokenizer", "tokenizer"),
    **{name: (name, "indexed", "pretrain") for name in PRETRAIN},
    **{f"long_len{lo}-{hi}": (f"long_len{lo}-{hi}", "indexed", "pretrain")
       for lo, hi in zip(LONG_BUCKETS, LONG_BUCKETS[1:])},
    "eval_lm": ("eval/lm.jsonl", "jsonl", "pretrain"),
    "cold_start": ("sft/cold_start.jsonl", "jsonl", "problems"),
    "rl_reasoning": ("rl/reasoning.jsonl", "jsonl", "problems"),
    "fusion": ("sft/fusion.jsonl", "jsonl", "problems"),
    "rl_general": ("rl/general.jsonl", "jsonl", "problems"),
    "distill_prompts": ("distill/prompts.jsonl", "jsonl", "problems"),
    "eval_held": ("eval/held.jsonl", "jsonl", "problems"),
}


def _step_params(seed: int, problems: int, held_out: int, tokenizer: str) -> dict:
    """What each step's outputs depend on: a step is redone when its entry changes."""
    from data_pipeline.corpus import DIGIT_MIX, TRAIN_DIGITS
    from data_pipeline.tokenizer import MINI_VOCAB

    return {"tokenizer": {"kind": tokenizer, **({"vocab": MINI_VOCAB} if tokenizer == "mini" else {})},
            "pretrain": {"seed": seed, "corpus_scale": CORPUS_SCALE, "long_buckets": LONG_BUCKETS,
                         "lm_docs": LM_DOCS, "tokenizer": tokenizer},
            "problems": {"seed": seed, "problems": problems, "held_out": held_out, "digits": list(DIGIT_MIX),
                         "train_digits": {str(k): v for k, v in TRAIN_DIGITS.items()},
                         "easy_digits": list(EASY_DIGITS), "fusion_ratio": FUSION_RATIO,
                         "fusion_flags": FUSION_FLAGS, "general_rewards": GENERAL_REWARDS}}


def _exists(path: Path, kind: str) -> bool:
    if kind == "tokenizer":
        return (path / "tokenizer.json").is_file()
    if kind == "indexed":
        return all(Path(f"{path}{ext}").is_file() for ext in (".bin", ".idx"))
    return path.is_file()


def _read_manifest(root: Path) -> dict | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("version") == VERSION else None


def _read_journal(root: Path) -> dict:
    try:
        journal = json.loads((root / JOURNAL).read_text())
    except (OSError, ValueError):
        return {}
    ok = isinstance(journal, dict) and journal.get("version") == VERSION and isinstance(journal.get("steps"), dict)
    return journal["steps"] if ok else {}


def _write_journal(root: Path, steps: dict) -> None:
    _write_text(root / JOURNAL, json.dumps({"version": VERSION, "steps": steps}, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_jsonl(path: Path, rows: list[dict]) -> int:
    _write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


# ----------------------------------------------------------------------------- steps

def _tokenizer(root: Path, kind: str) -> dict:
    from data_pipeline.tokenizer import MINI_VOCAB, save_mini_tokenizer, save_qwen3_tokenizer

    if kind == "qwen3":
        save_qwen3_tokenizer(root / "tokenizer", overwrite=True)   # built beside and renamed in
        return {"tokenizer": "Qwen3 tokenizer"}
    save_mini_tokenizer(root / "tokenizer", MINI_VOCAB, overwrite=True)
    return {"tokenizer": f"mini tokenizer, {MINI_VOCAB} ids"}


def _sources(text: str) -> set[str]:
    """The stdlib files a corpus document was cut from (none for generated prose and math)."""
    found = set(_FILE_HEADER.findall(text))
    if m := _CODE_HEADER.match(text):
        found.add(m.group(1))
    return found


def _lm_documents(train_files: dict[str, Path], seed: int) -> list[dict]:
    """Held-out LM documents from a corpus of another seed: generated prose and math, and
    code from stdlib files that no training document includes; none verbatim in training."""
    from data_pipeline.corpus import write_corpus

    seen, used_files = set(), set()
    for path in train_files.values():
        for line in path.read_text(encoding="utf-8").splitlines():
            text = json.loads(line)["text"]
            seen.add(text)
            used_files |= _sources(text)
    with tempfile.TemporaryDirectory() as tmp:
        other = {name: [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
                 for name, path in write_corpus(tmp, seed=seed + 1, scale=CORPUS_SCALE).items()}
    pools = {"prose": [d for d in other["general"] if not d.startswith(("# File: ", "Module "))],
             "math": other["math"],
             "code": [d for d in other["code"] if _sources(d) and not _sources(d) & used_files]}
    docs = []
    for kind, n in LM_DOCS.items():
        picked = [d for d in pools[kind] if d not in seen][:n]
        if len(picked) < n:
            raise RuntimeError(f"eval/lm.jsonl: only {len(picked)} held-out {kind} documents, {n} wanted")
        docs += [{"text": d} for d in picked]
    return docs


def _pretrain(root: Path, seed: int, progress: bool) -> dict:
    from data_pipeline.corpus import write_corpus
    from data_pipeline.preprocess import preprocess

    files = write_corpus(root / "corpus", seed=seed, scale=CORPUS_SCALE)
    tok, rows = root / "tokenizer", {}
    for name in PRETRAIN:
        stats = preprocess([files[name]], root / name, tok, overwrite=True, progress=progress)
        rows[name] = _indexed_summary(stats["outputs"][0])
    stats = preprocess([files["long"]], root / "long", tok, length_buckets=LONG_BUCKETS, overwrite=True,
                       progress=progress)
    for out in stats["outputs"]:
        rows[Path(out["prefix"]).name] = _indexed_summary(out)
    rows["eval_lm"] = _write_jsonl(root / OUTPUTS["eval_lm"][0], _lm_documents(files, seed))
    return rows


def _indexed_summary(out: dict) -> str:
    if not out["documents"]:
        raise RuntimeError(f"{out['prefix']}: no documents")
    return f"{out['documents']} documents, {out['tokens']} tokens"


def _user_prompt(row: dict) -> list[dict]:
    """The prompt of an addition_problems row: its user turn."""
    return [m for m in row["messages"] if m["role"] != "assistant"]


def _rl_row(row: dict) -> dict:
    return {"messages": _user_prompt(row), "reference": row["reference"]}


def _problems(root: Path, seed: int, problems: int, held_out: int, progress: bool) -> dict:
    from data_pipeline.corpus import DIGIT_MIX, TRAIN_DIGITS, addition_problems
    from data_pipeline.fusion import MODES, FlagConfig, build, in_mode

    def draw(stream: str, n: int, digits, exclude: set) -> list[dict]:
        return addition_problems(n, digits, seed=1000 * seed + _STREAMS[stream], exclude=exclude)

    # as many held-out problems of each size, none twice
    held = [r for d in DIGIT_MIX for r in draw("held", held_out // len(DIGIT_MIX), d, set())]
    held_pairs = {tuple(r["pair"]) for r in held}
    rows = {}

    rows["eval_held"] = _write_jsonl(root / OUTPUTS["eval_held"][0], [_rl_row(r) for r in held])
    rows["cold_start"] = _write_jsonl(root / OUTPUTS["cold_start"][0],
                                      draw("cold_start", problems, TRAIN_DIGITS, held_pairs))
    rows["rl_reasoning"] = _write_jsonl(root / OUTPUTS["rl_reasoning"][0],
                                        [_rl_row(r) for r in draw("rl_reasoning", problems, TRAIN_DIGITS, held_pairs)])

    # Fusion: thinking rows keep their reasoning; plain rows answer directly (no reasoning,
    # so fusion.build renders them with the empty think block and flags them /no_think).
    n_think = round(problems * FUSION_RATIO)
    thinking = [{"messages": r["messages"], "source": "addition_think"}
                for r in draw("fusion_thinking", n_think, TRAIN_DIGITS, held_pairs)]
    plain = [{"messages": [*_user_prompt(r), {"role": "assistant", "content": r["messages"][-1]["content"]}],
              "source": "addition_direct"} for r in draw("fusion_plain", problems - n_think, EASY_DIGITS, held_pairs)]
    inputs = root / "sft" / "fusion_inputs"
    _write_jsonl(inputs / "thinking.jsonl", thinking)
    _write_jsonl(inputs / "non_thinking.jsonl", plain)
    stats = build(inputs / "thinking.jsonl", inputs / "non_thinking.jsonl", root / OUTPUTS["fusion"][0],
                  ratio=FUSION_RATIO, seed=seed, size=problems, flags=FlagConfig(**FUSION_FLAGS), progress=progress)
    rows["fusion"] = stats["samples"]

    think = draw("rl_general", problems // 2, TRAIN_DIGITS, held_pairs)
    easy = draw("rl_general_easy", problems - problems // 2, EASY_DIGITS, held_pairs)
    general = []
    for i in range(problems):   # alternating modes
        mode = MODES[i % 2]
        r = (think if mode == "think" else easy)[i // 2]
        general.append({"messages": in_mode(_user_prompt(r), mode, flag=True), "reference": r["reference"],
                        "reward": GENERAL_REWARDS[mode]})
    rows["rl_general"] = _write_jsonl(root / OUTPUTS["rl_general"][0], general)
    rows["distill_prompts"] = _write_jsonl(root / OUTPUTS["distill_prompts"][0],
                                           [_rl_row(r) for r in draw("distill", problems, TRAIN_DIGITS, held_pairs)])
    return rows


STEPS = {"tokenizer": lambda root, p, progress: _tokenizer(root, p["tokenizer"]),
         "pretrain": lambda root, p, progress: _pretrain(root, p["seed"], progress),
         "problems": lambda root, p, progress: _problems(root, p["seed"], p["problems"], p["held_out"], progress)}


def thinking_budgets(root: Path) -> list:
    """Thinking budgets for the accuracy-against-budget curve on eval/held.jsonl: 0, then for
    each problem size the fewest tokens that let every worked answer of that size finish
    its thinking (its thinking tokens + 1: the budget cuts in once it is reached), then
    no limit (None). Accuracy rises in steps at these points as whole sizes come within
    reach."""
    from data_pipeline.chat import render
    from data_pipeline.corpus import addition_problem
    from data_pipeline.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(root / OUTPUTS["tokenizer"][0])
    open_id, close_id = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    longest: dict[int, int] = {}
    for line in (root / OUTPUTS["eval_held"][0]).read_text(encoding="utf-8").splitlines():
        a, b = map(int, re.fullmatch(r"What is (\d+)\+(\d+)\?", json.loads(line)["messages"][-1]["content"]).groups())
        ids = tokenizer.encode(render(addition_problem(a, b)["messages"]).text, add_special_tokens=False)
        start = ids.index(open_id) + 1
        size = len(str(max(a, b)))
        longest[size] = max(longest.get(size, 0), ids.index(close_id, start) - start)
    return [0, *sorted(n + 1 for n in longest.values()), None]


# ----------------------------------------------------------------------------- entry

def check_params(seed: int, problems: int, held_out: int, tokenizer: str = "mini") -> None:
    from data_pipeline.corpus import DIGIT_MIX

    for name, value, low in (("seed", seed, 0), ("problems", problems, 2), ("held_out", held_out, len(DIGIT_MIX))):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if held_out % len(DIGIT_MIX) or held_out // len(DIGIT_MIX) > 50:
        raise ValueError(f"held_out={held_out} must be a multiple of {len(DIGIT_MIX)} (as many problems of each "
                         f"size) of at most {50 * len(DIGIT_MIX)}: half the 100 one-digit sums stay for training")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")


def write_mini_data(root: Path, seed: int = 0, problems: int = PROBLEMS, held_out: int = HELD_OUT,
                    tokenizer: str = "mini", progress: bool = False, quiet: bool = False) -> dict[str, Path]:
    """Write (or find up to date) the miniature pipeline's data under `root`; returns
    {output name: path} (an indexed dataset's path is its prefix, without .bin/.idx).
    `tokenizer`: "mini" (learnt from the generated corpus) or "qwen3" (the real one)."""
    check_params(seed, problems, held_out, tokenizer)
    root = Path(root)
    params = {"seed": seed, "problems": problems, "held_out": held_out, "tokenizer": tokenizer}
    steps = _step_params(seed, problems, held_out, tokenizer)
    paths = {name: root / rel for name, (rel, _, _) in OUTPUTS.items()}
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))

    manifest = _read_manifest(root)
    if (manifest is not None and manifest.get("params") == params and manifest.get("steps") == steps
            and all(_exists(paths[n], kind) for n, (_, kind, _) in OUTPUTS.items())):
        say(f"{root / MANIFEST}: up to date (seed={seed}, problems={problems}, held_out={held_out}, "
            f"tokenizer={tokenizer})")
        return paths

    # From here until the new manifest is written, the directory is not a complete set.
    # The journal lists the steps whose outputs are complete, with the parameters they
    # were made with, so that a rebuild (or a run after a crash) redoes only what changed.
    root.mkdir(parents=True, exist_ok=True)
    (root / MANIFEST).unlink(missing_ok=True)
    journal = _read_journal(root)
    rows = {}
    for step, make in STEPS.items():
        outputs = [n for n, (_, _, s) in OUTPUTS.items() if s == step]
        done = journal.get(step)
        keep = (isinstance(done, dict) and done.get("params") == steps[step]
                and isinstance(done.get("rows"), dict) and set(outputs) <= set(done["rows"])
                and all(_exists(paths[n], OUTPUTS[n][1]) for n in outputs))
        if keep:
            rows.update({n: done["rows"][n] for n in outputs})
        else:
            journal.pop(step, None)
            _write_journal(root, journal)
            written = make(root, params, progress)
            missing = set(outputs) - set(written)
            if missing:
                raise RuntimeError(f"step {step} wrote no {', '.join(sorted(missing))}")
            rows.update(written)
            journal[step] = {"params": steps[step], "rows": {n: written[n] for n in outputs}}
            _write_journal(root, journal)
        for n in outputs:
            say(f"{paths[n]}: {rows[n]}" + (" rows" if OUTPUTS[n][1] == "jsonl" else "") + (" (kept)" if keep else ""))

    manifest = {"version": VERSION, "params": params, "steps": steps,
                "files": {n: {"path": rel, "kind": kind, "step": step, "rows": rows[n]}
                          for n, (rel, kind, step) in OUTPUTS.items()}}
    _write_text(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    say(f"{root / MANIFEST}: {len(OUTPUTS)} outputs (seed={seed}, problems={problems}, held_out={held_out}, "
        f"tokenizer={tokenizer})")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.mini", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="data root (the stages' data.root)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--problems", type=int, default=PROBLEMS, help="problems per training file")
    p.add_argument("--held-out", type=int, default=HELD_OUT, help="problems in eval/held.jsonl")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="mini",
                   help="the mini tokenizer (default) or the real Qwen3 one")
    p.add_argument("--progress", action="store_true", help="progress bars while tokenizing")
    p.add_argument("--quiet", action="store_true", help="no per-file summary")
    args = p.parse_args(argv)
    try:
        write_mini_data(Path(args.out), seed=args.seed, problems=args.problems, held_out=args.held_out,
                        tokenizer=args.tokenizer, progress=args.progress, quiet=args.quiet)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
