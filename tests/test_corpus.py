"""data_pipeline.corpus: the generated test/bench corpora are deterministic and sound."""

from __future__ import annotations

import ast
import json
import random
import re
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
        units = assistant["reasoning_content"].splitlines()[0]
        assert units == f"{a % 10}+{b % 10}={a % 10 + b % 10}"


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
    with pytest.raises(ValueError, match="distinct 1-digit pairs exist"):
        addition_problems(82, 1, seed=0)
