"""Shared helpers for the tests: a small stream folder and a way to run the CLI like a user."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("CI", "true")            # plain progress lines, no live bar
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests use tiny models: one thread is as fast as two there, and it keeps the suite from
# spinning OpenMP threads against each other (and against subprocesses, which inherit this).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """Long-running files first, each file's tests together and in their order (see pyproject.toml)."""
    items.sort(key=lambda item: item.get_closest_marker("long_running") is None)  # stable: order kept


def run_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `skillstream ARGS` in a subprocess, as a user would."""
    cmd = [sys.executable, "-m", "skillstream.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CI": "true"})


def write_task_folder(folder: Path, train: list[dict], test: list[dict], labels: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(json.dumps(train))
    (folder / "test.json").write_text(json.dumps(test))
    (folder / "labels.json").write_text(json.dumps(labels))
    return folder


@pytest.fixture
def sentiment_folder(tmp_path) -> Path:
    """A tiny classification task folder in the DESIGN.md format."""
    good = ["a wonderful, moving film", "great acting and a sharp script", "I loved every minute"]
    bad = ["a dull, lifeless mess", "terrible pacing and flat jokes", "I wanted to leave early"]
    rows = [{"sentence": s, "label": "Good"} for s in good] + [{"sentence": s, "label": "Bad"} for s in bad]
    return write_task_folder(tmp_path / "sentiment", rows, rows, ["Good", "Bad"])
