"""The HumanEval sandbox: a looping, memory-bombing or file-touching completion is stopped and scored failed."""

import time

import pytest

from ctxdistill.evaluate.sandbox import Limits, humaneval_program, run_program, run_programs

FAST = Limits(wall_seconds=2.0, cpu_seconds=1, memory_mb=512)


def test_passing_and_failing_programs():
    assert run_program("assert sum([1, 2]) == 3", FAST).passed
    result = run_program("assert 1 + 1 == 3", FAST)
    assert not result.passed and "AssertionError" in result.reason


def test_infinite_loop_is_stopped():
    started = time.perf_counter()
    result = run_program("while True:\n    pass", FAST)
    assert not result.passed and "timeout" in result.reason
    assert time.perf_counter() - started < FAST.wall_seconds + 3


def test_sleeping_program_is_stopped_by_the_wall_clock():
    result = run_program("import time\ntime.sleep(60)", Limits(wall_seconds=1.0, cpu_seconds=5))
    assert not result.passed and result.reason == "timeout"


@pytest.mark.parametrize("program", ["x = bytearray(10 ** 11)", "x = []\nwhile True:\n    x.append(bytearray(10 ** 7))"])
def test_unbounded_allocation_is_stopped(program):
    result = run_program(program, FAST)
    assert not result.passed
    assert "MemoryError" in result.reason or "killed" in result.reason or "timeout" in result.reason


