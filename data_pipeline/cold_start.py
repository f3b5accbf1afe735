"""The long-CoT cold-start data builder (Qwen3 report section 4.1): candidate responses in,
filtered chat samples out, with a count for every query and response filter.

    python -m data_pipeline.cold_start input=candidates.jsonl output=data/sft/cold_start.jsonl \\
        [validation=heldout.jsonl] [no_cot_answers=no_cot.jsonl] [filters.min_thinking_words=32 ...]

Input JSONL, one query per line: {"id"? (default: the line number, from 0), "query",
"reference" (the final answer) or "tests" (code test cases), "responses": [...] or
"response": "...", "source"?, "no_cot_correct"?}. A response is a long-CoT string
`<think>\\n{thinking}\\n</think>\\n\\n{summary}`. Output JSONL, one sample per kept response:
{"id", "messages": [{"role": "user", "content": query}, {"role": "assistant", "content":
summary, "reasoning_content": thinking}], "source", "reference"?} (data_pipeline.chat's
schema, ready for `recipes.sft`).

Query filters, in this order:
- not verifiable: neither a reference answer nor test cases;
- solved without CoT (`drop_no_cot_correct`): the row says so ("no_cot_correct": true),
  or its answer in the `no_cot_answers` JSONL ({"id" or "query_id", "answer" or
  "response"}, e.g. `recipes.generate ... enable_thinking=false` output) matches the
  reference; `build(no_cot_correct=fn)` takes any other judge.

Response filters, the report's list (thresholds: `Thresholds`, from `filters.*`):
1. wrong_answer: the summary's final answer (`data_pipeline.math_answers.extract_answer`) does
   not match the reference (`answers_match`, math-verify). Code rows (tests, no reference) are
   NOT executed here (the sandbox comes with reasoning RL): they are counted as
   `unverified_code` and kept, or dropped with `filters.keep_unverified_code=false`.
2. repetition: the share of repeated word n-grams (`repetition_n`) in the response exceeds
   `max_repetition_rate`.
3. guessing: an answer is present but the thinking has fewer than `min_thinking_words`
   words or fewer than `min_thinking_steps` sentences/lines.
4. inconsistent: the last answer reached in the thinking and the summary's answer both
   exist and differ (math rows only: code has no single final answer).
5. language_mixing: more than `max_offscript_fraction` of the response's sentences are
   written mainly in another script than the query (see `script_units`).
6. validation_overlap: query plus response share more than `max_shared_ngrams` word
   `overlap_n`-grams with the held-out `validation` items (no file: not applied).
A response without a `</think>` or with an empty summary is `malformed`.

Every response is checked by every filter: `failed` counts each filter's failures, and
`dropped_by` charges each dropped response to its first failure in the order above, so
kept + dropped_by adds up to all responses. Counts are printed and saved to
`{output}.stats.json`; output and stats are written under temporary names and renamed.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator

from data_pipeline.chat import split_reasoning
from data_pipeline.math_answers import answers_match, extract_answer
from model.config import ConfigError, from_dict

FILTERS = ("wrong_answer", "repetition", "guessing", "inconsistent", "language_mixing", "validation_overlap")
MALFORMED, UNVERIFIED_CODE = "malformed", "unverified_code"


@dataclass
class Thresholds:
    keep_unverified_code: bool = True
    repetition_n: int = 8
    max_repetition_rate: float = 0.3
    min_thinking_words: int = 64
    min_thinking_steps: int = 3
    max_offscript_fraction: float = 0.1
    overlap_n: int = 13
    max_shared_ngrams: int = 0
    answer_timeout_s: float = 5.0

    def check(self) -> "Thresholds":
        for f in fields(self):
            value = getattr(self, f.name)
            ok = isinstance(value, bool) if f.type == "bool" else (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                and (f.type != "int" or float(value).is_integer()))
            if not ok:
                raise ConfigError(f"filters.{f.name} must be a {f.type}, got {value!r}")
        for name in ("repetition_n", "overlap_n", "answer_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"filters.{name} must be > 0, got {getattr(self, name)}")
        for name in ("min_thinking_words", "min_thinking_steps", "max_shared_ngrams"):
            if getattr(self, name) < 0:
                raise ConfigError(f"filters.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_repetition_rate", "max_offscript_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"filters.{name} must be in [0, 1], got {getattr(self, name)}")
        return self


# ----------------------------------------------------------------------------- text

# Scripts written without spaces: each character counts as a word.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(f"[{_CJK}]|[^\\W{_CJK}]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])|\n+")
_SCRIPTS = {"LATIN", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "HANGUL", "DEVANAGARI", "BENGALI", "THAI",
            "ARMENIAN", "GEORGIAN", "TAMIL", "TELUGU", "KANNADA", "MALAYALAM", "GUJARATI", "GURMUKHI",
            "ETHIOPIC", "KHMER", "LAO", "MYANMAR", "SINHALA", "TIBETAN"}
_CJK_NAMES = {"CJK", "HIRAGANA", "KATAKANA", "IDEOGRAPHIC", "BOPOMOFO"}
_PER_CHAR_SCRIPTS = {"CJK", "Thai"}


def words(text: str) -> list[str]:
    """Lower-cased word tokens; a CJK character is a word of its own."""
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> Iterator[tuple[str, ...]]:
    return (tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text) if s.strip()]


@functools.lru_cache(maxsize=1 << 16)
def char_script(ch: str) -> str | None:
    """The writing system of a letter from its Unicode name ("Latin", "Cyrillic", "CJK"
    for Han/kana, ...); None for non-letters and for math letterlike symbols."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    name = unicodedata.name(ch, "").replace("-", " ").split()
    if name and name[0] in ("FULLWIDTH", "HALFWIDTH"):
        name = name[1:]
    if not name:
        return None
    if name[0] in _CJK_NAMES:
        return "CJK"
    return name[0].title() if name[0] in _SCRIPTS else None


