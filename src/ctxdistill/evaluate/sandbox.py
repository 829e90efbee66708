"""Run model-written code inside an OS isolation boundary: namespaces, a read-only root, rlimits.

Generated code is never executed in the evaluating process. Each program runs as
`python -I -S -B` (isolated mode: no environment variables, no user or site packages) inside
Linux namespaces made with util-linux's `unshare`:

- a new PID namespace: the program's set-up shell is its PID 1, so when the program ends or the
  wall-clock timeout kills the sandbox, every descendant dies with it (a `start_new_session=True`
  daemon cannot outlive it);
- a new network namespace with no interface up: no connection anywhere, 127.0.0.1 included;
- a new mount namespace whose root is a fresh tmpfs holding read-only bind mounts of the system
  (`/usr`, the `/lib*`/`/bin` links, the Python installation, `/etc/ld.so.cache`, four `/dev` nodes)
  and one writable, size-capped tmpfs at `/work` (also `/tmp` and `$HOME`); the program is chrooted
  into it, so the user's home, the project, `/etc/passwd` and every other file are simply absent;
- new IPC and UTS namespaces; as root the program then runs under a fresh unprivileged uid/gid,
  otherwise in a new user namespace (unprivileged user namespaces) as its root; either way with no
  capabilities (`setpriv`: empty bounding, inheritable and ambient sets, no_new_privs);
- rlimits on the program (`prlimit`, after the set-up): RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE,
  RLIMIT_NOFILE, no core files, and RLIMIT_NPROC = `Limits.processes` (1: no fork, no thread at all);
  plus a wall-clock timeout after which the whole sandbox is killed.

On top, a Python audit hook refuses the obvious (writes outside `/work`, `subprocess`, `os.system`,
sockets, ctypes, ...) so a weak model's accident gets a readable reason; the hook is a courtesy,
the namespaces are the boundary. Where the namespaces cannot be made (tools missing, user
namespaces disabled for a non-root user), `require_isolation()` raises CtxDistillError saying why
and how to enable them, and nothing runs: there is no unsandboxed fallback.

The program passes only if it exits with status 0 within the limits. The stored reason is one of a
few fixed forms ("passed", "timeout", "failed: AssertionError", ...) naming at most a built-in
exception type: never text the program printed, so nothing it read can come back in the results.
"""

from __future__ import annotations

import builtins
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import CtxDistillError

# Runs inside the child before the program. `SANDBOX_DIR` is substituted by the parent.
_GUARD = r'''
import os as _os, sys as _sys
_ROOT = _os.path.realpath(__SANDBOX_DIR__)
_os.chdir(_ROOT)
_WRITE_FLAGS = _os.O_WRONLY | _os.O_RDWR | _os.O_APPEND | _os.O_CREAT | _os.O_TRUNC
_BLOCKED = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
            "os.kill", "os.killpg", "pty.spawn", "socket.connect", "socket.bind", "socket.getaddrinfo",
            "socket.sendto", "socket.sendmsg", "socket.gethostbyname", "ctypes.dlopen", "ctypes.dlsym",
            "ctypes.cdata", "os.setuid", "os.chroot", "resource.setrlimit", "sys.addaudithook", "os.symlink", "os.link",
            "shutil.rmtree", "os.truncate", "os.utime", "os.chown"}
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod", "os.removexattr", "os.setxattr"}

def _inside(path):
    try:
        path = _os.fsdecode(path) if not isinstance(path, int) else None
    except Exception:
        return False
    if path is None:
        return False
    full = _os.path.realpath(path)
    return full == _ROOT or full.startswith(_ROOT + _os.sep)

def _hook(event, args):
    if event in _BLOCKED or event.startswith("os.exec") or event.startswith("os.spawn"):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args and args[0] in ("ctypes", "_ctypes", "multiprocessing", "socket", "_socket", "resource"):
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writing and not (isinstance(path, int) or _inside(path)):
            raise PermissionError(f"sandbox: writing {path!r} is not allowed")
    if event in _PATH_EVENTS:
        for p in args[:2]:
            if isinstance(p, (str, bytes, _os.PathLike)) and not _inside(p):
                raise PermissionError(f"sandbox: {event} outside the sandbox is not allowed")

_sys.addaudithook(_hook)
del _hook
'''


@dataclass(frozen=True)
class Limits:
    """Resource limits for one program run."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    file_size_mb: int = 8
    open_files: int = 64
    processes: int = 1  # RLIMIT_NPROC inside the sandbox: 1 = no fork, no threads

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class RunResult:
    passed: bool
    reason: str  # "passed", "failed: <built-in exception type>", "timeout", "killed by SIGSEGV", ...


WORK = "/work"  # the writable tmpfs inside the sandbox
SETUP_FAILED = 125  # exit status of the set-up shell when a mount or the chroot fails
TOOLS = ("unshare", "setpriv", "prlimit", "mount", "chroot", "cp")
_uids = itertools.count()
_uid_lock = threading.Lock()


def _sandbox_uid() -> int:
    """A fresh uid per run (as root), so RLIMIT_NPROC counts only this sandbox's processes."""
    with _uid_lock:
        n = next(_uids)
    return 3_000_000_000 + (os.getpid() % 100_000) * 10_000 + n % 10_000


