"""Running untrusted Python (model-written programs) in a sandbox: `run_sandboxed`.

`run_sandboxed(source, stdin, limits) -> Outcome` runs `source` with the base interpreter
(`python -I -S -B`: no site-packages, no PYTHON* variables, no bytecode writes) and
never raises for anything the program does; bad arguments raise ValueError.

The program is treated as hostile (it is rewarded for passing tests, so also for reading
the expected output). The kernel layers hold on their own; the audit hook is defence in
depth. Promises and their tests: docs/RL.md, "The code sandbox".

1. Resource limits. Per process (setrlimit, inherited): CPU seconds, address space
   (RLIMIT_AS), file size, open files, no core dumps, and a process count (RLIMIT_NPROC)
   that is counted per user, so the program never runs as the caller's user: as root it
   drops to a fresh uid of its own, and as any other user it runs in a user namespace.
   Per run: a cgroup (v1 memory + pids, or v2) caps the memory of all its processes
   together (`run_memory_mb`, tmpfs files included) and their number; an OOM kill in it
   is status "memory". A wall-clock deadline kills the whole run.
2. Kernel isolation, detected at run time (`Outcome.isolation` says what was used,
   `Outcome.isolation_errors` why a layer is missing): new network, PID, mount, IPC and
   UTS namespaces (plus a user namespace when not root). No network: only a loopback
   device that is down. Processes: the program runs under an init of its own, so every
   process it started dies with the PID namespace, and on a timeout the launcher reaps
   that init (no zombie). Files: an allow-list root. The new root is an empty tmpfs into
   which only the Python installation and the shared libraries (read-only), a fresh
   /proc, /dev/{null,zero,urandom,random} and the work dir are mounted, then pivot_root
   detaches the host's tree: no host data, repo, home or socket exists inside, whatever
   the path. The work dir (cwd, HOME, TMPDIR) is a tmpfs of `disk_mb`, the disk budget,
   that lives only in the run's mount namespace and so vanishes with it.
3. An audit hook (PEP 578) installed before the program's first line refuses sockets,
   fork/exec/spawn/subprocess, kill, ctypes and gc introspection, importing a refused
   module (matched on the last component of its name, so a renamed `x._posixsubprocess`
   is refused too), writing anywhere but the work dir, and reading anything but it and
   the standard library. It is what remains where namespaces are refused, and it is no
   boundary against code built to escape it (CPython's own warning).

`isolation_problem()` says, in one line, whether this host gives every kernel layer; the
RL stages refuse to start the code rewards without them unless
`rl.sandbox.require_isolation` is false.

The environment is empty but for PATH, HOME, TMPDIR and LANG: nothing of the caller's
(tokens, keys) reaches the program. The caller's temp dir (only solution.py, or the
program's files where there is no mount namespace) is removed with `rm -rf` in a
subprocess (an iterative fallback), never by recursion in Python, and cleanup never raises.
"""

from __future__ import annotations

import json
import math
import os
import random
import selectors
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Exit code the program's process uses to say "MemoryError"; reported as status "memory".
MEMORY_EXIT = 213
# The fresh uid a root caller drops to is drawn from here (no passwd entry needed).
SANDBOX_UID_BASE = 1_900_000_000


@dataclass(frozen=True)
class Limits:
    wall_s: float = 10.0        # the whole run, start-up included
    cpu_s: float = 5.0          # per process
    memory_mb: int = 512        # address space per process; Python itself needs ~30 MB
    processes: int = 16         # processes the program may have at once (itself included)
    file_size_mb: int = 16      # largest file it may write
    open_files: int = 64
    output_bytes: int = 65536   # stdout and stderr are each cut to this many bytes
    disk_mb: int = 64           # size of the run's work dir (a tmpfs), all files together
    run_memory_mb: int = 1024   # memory of the whole run (a cgroup), its files in the work dir included

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive number, got {value!r}")


@dataclass
class Outcome:
    status: str                 # ok | error | timeout | memory | killed | file_size | sandbox_error
    returncode: int | None      # exit code, or -signal; None when the wall limit killed it
    stdout: str
    stderr: str
    wall_s: float
    isolation: list[str] = field(default_factory=list)  # e.g. ["net", "pid", "root", "disk", "cgroup"]
    isolation_errors: list[str] = field(default_factory=list)  # why a layer is missing, one line each


