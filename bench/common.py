"""What every benchmark script shares: the machine line of a RESULTS.md entry, appending the entry,
and running one measurement in a fresh subprocess that prints its result as one marked JSON line."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

MARK = "BENCH_RESULT "
QUIET_ENV = {"CUDA_VISIBLE_DEVICES": "", "CI": "true", "TRANSFORMERS_VERBOSITY": "error",
             "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def machine() -> str:
    """'AMD EPYC ..., 2 CPUs, OMP_NUM_THREADS=1' (the CPU model from /proc/cpuinfo where there is one)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def record(text: str, append: bool = True) -> None:
    """Print a finished RESULTS.md entry and, if `append`, add it to bench/RESULTS.md."""
    print(text)
    if append:
        with (Path(__file__).resolve().parent / "RESULTS.md").open("a") as f:
            f.write("\n" + text)


def _child(args: list[str], *, label: str, bench: str, cwd: Path | None = None,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh process (its own peak memory, nothing left over from a previous run), its
    time on stderr; a failure stops the benchmark with the child's last lines."""
    t0 = time.time()
    print(f"  {label} ...", end="", flush=True, file=sys.stderr)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env={**os.environ, **QUIET_ENV, **(env or {})},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(" failed", file=sys.stderr)
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        sys.exit(f"{bench}: the {label.strip()} run failed (exit {proc.returncode}):\n{tail}")
    print(f" {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return proc


def run_child(script: str | Path, kind: str, spec: dict, *, label: str, bench: str, cwd: Path,
              env: dict | None = None) -> dict:
    """Run `script --_child KIND SPEC` in a fresh process and return the JSON it printed after MARK."""
    proc = _child([str(Path(script).resolve()), "--_child", kind, json.dumps(spec)], label=label, bench=bench,
                  cwd=cwd, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if not lines:
        sys.exit(f"{bench}: the {label.strip()} run printed no result line ({MARK.strip()})")
    return json.loads(lines[-1][len(MARK):])


def train_in_child(recipe: dict | str, run_dir: Path, *, resume: bool = False, smoke: bool = False,
                   overrides: dict | None = None, label: str, bench: str) -> None:
    """`skillstream.train(recipe, out=run_dir, ...)` in a fresh process."""
    code = ("import json, sys, skillstream; a = json.loads(sys.argv[1]); "
            "skillstream.train(a['recipe'], out=a['out'], overrides=a['overrides'], smoke=a['smoke'], "
            "resume=a['resume'], show_progress=False)")
    spec = {"recipe": recipe, "out": str(run_dir), "overrides": overrides, "smoke": smoke, "resume": resume}
    _child(["-c", code, json.dumps(spec)], label=label, bench=bench)


def train_inline(recipe: dict | str, run_dir: Path, *, resume: bool = False, smoke: bool = False,
                 overrides: dict | None = None, label: str, bench: str) -> None:
    """`train_in_child` in this process (the benches' tests: no second interpreter to start)."""
    import skillstream
    skillstream.train(recipe, out=run_dir, overrides=overrides, smoke=smoke, resume=resume, show_progress=False)
