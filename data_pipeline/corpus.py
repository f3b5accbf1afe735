"""Small test/bench corpora generated on the spot, with nothing downloaded.

    python -m data_pipeline.corpus --out DIR [--seed S] [--scale K]

writes four JSONL files (one `{"text": ...}` object per line):

- `general.jsonl`: Python standard-library source files and module docstrings (present on
  every machine that runs this project), plus prose-like English generated from template
  sentences, with a few non-English sentences mixed in;
- `math.jsonl`: generated word problems and linear equations with step-by-step solutions
  ending in `\\boxed{answer}`; every answer is computed, so it is correct;
- `code.jsonl`: single Python functions and methods cut from stdlib sources with `ast`;
- `long.jsonl`: documents made by concatenating stdlib sources, with lengths spread
  log-uniformly over two ranges: about 48..320 tokens (so the scaled-down S3 buckets
  [64,128) and [128,256) both get many documents at any scale) and about 3k..40k tokens
  (the real S3 buckets [4096,16384) and [16384,32768); a handful per unit of scale).

Output is a pure function of (seed, scale, the Python installation's stdlib files): the
same seed on the same Python gives byte-identical files. At scale 1 the corpus is a few
hundred thousand tokens (seconds to tokenize); `--scale` multiplies every count.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

# Characters per Qwen3 token, roughly, for Python source; only used to aim document
# lengths at token ranges (the spread is wide, so the estimate need not be exact).
CHARS_PER_TOKEN = 4.0
# Stdlib directories left out: tests hold deliberately broken/odd files, and
# site-packages differs between machines (it would break determinism).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib",
              "lib2to3", "turtledemo", "__phello__"}
_MAX_FILE_CHARS = 60_000  # keep single general documents moderate; long.jsonl makes long ones


@lru_cache(maxsize=1)
def stdlib_sources() -> tuple[tuple[str, str], ...]:
    """(relative path, text) of the stdlib's UTF-8 `.py` files, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                out.append((path.relative_to(root).as_posix(), text))
    out.sort()
    if len(out) < 20:
        raise RuntimeError(f"found only {len(out)} Python sources under {root}; "
                           "this Python installation has no usable stdlib sources")
    return tuple(out)


_PARSED: dict[str, ast.Module | None] = {}


def _parse(rel: str, text: str) -> ast.Module | None:
    """Parsed source, or None for files that do not parse (templates, newer syntax).

    Parsing the whole stdlib takes seconds, so only the files a corpus draws are parsed.
    """
    if rel not in _PARSED:
        try:
            _PARSED[rel] = ast.parse(text)
        except (SyntaxError, ValueError):
            _PARSED[rel] = None
    return _PARSED[rel]


def _shuffled_sources(rng: random.Random):
    """Stdlib sources in a seeded random order, cycling forever."""
    while True:
        pool = list(stdlib_sources())
        rng.shuffle(pool)
        yield from pool


def _pick(rng: random.Random, items, k: int) -> list:
    """k items, without repetition while the pool lasts, then cycling through reshuffles."""
    out = []
    while len(out) < k:
        pool = list(items)
        rng.shuffle(pool)
        out.extend(pool[: k - len(out)])
    return out


# --- prose ------------------------------------------------------------------------

_SUBJECTS = ["The committee", "A small team of engineers", "The river", "Every morning the baker",
             "The old library", "Our neighbour", "The research group", "A curious student",
             "The city council", "The orchestra", "The lighthouse keeper", "The new model",
             "A travelling merchant", "The garden", "The museum", "The weather station"]
_VERBS = ["carefully examined", "slowly rebuilt", "quietly described", "openly questioned",
          "patiently measured", "eagerly explored", "briefly summarised", "repeatedly tested",
          "gradually improved", "unexpectedly discovered", "thoroughly documented"]
