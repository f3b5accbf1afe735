"""Running untrusted Python (model-written programs) in a sandbox: `run_sandboxed`.

`run_sandboxed(source, stdin, limits) -> Outcome` runs `source` with the base interpreter
(`python -I -S -B`: no site-packages, no PYTHON* variables, no bytecode writes) and
never raises for anything the program does; bad arguments raise ValueError.

Three layers, each enough against an honest mistake and together a reasonable barrier
against a reward-hacking program:

1. Resource limits (setrlimit, inherited by every process of the run): CPU seconds,
   address space (RLIMIT_AS), file size, open files, no core dumps, and a process count
   (RLIMIT_NPROC) that is counted per user, so the program never runs as the caller's
   user: as root it drops to a fresh uid of its own, and as any other user it runs in
   a user namespace, where the count starts from zero. A wall-clock deadline kills the
   whole run.
2. Kernel isolation, detected at run time (`Outcome.isolation` says what was used):
   new network, PID, mount, IPC and UTS namespaces (plus a user namespace when not
   root). No network: the namespace has only a loopback device that is down. Processes:
   the program runs under a small init of its own, so when the run ends or is killed
   every process it started dies with the PID namespace, setsid or not. Files: the
   whole tree is remounted read-only and empty tmpfs are mounted over the repo, the
   home directories, /tmp, /var/tmp, /dev/shm, /run and /mnt; only the Python
   installation (read-only) and the run's temp dir (read-write, the cwd and HOME) are
   bound back; /proc is a fresh one that shows only the run's own processes.
3. An audit hook (PEP 578) installed before the program's first line refuses sockets,
   fork/exec/spawn/subprocess, kill, ctypes and gc introspection, writing anywhere but
   the temp dir, and reading anything but the temp dir and the standard library. It
   is what remains where namespaces are refused (some containers, hosts with
   unprivileged user namespaces turned off), and it is no boundary against code built
   to escape it (CPython's own warning), which is why layers 1 and 2 exist.

The environment is empty but for PATH, HOME, TMPDIR and LANG: nothing of the caller's
(tokens, keys) reaches the program. The temp dir is deleted afterwards.
"""

from __future__ import annotations

import json
import math
import os
import random
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Hidden inside the mount namespace, besides the repo, the caller's home and the temp root.
HIDDEN_DIRS = ("/root", "/home", "/tmp", "/var/tmp", "/dev/shm", "/run", "/mnt", "/media", "/srv")
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
    isolation: list[str] = field(default_factory=list)  # e.g. ["net", "pid", "mount", "uid"]


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
    try:
        with open(os.path.join(workdir, "solution.py"), "wb") as f:
            f.write(source_bytes)
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(os.path.join(workdir, "solution.py"), uid, uid)
        python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        cfg = {
            "workdir": workdir, "python": python, "uid": uid, "report_fd": report_w,
            "audit_hook": audit_hook, "namespaces": namespaces,
            "limits": {f.name: getattr(limits, f.name) for f in fields(limits)},
            "hide": _dirs_to_hide(),
            "keep": sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix,
                                                           os.path.dirname(python))}),
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
        outcome = _collect(proc, report_r, limits, start)
        if uid is not None and "pid" not in outcome.isolation:
            _kill_user(uid)
        return outcome
    finally:
        for fd in (report_r, report_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, onerror=_force_remove)


def _dirs_to_hide() -> list[str]:
    candidates = [*HIDDEN_DIRS, REPO, os.path.expanduser("~"), tempfile.gettempdir()]
    # the temp dir itself is bound back in after its parent is hidden
    return sorted({os.path.realpath(p) for p in candidates} - {"/"})


def _child_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


def _collect(proc: subprocess.Popen, report_r: int, limits: Limits, start: float) -> Outcome:
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
    report = _report(out[report_r])
    stdout = bytes(out[stdout_fd][:cap]).decode("utf-8", "replace")
    stderr = bytes(out[stderr_fd][:cap]).decode("utf-8", "replace")
    wall = time.monotonic() - start
    isolation = report.get("isolation", [])
    if timed_out:
        return Outcome("timeout", None, stdout, stderr, wall, isolation)
    if "error" in report or "exit" not in report:
        why = report.get("error", f"the sandbox launcher exited {proc.returncode}")
        return Outcome("sandbox_error", proc.returncode, stdout, (stderr + "\n" + why).strip(), wall, isolation)
    code = report["exit"]
    if code == 0:
        status = "ok"
    elif code == MEMORY_EXIT:
        status = "memory"
    elif code == -signal.SIGXCPU or code == -signal.SIGKILL and report.get("cpu_s", 0) >= limits.cpu_s:
        status = "timeout"  # the soft CPU limit, or the hard one a second later
    elif code == -signal.SIGXFSZ:
        status = "file_size"
    elif code < 0:
        status = "killed"
    else:
        status = "error"
    return Outcome(status, code, stdout, stderr, wall, isolation)


