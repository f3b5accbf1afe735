"""The code sandbox holds, layer by layer, and the `code` rewards score programs by their tests.

Containment checks run under three set-ups: everything (`full`), the kernel layers alone
(`kernel`: rlimits and namespaces, no audit hook) and the audit hook alone (`hook`: what
is left where namespaces are refused). Where the check could pass vacuously, a `control`
run with neither layer shows that the check does see the escape it looks for.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import threading
import uuid

import pytest

from recipes.rewards import get_reward
from recipes.rewards import sandbox as sb
from recipes.rewards.code import cases_from, extract_code
from recipes.rewards.sandbox import Limits, run_sandboxed

REPO = sb.REPO
LAYERS = {"full": {}, "kernel": {"audit_hook": False}, "hook": {"namespaces": False}}
NONE = {"audit_hook": False, "namespaces": False}
QUICK = Limits(wall_s=8, cpu_s=2)


def run(source: str, layers: dict, stdin: str = "", limits: Limits = QUICK) -> sb.Outcome:
    return sb._run(source, stdin, limits, **layers)


def sandbox_processes() -> list[int]:
    """Processes whose command line names a sandbox temp dir (each run's launcher, init, program)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"qwen3-sandbox-" in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_runs_a_program_with_stdin():
    out = run_sandboxed("import sys\nprint(sum(map(int, sys.stdin.read().split())))", "1 2 3\n4\n")
    assert (out.status, out.returncode, out.stdout) == ("ok", 0, "10\n")


def test_statuses_and_bad_arguments():
    assert run_sandboxed("import sys; sys.exit(3)").status == "error"
    crash = run_sandboxed("raise ValueError('boom')")
    assert crash.status == "error" and "ValueError: boom" in crash.stderr
    big = run_sandboxed("print('x' * 10**6)", limits=Limits(output_bytes=1000))
    assert big.status == "ok" and len(big.stdout) == 1000
    for bad in (lambda: run_sandboxed(b"print(1)"), lambda: run_sandboxed("", stdin=None),
                lambda: run_sandboxed("", limits={"wall_s": 1}), lambda: Limits(wall_s=0),
                lambda: Limits(memory_mb=float("nan")), lambda: Limits(processes=True)):
        with pytest.raises(ValueError):
            bad()


def test_infinite_loop_is_stopped():
    # CPU-bound: the CPU limit (SIGXCPU); sleeping: only the wall-clock kill can end it.
    assert run_sandboxed("while True:\n    pass\n", limits=Limits(wall_s=30, cpu_s=1)).status == "timeout"
    slept = run_sandboxed("import time\ntime.sleep(600)\n", limits=Limits(wall_s=1))
    assert (slept.status, slept.returncode) == ("timeout", None)
    assert sandbox_processes() == []


FORK_COUNTER = """
import os, time
n = 0
for _ in range(100):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    n += 1
print(n)
"""
FORK_BOMB = """
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
"""


@pytest.mark.parametrize("layers", ["full", "kernel", "hook"])
def test_fork_bomb_is_contained(layers):
    counted = run(FORK_COUNTER, LAYERS[layers], limits=Limits(wall_s=8, processes=6))
    assert counted.status == "ok"
    if layers == "kernel":  # RLIMIT_NPROC stops it; its sleeping children die with the run
        assert 0 < int(counted.stdout) < 6
    else:  # the hook refuses the first fork
        assert int(counted.stdout) == 0
    if layers == "kernel":  # elsewhere the hook turns the bomb into a plain busy loop
        assert run(FORK_BOMB, LAYERS[layers], limits=Limits(wall_s=2, cpu_s=2)).status == "timeout"
    assert sandbox_processes() == []
    assert subprocess.run(["true"]).returncode == 0  # this process can still start one


@pytest.mark.parametrize("layers", ["full", "kernel", "hook"])
def test_huge_allocation_is_a_memory_failure(layers):
    out = run("x = bytearray(10 * 1024**3)\nprint(len(x))\n", LAYERS[layers])
    assert (out.status, out.stdout) == ("memory", "")


WRITER = """
import os
for path in {paths!r}:
    try:
        with open(path, "w") as f:
            f.write("escaped")
        print("wrote", path)
    except OSError as e:
        print("refused", path, type(e).__name__)
with open("inside.txt", "w") as f:
    f.write("fine")
print(open("inside.txt").read())
"""


@pytest.mark.parametrize("layers", ["full", "kernel", "hook", "control"])
def test_writes_outside_the_temp_dir_do_not_land(layers):
    name = f"qwen3-sandbox-escape-{uuid.uuid4().hex}"
    paths = [os.path.join(REPO, name), os.path.join("/tmp", name)]
    try:
        out = run(WRITER.format(paths=paths), NONE if layers == "control" else LAYERS[layers])
        assert out.stdout.rstrip().endswith("fine")  # its own temp dir is writable
        landed = [p for p in paths if os.path.exists(p)]
        if layers == "control":
            assert landed == paths  # the check does see an escape
        else:
            assert landed == []
    finally:
        for p in paths:
            if os.path.exists(p):
                os.remove(p)


CONNECT = """
import socket
for family, address in ((socket.AF_INET, ("127.0.0.1", {port})), (socket.AF_INET6, ("::1", {port6}))):
    try:
        s = socket.socket(family)
        s.settimeout(1)
        s.connect(address)
        print("connected", address)
    except Exception as e:
        print("refused", address, type(e).__name__)
"""


def listener(family, host):
    s = socket.socket(family)
    s.bind((host, 0))
    s.listen(8)
    s.setblocking(False)
    return s


def accepted(s) -> bool:
    try:
        s.accept()[0].close()
        return True
    except BlockingIOError:
        return False


@pytest.mark.parametrize("layers", ["full", "kernel", "hook", "control"])
def test_cannot_connect_to_a_local_listener(layers):
    ipv4 = listener(socket.AF_INET, "127.0.0.1")
    ipv6 = listener(socket.AF_INET6, "::1") if socket.has_ipv6 else ipv4
    with ipv4, ipv6:
        source = CONNECT.format(port=ipv4.getsockname()[1], port6=ipv6.getsockname()[1])
        out = run(source, NONE if layers == "control" else LAYERS[layers])
        reached = accepted(ipv4) or accepted(ipv6)
    if layers == "control":
        assert reached and "connected" in out.stdout
    else:
        assert not reached and "connected" not in out.stdout


SERVER = """
import socket, time
try:
    s = socket.socket()
    s.bind(("127.0.0.1", {port}))
    s.listen(8)
    print("bound", flush=True)
    time.sleep(1.5)
except Exception as e:
    print("refused", type(e).__name__)
"""


@pytest.mark.parametrize("layers", ["full", "kernel", "hook", "control"])
def test_nothing_it_binds_is_reachable(layers):
    with socket.socket() as probe:  # a free port, released for the program to take
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reached, done = [], threading.Event()

    def knock():
        while not done.is_set() and not reached:
            with socket.socket() as c:
                c.settimeout(0.2)
                if c.connect_ex(("127.0.0.1", port)) == 0:
                    reached.append(port)
            done.wait(0.05)

    knocker = threading.Thread(target=knock)
    knocker.start()
    try:
        out = run(SERVER.format(port=port), NONE if layers == "control" else LAYERS[layers])
    finally:
        done.set()
        knocker.join()
    if layers == "control":
        assert reached and "bound" in out.stdout
    else:
        assert not reached
        if layers != "kernel":  # in its own network namespace a bind may work, and reach nothing
            assert "bound" not in out.stdout


SNOOP = """
import os
print(sorted(os.environ.items()))
for path in ("/proc/{pid}/environ", "/proc/1/environ", "/proc/self/environ"):
    try:
        print(open(path, "rb").read())
    except OSError as e:
        print("refused", path, type(e).__name__)
"""


@pytest.mark.parametrize("layers", ["full", "kernel", "hook"])
def test_parent_secrets_do_not_leak(layers, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("QWEN3_SECRET_TEST", secret)
    out = run(SNOOP.format(pid=os.getpid()), LAYERS[layers])
    assert "HOME" in out.stdout  # the snoop ran
    assert secret not in out.stdout + out.stderr


READER = """
for path in {paths!r}:
    try:
        print(open(path, errors="replace").read())
    except OSError as e:
        print("refused", path, type(e).__name__)
"""


@pytest.mark.parametrize("layers", ["full", "kernel", "hook", "control"])
def test_cannot_read_the_repo_or_home(layers, tmp_path):
    home_file = os.path.join(os.path.expanduser("~"), f".qwen3-sandbox-read-{uuid.uuid4().hex}")
    marker = secrets.token_hex(16)
    with open(home_file, "w") as f:
        f.write(marker)
    try:
        readme = os.path.join(REPO, "README.md")
        out = run(READER.format(paths=[readme, home_file]), NONE if layers == "control" else LAYERS[layers])
    finally:
        os.remove(home_file)
    with open(readme) as f:
        first_line = f.readline().strip()
    leaked = first_line in out.stdout or marker in out.stdout
    assert leaked if layers == "control" else not leaked


# ---- the code rewards ---------------------------------------------------------------------

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
CASES = [{"input": "10 -4\n", "output": " 6 "}, {"input": "0 0", "output": "0\n\n"}]


def fenced(code: str, tag: str = "python") -> str:
    return f"<think>\nLet me add.\n```python\nprint('draft')\n```\n</think>\nHere:\n```{tag}\n{code}```\n"


def test_code_reward_scores_the_fraction_of_tests_passed():
    code, code_all = get_reward("code"), get_reward("code_all")
    assert code(fenced(ADD), CASES) == 1.0 and code_all(fenced(ADD), CASES) == 1.0
    assert code(fenced("print(0)\n"), CASES) == 0.5  # right only for "0 0"
    assert code_all(fenced("print(0)\n"), CASES) == 0.0
    assert code(fenced("print(-1)\n"), CASES) == 0.0
    assert code(fenced("print(0)\nraise SystemExit(input())\n"), CASES) == 0.0  # right output, but crashes
    # the reference as JSON text and in the APPS form
    apps = {"inputs": [c["input"] for c in CASES], "outputs": [c["output"] for c in CASES]}
    assert code(fenced(ADD, tag=""), json.dumps(apps)) == 1.0


@pytest.mark.parametrize("response", [
    None, "", 42, b"\x00\xff", "\ud800 no code", "no fences at all: print(3)",
    "```python\nprint(3)\n",                       # cut off before the closing fence
    "<think>```python\nprint(3)\n```</think>",     # code only inside the thinking
    "```javascript\nconsole.log(3)\n```",
    "```python\n" + "x = 1\n" * 20_000 + "```",   # huge, and prints nothing
    "```python\n\x00\x01\x02\n```",
])
def test_malformed_responses_score_zero(response):
    reference = [{"input": "", "output": "3"}]
    assert get_reward("code")(response, reference) == 0.0
    assert get_reward("code_all")(response, reference) == 0.0


def test_extraction_and_reference_forms():
    assert extract_code(fenced(ADD)) == ADD
    assert extract_code("```py\nprint(1)\n```\n```text\nnot code\n```") == "print(1)\n"
    assert cases_from('[{"input": "1", "output": "2"}]') == [("1", "2")]
    for bad in ("not json", [], [{"input": 1, "output": "2"}], {"inputs": ["1"], "outputs": []}, None):
        with pytest.raises(ValueError):
            cases_from(bad)