def script_units(text: str) -> Counter:
    """Words per script: a run of letters of one script is one word, except in scripts
    without spaces (one per character). Single letters are skipped: in reasoning they are
    mostly variables (x, θ), which say nothing about the language."""
    units: Counter = Counter()
    run, length = None, 0
    for ch in text + " ":
        script = char_script(ch)
        if script is not None and script == run:
            length += 1
            continue
        if run in _PER_CHAR_SCRIPTS:
            units[run] += length
        elif run is not None and length >= 2:
            units[run] += 1
        run, length = script, 1
    return units


def dominant_script(units: Counter, prefer: str | None = None) -> str | None:
    """The script with the most words; a tie with `prefer` goes to `prefer`."""
    if not units:
        return None
    top = max(units.values())
    if prefer is not None and units.get(prefer) == top:
        return prefer
    return min(s for s, n in units.items() if n == top)


def repetition_rate(tokens: list[str], n: int) -> float:
    """Share of the n-grams that repeat an earlier one: 0 for all distinct, near 1 for a loop."""
    grams = list(ngrams(tokens, n))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def offscript_fraction(query: str, text: str) -> float:
    """Share of the sentences (those with any words) whose dominant script is not the query's."""
    expected = dominant_script(script_units(query))
    if expected is None:  # a query of symbols and numbers has no language to keep
        return 0.0
    judged = [u for u in map(script_units, sentences(text)) if u]
    off = sum(dominant_script(u, prefer=expected) != expected for u in judged)
    return off / len(judged) if judged else 0.0


# ----------------------------------------------------------------------------- filters
# Each returns True when the response fails the filter.

def wrong_answer(summary: str, reference: str, t: Thresholds) -> bool:
    return not answers_match(extract_answer(summary), reference, timeout_s=t.answer_timeout_s)


def repetitive(text: str, t: Thresholds) -> bool:
    return repetition_rate(words(text), t.repetition_n) > t.max_repetition_rate


def guessing(thinking: str, answer_present: bool, t: Thresholds) -> bool:
    steps = sum(1 for s in sentences(thinking) if words(s))
    return answer_present and (len(words(thinking)) < t.min_thinking_words or steps < t.min_thinking_steps)


def inconsistent(thinking: str, summary: str, t: Thresholds) -> bool:
    reached, final = extract_answer(thinking), extract_answer(summary)
    if reached is None or final is None:
        return False
    return not answers_match(final, reached, timeout_s=t.answer_timeout_s)


def language_mixing(query: str, text: str, t: Thresholds) -> bool:
    return offscript_fraction(query, text) > t.max_offscript_fraction


def validation_overlap(text: str, held_out: set, t: Thresholds) -> bool:
    if not held_out:
        return False
    shared = held_out.intersection(ngrams(words(text), t.overlap_n))
    return len(shared) > t.max_shared_ngrams


def response_failures(query: str, reference, is_code: bool, thinking: str, summary: str,
                      held_out: set, t: Thresholds) -> list[str]:
    """The filters (by name, in the report's order) this response fails."""
    response = thinking + "\n" + summary
    answer_present = bool(summary.strip()) if is_code else extract_answer(summary) is not None
    checks = {
        "wrong_answer": lambda: not is_code and wrong_answer(summary, reference, t),
        "repetition": lambda: repetitive(response, t),
        "guessing": lambda: guessing(thinking, answer_present, t),
        "inconsistent": lambda: not is_code and inconsistent(thinking, summary, t),
        "language_mixing": lambda: language_mixing(query, response, t),
        "validation_overlap": lambda: validation_overlap(query + "\n" + response, held_out, t),
    }
    return [name for name in FILTERS if checks[name]()]


