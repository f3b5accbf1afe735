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
import tempfile
import threading
import time
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


# ---- a hostile policy (issue 25) -----------------------------------------------------------
# Each runs with every layer on, the program escaping the audit hook the way the held-out
# probe did (`_posixsubprocess` loaded under another name gives `fork_exec`, and a child
# interpreter without the hook), and with the hook off: the kernel layers alone must hold.

HOSTILE = {"full": {}, "kernel": {"audit_hook": False}}

BYPASS = r'''
import os, sys

def unhooked(payload):
    """Run `payload` in a fresh interpreter without the audit hook, started through
    `_posixsubprocess.fork_exec` loaded under another name; in this process if refused."""
    try:
        import importlib.machinery, importlib.util
        origin = importlib.machinery.PathFinder.find_spec("_posixsubprocess").origin
        spec = importlib.util.spec_from_file_location("probe._posixsubprocess", origin)
        fx = importlib.util.module_from_spec(spec)
        r, w = os.pipe()
        exe = os.fsencode(sys.executable)
        pid = fx.fork_exec([exe, b"-I", b"-S", b"-B", b"-c", payload.encode()], [exe], True, (w,), None, None,
                           -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False)
        os.close(w)
        os.read(r, 4096)
        os.close(r)
        os.waitpid(pid, 0)
    except BaseException as e:
        print("bypass refused:", type(e).__name__, e, flush=True)
        exec(payload, {"__name__": "__payload__"})
'''


def hostile(payload: str, before: str = "") -> str:
    return BYPASS + before + f"\nunhooked({payload!r})\n"


@pytest.fixture
def probe_dir():
    """A world-readable directory at the top of the host tree, outside every formerly hidden dir."""
    path = f"/qwen3_sandbox_probe_{uuid.uuid4().hex}"
    os.mkdir(path)
    os.chmod(path, 0o777)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", "--", path])


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The runs' temp dirs go here, so that what a run leaves behind can be seen."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.mark.parametrize("layers", ["full", "kernel"])
def test_no_host_file_is_readable_outside_the_allow_list(layers, probe_dir):
    marker = secrets.token_hex(16)
    data = os.path.join(probe_dir, "data", "rl.jsonl")
    os.makedirs(os.path.dirname(data))
    with open(data, "w") as f:
        f.write(json.dumps({"secret": marker}) + "\n")
    os.chmod(data, 0o644)
    os.chmod(os.path.dirname(data), 0o755)
    payload = f"""
import os
try:
    print("top", sorted(os.listdir("/")))
except OSError as e:
    print("top refused", type(e).__name__)
for path in {[data, os.path.join(REPO, "README.md"), "/etc/hostname", "/etc/passwd"]!r}:
    try:
        print(open(path, errors="replace").read())
    except OSError as e:
        print("refused", path, type(e).__name__)
"""
    out = run(hostile(payload), HOSTILE[layers])
    assert "refused" in out.stdout  # the payload ran
    top = next(line for line in out.stdout.splitlines() if line.startswith("top"))
    assert marker not in out.stdout and os.path.basename(probe_dir) not in top
    with open(os.path.join(REPO, "README.md")) as f:
        assert f.readline().strip() not in out.stdout
    assert "root:" not in out.stdout  # /etc/passwd


NEST = """
import os
n = 0
try:
    for n in range(1, 5001):
        os.mkdir("d")
        os.chdir("d")
except OSError as e:
    print("stopped", type(e).__name__)
print(n)
"""


@pytest.mark.parametrize("layers", ["full", "kernel", "hook"])
def test_deep_directories_get_a_verdict_and_leave_nothing(layers, private_tmp):
    # Under the hook every call resolves the whole path: slow, and a timeout is a verdict too.
    if layers == "kernel":
        out = run(NEST, LAYERS[layers], limits=Limits(wall_s=30, cpu_s=10))
        assert out.status == "ok" and int(out.stdout.split()[-1]) == 5000
    else:
        out = run(hostile(NEST), LAYERS[layers], limits=Limits(wall_s=8, cpu_s=8))
        assert out.status in ("ok", "timeout")
    assert os.listdir(private_tmp) == []


DISK_HOG = """
import os
written = 0
try:
    for i in range(8):
        with open(f"f{i}", "wb") as f:
            f.write(b"x" * (15 * 2**20))
        written += 15
except OSError as e:
    print("stopped", type(e).__name__)
print(written)
"""


@pytest.mark.parametrize("layers", ["full", "kernel"])
def test_writing_past_the_disk_budget_gets_a_verdict_and_leaves_nothing(layers, private_tmp):
    budget = getattr(Limits(), "disk_mb", 64)
    out = run(DISK_HOG, HOSTILE[layers], limits=Limits(wall_s=20))
    assert out.status == "ok" and "stopped" in out.stdout
    assert int(out.stdout.split()[-1]) <= budget
    assert os.listdir(private_tmp) == []


