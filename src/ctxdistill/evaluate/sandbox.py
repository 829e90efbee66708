"""Run model-written code in a sandboxed subprocess: time, memory, file-system and network limits.

Generated code is never executed in the evaluating process. Each program runs in a fresh
`python -I -S` child (isolated mode: no environment variables, no user or site packages) started in
an empty temporary directory, with:

- time: RLIMIT_CPU (CPU seconds) and a wall-clock timeout after which the child's whole process
  group is killed (a `time.sleep` or a blocked read cannot outlast it);
- memory: RLIMIT_AS (address space), so an unbounded allocation raises MemoryError or dies;
- files: RLIMIT_FSIZE caps what any file write can grow to, RLIMIT_NOFILE caps open files, and a
  Python audit hook (installed before the program runs and impossible to remove from Python) refuses
  opening any file for writing outside the temporary directory, and refuses deleting, renaming,
  chmod-ing or creating directories anywhere but there;
- processes and network: the same audit hook refuses `subprocess`, `os.system`, `os.exec*`,
  `os.fork`, `os.posix_spawn`, `os.kill`, sockets (`socket.connect/bind/getaddrinfo/sendto`) and
  `ctypes` (which could call libc directly); RLIMIT_NPROC is set to 0 extra processes where the OS
  honours it.

The program passes only if the child exits with status 0 within the limits. Anything else (an
assertion, an exception, a limit, a refused operation) scores as failed; the reason is returned.
This is a guard against accidents by weak models, not a security boundary against an adversary: use
a container or VM for untrusted code at scale.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Runs inside the child before the program. `SANDBOX_DIR` is substituted by the parent.
_GUARD = r'''
import os as _os, sys as _sys
_ROOT = _os.path.realpath(__SANDBOX_DIR__)
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

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class RunResult:
    passed: bool
    reason: str  # "passed", "failed: <last stderr line>", "timeout", "killed by signal N", ...


def _limit_child(limits: Limits):
    import resource

    def apply():
        os.setsid()  # own process group: the parent can kill everything the program started
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        memory = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        size = limits.file_size_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        except (ValueError, OSError):
            pass

    return apply


def run_program(program: str, limits: Limits = Limits()) -> RunResult:
    """Execute `program` (Python source) in a sandboxed child; passed = exit status 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="ctxdistill-sandbox-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        script = Path(tmp) / "program.py"
        script.write_text(_GUARD.replace("__SANDBOX_DIR__", repr(str(work))) + "\n" + program, encoding="utf-8")
        stderr_path = Path(tmp) / "stderr.txt"
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": str(work), "TMPDIR": str(work)}
        with open(stderr_path, "wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", str(script)], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                    preexec_fn=_limit_child(limits), close_fds=True)
            try:
                code = proc.wait(timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return RunResult(False, "timeout")
            finally:
                _kill_group(proc)  # anything the program left behind in its group
        tail = stderr_path.read_bytes()[-2000:].decode("utf-8", "replace").strip().splitlines()
        if code == 0:
            return RunResult(True, "passed")
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            reason = {"SIGXCPU": "timeout (cpu)", "SIGKILL": "killed (memory or time)", "SIGXFSZ": "file size limit"}.get(name, f"killed by {name}")
            return RunResult(False, reason)
        return RunResult(False, "failed: " + (tail[-1][:200] if tail else f"exit status {code}"))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def run_programs(programs: list[str], limits: Limits = Limits(), workers: int = 2) -> list[RunResult]:
    """Run several programs, `workers` at a time; results in input order."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda p: run_program(p, limits), programs))


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program HumanEval's check_correctness runs: prompt + completion + tests + check(entry point)."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"