def _tools() -> dict[str, str]:
    found = {name: shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin") for name in TOOLS}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise CtxDistillError(f"HumanEval runs model-written code only inside an isolated sandbox, but {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} missing; install util-linux, mount and coreutils "
                              f"(Debian/Ubuntu: apt-get install util-linux mount coreutils), or leave humaneval out of --tasks")
    return found


def _python() -> tuple[str, list[str]]:
    """The real interpreter (a venv's python is a link to it) and the directories it needs outside /usr."""
    exe = os.path.realpath(sys.executable)
    roots = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.dirname(exe)),
                                            sysconfig.get_config_var("LIBDIR") or "/usr")}
    extra = sorted(r for r in roots if r != "/" and not (r + "/").startswith("/usr/"))
    # keep only the outermost of nested directories
    return exe, [r for r in extra if not any(r != o and r.startswith(o + "/") for o in extra)]


def _setup_script(root: str, program: str, limits: Limits, as_root: bool, uid: int, tools: dict[str, str]) -> str:
    """The shell run as PID 1 of the new namespaces: build the read-only root, then run the program in it."""
    q = shlex.quote
    exe, extra = _python()
    steps = [f"mount -t tmpfs -o size=4m,mode=0755 ctxdistill-root {q(root)}"]
    for d in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            steps.append(f"ln -s {q(os.readlink(d))} {q(root + d)}")
        elif os.path.isdir(d):
            extra.append(d)
    for d in ["/usr", *extra]:
        steps += [f"mkdir -p {q(root + d)}", f"mount --rbind {q(d)} {q(root + d)}",
                  f"mount -o remount,bind,ro,nosuid,nodev {q(root + d)}"]
    steps.append(f"mkdir -p {q(root + '/etc')} {q(root + '/dev')} {q(root + WORK)}")
    if os.path.isfile("/etc/ld.so.cache"):
        steps += [f"touch {q(root + '/etc/ld.so.cache')}", f"mount --bind /etc/ld.so.cache {q(root + '/etc/ld.so.cache')}"]
    for node in ("null", "zero", "random", "urandom"):
        steps += [f"touch {q(root + '/dev/' + node)}", f"mount --bind /dev/{node} {q(root + '/dev/' + node)}"]
    owner = f",uid={uid},gid={uid}" if as_root else ""
    size = max(16, 2 * limits.file_size_mb)
    steps += [f"ln -s {WORK[1:]} {q(root + '/tmp')}",
              f"mount -t tmpfs -o size={size}m,mode=0700,nosuid,nodev{owner} ctxdistill-work {q(root + WORK)}",
              f"cp {q(program)} {q(root + WORK + '/program.py')}",
              f"mount -o remount,bind,ro {q(root)}"]
    # setpriv and prlimit run inside the new root: found in /usr/sbin, /usr/bin, /sbin or /bin, all bound there
    drop = [tools["setpriv"], *([f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if as_root else [])]
    drop += ["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    mb = 1024 * 1024  # the limits bind the program only, not the set-up tools before it
    rlimits = [f"--cpu={limits.cpu_seconds}:{limits.cpu_seconds + 1}", f"--as={limits.memory_mb * mb}",
               f"--fsize={limits.file_size_mb * mb}", f"--nofile={limits.open_files}", "--core=0", f"--nproc={limits.processes}"]
    run = [tools["chroot"], root, *drop, tools["prlimit"], *rlimits, "--", exe, "-I", "-S", "-B", WORK + "/program.py"]
    # PID 1 stays the shell (a namespace's PID 1 ignores signals it has no handler for, SIGXCPU included);
    # when the program exits, the shell exits and the kernel kills whatever the program left behind.
    return (" && ".join(steps) + f" || exit {SETUP_FAILED}\ncd / && " + " ".join(q(a) for a in run) + "\nexit $?\n")


def _command(tools: dict[str, str], as_root: bool) -> list[str]:
    user = [] if as_root else ["--user", "--map-root-user"]
    return [tools["unshare"], *user, "--pid", "--fork", "--kill-child=SIGKILL", "--net", "--mount", "--ipc", "--uts",
            "--propagation", "private", "--", "/bin/sh", "-c"]


_BUILTIN_EXCEPTIONS = {n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)}
_SIGNAL_REASONS = {"SIGXCPU": "timeout (cpu)", "SIGKILL": "killed (memory or time)", "SIGXFSZ": "file size limit"}


def failure_reason(code: int, stderr_tail: bytes) -> str:
    """A fixed-form reason: a signal name, or 'failed: ' and a built-in exception type; never the program's text."""
    if code < 0 or 128 < code <= 128 + 64:
        number = -code if code < 0 else code - 128
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else str(number)
        return _SIGNAL_REASONS.get(name, f"killed by {name}")
    lines = stderr_tail.decode("utf-8", "replace").strip().splitlines()
    last = lines[-1] if lines else ""
    match = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:|$)", last)
    if match and match.group(1) in _BUILTIN_EXCEPTIONS:
        refused = " (refused by the sandbox)" if last[len(match.group(0)):].strip().startswith("sandbox:") else ""
        return f"failed: {match.group(1)}{refused}"
    return f"failed: exit status {code}"