# ----------------------------------------------------------------------------- inputs

def jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value or None if unreadable) for every non-blank line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError:
                    yield n, None


def _present(value) -> bool:
    return value is not None and value != "" and value != [] and value != {}


def validation_ngrams(path: Path, n: int) -> tuple[set, int]:
    """All word n-grams of the held-out items' prompts, and the number of items."""
    held_out, items = set(), 0
    for _, row in jsonl_rows(path):
        if not isinstance(row, dict):
            continue
        texts = [row[k] for k in ("query", "prompt", "problem", "question") if isinstance(row.get(k), str)]
        texts += [m.get("content") for m in row.get("messages") or []
                  if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)]
        if texts:
            items += 1
            for text in texts:
                held_out.update(ngrams(words(text), n))
    return held_out, items


def read_no_cot_answers(path: Path) -> dict[str, str]:
    """Query id (as a string) -> the answer a model gave without thinking."""
    answers = {}
    for _, row in jsonl_rows(path):
        if isinstance(row, dict):
            qid = row.get("query_id", row.get("id"))
            text = row.get("answer", row.get("response"))
            if qid is not None and isinstance(text, str):
                answers[str(qid)] = text
    return answers


def no_cot_judge(answers: dict[str, str] | None, t: Thresholds) -> Callable[[dict], bool]:
    """Whether a model solved the row without thinking: its "no_cot_correct" field, else
    its answer in `answers` checked against the reference."""
    def solved(row: dict) -> bool:
        if isinstance(row.get("no_cot_correct"), bool):
            return row["no_cot_correct"]
        text = (answers or {}).get(str(row["id"]))
        return (text is not None and _present(row.get("reference"))
                and answers_match(extract_answer(text), str(row["reference"]), timeout_s=t.answer_timeout_s))
    return solved


def _responses(row: dict):
    if isinstance(row.get("responses"), list):
        return row["responses"]
    if isinstance(row.get("response"), str):
        return [row["response"]]
    return None


# ----------------------------------------------------------------------------- build

