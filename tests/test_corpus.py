"""data_pipeline.corpus: the generated test/bench corpora are deterministic and sound."""

from __future__ import annotations

import ast
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from data_pipeline.corpus import KINDS, math_problem, write_corpus


def texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c0"), seed=0)


def test_deterministic_per_seed(corpus, tmp_path):
    again = write_corpus(tmp_path / "again", seed=0)
    other = write_corpus(tmp_path / "other", seed=1)
    assert set(corpus) == set(KINDS) == {"general", "math", "code", "long"}
    for name in KINDS:
        assert corpus[name].read_bytes() == again[name].read_bytes(), name
        assert corpus[name].read_bytes() != other[name].read_bytes(), name
        docs = texts(corpus[name])
        assert len(docs) >= 50 and all(d.strip() for d in docs), name


def test_scale_multiplies(corpus, tmp_path):
    big = write_corpus(tmp_path / "big", seed=0, scale=2)
    for name in KINDS:
        assert len(texts(big[name])) == 2 * len(texts(corpus[name])), name


# Two-operand "a op b = c" claims in the solutions ("4 × 12 = 48", "20 - (-3) = 23"); the
# lookbehinds skip the tail of a longer expression ("540 × 20 / 100 = 108", "(9 + 351)").
_CLAIM = re.compile(r"(?<![\d)(])(?<![×+\-/] )(-?\d+) ([×+\-/]) \(?(-?\d+)\)? = (-?\d+)(?![\d(])")
_OPS = {"×": lambda a, b: a * b, "+": lambda a, b: a + b, "-": lambda a, b: a - b,
        "/": lambda a, b: a / b}


# The answer of each problem template, computed afresh from the problem statement alone.
_SOLVERS = [
    (r"has (\d+) \w+\. \w+ buys (\d+) packs with (\d+) \w+ in each pack, then gives (\d+)",
     lambda a, b, c, d: a + b * c - d),
    (r"travels at (\d+) km/h for (\d+) hours, then at (\d+) km/h for (\d+) hours",
     lambda v, t, w, u: v * t + w * u),
    (r"Solve for x: (-?\d+)x ([+-] \d+) = (-?\d+)\.", None),
    (r"costs \$(\d+)\. The shop offers a (\d+)% discount\. How much do (\d+)",
     lambda p, pct, q: p * (100 - pct) * q / 100),
    (r"first (\d+) terms of the arithmetic sequence that starts (\d+), (\d+),",
     lambda n, a, a2: n * (2 * a + (n - 1) * (a2 - a)) / 2),
    (r"(\d+) cm wide and (\d+) cm tall\. What is its area", lambda w, h: w * h),
    (r"(\d+) cm wide and (\d+) cm tall\. What is its perimeter", lambda w, h: 2 * (w + h)),
]


def test_math_answers_are_correct(corpus):
    docs = texts(corpus["math"])
    used = set()
    for doc in docs:
        assert doc.startswith("Problem: ") and "\nSolution:\n" in doc
        boxed = re.findall(r"\\boxed\{(-?\d+)\}", doc)
        assert len(boxed) == 1 and doc.endswith(f"\\boxed{{{boxed[0]}}}."), doc
        answer = int(boxed[0])
        question = doc.split("\n")[0]
        matched = [(i, m) for i, (pat, _) in enumerate(_SOLVERS) if (m := re.search(pat, question))]
        assert len(matched) == 1, doc
        i, m = matched[0]
        used.add(i)
        if _SOLVERS[i][1] is None:  # linear equation: substitute the answer back
            a, b, c = int(m[1]), int(m[2].replace(" ", "")), int(m[3])
            assert a * answer + b == c, doc
        else:
            assert _SOLVERS[i][1](*map(int, m.groups())) == answer, doc
        # Every two-operand step ("4 × 12 = 48") is right too.
        for a, op, b, c in _CLAIM.findall(doc):
            assert _OPS[op](int(a), int(b)) == int(c), (doc, a, op, b, c)
    assert used == set(range(len(_SOLVERS)))  # every template occurs


