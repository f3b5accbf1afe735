"""Final answers in model text: extraction and equivalence through `math-verify`.

The one home of what "the answer" of a math response is and when two answers are the
same: the cold-start data filter (data_pipeline.cold_start) and the `math` reward
(recipes.rewards.math) both call it, so that data built here and rollouts scored in RL
agree on it.

- `extract_answer(text)`: the content of the last complete `\\boxed{...}` (or `\\fbox`),
  nested braces included; failing that, the last number in the text (integers, decimals,
  `1,000`-style thousands, `a/b` and `\\frac{a}{b}` fractions); None when there is neither.
- `answers_match(predicted, reference)`: the two strings parsed as math (a bare answer
  is read as LaTeX inline math) and compared by `math_verify.verify`, the reference as
  gold: `1/2`, `0.5`, `\\frac{1}{2}` and `\\dfrac{2}{4}` all match, `x+1` matches `1+x`.
  Identical strings always match, so answers that do not parse as math (`yes`, `(B)`)
  still compare. It never raises, and every parse and comparison is bounded by
  `timeout_s`: a timed-out or failed check is a mismatch.

Why the threading branch: math-verify bounds its work with `signal.alarm`, which only
works in the main thread. Off the main thread (an RL reward pool, say) the check runs in
one persistent child process, whose main thread does have the alarm; a child that
overruns a generous deadline anyway is killed (and restarted on the next call) and the
answer counts as wrong. In the
main thread the caller's own interval timer, if any (pytest-timeout, a watchdog), is put
back afterwards, since math-verify's alarm would otherwise cancel it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_TIMEOUT_S = 5
# added to the child's deadline: its alarms fire late under load
DEADLINE_SLACK_S = 10.0

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A minus sign only when it is not a binary minus (`10-3` ends in 3, not -3).
_NUMBER = re.compile(
    r"\\[dt]?frac\{-?\d+\}\{\d+\}"
    r"|(?<![\w.])(?:-(?=\d))?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_MATH_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")


def boxed_contents(text: str) -> list[str]:
    found = []
    for m in BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:  # a box cut off mid-way (truncated generation) is no answer
            found.append(text[m.end():i - 1].strip())
    return found


def extract_answer(text: str) -> str | None:
    """The last complete `\\boxed{...}`'s content, else the last number, else None."""
    if not isinstance(text, str):
        return None
    boxed = boxed_contents(text)
    if boxed:
        return boxed[-1]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_math(answer: str) -> str:
    return answer if any(d in answer for d in _MATH_DELIMITERS) else f"${answer}$"


def _verify(predicted: str, reference: str, timeout_s: int | None) -> bool:
    from math_verify import parse, verify

    try:
        gold = parse(_as_math(reference), parsing_timeout=timeout_s)
        target = parse(_as_math(predicted), parsing_timeout=timeout_s)
        return bool(gold and target and verify(gold, target, timeout_seconds=timeout_s))
    except Exception:
        return False


def _verify_keeping_timer(predicted: str, reference: str, timeout_s: int) -> bool:
    delay, interval = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    try:
        return _verify(predicted, reference, timeout_s)
    finally:
        if delay > 0:
            left = delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-3), interval)


class _Worker:
    """A `python -c` child answering one JSON line per request on stdin/stdout (not
    multiprocessing: that re-imports the caller's __main__ and refuses to start from
    daemonic processes)."""

    def __init__(self):
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-c", "from data_pipeline.math_answers import serve; serve()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        self.fresh = True

    def ask(self, predicted: str, reference: str, timeout_s: int) -> bool | None:
        """The answer, or None when the child died or overran the deadline."""
        # two parses and up to four comparisons, each under its own alarm; a fresh child
        # first imports sympy
        deadline = 6 * timeout_s + DEADLINE_SLACK_S + (120 if self.fresh else 0)
        self.fresh = False
        try:
            self.proc.stdin.write(json.dumps([predicted, reference, timeout_s]) + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], deadline)
            line = self.proc.stdout.readline() if ready else ""
            return json.loads(line) if line else None
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def serve() -> None:
    for line in sys.stdin:
        predicted, reference, timeout_s = json.loads(line)
        print(json.dumps(_verify(predicted, reference, timeout_s)), flush=True)


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def _in_worker(predicted: str, reference: str, timeout_s: int) -> bool:
    global _worker
    with _worker_lock:
        if _worker is None or _worker.proc.poll() is not None:
            _worker = _Worker()
        answer = _worker.ask(predicted, reference, timeout_s)
        if answer is None:
            _worker.close()
            _worker = None
        return bool(answer)


def answers_match(predicted, reference, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether `predicted` is mathematically equivalent to `reference` (see module doc)."""
    values = []
    for v in (predicted, reference):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not v.strip():
            return False
        values.append(v.strip())
    predicted, reference = values
    if predicted == reference:
        return True
    seconds = max(1, math.ceil(timeout_s))  # signal.alarm counts whole seconds
    if os.name == "posix" and threading.current_thread() is threading.main_thread():
        return _verify_keeping_timer(predicted, reference, seconds)
    return _in_worker(predicted, reference, seconds)


# math-verify logs each timeout and parse failure as a warning; here they are mismatches.
logging.getLogger("math_verify").setLevel(logging.ERROR)