_OBJECTS = ["the results of the experiment", "an unusual pattern in the data", "the northern bridge",
            "a collection of handwritten letters", "the schedule for next year",
            "the cost of the repairs", "a forgotten recipe", "the rules of the game",
            "the shape of the coastline", "several competing explanations", "the harvest"]
_TAILS = ["before the end of the week", "despite the heavy rain", "with great attention to detail",
          "as the sun went down", "after a long discussion", "without telling anyone",
          "for the first time in years", "to everyone's surprise", "in a matter of hours", ""]
_CONNECTIVES = ["However,", "Meanwhile,", "As a result,", "In the end,", "At first,", "Later,",
                "For this reason,", "Nevertheless,", "In addition,", "Surprisingly,"]
_FOREIGN = ["Der Bericht wurde am Montag veröffentlicht und sorgfältig geprüft.",
            "La réunion a été reportée à cause de la pluie.",
            "El equipo terminó el proyecto antes de lo previsto.",
            "这个小组在一周内完成了所有的测量。",
            "研究人员发现数据中有一个不寻常的模式。",
            "データは毎朝気象台で記録されます。",
            "Команда внимательно изучила результаты эксперимента."]


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    tail = rng.choice(_TAILS)
    s = f"{s} {tail}." if tail else f"{s}."
    if rng.random() < 0.3:
        first = rng.choice(_CONNECTIVES)
        s = f"{first} {s[0].lower()}{s[1:]}"
    return s


def prose(rng: random.Random, paragraphs: int) -> str:
    out = []
    for _ in range(paragraphs):
        sents = [_sentence(rng) for _ in range(rng.randint(3, 8))]
        if rng.random() < 0.15:
            sents.insert(rng.randrange(len(sents) + 1), rng.choice(_FOREIGN))
        out.append(" ".join(sents))
    return "\n\n".join(out)


# --- math -------------------------------------------------------------------------

_NAMES = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Jia"]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells"]


def _fmt(x) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _math_shopping(rng):
    n, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b, c = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 12)
    d = rng.randint(1, a + b * c - 1)
    total = a + b * c
    ans = total - d
    q = (f"{n} has {a} {item}. {n} buys {b} packs with {c} {item} in each pack, then gives "
         f"{d} {item} to a friend. How many {item} does {n} have now?")
    s = (f"Step 1: The packs contain {b} × {c} = {b * c} {item}.\n"
         f"Step 2: Before giving any away, {n} has {a} + {b * c} = {total} {item}.\n"
         f"Step 3: After giving away {d}, {n} has {total} - {d} = {ans} {item}.")
    return q, s, ans


def _math_speed(rng):
    v, t1, t2 = rng.randint(20, 120), rng.randint(1, 6), rng.randint(1, 5)
    w = rng.randint(10, 90)
    d1, d2 = v * t1, w * t2
    ans = d1 + d2
    q = (f"A train travels at {v} km/h for {t1} hours, then at {w} km/h for {t2} hours. "
         "How many kilometres does it travel in total?")
    s = (f"Step 1: First part: {v} × {t1} = {d1} km.\n"
         f"Step 2: Second part: {w} × {t2} = {d2} km.\n"
         f"Step 3: Total distance: {d1} + {d2} = {ans} km.")
    return q, s, ans


def _math_linear(rng):
    x = rng.randint(-30, 30)
    a = rng.choice([i for i in range(-12, 13) if i not in (0, 1)])
    b = rng.randint(-50, 50)
    c = a * x + b
    bs = f"+ {b}" if b >= 0 else f"- {-b}"
    q = f"Solve for x: {a}x {bs} = {c}."
    s = (f"Step 1: Subtract {b} from both sides: {a}x = {c} - ({b}) = {c - b}.\n"
         f"Step 2: Divide both sides by {a}: x = {c - b} / {a} = {x}.\n"
         f"Check: {a} × ({x}) {bs} = {a * x + b}, which equals {c}.")
    return q, s, x