def test_math_problem_answer_matches_text():
    rng = random.Random(0)
    for _ in range(200):
        text, answer = math_problem(rng)
        assert text.endswith(f"\\boxed{{{answer}}}.")


def test_code_documents_are_python_functions(corpus):
    docs = texts(corpus["code"])
    for doc in docs:
        tree = ast.parse(doc)  # each function stands alone (methods dedented)
        assert len(tree.body) == 1 and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef))
    assert len({d.splitlines()[0] for d in docs}) >= 20  # drawn from many stdlib files


def test_general_mixes_sources_docs_and_prose(corpus):
    docs = texts(corpus["general"])
    assert any(d.startswith("# File: Lib/") for d in docs)
    assert any(d.startswith("Module ") for d in docs)
    assert any(not d.startswith(("# File:", "Module ")) for d in docs)
    assert any(not d.isascii() for d in docs)  # some non-English text


@pytest.mark.parametrize("with_carries", [True, False])
def test_addition_problems_hold_out_and_work_the_columns(with_carries):
    from data_pipeline.corpus import addition_problems, carries

    train = addition_problems(300, 2, seed=0, with_carries=with_carries)
    held = addition_problems(40, 2, seed=1, exclude={tuple(r["pair"]) for r in train}, with_carries=with_carries)
    pairs = [tuple(r["pair"]) for r in train + held]
    assert len(set(pairs)) == len(pairs) == 340
    assert all(10 <= a <= 99 and 10 <= b <= 99 for a, b in pairs)
    if not with_carries:
        assert not any(carries(a, b) for a, b in pairs)
    else:
        assert any(carries(a, b) for a, b in pairs)
    for r in train[:50]:
        a, b = r["pair"]
        user, assistant = r["messages"]
        assert user["content"] == f"What is {a}+{b}?" and r["reference"] == str(a + b)
        assert assistant["content"] == f"\\boxed{{{a + b}}}"
        assert r["digits"] == 2
        units = assistant["reasoning_content"].splitlines()[0]
        assert units == f"{a % 10}+{b % 10}={a % 10 + b % 10}, {(a + b) % 10}"


def test_carries():
    from data_pipeline.corpus import carries

    assert [carries(a, b) for a, b in [(15, 14), (15, 15), (91, 10), (5, 995), (0, 0)]] == \
        [False, True, True, True, False]


def test_addition_problems_refuse_impossible_requests():
    from data_pipeline.corpus import addition_problems

    with pytest.raises(ValueError, match="without carries remain"):
        addition_problems(2000, 2, seed=0, with_carries=False)
    with pytest.raises(ValueError, match="digits must be 1, 2 or 3"):
        addition_problems(10, 4, seed=0, with_carries=False)
    # one digit means 0-9: 100 pairs, and a single digit class must not repeat them
    assert len(addition_problems(100, 1, seed=0)) == 100
    with pytest.raises(ValueError, match="only 100 distinct 1-digit pairs remain"):
        addition_problems(101, 1, seed=0)
    every_one_digit = {(a, b) for a in range(10) for b in range(10)}
    with pytest.raises(ValueError, match="no 1-digit pairs remain outside `exclude`"):
        addition_problems(5, [1, 2], seed=0, exclude=every_one_digit)
    for digits in (0, [], [2, 0], {1: 1, "2": 1}):
        with pytest.raises(ValueError, match="digits must be a positive integer"):
            addition_problems(5, digits, seed=0)


@pytest.mark.parametrize("a, b, expected", [
    (0, 0, "0+0=0, 0"),
    (5, 7, "5+7=12, 12"),                                 # one column: its total in full
    (47, 85, "7+5=12, 2\n4+8+1=13, 132"),                # carry into the last column
    (123, 4, "3+4=7, 7\n2=2, 27\n1=1, 127"),              # unequal lengths, no carry
    (95, 8, "5+8=13, 3\n9+1=10, 103"),                   # the final carry becomes a digit
    (999, 1, "9+1=10, 0\n9+1=10, 00\n9+1=10, 1000"),      # a carry through every column
])
def test_column_sums_by_hand(a, b, expected):
    from data_pipeline.corpus import column_sums

    assert column_sums(a, b) == expected
    assert column_sums(b, a).splitlines()[-1].endswith(f", {a + b}")