def _report(raw: bytearray) -> dict:
    merged = {}
    for line in bytes(raw).decode("utf-8", "replace").splitlines():
        try:
            merged.update(json.loads(line))
        except (ValueError, TypeError):
            pass
    return merged


def _kill_run(proc: subprocess.Popen, report: dict) -> None:
    # The init of the run's PID namespace first: every process in it dies with it.
    if "init_pid" in report and proc.poll() is None:
        try:
            os.kill(report["init_pid"], signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
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
    for _ in range(20):
        pids = _pids_of(uid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.05)


def _force_remove(function, path, _exc_info) -> None:
    # the program may have left a directory without write or search permission
    try:
        os.chmod(os.path.dirname(path), stat.S_IRWXU)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, stat.S_IRWXU)
            shutil.rmtree(path, onerror=lambda *a: None)
        else:
            os.unlink(path)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------
# Inside the sandbox. `_launch` runs in the launcher process (`python -I -S -c`), before any
# untrusted code; it loads this file by path, so nothing here may import from the repo.

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (a post-4.x syscall)
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2


def _launch(cfg: dict) -> None:
    """Limits, namespaces, then the run's init (mounts, uid drop) which starts the program."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    report_fd = cfg["report_fd"]
    os.set_inheritable(report_fd, False)

    def note(**kv) -> None:
        os.write(report_fd, (json.dumps(kv) + "\n").encode())

    limits = cfg["limits"]
    _set_limits(limits)
    root = os.geteuid() == 0
    uid, gid = (cfg["uid"], cfg["uid"]) if root else (os.getuid(), os.getgid())
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    flags |= 0 if root else CLONE_NEWUSER
    namespaces = cfg["namespaces"] and libc.unshare(flags) == 0
    if cfg["namespaces"] and not namespaces:
        note(namespace_error=os.strerror(ctypes.get_errno()))
    elif not root:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    launcher = os.getpid()
    init = os.fork()
    if init == 0:
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() not in (launcher, 0):  # 0: the parent is outside our PID namespace
                os._exit(1)  # the launcher died before PDEATHSIG was armed
            isolation = ["net", "pid", "ipc"] if namespaces else []
            if namespaces:
                isolation += _isolate_files(libc, cfg, note)
            if root and (namespaces or _reachable_by_others(cfg["python"])):
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                isolation.append("uid")
            elif not root:
                isolation.append("userns" if namespaces else "same-uid")
            _run_init(libc, cfg, isolation, namespaces, note)
        except BaseException as e:  # noqa: BLE001 - reported to the caller as a sandbox error
            note(error=f"sandbox set-up failed: {type(e).__name__}: {e}")
        os._exit(1)
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


def _isolate_files(libc, cfg: dict, note) -> list[str]:
    """Inside the new mount namespace: read-only tree, tmpfs over private places, binds back."""
    import ctypes

    def mount(source, target, fstype, flags, data=None) -> bool:
        enc = (lambda s: s.encode() if s is not None else None)
        return libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0

    def fail(what: str) -> None:
        note(mount_error=f"{what}: {os.strerror(ctypes.get_errno())}")

    done = []
    if not mount(None, "/", None, MS_REC | MS_PRIVATE):
        fail("private /")
        return done  # without private propagation our mounts would show up outside
    done.append("mount")
    workdir = cfg["workdir"]
    keep = [(p, False) for p in cfg["keep"]] + [(workdir, True)]
    fds = {path: os.open(path, os.O_PATH | os.O_DIRECTORY) for path, _ in keep}

    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    if libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), 32) == 0:
        done.append("read-only")
    else:
        fail("read-only /")

    hidden: list[str] = []
    for path in sorted(cfg["hide"], key=len):
        if not os.path.isdir(path) or any(path.startswith(h + os.sep) for h in hidden):
            continue
        if mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755"):
            hidden.append(path)
        else:
            fail(f"hide {path}")
    if hidden:
        done.append("hidden")

    for path, writable in keep:
        if not writable and not any(path.startswith(h + os.sep) or path == h for h in hidden):
            continue  # still visible, and read-only with the rest of the tree
        os.makedirs(path, exist_ok=True)
        flags = MS_NOSUID | MS_NODEV | (MS_NOEXEC if writable else MS_RDONLY)
        if not (mount(f"/proc/self/fd/{fds[path]}", path, None, MS_BIND | MS_REC)
                and mount(None, path, None, MS_REMOUNT | MS_BIND | flags)):
            fail(f"bind {path}")
    for fd in fds.values():
        os.close(fd)

    if mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC):
        done.append("proc")
    elif mount("tmpfs", "/proc", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=1m"):
        done.append("no-proc")  # e.g. a container whose /proc has masked paths
    else:
        fail("proc")
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
            if args[0] in refused_modules:
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