@pytest.mark.parametrize("layers", ["full", "kernel"])
def test_a_host_unix_socket_is_unreachable(layers, probe_dir):
    path = os.path.join(probe_dir, "agent.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        os.chmod(path, 0o777)
        server.listen(8)
        server.setblocking(False)
        payload = f"""
import socket
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect({path!r})
    print("connected")
except OSError as e:
    print("refused", type(e).__name__)
"""
        out = run(hostile(payload), HOSTILE[layers])
        reached = accepted(server)
    assert "refused" in out.stdout and "connected" not in out.stdout and not reached


MEMORY_HOGS = """
import os, time
survivors = 0
try:
    kids = []
    for _ in range(5):
        pid = os.fork()
        if pid == 0:
            x = b"\\x01" * (300 * 2**20)
            time.sleep(2)
            os._exit(0)
        kids.append(pid)
    for pid in kids:
        survivors += os.waitpid(pid, 0)[1] == 0
except OSError as e:
    print("refused", type(e).__name__)
print("survivors", survivors, flush=True)
"""


@pytest.mark.parametrize("layers", ["full", "kernel"])
def test_whole_run_memory_over_the_budget_is_refused(layers):
    # five processes of 300 MiB, each well under the 512 MiB per-process cap, 1.5 GiB together
    limits = Limits(wall_s=20)
    assert limits.memory_mb > 300 and 5 * 300 > getattr(limits, "run_memory_mb", 1024)
    out = run(hostile(MEMORY_HOGS), HOSTILE[layers], limits=limits)
    assert "survivors" in out.stdout and "survivors 5" not in out.stdout
    if layers == "kernel":
        assert out.status == "memory"


FIND_THE_TESTS = """
import os, json

def answer(obj):
    if isinstance(obj, dict):
        if obj.get("input") == NEEDLE and isinstance(obj.get("output"), str):
            return obj["output"]
        obj = list(obj.values())
    if isinstance(obj, list):
        for item in obj:
            found = answer(item)
            if found is not None:
                return found

level = ["/"]
for depth in range(4):
    deeper = []
    for d in level:
        if d in ("/proc", "/sys", "/dev"):
            continue
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    deeper.append(e.path)
                elif e.name.endswith(".jsonl") and e.stat().st_size < 10**7:
                    for line in open(e.path, errors="replace"):
                        if NEEDLE.strip() in line:
                            found = answer(json.loads(line))
                            if found is not None:
                                print(found)
                                raise SystemExit(0)
            except (OSError, ValueError):
                pass
    level = deeper
print("not found")
"""


@pytest.mark.parametrize("layers", ["full", "kernel"])
def test_reading_the_tests_from_disk_earns_nothing(layers, probe_dir, monkeypatch):
    from recipes.rewards import code as code_module

    if layers == "kernel":
        monkeypatch.setattr(code_module, "run_sandboxed", lambda s, i, l: sb._run(s, i, l, audit_hook=False))
    cases = [{"input": f"probe-{secrets.token_hex(8)}\n", "output": secrets.token_hex(8)}]
    data = os.path.join(probe_dir, "rl", "code.jsonl")
    os.makedirs(os.path.dirname(data))
    with open(data, "w") as f:
        f.write(json.dumps({"prompt": "add", "reward": "code", "reference": cases}) + "\n")
    os.chmod(data, 0o644)
    os.chmod(os.path.dirname(data), 0o755)
    program = hostile("", before="\nNEEDLE = sys.stdin.read()\n").replace(
        "unhooked('')", f"unhooked('NEEDLE = %r\\n' % NEEDLE + {FIND_THE_TESTS!r})")
    assert get_reward("code")(fenced(program), cases) == 0.0
    assert get_reward("code_all")(fenced(program), cases) == 0.0


@pytest.mark.parametrize("layers", ["full", "kernel"])
def test_no_zombie_init_after_a_timeout(layers, monkeypatch):
    inits, kill_run = [], sb._kill_run

    def spy(proc, report):
        inits.append(report.get("init_pid"))
        return kill_run(proc, report)

    monkeypatch.setattr(sb, "_kill_run", spy)
    out = run("import time\ntime.sleep(600)\n", HOSTILE[layers], limits=Limits(wall_s=2))
    assert out.status == "timeout" and inits and inits[0]

    def state(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return None

    time.sleep(0.5)
    assert state(inits[0]) is None


def test_isolation_is_reported_and_required_by_the_rl_stage(monkeypatch):
    from omegaconf import OmegaConf

    from model.config import ConfigError
    from recipes import rl

    out = run_sandboxed("print(1)")
    assert set(sb.REQUIRED_ISOLATION) <= set(out.isolation), out.isolation_errors
    assert sb.isolation_problem() is None  # this host gives every layer
    monkeypatch.setattr(sb, "isolation_problem", lambda: "missing cgroup (no cgroup for the run)")
    cfg = OmegaConf.create({"rl": {"rewards": ["code"], "sandbox": {"require_isolation": True}}})
    with pytest.raises(ConfigError, match="rl.sandbox.require_isolation=false"):
        rl.check_sandbox(cfg, ["math", "code"])
    rl.check_sandbox(cfg, ["math"])  # no program runs: nothing to require
    cfg.rl.sandbox.require_isolation = False
    rl.check_sandbox(cfg, ["code_all"])  # the visible opt-out
