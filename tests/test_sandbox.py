import os
import socket
import tempfile
import time

import pytest

from skillstream import sandbox
from skillstream.errors import UserError
from skillstream.sandbox import run_bash, run_python

pytestmark = pytest.mark.skipif(
    not sandbox._isolation_works(),
    reason="no network namespace available here (needs root or unprivileged user namespaces)")


def _sandbox_pids() -> list[int]:
    """Live processes running under any of the sandbox's throw-away uids."""
    lo, hi = sandbox._UID_BASE, sandbox._UID_BASE + sandbox._UID_SPAN
    return [pid for uid in _uids_in_use(lo, hi) for pid in sandbox._pids_of(uid)]


def _uids_in_use(lo: int, hi: int) -> set[int]:
    uids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                uid = os.stat(f"/proc/{entry}").st_uid
            except OSError:
                continue
            if lo <= uid < hi:
                uids.add(uid)
    return uids


def test_normal_output_stdin_and_exit_code():
    r = run_python("import sys\nprint('hello', sys.stdin.read().upper())\nprint('warn', file=sys.stderr)",
                   stdin="abc")
    assert (r.returncode, r.stdout, r.stderr) == (0, "hello ABC\n", "warn\n")
    assert r.ok and not r.timed_out and not r.killed_for_memory and r.network_blocked
    assert run_python("raise SystemExit(3)").returncode == 3
    b = run_bash("echo $((6 * 7)); exit 5")
    assert (b.returncode, b.stdout) == (5, "42\n")


def test_python_runs_isolated_with_minimal_environment(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    r = run_python("import os, sys\nprint(sys.flags.isolated)\nprint(sorted(os.environ))")
    assert r.stdout.splitlines()[0] == "1"
    assert "SECRET_TOKEN" not in r.stdout
    env = run_bash("env").stdout
    assert "hunter2" not in env and "PATH=/usr/local/bin:/usr/bin:/bin" in env


def test_infinite_loop_times_out_quickly():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", timeout_s=1)
    elapsed = time.monotonic() - t0
    assert r.timed_out and not r.ok and r.returncode < 0
    assert elapsed < 2.0 and r.duration_s < 2.0
    # a sleeping (not CPU-burning) bash child is killed by the wall clock too
    t0 = time.monotonic()
    assert run_bash("sleep 30; echo never", timeout_s=1).timed_out
    assert time.monotonic() - t0 < 2.0


def test_memory_limit():
    r = run_python("x = bytearray(2 * 1024**3)\nprint('allocated')", memory_mb=256)
    assert r.returncode != 0 and "allocated" not in r.stdout
    assert r.killed_for_memory and "MemoryError" in r.stderr
    # the limit is a limit, not a ban: 50 MB fits in 256 MB
    ok = run_python("x = bytearray(50 * 1024**2)\nprint(len(x))", memory_mb=256)
    assert ok.ok and not ok.killed_for_memory


def test_no_network_to_a_loopback_server_outside():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), 2).close()  # reachable from out here
        code = ("import socket\ntry:\n"
                f"    socket.create_connection(('127.0.0.1', {port}), 2)\n    print('connected')\n"
                "except OSError as e:\n    print('blocked', e.errno)")
        r = run_python(code)
        assert r.stdout.startswith("blocked"), r
        assert r.network_blocked
        b = run_bash(f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected || echo blocked")
        assert b.stdout.strip() == "blocked"
        # not even an outside address: there is no route at all
        out = run_python("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), 2)\n"
                         "except OSError as e:\n    print('blocked', e.errno)")
        assert out.stdout.startswith("blocked")


@pytest.mark.skipif(os.geteuid() != 0, reason="process containment by uid needs root")
def test_fork_bomb_is_contained_and_cleaned_up():
    t0 = time.monotonic()
    r = run_bash(":(){ :|:& };:", timeout_s=2, max_procs=32)
    assert time.monotonic() - t0 < 4.0
    assert not _sandbox_pids(), "fork bomb processes survived the run"
    assert r.returncode is not None
    # the process limit is what stops it: forks fail once max_procs is reached
    code = ("import os\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
            "            import time; time.sleep(60)\n        n += 1\n"
            "except OSError as e:\n    print(n, e.errno)")
    p = run_python(code, timeout_s=3, max_procs=16)
    forks, err = map(int, p.stdout.split())
    assert forks < 16 and err == 11  # EAGAIN
    assert not _sandbox_pids()


@pytest.mark.skipif(os.geteuid() != 0, reason="process containment by uid needs root")
def test_processes_escaping_the_process_group_are_killed():
    # setsid() leaves the process group, so a killpg alone would miss these
    r = run_bash("for i in 1 2 3; do setsid sleep 60 & done; echo started", timeout_s=2)
    assert r.stdout == "started\n" and not r.timed_out
    assert not _sandbox_pids()


def test_files_land_in_a_temp_dir_that_is_removed():
    r = run_python("import os\nopen('out.txt', 'w').write('x')\nprint(os.path.abspath('out.txt'))")
    path = r.stdout.strip()
    assert r.ok and path.startswith(tempfile.gettempdir())
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop only happens when run as root")
def test_code_cannot_write_outside_its_dir(tmp_path):
    target = tmp_path / "victim.txt"
    os.chmod(tmp_path, 0o755)
    r = run_bash(f"echo pwned > {target}")
    assert r.returncode != 0 and "Permission denied" in r.stderr
    assert not target.exists()


def test_bash_cwd_is_copied_in_not_modified(tmp_path):
    (tmp_path / "data.txt").write_text("b\na\nc\n")
    r = run_bash("sort data.txt; rm data.txt; echo new > made.txt", cwd=str(tmp_path))
    assert r.stdout == "a\nb\nc\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]
    with pytest.raises(UserError):
        run_bash("ls", cwd=str(tmp_path / "missing"))


def test_output_is_truncated():
    r = run_bash("yes | head -c 1000000", output_limit=1000)
    assert r.truncated and len(r.stdout) == 1000 and r.returncode == 0


def test_bad_limits_are_user_errors():
    with pytest.raises(UserError):
        run_python("pass", timeout_s=0)


PROMPT = 'def add(a: int, b: int) -> int:\n    """Return the sum of a and b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


@pytest.mark.parametrize("completion, passes", [
    ("    return a + b\n", True),
    ("    return a - b\n", False),
    ("    while True: pass\n", False),
])
def test_humaneval_style_unit_tests(completion, passes):
    program = PROMPT + completion + "\n" + TEST + "\ncheck(add)\n"
    r = run_python(program, timeout_s=1)
    assert r.ok is passes
    if not passes and not r.timed_out:
        assert "AssertionError" in r.stderr