def _execute(program: str, limits: Limits, as_root: bool) -> tuple[int | None, bytes]:
    """Run `program` in fresh namespaces: (exit status or None on the wall-clock timeout, the last 2000 bytes of stderr)."""
    with tempfile.TemporaryDirectory(prefix="ctxdistill-sandbox-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        script = Path(tmp) / "program.py"
        script.write_text(_GUARD.replace("__SANDBOX_DIR__", repr(WORK)) + "\n" + program, encoding="utf-8")
        os.chmod(tmp, 0o755)
        os.chmod(script, 0o644)
        stderr_path = Path(tmp) / "stderr.txt"
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": WORK, "TMPDIR": WORK}
        tools = _tools()
        setup = _setup_script(str(root), str(script), limits, as_root, _sandbox_uid(), tools)
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen([*_command(tools, as_root), setup], cwd="/", env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True, close_fds=True)
            try:
                code = proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                _kill_group(proc)  # the set-up shell is PID 1: killing it ends every process in the sandbox
        with open(stderr_path, "rb") as f:
            f.seek(max(0, stderr_path.stat().st_size - 2000))
            return code, f.read()


def run_program(program: str, limits: Limits = Limits()) -> RunResult:
    """Execute `program` (Python source) in the sandbox; passed = exit status 0 within the limits."""
    require_isolation()
    code, tail = _execute(program, limits, _privileged)
    if code is None:
        return RunResult(False, "timeout")
    if code == 0:
        return RunResult(True, "passed")
    if code == SETUP_FAILED:
        return RunResult(False, "sandbox set-up failed")
    return RunResult(False, failure_reason(code, tail))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


# sysctl file -> (the value that disables unprivileged user namespaces, the command that enables them)
USERNS_SETTINGS = {"/proc/sys/kernel/unprivileged_userns_clone": ("0", "sysctl -w kernel.unprivileged_userns_clone=1"),
                   "/proc/sys/user/max_user_namespaces": ("0", "sysctl -w user.max_user_namespaces=15000"),
                   "/proc/sys/kernel/apparmor_restrict_unprivileged_userns": ("1", "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0")}
_PROBE = "import os\nassert not os.path.exists('/etc/passwd') and os.getcwd() == '/work'\nopen('/work/probe', 'w').write('ok')\n"
_privileged: bool | None = None  # None: not checked yet; True: as root, a fresh uid; False: a user namespace


def _userns_problem() -> str | None:
    """Why a non-root user cannot create a user namespace here, or None."""
    for path, (blocking, fix) in USERNS_SETTINGS.items():
        try:
            value = Path(path).read_text().strip()
        except OSError:
            continue
        if value == blocking:
            return f"unprivileged user namespaces are disabled ({path} is {value}); ask an administrator to run `sudo {fix}`"
    try:
        ok = subprocess.run([shutil.which("unshare") or "unshare", "--user", "--map-root-user", "true"], capture_output=True,
                            timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        return ("this user cannot create a user namespace (`unshare --user --map-root-user true` fails: disabled by the kernel, "
                "a seccomp profile or a container); run as root, or in a container started with user namespaces allowed")
    return None


def require_isolation() -> None:
    """Raise CtxDistillError, saying why and how to fix it, unless programs can run isolated here (checked once)."""
    global _privileged
    if _privileged is not None:
        return
    why = "HumanEval runs model-written code only inside an isolated sandbox (PID, network, mount and user namespaces)"
    if sys.platform != "linux":
        raise CtxDistillError(f"{why}, which needs Linux; run the evaluation on Linux (or in a Linux container), "
                              "or leave humaneval out of --tasks")
    _tools()
    if os.geteuid() != 0:
        problem = _userns_problem()
        if problem:
            raise CtxDistillError(f"{why}, but {problem}; or leave humaneval out of --tasks")
    privileged = os.geteuid() == 0  # root: a fresh unprivileged uid (RLIMIT_NPROC binds); else a user namespace
    code, tail = _execute(_PROBE, Limits(wall_seconds=30, cpu_seconds=10, memory_mb=512), privileged)
    if code != 0:
        lines = tail.decode("utf-8", "replace").strip().splitlines()
        detail = lines[-1][:200] if lines else f"exit status {code}"
        user = "" if privileged else "--user --map-root-user "
        raise CtxDistillError(f"{why}, but a trial program in it did not run ({detail}); check that `unshare {user}--pid --fork "
                              "--net --mount true` works for this user (in a container: allow namespaces, e.g. docker "
                              "--cap-add SYS_ADMIN --security-opt seccomp=unconfined), or leave humaneval out of --tasks")
    _privileged = privileged


def run_programs(programs: list[str], limits: Limits = Limits(), workers: int = 2) -> list[RunResult]:
    """Run several programs, `workers` at a time; results in input order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, limits), programs))


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval's check_correctness runs: prompt + completion + tests + check(entry point)."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"
