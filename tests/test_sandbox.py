import glob
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from skillstream.errors import UserError
from skillstream.sandbox import private_view_unavailable, run_bash, run_python
from skillstream.sandbox.checks import bubblewrap_check, isolation_works
from skillstream.sandbox.child import UID_BASE, UID_SPAN
from skillstream.sandbox.processes import pids_of

pytestmark = pytest.mark.skipif(
    not isolation_works(),
    reason="no network namespace available here (needs root or unprivileged user namespaces)")


def _sandbox_pids() -> list[int]:
    """Live processes running under any of the sandbox's throw-away uids."""
    lo, hi = UID_BASE, UID_BASE + UID_SPAN
    return [pid for uid in _uids_in_use(lo, hi) for pid in pids_of(uid)]


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


@pytest.fixture
def private_view():
    """Skips, saying why, where bubblewrap cannot give runs a private filesystem view."""
    why = private_view_unavailable()
    if why:
        pytest.skip(f"no private filesystem view here: {why}")


def _processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):  # not a process, or it ended while we looked
            continue
    return found


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
    assert r.leftover_processes == 3 and not r.ok
    assert not _sandbox_pids()


def test_a_process_left_running_is_killed_and_reported():
    seconds = f"1000.{secrets.randbelow(10**6)}"  # unique, to find our sleeper among all processes
    r = run_bash(f"nohup sleep {seconds} >/dev/null 2>&1 & echo started")
    assert r.stdout == "started\n" and r.returncode == 0 and not r.timed_out
    assert not r.ok and r.leftover_processes == 1
    assert _processes_mentioning(seconds) == []


def test_a_forked_child_left_sleeping_is_killed_and_reported():
    seconds = f"1000.{secrets.randbelow(10**6)}"
    r = run_python(f"import os, time\nif os.fork() == 0:\n    time.sleep({seconds})\nprint('parent done')")
    assert r.stdout == "parent done\n" and r.returncode == 0
    assert not r.ok and r.leftover_processes == 1
    assert _processes_mentioning(seconds) == []


def test_background_work_that_ends_in_time_is_not_a_leftover():
    r = run_bash("(sleep 0.05; echo late) & echo early")
    assert r.ok and r.leftover_processes == 0 and r.stdout == "early\nlate\n"


def test_files_land_in_a_fresh_dir_that_is_removed():
    name = f"out-{secrets.token_hex(4)}.txt"
    r = run_python(f"import os\nprint(os.listdir('.'))\nopen({name!r}, 'w').write('x')")
    assert r.ok and r.stdout == "[]\n"
    # the working dir lives in a skillstream-sbx-* dir under the host's temp dir, removed afterwards
    assert glob.glob(os.path.join(tempfile.gettempdir(), "skillstream-sbx-*", "work", name)) == []


def test_files_written_to_tmp_shm_and_var_tmp_do_not_outlive_the_run(private_view):
    name = f"skillstream-test-{secrets.token_hex(4)}"
    paths = [f"/tmp/{name}", f"/dev/shm/{name}", f"/var/tmp/{name}"]
    code = (f"import os\nfor path in {paths!r}:\n"
            "    print(os.listdir(os.path.dirname(path)))\n    open(path, 'w').write('left behind')")
    try:
        r = run_python(code)
        assert [p for p in paths if os.path.exists(p)] == []
        assert r.stdout == "[]\n" * 3  # each of them empty: the run's own
        assert r.ok and r.private_fs
    finally:  # where the code did write the host's dirs
        for p in paths:
            if os.path.exists(p):
                os.remove(p)


def test_code_cannot_read_the_callers_tree_or_other_world_readable_files(private_view):
    repo_file = Path(__file__).resolve().parents[1] / "pyproject.toml"
    shared = Path(tempfile.mkdtemp())  # like another user's project in a shared directory
    try:
        shared.chmod(0o755)
        (shared / "notes.txt").write_text("not for the sandbox")
        (shared / "notes.txt").chmod(0o644)
        readable = [str(repo_file), "/etc/passwd", str(shared / "notes.txt")]
        code = (f"for path in {readable!r}:\n    try:\n        open(path).read()\n"
                "        print('read', path)\n    except OSError as e:\n"
                "        print(type(e).__name__, path)")
        r = run_python(code)
        assert r.stdout.splitlines() == [f"FileNotFoundError {p}" for p in readable]
    finally:
        shutil.rmtree(shared)
    top = json.loads(run_python("import json, os\nprint(json.dumps(os.listdir('/')))").stdout)
    # no /work, /home, /root, /opt, /mnt: only what the interpreter needs and the run's own dirs
    assert set(top) <= {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sandbox",
                        "sbin", "tmp", "usr", "var"}


def test_without_bubblewrap_it_warns_once_and_uses_the_fallback(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap to be found
    bubblewrap_check.cache_clear()  # the warning comes once per process: start afresh
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = run_bash("echo hi"), run_bash("echo hi")
        said = [str(w.message) for w in caught if "bubblewrap" in str(w.message)]
        assert len(said) == 1 and "apt-get install bubblewrap" in said[0]
        assert first.stdout == second.stdout == "hi\n" and first.ok and first.network_blocked
        assert not first.private_fs and not second.private_fs
        assert private_view_unavailable() == "bubblewrap is not installed (no bwrap on PATH)"
    finally:
        bubblewrap_check.cache_clear()


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid drop only happens when run as root")
def test_code_cannot_write_outside_its_dir(tmp_path):
    target = tmp_path / "victim.txt"
    os.chmod(tmp_path, 0o755)
    r = run_bash(f"echo pwned > {target}")
    # the fallback's uid may not write there; under bwrap the path is not even in its view
    assert r.returncode != 0 and ("Permission denied" in r.stderr or "No such file" in r.stderr)
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