# What a run must report in `Outcome.isolation` for `isolation_problem` to be satisfied.
REQUIRED_ISOLATION = ("net", "pid", "ipc", "mount", "disk", "read-only", "cgroup")
_isolation_checked: list = []


def isolation_problem() -> str | None:
    """None when a probe run gets every kernel layer; else one line saying what is missing and why."""
    if not _isolation_checked:
        out = run_sandboxed("print('ok')", limits=Limits(wall_s=60))
        got = set(out.isolation)
        missing = [name for name in REQUIRED_ISOLATION if name not in got]
        if not got & {"root", "chroot"}:
            missing.append("root")
        if not got & {"uid", "userns"}:
            missing.append("uid")
        if out.status != "ok" or out.stdout.strip() != "ok":
            problem = f"a probe run ended {out.status}: {out.stderr.strip()[-300:]!r}"
        elif missing:
            problem = f"missing {', '.join(missing)}" + (f" ({'; '.join(out.isolation_errors)})"
                                                          if out.isolation_errors else "")
        else:
            problem = None
        _isolation_checked.append(problem)
    return _isolation_checked[0]


def run_sandboxed(source: str, stdin: str = "", limits: Limits = Limits()) -> Outcome:
    """Run Python `source` with `stdin` as its input under `limits` (see the module doc)."""
    return _run(source, stdin, limits)


def _run(source: str, stdin: str, limits: Limits, audit_hook: bool = True, namespaces: bool = True) -> Outcome:
    # The switches exist for the tests, to show that each layer holds on its own.
    if not isinstance(source, str):
        raise ValueError(f"source must be a str, got {type(source).__name__}")
    if not isinstance(stdin, str):
        raise ValueError(f"stdin must be a str, got {type(stdin).__name__}")
    if not isinstance(limits, Limits):
        raise ValueError(f"limits must be a Limits, got {type(limits).__name__}")
    source_bytes = source.encode("utf-8", "surrogatepass")
    if b"\0" in source_bytes:
        return Outcome("error", 1, "", "source contains a NUL byte", 0.0)

    start = time.monotonic()
    workdir = os.path.realpath(tempfile.mkdtemp(prefix="qwen3-sandbox-"))
    uid = SANDBOX_UID_BASE + random.SystemRandom().randrange(1 << 24) if os.geteuid() == 0 else None
    report_r, report_w = os.pipe()
    group = None
    try:
        with open(os.path.join(workdir, "solution.py"), "wb") as f:
            f.write(source_bytes)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "solution.py"), uid, uid)
        python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        group = _Cgroup.create(os.path.basename(workdir), limits)
        cfg = {
            "workdir": workdir, "python": python, "uid": uid, "report_fd": report_w,
            "audit_hook": audit_hook, "namespaces": namespaces,
            "limits": {f.name: getattr(limits, f.name) for f in fields(limits)},
            "binds": _allowed_paths(python), "links": _root_links(),
            "cgroup": group.procs if group else [], "cgroup_error": _Cgroup.why_not if group is None else None,
        }
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode("utf-8", "surrogatepass"))
            stdin_file.seek(0)
            boot = ("import importlib.util, json, sys; "
                    "spec = importlib.util.spec_from_file_location('_qwen3_sandbox', sys.argv[1]); "
                    "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; "
                    "spec.loader.exec_module(m); m._launch(json.loads(sys.argv[2]))")
            proc = subprocess.Popen(
                [python, "-I", "-S", "-B", "-c", boot, os.path.abspath(__file__), json.dumps(cfg)],
                stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir,
                env=_child_env(workdir), start_new_session=True, pass_fds=(report_w,))
        os.close(report_w)
        report_w = -1
        outcome = _collect(proc, report_r, limits, start, group)
        if uid is not None and "pid" not in outcome.isolation:
            _kill_user(uid)
        return outcome
    finally:
        try:  # nothing here may raise: run_sandboxed never does for what the program did
            for fd in (report_r, report_w):
                if fd >= 0:
                    os.close(fd)
            if group is not None:
                group.remove()
            _remove_tree(workdir)
        except Exception:  # noqa: BLE001
            pass


# Read-only in the sandbox's root besides the Python installation: the shared libraries
# the interpreter and its extension modules load, and the dynamic linker's cache.
LIBRARY_PATHS = ("/lib", "/lib64", "/lib32", "/libx32", "/usr/lib", "/usr/lib64", "/usr/lib32",
                 "/usr/libx32", "/etc/ld.so.cache")


