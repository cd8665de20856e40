"""hcx.evaluation.sandbox: each test runs a real program in the sandbox and checks, from
outside, what the program could and could not do."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hcx.evaluation.sandbox import ExecResult, SandboxError, run_many, run_program


def run(src: str, **kw) -> ExecResult:
    return run_program(textwrap.dedent(src), **kw)


def test_passing_program_passes_with_stdlib():
    r = run("""
        import collections, hashlib, heapq, itertools, math, re
        print(math.gcd(12, 18), hashlib.md5(b"x").hexdigest()[:6], "한국어")
    """)
    assert r.status == "passed" and r.returncode == 0 and r.passed
    assert r.stdout == "6 9dd4e4 한국어\n"


def test_exit_works_without_site():
    # -S leaves exit() undefined; the prelude provides it, with sys.exit's codes
    assert run("print('a'); exit(0); print('b')").stdout == "a\n"
    assert run("exit(2)").returncode == 2


def test_assertion_fails():
    r = run("assert 1 + 1 == 3, 'arithmetic'")
    assert r.status == "failed" and r.returncode == 1
    assert "AssertionError: arithmetic" in r.stderr


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    r = run("while True: pass", timeout_s=1)
    assert r.status == "timeout"
    assert time.monotonic() - t0 < 3


def test_memory_limit_stops_large_allocation():
    r = run("x = bytearray(2 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert r.status in ("failed", "killed") and "allocated" not in r.stdout
    if r.status == "failed":
        assert "MemoryError" in r.stderr


def test_no_network_even_to_localhost():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        r = run(f"""
            import socket
            s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
            s.sendall(b"hello")
            print("connected")
        """)
        assert r.status == "failed" and "connected" not in r.stdout
        with pytest.raises(BlockingIOError):  # nobody ever connected
            server.accept()
    finally:
        server.close()


def _can_unshare_net() -> bool:
    probe = ("import ctypes; l = ctypes.CDLL(None); "
             "raise SystemExit(0 if l.unshare(0x40000000) == 0 "
             "or l.unshare(0x40000000 | 0x10000000) == 0 else 1)")
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


def test_program_runs_in_its_own_network_namespace():
    if not _can_unshare_net():
        pytest.skip("this kernel refuses new network namespaces; the audit hook still "
                    "blocks sockets (test_no_network_even_to_localhost)")
    r = run("import os; print(os.readlink('/proc/self/ns/net'))")
    assert r.status == "passed"
    assert r.stdout.strip() != os.readlink("/proc/self/ns/net")


@pytest.mark.parametrize("how", [
    "open(TARGET, 'w').write('x')",
    "import os; os.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))",
    "import os; os.symlink(os.path.dirname(TARGET), 'out'); "
    "open(os.path.join('out', os.path.basename(TARGET)), 'w').write('x')",
    "import os; os.chdir(os.path.dirname(TARGET)); open(os.path.basename(TARGET), 'w')",
    "import os; fd = os.open(os.path.dirname(TARGET), os.O_RDONLY); "
    "os.open(os.path.basename(TARGET), os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
])
def test_cannot_write_outside_working_directory(tmp_path, how):
    target = tmp_path / "escape.txt"
    r = run(f"TARGET = {str(target)!r}\n{how}\n")
    assert r.status == "failed" and "sandbox:" in r.stderr
    assert not target.exists()


def test_cannot_delete_or_rename_outside(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("x")
    for src in (f"import os; os.remove({str(keep)!r})",
                f"import os; os.rename({str(keep)!r}, 'stolen.txt')"):
        r = run(src)
        assert r.status == "failed" and "sandbox:" in r.stderr
    assert keep.read_text() == "x"


def test_writes_inside_working_directory_are_fine_and_it_is_removed():
    r = run("""
        import os, tempfile
        open("a.txt", "w").write("x")
        fd, path = tempfile.mkstemp()
        os.makedirs("d/e")
        print(os.getcwd(), os.environ["HOME"], os.environ["TMPDIR"], os.path.dirname(path))
    """)
    assert r.status == "passed", r.stderr
    cwd, home, tmpdir, mkstemp_dir = r.stdout.split()
    assert cwd == home == tmpdir == mkstemp_dir
    assert not os.path.exists(cwd)


@pytest.mark.parametrize("src", [
    "import os; os.system('true')",
    "import subprocess; subprocess.run(['true'])",
    "import os; os.kill(os.getppid(), 0)",
    "import ctypes; ctypes.CDLL(None)",
    "import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
])
def test_guard_refuses_processes_signals_ctypes_and_limits(src):
    r = run(src)
    assert r.status == "failed" and "PermissionError: sandbox:" in r.stderr


def test_what_ordinary_benchmark_programs_do_is_allowed():
    """Unnamed temporary files (O_TMPFILE in the working directory), writing to the
    process's own stdout/stderr by path, and lowering a resource limit."""
    r = run("""
        import resource, sys, tempfile
        with tempfile.TemporaryFile() as f:
            f.write(b"x"); f.seek(0); assert f.read() == b"x"
        with tempfile.NamedTemporaryFile("w") as f:
            f.write("y")
        with open("/dev/stdout", "w") as out:
            out.write("via-dev-stdout\\n")
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft // 2, hard))
        sys.setrecursionlimit(10000)
    """)
    assert r.status == "passed", r.stderr
    assert "via-dev-stdout" in r.stdout


def _live_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that are not zombies (a zombie is dead; it
    waits only for a parent to reap it, which in a container may never happen)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def test_timeout_kills_the_whole_process_group():
    r = run("""
        import os, subprocess
        p = subprocess.Popen(["sleep", "60"])
        print(p.pid, os.getpgrp(), flush=True)
        while True:
            pass
    """, timeout_s=1, allow_subprocess=True)
    assert r.status == "timeout"
    child, pgid = map(int, r.stdout.split())
    assert child != pgid  # the sleep really was a separate process
    deadline = time.monotonic() + 2
    while _live_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _live_members(pgid) == []


def test_environment_does_not_leak(monkeypatch):
    monkeypatch.setenv("HCX_SECRET", "hunter2")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent/hcx")
    r = run("""
        import os, sys
        print(os.environ.get("HCX_SECRET"), sorted(os.environ))
        print([p for p in sys.path if "hcx" in p or "site-packages" in p])
    """)
    assert r.status == "passed"
    assert "hunter2" not in r.stdout
    assert r.stdout.splitlines() == ["None ['HOME', 'LANG', 'PATH', 'TMPDIR']", "[]"]


def test_run_many_keeps_input_order():
    progs = [f"print({i})" for i in range(5)] + ["raise SystemExit(3)"]
    results = run_many(progs, workers=2)
    assert [r.stdout for r in results[:5]] == [f"{i}\n" for i in range(5)]
    assert results[5].status == "failed" and results[5].returncode == 3
    with pytest.raises(SandboxError):
        run_many(progs, workers=0)