def _math_discount(rng):
    price = rng.randint(2, 40) * 20
    pct = rng.choice([5, 10, 15, 20, 25, 30, 40, 50])
    qty = rng.randint(1, 6)
    off = price * pct // 100  # price is a multiple of 20, so this is exact
    ans = (price - off) * qty
    q = (f"A jacket costs ${price}. The shop offers a {pct}% discount. How much do {qty} "
         "jackets cost after the discount?")
    s = (f"Step 1: The discount per jacket is {pct}% of {price} = {price} × {pct} / 100 = {off}.\n"
         f"Step 2: The discounted price is {price} - {off} = {price - off}.\n"
         f"Step 3: For {qty} jackets: {price - off} × {qty} = {ans}.")
    return q, s, ans


def _math_series(rng):
    a, d, n = rng.randint(1, 20), rng.randint(1, 9), rng.randint(5, 40)
    last = a + (n - 1) * d
    ans = n * (a + last) // 2
    q = (f"What is the sum of the first {n} terms of the arithmetic sequence that starts "
         f"{a}, {a + d}, {a + 2 * d}, ...?")
    s = (f"Step 1: The common difference is {d}, so the {n}th term is {a} + ({n} - 1) × {d} = {last}.\n"
         f"Step 2: The sum is n × (first + last) / 2 = {n} × ({a} + {last}) / 2 = {ans}.")
    return q, s, ans


def _math_rectangle(rng):
    w, h = rng.randint(2, 60), rng.randint(2, 60)
    area, per = w * h, 2 * (w + h)
    ask_area = rng.random() < 0.5
    q = (f"A rectangle is {w} cm wide and {h} cm tall. What is its "
         f"{'area in square centimetres' if ask_area else 'perimeter in centimetres'}?")
    if ask_area:
        s = f"Step 1: Area = width × height = {w} × {h} = {area}."
        return q, s, area
    s = f"Step 1: Perimeter = 2 × (width + height) = 2 × ({w} + {h}) = {per}."
    return q, s, per


MATH_KINDS = [_math_shopping, _math_speed, _math_linear, _math_discount, _math_series, _math_rectangle]


def math_problem(rng: random.Random) -> tuple[str, int]:
    """One problem + solution text and its (integer) answer."""
    q, s, ans = rng.choice(MATH_KINDS)(rng)
    return f"Problem: {q}\n\nSolution:\n{s}\nThe answer is \\boxed{{{_fmt(ans)}}}.", ans


# --- code -------------------------------------------------------------------------