def _allowed_paths(python: str) -> list[str]:
    """The host paths bound read-only into the sandbox's otherwise empty root."""
    paths = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(python))}
    paths |= {os.path.realpath(p) for p in LIBRARY_PATHS if os.path.exists(p)}
    kept: list[str] = []
    for path in sorted(paths - {"/"}, key=len):  # a path under one already kept comes with it
        if not any(path.startswith(k + os.sep) for k in kept):
            kept.append(path)
    return kept


def _root_links() -> list[list[str]]:
    """Top-level symlinks among the library paths (/lib -> usr/lib), recreated in the sandbox."""
    return [[p, os.readlink(p)] for p in LIBRARY_PATHS if os.path.islink(p)]


def _remove_tree(path: str) -> None:
    """Delete `path` without recursion in Python and without raising (RecursionError included)."""
    try:
        if os.geteuid() != 0:  # the program may have left directories it cannot search
            subprocess.run(["chmod", "-R", "u+rwx", "--", path], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
        subprocess.run(["rm", "-rf", "--one-file-system", "--", path], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    except Exception:  # noqa: BLE001 - no rm here: the loop below
        pass
    try:
        if os.path.lexists(path):
            _remove_tree_iteratively(path)
    except Exception:  # noqa: BLE001
        pass


def _remove_tree_iteratively(path: str) -> None:
    """Depth-first with a list of names and one open directory at a time (no fd or stack limit)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
        return
    names: list[str] = []  # the directories below `path` we are in
    stuck: set[tuple[int, int]] = set()
    while True:
        child = None
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            st = entry.stat(follow_symlinks=False)
                            if (st.st_dev, st.st_ino) not in stuck:
                                child = entry.name
                                break
                        else:
                            os.unlink(entry.name, dir_fd=fd)
                    except OSError:
                        pass
        except OSError:
            pass
        if child is not None:
            try:
                os.chmod(child, stat.S_IRWXU, dir_fd=fd)
            except OSError:
                pass
            try:
                new = os.open(child, flags, dir_fd=fd)
            except OSError:
                try:
                    st = os.stat(child, dir_fd=fd, follow_symlinks=False)
                    stuck.add((st.st_dev, st.st_ino))
                except OSError:
                    os.close(fd)
                    return
                continue
            os.close(fd)
            fd = new
            names.append(child)
            continue
        if not names:
            os.close(fd)
            try:
                os.rmdir(path)
            except OSError:
                pass
            return
        parent = os.open("..", flags, dir_fd=fd)
        os.close(fd)
        fd = parent
        name = names.pop()
        try:
            os.rmdir(name, dir_fd=fd)
        except OSError:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                stuck.add((st.st_dev, st.st_ino))
            except OSError:
                pass


class _Cgroup:
    """The run's cgroup: memory and process count of the whole run (v1 or v2), made by the caller."""

    why_not: str | None = None  # why the last `create` gave None, for Outcome and isolation_problem

    def __init__(self, version: int, dirs: list[str], limits: Limits):
        self.version, self.dirs, self.limits = version, dirs, limits
        self.procs = [os.path.join(d, "cgroup.procs") for d in dirs]

    @classmethod
    def create(cls, name: str, limits: Limits) -> "_Cgroup | None":
        made: list[str] = []
        try:
            memory = str(int(limits.run_memory_mb * 2**20))
            pids = str(int(limits.processes) + 2)  # the launcher and the run's init
            if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # cgroup v2, unified
                own = _own_cgroup("")
                parent = "/sys/fs/cgroup" + own
                with open(os.path.join(parent, "cgroup.controllers")) as f:
                    if not {"memory", "pids"} <= set(f.read().split()):
                        raise OSError("the memory and pids controllers are not delegated to "
                                      f"{parent}")
                path = os.path.join(parent, name)
                os.mkdir(path)
                made.append(path)
                for file, value in (("memory.max", memory), ("memory.swap.max", "0"), ("pids.max", pids)):
                    if file == "pids.max" or os.path.exists(os.path.join(path, file)):
                        _write(os.path.join(path, file), value)
                cls.why_not = None
                return cls(2, made, limits)
            for controller in ("memory", "pids"):
                base = f"/sys/fs/cgroup/{controller}"
                if not os.path.isdir(base):
                    raise OSError(f"no {base}")
                path = os.path.join(base + _own_cgroup(controller), name)
                os.mkdir(path)
                made.append(path)
            _write(os.path.join(made[0], "memory.limit_in_bytes"), memory)
            if os.path.exists(os.path.join(made[0], "memory.memsw.limit_in_bytes")):
                _write(os.path.join(made[0], "memory.memsw.limit_in_bytes"), memory)
            _write(os.path.join(made[1], "pids.max"), pids)
            cls.why_not = None
            return cls(1, made, limits)
        except Exception as e:  # noqa: BLE001 - reported; the rlimits still hold per process
            for path in reversed(made):
                try:
                    os.rmdir(path)
                except OSError:
                    pass
            cls.why_not = f"no cgroup for the run ({type(e).__name__}: {e})"
            return None

    def oom_killed(self) -> bool:
        name, key = ("memory.events", "oom_kill") if self.version == 2 else ("memory.oom_control", "oom_kill")
        try:
            with open(os.path.join(self.dirs[0], name)) as f:
                return any(line.split()[:1] == [key] and int(line.split()[1]) > 0 for line in f)
        except (OSError, ValueError, IndexError):
            return False

    def kill(self) -> None:
        """SIGKILL whatever is still in the cgroup (nothing, normally: the PID namespace is gone)."""
        _kill_until_gone(self._pids, tries=50, pause=0.02)

    def _pids(self) -> list[int]:
        pids = []
        for procs in self.procs:
            try:
                with open(procs) as f:
                    pids += [int(p) for p in f.read().split()]
            except (OSError, ValueError):
                pass
        return pids

    def remove(self) -> None:
        self.kill()
        for path in self.dirs:
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)


def _own_cgroup(controller: str) -> str:
    """This process's cgroup path in the hierarchy of `controller` ("" for v2's unified one)."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if (controller == "" and names == "") or controller in names.split(","):
                return path.rstrip("/")
    raise OSError(f"no {controller or 'v2'} cgroup in /proc/self/cgroup")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _child_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


def _collect(proc: subprocess.Popen, report_r: int, limits: Limits, start: float,
             group: "_Cgroup | None") -> Outcome:
    """Read stdout, stderr and the launcher's report until they close or the deadline passes."""
    cap = int(limits.output_bytes)
    stdout_fd, stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
    out = {stdout_fd: bytearray(), stderr_fd: bytearray(), report_r: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in out:
        sel.register(fd, selectors.EVENT_READ)
    deadline = start + limits.wall_s
    timed_out = False
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0 and not timed_out:
                timed_out = True
                _kill_run(proc, _report(out[report_r]))
                deadline = time.monotonic() + 10  # to drain what the dead run left in the pipes
                continue
            if left <= 0:
                break
            for key, _ in sel.select(timeout=left):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                elif key.fd == report_r or len(out[key.fd]) < cap:
                    out[key.fd] += chunk
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        _kill_run(proc, _report(out[report_r]))
        proc.wait()
    try:  # members of the session that outlived the launcher (no PID namespace)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if group is not None:
        group.kill()
    report = _report(out[report_r])
    stdout = bytes(out[stdout_fd][:cap]).decode("utf-8", "replace")
    stderr = bytes(out[stderr_fd][:cap]).decode("utf-8", "replace")
    wall = time.monotonic() - start
    isolation = report.get("isolation", [])
    errors = [str(report[k]) for k in ("namespace_error", "cgroup_error") if report.get(k)]
    oom = group is not None and group.oom_killed()
    if timed_out:
        return Outcome("timeout", None, stdout, stderr, wall, isolation, errors)
    if oom and "exit" not in report:  # the kernel's OOM killer took the run's init
        return Outcome("memory", proc.returncode, stdout, stderr, wall, isolation, errors)
    if "error" in report or "exit" not in report:
        why = report.get("error", f"the sandbox launcher exited {proc.returncode}")
        return Outcome("sandbox_error", proc.returncode, stdout, (stderr + "\n" + why).strip(), wall,
                       isolation, errors)
    code = report["exit"]
    if code == MEMORY_EXIT or oom:  # the run went over its memory, whichever process the kernel took
        status = "memory"
    elif code == 0:
        status = "ok"
    elif code == -signal.SIGXCPU or code == -signal.SIGKILL and report.get("cpu_s", 0) >= limits.cpu_s:
        status = "timeout"  # the soft CPU limit, or the hard one a second later
    elif code == -signal.SIGXFSZ:
        status = "file_size"
    elif code < 0:
        status = "killed"
    else:
        status = "error"
    return Outcome(status, code, stdout, stderr, wall, isolation, errors)


def _report(raw: bytearray) -> dict:
    merged = {}
    for line in bytes(raw).decode("utf-8", "replace").splitlines():
        try:
            merged.update(json.loads(line))
        except (ValueError, TypeError):
            pass
    return merged


def _kill_run(proc: subprocess.Popen, report: dict) -> None:
    # The init of the run's PID namespace first: every process in it dies with it. Then the
    # launcher reaps it and exits (no zombie init); the launcher is killed only if it does not.
    if proc.poll() is None:
        try:
            if "init_pid" in report:
                os.kill(report["init_pid"], signal.SIGKILL)
            os.kill(proc.pid, signal.SIGTERM)  # the launcher kills and reaps its init, then exits
            proc.wait(timeout=2)
        except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pids_of(uid: int) -> list[int]:
    """Processes whose real, effective or saved uid is `uid`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                if str(uid) in next(line for line in f if line.startswith("Uid:")).split()[1:4]:
                    pids.append(int(pid))
        except (OSError, StopIteration):
            pass
    return pids


def _kill_user(uid: int) -> None:
    """SIGKILL every process running as `uid` (a root caller's per-run uid, so only the run's)."""
    _kill_until_gone(lambda: _pids_of(uid), tries=20, pause=0.05)


def _kill_until_gone(list_pids, tries: int, pause: float) -> None:
    """SIGKILL what `list_pids()` names until it names nothing (a dying fork may spawn once more)."""
    for _ in range(tries):
        pids = list_pids()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(pause)


# ---------------------------------------------------------------------------------------------
# Inside the sandbox. `_launch` runs in the launcher process (`python -I -S -c`), before any
# untrusted code; it loads this file by path, so nothing here may import from the repo.

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (a post-4.x syscall)
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 217, "riscv64": 41, "ppc64le": 203, "s390x": 217}
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
DEVICES = ("null", "zero", "urandom", "random")


def _launch(cfg: dict) -> None:
    """Cgroup, limits, namespaces, then the run's init (new root, uid drop) which starts the program."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    report_fd = cfg["report_fd"]
    os.set_inheritable(report_fd, False)

    def note(**kv) -> None:
        os.write(report_fd, (json.dumps(kv) + "\n").encode())

    in_cgroup = bool(cfg["cgroup"])
    try:  # before anything else, so every process of the run is counted
        for procs in cfg["cgroup"]:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
    except OSError as e:
        in_cgroup = False
        note(cgroup_error=f"cannot join the run's cgroup: {e}")
    if cfg.get("cgroup_error"):
        note(cgroup_error=cfg["cgroup_error"])
    try:  # the OOM killer spares the launcher and the init (the program resets its own score)
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
    except OSError:
        pass
    limits = cfg["limits"]
    _set_limits(limits)
    root = os.geteuid() == 0
    uid, gid = (cfg["uid"], cfg["uid"]) if root else (os.getuid(), os.getgid())
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    flags |= 0 if root else CLONE_NEWUSER
    namespaces = cfg["namespaces"] and libc.unshare(flags) == 0
    if cfg["namespaces"] and not namespaces:
        note(namespace_error=os.strerror(ctypes.get_errno()))
    elif namespaces and not root:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    launcher, child = os.getpid(), []

    def end(*_) -> None:  # SIGTERM from the caller: end the run, leaving no zombie init
        for pid in child:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, end)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # until the init's pid is known
    init = os.fork()
    if init == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() not in (launcher, 0):  # 0: the parent is outside our PID namespace
                os._exit(1)  # the launcher died before PDEATHSIG was armed
            isolation = ["net", "pid", "ipc"] if namespaces else []
            if namespaces:
                isolation += _new_root(libc, cfg, uid, gid)
            if root and (namespaces or _reachable_by_others(cfg["python"])):
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                isolation.append("uid")
            elif not root:
                isolation.append("userns" if namespaces else "same-uid")
            if in_cgroup:
                isolation.append("cgroup")
            _run_init(libc, cfg, isolation, namespaces, note)
        except BaseException as e:  # noqa: BLE001 - reported to the caller as a sandbox error
            note(error=f"sandbox set-up failed: {type(e).__name__}: {e}")
        os._exit(1)
    child.append(init)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    note(init_pid=init)
    os.waitpid(init, 0)
    os._exit(0)


def _set_limits(limits: dict) -> None:
    import resource

    cpu = max(1, math.ceil(limits["cpu_s"]))
    memory = int(limits["memory_mb"] * 2**20)
    size = int(limits["file_size_mb"] * 2**20)
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_CPU", cpu), ("RLIMIT_AS", memory),
                        ("RLIMIT_FSIZE", size), ("RLIMIT_NOFILE", int(limits["open_files"]))):
        hard = value + 1 if name == "RLIMIT_CPU" else value  # SIGXCPU first, SIGKILL a second later
        resource.setrlimit(getattr(resource, name), (value, hard))


