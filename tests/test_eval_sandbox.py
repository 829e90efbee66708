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