def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_outputs(out: Path, lines: Iterable[str], stats: dict) -> dict:
    """`lines` to `out` and `stats` to `{out}.stats.json`, each written whole or not at all."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(out, lines)
    stats_path = Path(f"{out}.stats.json")
    _write_atomic(stats_path, [json.dumps(stats, indent=2) + "\n"])
    return {**stats, "stats_path": str(stats_path)}


def build(input_path, output_path, t: Thresholds | None = None, validation=None, no_cot_answers=None,
          no_cot_correct: Callable[[dict], bool] | None = None, drop_no_cot_correct: bool = True,
          max_per_query: int | None = None, progress: bool = True) -> dict:
    """Filter `input_path` into chat samples at `output_path`; return the stats."""
    t = (t or Thresholds()).check()
    src, out = Path(input_path), Path(output_path)
    for what, p in (("input", src), ("validation", validation), ("no_cot_answers", no_cot_answers)):
        if p is not None and not Path(p).is_file():
            raise ConfigError(f"{what}={p} does not exist")
    if max_per_query is not None and int(max_per_query) < 1:
        raise ConfigError(f"max_per_query must be >= 1 or null, got {max_per_query}")
    held_out, items = validation_ngrams(Path(validation), t.overlap_n) if validation else (set(), 0)
    if no_cot_correct is None:
        no_cot_correct = no_cot_judge(read_no_cot_answers(Path(no_cot_answers)) if no_cot_answers else None, t)

    queries, responses = Counter(), Counter()
    query_drops, dropped_by, failed = Counter(), Counter(), Counter()
    samples: list[str] = []
    from tqdm import tqdm

    with open(src, "rb") as f:
        lines = sum(1 for _ in f)
    bar = tqdm(total=lines, unit=" query", desc="cold start", disable=not progress, file=sys.stderr,
               mininterval=0.5)
    for n, row in jsonl_rows(src):
        bar.update(n + 1 - bar.n)
        queries["total"] += 1
        if not isinstance(row, dict) or not isinstance(row.get("query"), str) or not row["query"].strip():
            query_drops["invalid_row"] += 1
            continue
        row.setdefault("id", n)
        candidates = _responses(row)
        reference, tests = row.get("reference"), row.get("tests")
        if not candidates:
            query_drops["no_responses"] += 1
            continue
        if not _present(reference) and not _present(tests):
            query_drops["unverifiable"] += 1
            continue
        if drop_no_cot_correct and no_cot_correct(row):
            query_drops["no_cot_correct"] += 1
            continue
        is_code = not _present(reference)
        kept = 0
        for response in candidates:
            responses["total"] += 1
            if not isinstance(response, str) or "</think>" not in response:
                dropped_by[MALFORMED] += 1
                continue
            thinking, summary = split_reasoning({"content": response})
            if not summary.strip():
                dropped_by[MALFORMED] += 1
                continue
            fails = response_failures(row["query"], None if is_code else str(reference), is_code,
                                      thinking, summary, held_out, t)
            failed.update(fails)
            if fails:
                dropped_by[fails[0]] += 1
                continue
            if is_code:
                responses[UNVERIFIED_CODE] += 1
                if not t.keep_unverified_code:
                    dropped_by[UNVERIFIED_CODE] += 1
                    continue
            if max_per_query is not None and kept >= int(max_per_query):
                dropped_by["over_max_per_query"] += 1
                continue
            kept += 1
            sample = {"id": row["id"],
                      "messages": [{"role": "user", "content": row["query"]},
                                   {"role": "assistant", "content": summary, "reasoning_content": thinking}],
                      "source": row.get("source", src.name)}
            if _present(reference):
                sample["reference"] = reference
            samples.append(json.dumps(sample, ensure_ascii=False) + "\n")
        responses["kept"] += kept
        queries["kept" if kept else "all_responses_dropped"] += 1
    bar.close()

    stats = {
        "input": str(src), "output": str(out), "validation": None if validation is None else str(validation),
        "validation_items": items, "no_cot_answers": None if no_cot_answers is None else str(no_cot_answers),
        "thresholds": asdict(t), "max_per_query": max_per_query,
        "queries": {"total": queries["total"], "kept": queries["kept"],
                    "all_responses_dropped": queries["all_responses_dropped"], "dropped": dict(query_drops)},
        "responses": {"total": responses["total"], "kept": responses["kept"],
                      UNVERIFIED_CODE: responses[UNVERIFIED_CODE], "dropped_by": dict(dropped_by),
                      "failed": {name: failed[name] for name in FILTERS}},
        "samples": len(samples),
    }
    # nothing is lost without a count
    assert stats["queries"]["total"] == (queries["kept"] + queries["all_responses_dropped"]
                                         + sum(query_drops.values())), stats
    assert responses["total"] == responses["kept"] + sum(dropped_by.values()), stats
    return write_outputs(out, samples, stats)


def format_summary(stats: dict) -> str:
    q, r = stats["queries"], stats["responses"]
    lines = [f"wrote {stats['samples']:,} samples to {stats['output']}",
             f"queries: {q['total']:,} read, {q['kept']:,} with a kept response, "
             f"{q['all_responses_dropped']:,} with every response dropped"]
    lines += [f"  dropped {reason}: {n:,}" for reason, n in q["dropped"].items()]
    lines.append(f"responses: {r['total']:,} read, {r['kept']:,} kept "
                 f"({r[UNVERIFIED_CODE]:,} code responses passed unverified)")
    for name in (MALFORMED, *FILTERS, UNVERIFIED_CODE, "over_max_per_query"):
        if name in r["dropped_by"] or name in r["failed"]:
            extra = f" (failed: {r['failed'][name]:,})" if name in r["failed"] else ""
            lines.append(f"  dropped by {name}: {r['dropped_by'].get(name, 0):,}{extra}")
    lines.append(f"stats: {stats['stats_path']}")
    return "\n".join(lines)


def require(cfg, *keys: str) -> None:
    from omegaconf import OmegaConf

    for key in keys:
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
            raise ConfigError(f"{key}= is required")


def hydra_entry(config_name: str, job: Callable, usage: str | None = None) -> None:
    """`python -m` entry on `hydra_conf/<config_name>.yaml` (model.launch.hydra_cli, so
    `--help` prints `usage`): prints what `job(cfg)` returns, or a ConfigError as one
    `error:` line with exit code 2."""
    from model.launch import hydra_cli

    def run_cli(cfg) -> int:
        try:
            print(job(cfg))
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0

    hydra_cli(config_name, run_cli, usage)


def job(cfg) -> str:
    from omegaconf import OmegaConf

    require(cfg, "input", "output")
    t = from_dict(Thresholds, OmegaConf.to_container(cfg.filters, resolve=True), "filters")
    return format_summary(build(cfg.input, cfg.output, t, validation=cfg.validation,
                                no_cot_answers=cfg.no_cot_answers, drop_no_cot_correct=bool(cfg.drop_no_cot_correct),
                                max_per_query=cfg.max_per_query, progress=bool(cfg.progress)))


if __name__ == "__main__":
    hydra_entry("cold_start", job, __doc__)
