"""Rule-based rewards: the response's format, and IFEval-style instruction following.

A response is the assistant text after the generation prompt `<|im_start|>assistant\\n`
(see data_pipeline.chat), possibly ending in the stop token `<|im_end|>` or `<|endoftext|>`,
which is dropped. Every reward returns a float and never raises on junk output.

Format rewards (reference unused), 1.0 or 0.0:
- `format_think`: exactly one `<think>...</think>` block, at the start (leading whitespace
  allowed), then a non-empty answer. No block, two blocks, a nested or unclosed block, a
  stray `</think>`, an empty answer, or a chat special token inside the response (the
  model ran into another turn) give 0.0. An empty block is still well-formed; `no_think`
  is the reward that asks for one.
- `format_boxed`: `format_think`, and the answer holds exactly one `\\boxed{...}` (or
  `\\fbox`), complete and not empty.
- `no_think`: for /no_think turns, whose generation prompt already ends in the empty
  block: no block, or an empty one (whitespace only), then a non-empty answer.

`instructions` (reference: a dict, or a JSON object string, of instruction -> value) is
the fraction of the instructions the final answer (after the last `</think>`) satisfies;
`instructions_all` is 1.0 only when all of them are. An answer that is empty or cut off
inside a think block satisfies nothing, so saying nothing cannot earn `exclude` or
`max_words`. The instructions (words and sentences as data_pipeline.cold_start counts
them: a CJK character is a word; sentences end at `.!?`, `。！？` or a line break):

| key | value | satisfied when the answer |
|---|---|---|
| `max_words`, `min_words` | int >= 0 | has at most / at least that many words |
| `max_sentences`, `min_sentences` | int >= 0 | has at most / at least that many sentences |
| `include`, `exclude` | phrase or list of phrases | contains every / none of them (case-insensitive; a phrase edge that is a letter or digit must be a word edge, so `cat` is not in `category`) |
| `format` | `json`, `bullet_list`, `numbered_list` | is one JSON object or array (a fenced ```json block is fine); is a list: every non-empty line an item (`- `, `* `, `• ` / `1. `, `1) `) or an indented continuation, after an optional lead-in line ending in `:` |
| `language` | ISO 639-1 code (`en`, `zh`, `ru`, ...; `zh-CN` reads as `zh`) | is written mainly in that language's script: the script with the most words (cold_start's `script_units`) is the language's. Script only: `en` and `fr` are both Latin. `ja` and `zh` share CJK characters; kana in at least a tenth of them makes it `ja`, fewer makes it `zh`. No dependency. |
| `starts_with`, `ends_with` | non-empty string | starts / ends with it, exact case, outer whitespace ignored |
| `lowercase`, `uppercase` | `true` | has cased letters, all lower / all upper case |

At reward time an unknown key, or a known key with a bad value, counts as an unsatisfied
instruction. Both rewards register `instruction_problems(spec)` (joined into one line) as
their reference check, so the RL data reader (`recipes.rewards.reference_problem`) rejects
such a row before training: bad keys and values, contradictions such as min_words > max_words.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

# The cold-start filters' text measures (words, sentences, scripts), so that both judge text alike.
from data_pipeline import cold_start as _text
from data_pipeline.math_answers import BOXED, boxed_contents
from recipes.rewards import register
from recipes.rewards.math import final_part

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
SPECIAL_TOKENS = ("<|im_start|>",) + STOP_TOKENS


def _strip_stop(response: str) -> str:
    response = response.rstrip()
    for token in STOP_TOKENS:
        if response.endswith(token):
            return response[:-len(token)]
    return response


def _answer_text(after_think: str) -> str:
    # The thinking-budget stop phrase (data_pipeline.chat.BUDGET_STOP) leaves a '.' after </think>.
    lone_dot = after_think[:1] == "." and not after_think[1:2].strip()
    return (after_think[1:] if lone_dot else after_think).strip()


def split_think(response: Any) -> tuple[str | None, str] | None:
    """(reasoning, answer) of a well-formed response, reasoning None when it has no think
    block; None when malformed (not a string, several, nested, unclosed or misplaced
    blocks, a chat special token before the end)."""
    if not isinstance(response, str):
        return None
    body = _strip_stop(response)
    if any(token in body for token in SPECIAL_TOKENS):
        return None
    opens, closes = body.count(THINK_OPEN), body.count(THINK_CLOSE)
    if opens == closes == 0:
        return None, _answer_text(body)
    if opens != 1 or closes != 1:
        return None
    body = body.lstrip()
    if not body.startswith(THINK_OPEN):
        return None
    end = body.find(THINK_CLOSE)
    return body[len(THINK_OPEN):end], _answer_text(body[end + len(THINK_CLOSE):])


@register("format_think")
def format_think(response: str, reference: Any = None) -> float:
    parts = split_think(response)
    return 1.0 if parts is not None and parts[0] is not None and parts[1] else 0.0


@register("format_boxed")
def format_boxed(response: str, reference: Any = None) -> float:
    if not format_think(response):
        return 0.0
    answer = split_think(response)[1]
    complete = boxed_contents(answer)
    return 1.0 if len(BOXED.findall(answer)) == 1 and len(complete) == 1 and complete[0] else 0.0


@register("no_think")
def no_think(response: str, reference: Any = None) -> float:
    parts = split_think(response)
    if parts is None:
        return 0.0
    reasoning, answer = parts
    return 1.0 if (reasoning is None or not reasoning.strip()) and answer else 0.0


# ----------------------------------------------------------------------------- instructions

FORMATS = ("json", "bullet_list", "numbered_list")
# ISO 639-1 code -> the script name data_pipeline.cold_start.char_script gives its letters.
_SCRIPT_LANGUAGES = {
    "Latin": "af az bs ca cs cy da de en eo es et eu fi fr ga gl hr hu id is it lb lt lv ms mt nb nl "
             "nn no pl pt ro sk sl sq sv sw tl tr uz vi",
    "Cyrillic": "be bg kk ky mk mn ru sr tg uk",
    "Greek": "el", "Arabic": "ar fa ps ur", "Hebrew": "he yi", "Devanagari": "hi mr ne sa",
    "Bengali": "as bn", "Thai": "th", "Armenian": "hy", "Georgian": "ka", "Tamil": "ta",
    "Telugu": "te", "Kannada": "kn", "Malayalam": "ml", "Gujarati": "gu", "Gurmukhi": "pa",
    "Ethiopic": "am ti", "Khmer": "km", "Lao": "lo", "Myanmar": "my", "Sinhala": "si",
    "Tibetan": "bo", "Hangul": "ko", "CJK": "ja zh",
}
LANGUAGE_SCRIPTS = {code: script for script, codes in _SCRIPT_LANGUAGES.items() for code in codes.split()}
_KANA = re.compile("[\u3040-\u30ff]")
_JAPANESE_MIN_KANA = 0.1  # share of the CJK characters; Japanese prose has several times more

_FENCED = re.compile(r"```(?:json)?\s*\n?(.*?)\n?\s*```", re.DOTALL | re.IGNORECASE)
_BULLET_ITEM = re.compile(r"\s*[-*•]\s+\S")
_NUMBERED_ITEM = re.compile(r"\s*\d+[.)]\s+\S")


def _language_code(value: str) -> str:
    return re.split(r"[-_]", value.strip().lower(), maxsplit=1)[0]


def _phrases(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _contains(text: str, phrase: str) -> bool:
    # CJK is written without spaces, so it neither has word edges nor breaks a Latin word's
    # ("用Python写" contains "Python").
    phrase, word_char = phrase.strip(), f"[^\\W{_text._CJK}]"
    pattern = ((f"(?<!{word_char})" if re.match(word_char, phrase) else "") + re.escape(phrase)
               + (f"(?!{word_char})" if re.match(word_char, phrase[-1]) else ""))
    return re.search(pattern, text, re.IGNORECASE) is not None


def _is_json(answer: str) -> bool:
    fenced = _FENCED.fullmatch(answer.strip())
    try:
        value = json.loads(fenced.group(1) if fenced else answer)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, (dict, list))


def _is_list(answer: str, item: re.Pattern) -> bool:
    lines = [line for line in answer.splitlines() if line.strip()]
    if lines and not item.match(lines[0]) and lines[0].rstrip().endswith(":"):
        lines = lines[1:]
    if not lines or not item.match(lines[0]):
        return False
    return all(item.match(line) or line[:1].isspace() for line in lines)


def _in_language(answer: str, code: str) -> bool:
    script = LANGUAGE_SCRIPTS[_language_code(code)]
    units = _text.script_units(answer)
    if _text.dominant_script(units) != script:
        return False
    if script != "CJK":
        return True
    japanese = len(_KANA.findall(answer)) >= _JAPANESE_MIN_KANA * units["CJK"]
    return japanese == (_language_code(code) == "ja")


def _sentence_count(answer: str) -> int:
    return sum(1 for s in _text.sentences(answer) if _text.words(s))


# Each value check says why a value is bad, or None.
def _count_problem(value) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else f"must be an integer >= 0, got {value!r}"


def _phrases_problem(value) -> str | None:
    ok = (isinstance(value, str) and value.strip()) or (
        isinstance(value, list) and value and all(isinstance(p, str) and p.strip() for p in value))
    return None if ok else f"must be a non-empty string or a non-empty list of them, got {value!r}"


def _format_problem(value) -> str | None:
    return None if value in FORMATS else f"must be one of {', '.join(FORMATS)}, got {value!r}"


def _language_problem(value) -> str | None:
    ok = isinstance(value, str) and _language_code(value) in LANGUAGE_SCRIPTS
    return None if ok else f"must be a language code such as en, zh, ru (known: {len(LANGUAGE_SCRIPTS)}), got {value!r}"


def _string_problem(value) -> str | None:
    return None if isinstance(value, str) and value.strip() else f"must be a non-empty string, got {value!r}"


def _true_problem(value) -> str | None:
    return None if value is True else f"must be true (leave it out for no requirement), got {value!r}"


# instruction -> (value problem, check(answer, value) on a valid value)
INSTRUCTIONS: dict[str, tuple[Callable[[Any], str | None], Callable[[str, Any], bool]]] = {
    "max_words": (_count_problem, lambda a, n: len(_text.words(a)) <= n),
    "min_words": (_count_problem, lambda a, n: len(_text.words(a)) >= n),
    "max_sentences": (_count_problem, lambda a, n: _sentence_count(a) <= n),
    "min_sentences": (_count_problem, lambda a, n: _sentence_count(a) >= n),
    "include": (_phrases_problem, lambda a, v: all(_contains(a, p) for p in _phrases(v))),
    "exclude": (_phrases_problem, lambda a, v: not any(_contains(a, p) for p in _phrases(v))),
    "format": (_format_problem, lambda a, v: _is_json(a) if v == "json" else _is_list(
        a, _BULLET_ITEM if v == "bullet_list" else _NUMBERED_ITEM)),
    "language": (_language_problem, _in_language),
    "starts_with": (_string_problem, lambda a, v: a.startswith(v.strip())),
    "ends_with": (_string_problem, lambda a, v: a.endswith(v.strip())),
    "lowercase": (_true_problem, lambda a, v: a.islower()),
    "uppercase": (_true_problem, lambda a, v: a.isupper()),
}


def _spec(reference) -> dict | None:
    if isinstance(reference, str):
        try:
            reference = json.loads(reference)
        except (ValueError, RecursionError):
            return None
    return reference if isinstance(reference, dict) else None


def instruction_problems(spec) -> list[str]:
    """Why an instruction spec is unusable, one line each; [] when it is fine."""
    parsed = _spec(spec)
    if parsed is None:
        return [f"instructions must be a dict or a JSON object string, got {type(spec).__name__} {str(spec)[:80]!r}"]
    if not parsed:
        return ["no instructions"]
    problems = []
    for key, value in parsed.items():
        if key not in INSTRUCTIONS:
            problems.append(f"unknown instruction {key!r}; known: {', '.join(INSTRUCTIONS)}")
        elif (why := INSTRUCTIONS[key][0](value)) is not None:
            problems.append(f"instruction {key} {why}")
    if problems:
        return problems
    for low, high in (("min_words", "max_words"), ("min_sentences", "max_sentences")):
        if low in parsed and high in parsed and parsed[low] > parsed[high]:
            problems.append(f"{low}={parsed[low]} > {high}={parsed[high]} cannot both hold")
    if parsed.get("lowercase") and parsed.get("uppercase"):
        problems.append("lowercase and uppercase cannot both hold")
    for bad in _phrases(parsed.get("exclude", [])):
        for wanted in _phrases(parsed.get("include", [])):
            if _contains(wanted, bad):
                problems.append(f"include {wanted!r} contains excluded {bad!r}")
    return problems


def instruction_results(response: Any, reference: Any) -> dict[str, bool] | None:
    """Each instruction's outcome on the response's final answer; None for an unusable spec."""
    spec = _spec(reference)
    if not spec:
        return None
    answer = _strip_stop(final_part(response)) if isinstance(response, str) else ""
    # cut off while thinking: there is no answer yet
    answer = "" if THINK_OPEN in answer else _answer_text(answer)
    results = {}
    for key, value in spec.items():
        rule = INSTRUCTIONS.get(key) if isinstance(key, str) else None
        results[key] = bool(answer) and rule is not None and rule[0](value) is None and rule[1](answer, value)
    return results


def _reference_problem(reference) -> str | None:
    return "; ".join(instruction_problems(reference)) or None


@register("instructions", _reference_problem)
def instructions(response: str, reference: Any) -> float:
    results = instruction_results(response, reference)
    return sum(results.values()) / len(results) if results else 0.0


@register("instructions_all", _reference_problem)
def instructions_all(response: str, reference: Any) -> float:
    results = instruction_results(response, reference)
    return 1.0 if results and all(results.values()) else 0.0