def functions_in(text: str, tree: ast.Module, min_lines: int = 3, max_chars: int = 6000) -> list[str]:
    """Source of the module-level functions and class methods in one file, dedented."""
    lines = text.splitlines(keepends=True)
    nodes = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            nodes.extend(n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nodes.append(node)
    out = []
    for node in nodes:
        start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
        seg = lines[start:node.end_lineno]
        if len(seg) < min_lines:
            continue
        # Methods are indented: strip the def line's indent so each function stands alone.
        indent = len(seg[0]) - len(seg[0].lstrip())
        src = "".join("\n" if not l.strip() else l[indent:] if not l[:indent].strip()
                      else l.lstrip() for l in seg)
        if len(src) <= max_chars:
            out.append(src)
    return out


# --- writers ----------------------------------------------------------------------

def _general(rng: random.Random, scale: int) -> list[str]:
    docs = []
    for rel, text in _pick(rng, stdlib_sources(), 24 * scale):
        docs.append(f"# File: Lib/{rel}\n\n{text[:_MAX_FILE_CHARS]}")
    # Module docstrings: one shuffled pass over the files (parsing only as many as
    # needed); a scale asking for more than the stdlib has repeats them.
    n_doc, found = 30 * scale, []
    pool = list(stdlib_sources())
    rng.shuffle(pool)
    for rel, text in pool:
        if len(found) == n_doc:
            break
        tree = _parse(rel, text)
        d = ast.get_docstring(tree) if tree is not None else None
        if d and len(d) > 80:
            mod = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            found.append(f"Module {mod}\n\n{d}")
    docs.extend(_pick(rng, found, n_doc))
    for _ in range(120 * scale):
        docs.append(prose(rng, rng.randint(1, 6)))
    rng.shuffle(docs)
    return docs


def _math(rng: random.Random, scale: int) -> list[str]:
    return [math_problem(rng)[0] for _ in range(300 * scale)]


def _code(rng: random.Random, scale: int) -> list[str]:
    want, docs = 300 * scale, []
    for rel, text in _shuffled_sources(rng):
        tree = _parse(rel, text)
        if tree is not None:
            # At most 20 per file, so that a few huge modules do not dominate.
            fns = functions_in(text, tree)
            docs.extend(f"# {rel}\n{src}" for src in rng.sample(fns, min(20, len(fns))))
        if len(docs) >= want:
            break
    rng.shuffle(docs)
    return docs[:want]


def _concat_to(rng: random.Random, chars: int) -> str:
    """Stdlib text of about `chars` characters, cut at a line end."""
    parts, n = [], 0
    while n < chars:
        rel, text = rng.choice(stdlib_sources())
        piece = f"# File: Lib/{rel}\n\n{text}"
        parts.append(piece)
        n += len(piece) + 2
    doc = "\n\n".join(parts)[:chars]
    cut = doc.rfind("\n")
    return doc[:cut] if cut > chars // 2 else doc


def _long(rng: random.Random, scale: int) -> list[str]:
    docs = []
    # (count per unit scale, token range): log-uniform lengths inside each range.
    for count, lo, hi in ((60, 48, 320), (4, 3000, 40000)):
        for _ in range(count * scale):
            tokens = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            docs.append(_concat_to(rng, int(tokens * CHARS_PER_TOKEN)))
    rng.shuffle(docs)
    return docs


KINDS = {"general": _general, "math": _math, "code": _code, "long": _long}


def write_corpus(out_dir, seed: int = 0, scale: int = 1) -> dict[str, Path]:
    """Write the four JSONL files into `out_dir`; returns {name: path}."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, make in KINDS.items():
        # A string seed per kind: independent streams, and str seeds hash the same
        # on every run (no PYTHONHASHSEED dependence).
        docs = make(random.Random(f"{seed}/{name}"), scale)
        path = out / f"{name}.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for d in docs:
                f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        paths[name] = path
    return paths


def column_sums(a: int, b: int) -> str:
    """Column addition of a and b written out, right to left: one line per column with its
    digits and the carry added, then the answer's digits found so far (the last column
    contributes its whole total). 47+85: "7+5=12, 2" then "4+8+1=13, 132".

    Every line is a local step (two digits and a carry; prepend one digit to the previous
    line's tail), so a small model can learn it, and its length grows with the digits:
    longer numbers take longer thinking, which is what the thinking-budget curve shows."""
    da, db = str(a)[::-1], str(b)[::-1]
    columns = max(len(da), len(db))
    lines, carry, tail = [], 0, ""
    for i in range(columns):
        terms = [int(d[i]) for d in (da, db) if i < len(d)] + ([carry] if carry else [])
        total = sum(terms)
        tail = (str(total) if i == columns - 1 else str(total % 10)) + tail
        lines.append("+".join(map(str, terms)) + f"={total}, {tail}")
        carry = total // 10
    return "\n".join(lines)


def addition_problem(a: int, b: int) -> dict:
    """A verifiable chat task: a+b with its column sums (column_sums) as the reasoning and
    the sum in \\boxed{} as the answer, for the math verifier.

    {"messages": [user, assistant(reasoning_content, content)], "reference": sum}. Kept
    terse: the small models that train on it in tests pay for every token.
    """
    return {"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                         {"role": "assistant", "reasoning_content": column_sums(a, b),
                          "content": f"\\boxed{{{a + b}}}"}],
            "reference": str(a + b)}


def carries(a: int, b: int) -> bool:
    """Whether column addition of a and b carries in any column."""
    while a or b:
        if a % 10 + b % 10 > 9:
            return True
        a, b = a // 10, b // 10
    return False


# The miniature's arithmetic (data_pipeline.mini, the mini tokenizer's corpus, the learning
# tests): sums of two 1-, 2- or 3-digit numbers, with carries. One digit is answered at a
# glance, three take three column steps: the range over which thinking pays.
DIGIT_MIX = (1, 2, 3)
# What the miniature trains on: more of the longer sums, where the model has more to learn
# (the held-out set keeps DIGIT_MIX's even split).
TRAIN_DIGITS = {1: 1, 2: 2, 3: 3}


def _pairs(digits: int, with_carries: bool):
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits
    return [(a, b) for a in range(lo, hi) for b in range(lo, hi) if with_carries or not carries(a, b)]


def addition_problems(n: int, digits, seed: int, exclude: set | None = None,
                      with_carries: bool = True) -> list[dict]:
    """`n` addition tasks of two `digits`-digit numbers, none of them in `exclude` ((a, b)
    pairs), e.g. to hold out evaluation problems from training ones; each row also has
    "pair" and "digits".

    `digits` is a number of digits, or several: each problem then draws its own from them,
    uniformly or with the weights of a {digits: weight} mapping, so that a set ranges in
    difficulty. Pairs are distinct while a digit count
    has unused ones left; a count that runs out (there are only 100 one-digit pairs)
    repeats its pairs. `with_carries=False` keeps only pairs whose columns never carry
    (each answer digit is then one digit sum); it lists every pair, so digits <= 3.
    """
    choices = [digits] if isinstance(digits, int) else list(digits)
    weights = [digits[d] for d in choices] if isinstance(digits, dict) else None
    if not choices or any(not isinstance(d, int) or d < 1 for d in choices):
        raise ValueError(f"digits must be a positive integer or a list of them, got {digits!r}")
    rng = random.Random(f"{seed}/addition/{digits}")
    exclude = set(exclude or ())
    if not with_carries and max(choices) > 3:
        raise ValueError("with_carries=False lists every pair, so digits must be 1, 2 or 3")
    pools: dict[int, list] = {}
    counts = {d: 0 for d in choices}
    for d in rng.choices(choices, weights, k=n):
        counts[d] += 1
    rows = []
    for d in choices:
        if d <= 3 or not with_carries:   # small enough to list: sample without replacement
            space = [p for p in _pairs(d, with_carries) if p not in exclude]
            if not space:
                raise ValueError(f"no {d}-digit pair{'s without carries' if not with_carries else 's'} "
                                 "remain outside `exclude`")
            if len(choices) == 1 and counts[d] > len(space):
                raise ValueError(f"only {len(space)} distinct {d}-digit pairs"
                                 f"{'' if with_carries else ' without carries'} remain")
            picked = []
            while len(picked) < counts[d]:
                picked += rng.sample(space, min(len(space), counts[d] - len(picked)))
        else:
            lo, hi = 10 ** (d - 1), 10 ** d - 1
            seen, picked = set(exclude), []
            while len(picked) < counts[d]:
                pair = (rng.randint(lo, hi), rng.randint(lo, hi))
                if pair not in seen:
                    seen.add(pair)
                    picked.append(pair)
        rows += [{**addition_problem(*pair), "pair": list(pair), "digits": d} for pair in picked]
    rng.shuffle(rows)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.corpus", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=1, help="multiplies every document count")
    args = p.parse_args(argv)
    if args.scale < 1:
        print("error: --scale must be >= 1", file=sys.stderr)
        return 2
    for name, path in write_corpus(args.out, args.seed, args.scale).items():
        with open(path, "rb") as f:
            n = sum(1 for _ in f)
        print(f"{path}: {n} documents, {path.stat().st_size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