def test_files_outside_the_sandbox_are_untouched(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    attempts = [
        f"open({str(victim)!r}, 'w').write('gone')",
        f"import os\nos.remove({str(victim)!r})",
        f"import os\nos.rename({str(victim)!r}, {str(victim) + '.moved'!r})",
        f"import os\nos.open({str(victim)!r}, os.O_WRONLY | os.O_TRUNC)",
        f"import pathlib\npathlib.Path({str(victim)!r}).write_text('gone')",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import subprocess\nsubprocess.run(['rm', {str(victim)!r}])",
        f"import os\nos.system('rm {victim}')",
    ]
    for program in attempts:
        result = run_program(program, FAST)
        assert not result.passed, program
        # refused by the audit hook, or the path does not exist in the sandbox's own file system
        assert "sandbox" in result.reason or result.reason in ("failed: FileNotFoundError", "failed: OSError"), (program, result.reason)
    assert victim.read_text() == "keep"


def test_writing_inside_the_sandbox_works_but_is_capped():
    assert run_program("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'", FAST).passed
    big = run_program("open('big', 'wb').write(b'0' * (64 * 2 ** 20))", Limits(wall_seconds=5, file_size_mb=1))
    assert not big.passed


@pytest.mark.parametrize("program", ["import socket", "import os\nos.fork()", "import ctypes"])
def test_network_processes_and_ctypes_are_refused(program):
    result = run_program(program, FAST)
    assert not result.passed and "sandbox" in result.reason


def test_humaneval_program_and_parallel_runs():
    prompt = "def add(a, b):\n    \"\"\"Add two numbers.\"\"\"\n"
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n"
    good = humaneval_program(prompt, "    return a + b\n", test, "add")
    bad = humaneval_program(prompt, "    return a - b\n", test, "add")
    loop = humaneval_program(prompt, "    while True:\n        pass\n", test, "add")
    results = run_programs([good, bad, loop], FAST, workers=2)
    assert [r.passed for r in results] == [True, False, False]


# --- The isolation boundary: programs that get past the audit hook meet the namespaces -------------------

import os
import socket
import uuid
from pathlib import Path

from ctxdistill.errors import CtxDistillError
from ctxdistill.evaluate import sandbox

# The escape: subprocess without its audit event, so the child is a fresh python with no hook
# (it runs through _posixsubprocess.fork_exec). `unguarded(code)` runs `code` in such a child.
ESCAPE = '''
import subprocess, sys, types
class _NoAudit(types.ModuleType):
    def __getattr__(self, name):
        return getattr(sys, name)
    @staticmethod
    def audit(*args):
        pass
subprocess.sys = _NoAudit("sys")
'''
ROOMY = Limits(wall_seconds=4.0, cpu_seconds=3, memory_mb=512, processes=16)  # lets the escape start its child


def unguarded(code: str) -> str:
    return ESCAPE + f"raise SystemExit(subprocess.run([sys.executable, '-I', '-S', '-c', {code!r}]).returncode)\n"


def processes_with(token: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_the_escape_itself_reaches_an_unhooked_python():
    """Control: the escape works (an unhooked child runs and may exit 0), so the cases below test the OS boundary."""
    assert run_program(unguarded("import socket, ctypes"), ROOMY).passed


def test_fork_exec_of_a_shell_is_refused_by_rlimit_nproc():
    result = run_program(ESCAPE + "subprocess.run(['/bin/sh', '-c', 'echo escaped'])", FAST)
    assert not result.passed and result.reason == "failed: BlockingIOError"  # RLIMIT_NPROC 1: no fork at all


def test_a_shell_run_through_fork_exec_sees_no_user_files_and_writes_nothing(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    shell = f"cat /etc/passwd {victim} && echo gone > {victim}"
    result = run_program(ESCAPE + f"raise SystemExit(subprocess.run(['/bin/sh', '-c', {shell!r}]).returncode)", ROOMY)
    assert not result.passed and result.reason.startswith("failed")
    assert victim.read_text() == "keep" and sorted(tmp_path.iterdir()) == [victim]


@pytest.mark.parametrize("how", ["start_new_session", "double-fork daemon"])
def test_a_detached_child_dies_with_the_sandbox(how, tmp_path):
    token = uuid.uuid4().hex
    marker = tmp_path / "written-later"
    late = f"import time\ntime.sleep(1.5)\nopen({str(marker)!r}, 'w').write('escaped')  # {token}"
    if how == "start_new_session":
        program = ESCAPE + f"subprocess.Popen([sys.executable, '-I', '-S', '-c', {late!r}], start_new_session=True)\n"
    else:
        program = unguarded(f"import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
                            f"        os.execv(sys.executable, [sys.executable, '-I', '-S', '-c', {late!r}])\n")
    assert run_program(program, ROOMY).passed  # the parent exits 0 at once, leaving its child behind
    time.sleep(0.3)
    assert processes_with(token) == [], "a process outlived the sandbox"
    time.sleep(1.6)
    assert not marker.exists()


def test_a_fork_bomb_stays_bounded_and_dies_with_the_sandbox():
    token = uuid.uuid4().hex
    bomb = f"import os, time  # {token}\nfor _ in range(12):\n    try:\n        os.fork()\n    except BlockingIOError:\n        pass\ntime.sleep(30)\n"
    started = time.perf_counter()
    result = run_program(unguarded(bomb), Limits(wall_seconds=2.0, cpu_seconds=2, memory_mb=512, processes=16))
    assert result.reason == "timeout" and time.perf_counter() - started < 5
    time.sleep(0.3)
    assert processes_with(token) == []
    assert run_program(bomb, FAST).reason == "failed: PermissionError (refused by the sandbox)"  # the hook, without the escape


def test_no_network_not_even_loopback():
    secret = uuid.uuid4().hex
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        connect = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                   f"s.sendall({secret!r}.encode())\n")
        guarded = run_program(connect, FAST)
        escaped = run_program(unguarded(connect), ROOMY)
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing ever connected
    assert guarded.reason == "failed: PermissionError (refused by the sandbox)"
    assert not escaped.passed
    assert run_program(unguarded("import socket\nsocket.getaddrinfo('pypi.org', 443)"), ROOMY).reason.startswith("failed")


@pytest.mark.parametrize("attack", [
    "fd = os.open({dir!r}, os.O_RDONLY)\nos.close(os.open('dirfd.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
    "fd = os.open('/', os.O_RDONLY)\nos.close(os.open({dir!r}[1:] + '/dirfd.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd))",
    "import sqlite3\nsqlite3.connect({dir!r} + '/db.sqlite').execute('create table t (x)')",
    "os.mkfifo({dir!r} + '/fifo')",
    "os.mkfifo('/usr/fifo')",
    "open('/usr/lib/escaped', 'w')",
])
def test_writes_outside_work_fail_in_the_kernel(attack, tmp_path):
    (tmp_path / "victim.txt").write_text("keep")
    program = "import os\n" + attack.format(dir=str(tmp_path))
    for limits, code in ((FAST, program), (ROOMY, unguarded(program))):
        assert not run_program(code, limits).passed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"] and (tmp_path / "victim.txt").read_text() == "keep"
    assert not Path("/usr/fifo").exists() and not Path("/usr/lib/escaped").exists()


def test_user_files_are_invisible_and_secrets_never_reach_the_reason(tmp_path):
    secret = "secret-" + uuid.uuid4().hex
    in_tmp = tmp_path / "secret.txt"
    in_home = Path.home() / f".ctxdistill-test-{uuid.uuid4().hex}"
    in_tmp.write_text(secret)
    in_home.write_text(secret)
    try:
        for path in (in_tmp, in_home, Path("/etc/passwd"), Path(__file__)):
            leak = f"raise RuntimeError(open({str(path)!r}).read())"
            for limits, code in ((FAST, leak), (ROOMY, unguarded(leak))):
                result = run_program(code, limits)
                assert result.reason == "failed: FileNotFoundError" if limits is FAST else result.reason.startswith("failed")
        # even text the program chooses to print never becomes the reason
        loud = f"import sys\nsys.stderr.write('root:x:0:0 {secret}')\nraise ValueError({secret!r})"
        assert run_program(loud, FAST).reason == "failed: ValueError"
        assert run_program(f"class E{secret.replace('-', '')}(Exception): pass\nraise E{secret.replace('-', '')}()", FAST).reason == "failed: exit status 1"
    finally:
        in_home.unlink()


def test_failure_reasons_are_fixed_forms():
    assert sandbox.failure_reason(1, b"Traceback\nAssertionError: root:x:0:0:root:/root:/bin/bash") == "failed: AssertionError"
    assert sandbox.failure_reason(1, b"x" * 5000) == "failed: exit status 1"
    assert sandbox.failure_reason(-9, b"") == "killed (memory or time)"
    assert sandbox.failure_reason(128 + 11, b"") == "killed by SIGSEGV"


def test_no_isolation_no_humaneval(monkeypatch, tmp_path):
    monkeypatch.setattr(sandbox, "_privileged", None)
    real_which = sandbox.shutil.which
    monkeypatch.setattr(sandbox.shutil, "which", lambda name, path=None: None if name == "unshare" else real_which(name, path=path))
    with pytest.raises(CtxDistillError, match="unshare is missing; install util-linux"):
        run_programs(["pass"], FAST)
    monkeypatch.setattr(sandbox.shutil, "which", real_which)

    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)  # a user without root, user namespaces switched off
    off = tmp_path / "max_user_namespaces"
    off.write_text("0\n")
    monkeypatch.setattr(sandbox, "USERNS_SETTINGS", {str(off): ("0", "sysctl -w user.max_user_namespaces=15000")})
    with pytest.raises(CtxDistillError, match=r"unprivileged user namespaces are disabled .*sudo sysctl -w user.max_user_namespaces=15000"):
        sandbox.require_isolation()
    assert sandbox._privileged is None


NON_ROOT_RUNNER = '''
import json, sys
sys.path.insert(0, sys.argv[1])
from ctxdistill.evaluate import sandbox
sandbox.require_isolation()
programs, roomy = json.load(sys.stdin)
limits = sandbox.Limits(**roomy)
print(json.dumps([sandbox.run_program(p, limits if escape else sandbox.Limits(wall_seconds=3)).reason for p, escape in programs]))
'''


@pytest.mark.skipif(os.geteuid() != 0 or not Path("/usr/bin/python3").is_file() or not Path("/usr/bin/setpriv").is_file(),
                    reason="needs root to become an unprivileged user, and a system python3 that user can run")
def test_as_an_unprivileged_user_the_sandbox_is_a_user_namespace(tmp_path):
    """The non-root path (unshare --user): run as `nobody` with the system python; same boundary."""
    import json
    import subprocess

    src = Path(sandbox.__file__).parents[2]
    probe = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", "/usr/bin/python3", "-c",
                            f"import sys; sys.path.insert(0, {str(src)!r}); import ctxdistill.evaluate.sandbox"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("nobody cannot import the source tree here")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    secret.chmod(0o644)
    programs = [("assert sorted([3, 1, 2]) == [1, 2, 3]", False),
                (ESCAPE + "subprocess.run(['/bin/sh', '-c', 'true'])", False),
                (unguarded("import socket, ctypes"), True),  # control: the escape works for this user too
                (unguarded(f"open({str(secret)!r}).read()"), True),
                (unguarded("open('/etc/passwd').read()"), True),
                (unguarded("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)"), True),
                (unguarded("open('/usr/escaped', 'w')"), True)]
    runner = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", "/usr/bin/python3", "-c",
                             NON_ROOT_RUNNER, str(src)], input=json.dumps([programs, ROOMY.to_dict()]), capture_output=True,
                            text=True, timeout=60, cwd="/")
    assert runner.returncode == 0, runner.stderr[-2000:]
    reasons = json.loads(runner.stdout)
    assert reasons[:3] == ["passed", "failed: BlockingIOError", "passed"], reasons
    assert all(r.startswith("failed") for r in reasons[3:]), reasons
    assert not Path("/usr/escaped").exists()