def _new_root(libc, cfg: dict, uid: int, gid: int) -> list[str]:
    """In the new mount namespace, an allow-list root: an empty tmpfs into which only the
    Python installation and the shared libraries (read-only), a size-capped tmpfs as the
    work dir (read-write), a fresh /proc and /dev/{null,zero,urandom,random} are mounted;
    then pivot_root into it and detach the host's tree. Any failure raises: the run is
    then a sandbox error, never a run with half a root."""
    import ctypes
    import platform

    def mount(source, target, fstype, flags, data=None) -> None:
        enc = (lambda v: v.encode() if v is not None else None)
        if libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
            raise OSError(ctypes.get_errno(), f"mount {source} on {target}: {os.strerror(ctypes.get_errno())}")

    def kept_flags(path: str) -> int:  # flags a bind mount in a user namespace may not drop
        return os.statvfs(path).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME
                                          | MS_RELATIME)

    workdir = cfg["workdir"]
    with open(os.path.join(workdir, "solution.py"), "rb") as f:
        source = f.read()
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount shows up outside
    new = workdir  # the host's work dir is only the mount point of the new root
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,nr_inodes=4096,mode=755")
    done = ["mount"]

    def inside(path: str) -> str:
        return new + path

    for link, target in cfg["links"]:
        os.makedirs(os.path.dirname(inside(link)), exist_ok=True)
        os.symlink(target, inside(link))
    for path in cfg["binds"]:
        if os.path.isdir(path):
            os.makedirs(inside(path), exist_ok=True)
        else:
            os.makedirs(os.path.dirname(inside(path)), exist_ok=True)
            open(inside(path), "wb").close()
        mount(path, inside(path), None, MS_BIND | MS_REC)
        mount(None, inside(path), None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | kept_flags(path))
        attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)  # and mounts below it
        libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, inside(path).encode(), AT_RECURSIVE, ctypes.byref(attr), 32)

    os.makedirs(inside("/dev"))
    mount("tmpfs", inside("/dev"), "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,nr_inodes=64,mode=755")
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            open(inside(f"/dev/{name}"), "wb").close()
            mount(f"/dev/{name}", inside(f"/dev/{name}"), None, MS_BIND)
    mount(None, inside("/dev"), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)

    disk_mb = max(1, int(cfg["limits"]["disk_mb"]))
    os.makedirs(inside(workdir))
    mount("tmpfs", inside(workdir), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={disk_mb}m,nr_inodes={max(1024, 256 * disk_mb)},mode=700,uid={uid},gid={gid}")
    with open(inside(os.path.join(workdir, "solution.py")), "wb") as f:
        f.write(source)
    os.chown(inside(os.path.join(workdir, "solution.py")), uid, gid)
    done.append("disk")

    os.makedirs(inside("/proc"))
    try:
        mount("proc", inside("/proc"), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        done.append("proc")
    except OSError:  # e.g. a container whose /proc has masked paths
        mount("tmpfs", inside("/proc"), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=555")
        done.append("no-proc")

    os.chdir(new)
    number = SYS_PIVOT_ROOT.get(platform.machine())
    if number is not None and libc.syscall(number, b".", b".") == 0:
        if libc.umount2(b".", MNT_DETACH) != 0:  # the old root, stacked under the new one
            raise OSError(ctypes.get_errno(), "cannot detach the host's root")
        done.append("root")
    else:  # e.g. a root that is no mount point: chroot, the host's tree kept but out of reach
        os.chroot(".")
        done.append("chroot")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    done.append("read-only")
    return done


def _reachable_by_others(path: str) -> bool:
    """Whether a user other than the owner may execute `path` (every parent searchable)."""
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        if not os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH:
            return False
    return True


def _run_init(libc, cfg: dict, isolation: list[str], namespaces: bool, note) -> None:
    """The run's init: start the program, report how it ended. Exiting ends the namespace."""
    import resource

    workdir = cfg["workdir"]
    allowed = cfg["limits"]["processes"] + 1  # this init counts too
    if not namespaces:  # the count is per user: leave room above what the user already runs
        allowed += len(_pids_of(os.getuid()))
    resource.setrlimit(resource.RLIMIT_NPROC, (allowed, allowed))
    os.chdir(workdir)
    note(isolation=isolation)
    program = os.fork()
    if program == 0:
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            try:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write("0")
            except OSError:
                pass
            argv = [cfg["python"], "-I", "-S", "-B", "-c", _PROGRAM, workdir,
                    "1" if cfg["audit_hook"] else "0", str(MEMORY_EXIT)]
            os.execve(cfg["python"], argv, _child_env(workdir))
        except BaseException as e:  # noqa: BLE001
            note(error=f"cannot start the program: {type(e).__name__}: {e}")
        os._exit(1)
    _, status, usage = os.wait4(program, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    note(exit=code, cpu_s=usage.ru_utime + usage.ru_stime)
    os._exit(0)


# The program's process: `python -I -S -B -c _PROGRAM <workdir> <audit 0|1> <memory exit>`.
# The hook keeps its state in closure constants and pre-bound functions, so that later
# rebinding of builtins or module attributes by the program does not change its decisions.
_PROGRAM = r'''
import os, sys, types

def _make_hook(workdir, read_roots):
    realpath, fspath, fsdecode = os.path.realpath, os.fspath, os.fsdecode
    is_a, any_of, Refused = isinstance, any, PermissionError
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    refused = frozenset({
        "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg",
        "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system", "subprocess.Popen",
        "os.kill", "os.killpg", "pty.spawn",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.PyObj_FromPtr",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
        "sys.settrace", "sys.setprofile"})
    refused_modules = frozenset({"_posixsubprocess", "_ctypes", "_xxsubinterpreters", "_testcapi",
                                 "_testinternalcapi"})
    reads = frozenset({"os.listdir", "os.scandir", "os.chdir"})
    writes = frozenset({"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
                        "os.chmod", "os.chown", "os.truncate", "os.utime", "os.setxattr",
                        "os.removexattr", "shutil.rmtree", "shutil.copyfile", "shutil.move"})

    def inside(path, roots):
        if is_a(path, int):
            return True  # an fd it already holds
        try:
            real = realpath(fsdecode(fspath(path)))
        except Exception:
            return False
        return any_of(real == r or real.startswith(r + "/") for r in roots)

    def hook(event, args):
        if event in refused:
            raise Refused(f"sandbox: {event} is not allowed")
        if event == "import":
            if str(args[0]).rpartition(".")[2] in refused_modules:
                raise Refused(f"sandbox: importing {args[0]} is not allowed")
        elif event == "open":
            path, mode, flags = args
            writing = any_of(c in mode for c in "wax+") if is_a(mode, str) else bool(flags & write_flags)
            if not inside(path, (workdir,) if writing else read_roots):
                raise Refused(f"sandbox: {'writing' if writing else 'reading'} {path!r} is not allowed")
        elif event in reads:
            if args and args[0] is not None and not inside(args[0], read_roots):
                raise Refused(f"sandbox: {event} {args[0]!r} is not allowed")
        elif event in writes:
            for a in args:
                if is_a(a, (str, bytes)) or hasattr(a, "__fspath__"):
                    if not inside(a, (workdir,)):
                        raise Refused(f"sandbox: {event} {a!r} is not allowed")
    return hook

def _prepare():
    workdir, audit, memory_exit = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
    path = os.path.join(workdir, "solution.py")
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    module = types.ModuleType("__main__")
    module.__file__ = path
    sys.modules["__main__"] = module
    sys.argv = [path]
    if audit:
        devices = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
        roots = (workdir, *devices, *(os.path.realpath(p) for p in sys.path if p))
        sys.addaudithook(_make_hook(workdir, roots))
    return code, module.__dict__, memory_exit

_code, _namespace, _memory_exit = _prepare()
del _prepare, _make_hook
try:
    exec(_code, _namespace)
except MemoryError:
    os.write(2, b"MemoryError\n")
    os._exit(_memory_exit)
'''