def test_column_sums_tails_are_the_answer_so_far():
    """Each line's tail is the sum's last i+1 digits; the last line's is the whole sum."""
    from data_pipeline.corpus import column_sums

    rng = random.Random(0)
    for _ in range(300):
        a, b = rng.randrange(10 ** rng.randint(1, 5)), rng.randrange(10 ** rng.randint(1, 5))
        lines = column_sums(a, b).splitlines()
        assert len(lines) == max(len(str(a)), len(str(b)))
        total = str(a + b)
        for i, line in enumerate(lines):
            work, tail = line.split(", ")
            terms, result = work.split("=")
            assert sum(map(int, terms.split("+"))) == int(result), line
            assert tail == (total if i == len(lines) - 1 else total[-(i + 1):]), (a, b, line)


def _size(pair) -> int:
    a, b = pair
    assert len(str(a)) == len(str(b)), pair   # both operands from one digit class
    return len(str(a))


def test_addition_problems_digit_mix_follows_the_weights():
    from data_pipeline.corpus import addition_problems

    n = 3000
    rows = addition_problems(n, {1: 1, 2: 2, 3: 3}, seed=0)
    assert len(rows) == n
    sizes = Counter(_size(r["pair"]) for r in rows)
    assert sizes == Counter(r["digits"] for r in rows)
    # binomial spread at n=3000 is under 1 point; 3 points is > 4 sigma
    for d, share in {1: 1 / 6, 2: 2 / 6, 3: 3 / 6}.items():
        assert abs(sizes[d] / n - share) < 0.03, sizes
    uniform = Counter(r["digits"] for r in addition_problems(1000, [1, 3], seed=0))
    assert set(uniform) == {1, 3} and abs(uniform[1] - 500) < 80, uniform
    for r in rows[:200]:
        a, b = r["pair"]
        assert r["reference"] == str(a + b) and r["messages"][0]["content"] == f"What is {a}+{b}?"


def test_addition_problems_distinct_per_digit_class():
    """Pairs repeat only in a class that has run out, and then only by whole rounds."""
    from data_pipeline.corpus import addition_problems

    rows = addition_problems(1000, [1, 2, 3], seed=3)
    by_class: dict[int, Counter] = {}
    for r in rows:
        by_class.setdefault(r["digits"], Counter())[tuple(r["pair"])] += 1
    ones = by_class[1]
    drawn = sum(ones.values())
    assert drawn > 100                                    # more than the 100 one-digit pairs
    assert len(ones) == 100                               # each used before any repeats
    assert max(ones.values()) <= -(-drawn // 100)         # no pair ahead of a round
    for d in (2, 3):
        assert max(by_class[d].values()) == 1, d


def test_addition_problems_honour_exclude():
    from data_pipeline.corpus import addition_problems

    allowed_ones = {(1, 2), (3, 4), (0, 9), (7, 7), (9, 0)}
    exclude = {(a, b) for a in range(10) for b in range(10)} - allowed_ones
    exclude |= {(a, b) for a in range(10, 100) for b in range(10, 100) if (a + b) % 3}
    rows = addition_problems(600, [1, 2], seed=0, exclude=exclude)
    pairs = [tuple(r["pair"]) for r in rows]
    assert not set(pairs) & exclude
    assert {p for p in pairs if max(p) < 10} == allowed_ones   # the five left, repeated
    # digits > 3 draws at random instead of listing: the same seed without its own
    # first draws must find others
    first = addition_problems(50, 4, seed=0)
    again = addition_problems(50, 4, seed=0, exclude={tuple(r["pair"]) for r in first})
    assert not {tuple(r["pair"]) for r in first} & {tuple(r["pair"]) for r in again}
    assert all(1000 <= x <= 9999 for r in again for x in r["pair"])