def test_namespaces_refused_by_the_system_is_one_clear_error(monkeypatch):
    """E.g. a container whose seccomp profile forbids unshare: the trial run fails and the error quotes why."""
    monkeypatch.setattr(sandbox, "_privileged", None)
    monkeypatch.setattr(sandbox, "_command", lambda tools, as_root: ["/bin/sh", "-c", "echo 'unshare: unshare failed: Operation not permitted' >&2; exit 1", "-c"])
    with pytest.raises(CtxDistillError, match=r"did not run \(unshare: unshare failed: Operation not permitted\); check that `unshare"):
        run_program("pass", FAST)
    assert sandbox._privileged is None, "nothing runs until a trial succeeds"


def test_the_rlimits_bind_the_program():
    check = ("import resource as r\nmb = 2 ** 20\n"
             "assert r.getrlimit(r.RLIMIT_AS) == (512 * mb, 512 * mb)\nassert r.getrlimit(r.RLIMIT_CPU) == (3, 4)\n"
             "assert r.getrlimit(r.RLIMIT_FSIZE)[1] == 8 * mb and r.getrlimit(r.RLIMIT_NOFILE)[1] == 64\n"
             "assert r.getrlimit(r.RLIMIT_CORE) == (0, 0) and r.getrlimit(r.RLIMIT_NPROC) == (16, 16)\n")
    assert run_program(unguarded(check), ROOMY).passed
    assert run_program(ESCAPE + "import threading\nthreading.Thread(target=print).start()", FAST).reason == "failed: RuntimeError"


@pytest.mark.slow
def test_every_canonical_humaneval_solution_passes_in_the_sandbox():
    """The boundary costs no correct program: all 164 reference solutions pass (about 12 s on 2 cores)."""
    from ctxdistill.evaluate import data

    rows = data.read_dataset("humaneval", log=lambda *a: None)
    results = run_programs([humaneval_program(r["prompt"], r["canonical_solution"], r["test"], r["entry_point"]) for r in rows], Limits())
    assert len(rows) == 164 and [r["id"] for r, res in zip(rows, results) if not res.passed] == []
