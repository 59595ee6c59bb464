"""Stream folders (DESIGN.md contract): subfolders that are classification task folders, with an
optional `stream.yaml` giving the order (`tasks: [...]`) and an instruction per task
(`instructions: {name: ...}`); without it, alphabetical order and a generic instruction.

`--set data.stream=PATH` turns any recipe into one stage per task of the stream, each evaluated
on every task, so a method runs unchanged on a new stream. `data.stream: offline_skills` is the
stream the package builds offline from installed data (skillstream/data/packaged_stream.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import UserError
from .readers import read_text

GENERIC_INSTRUCTION = "Choose the correct option."  # a classification task without an instruction of its own


@dataclass
class StreamTask:
    name: str
    folder: Path
    instruction: str


def read_stream(path: str | Path) -> list[StreamTask]:
    """The tasks of a stream folder, or of a packaged stream named by `path` (`offline_skills`)."""
    from .packaged_stream import PACKAGED_STREAMS

    if str(path) in PACKAGED_STREAMS:
        return read_stream(PACKAGED_STREAMS[str(path)]())
    root = Path(path)
    if not root.exists():
        raise UserError(f"data.stream {str(root)!r}: no such folder (expected a stream folder: one task folder "
                        f"per task; or a packaged stream: {', '.join(PACKAGED_STREAMS)})")
    if not root.is_dir():
        raise UserError(f"data.stream {str(root)!r}: is a file, not a stream folder (one task folder per task)")
    spec = {}
    if (root / "stream.yaml").is_file():
        try:
            spec = yaml.safe_load(read_text(root / "stream.yaml")) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{root / 'stream.yaml'}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(spec, dict):
            raise UserError(f"{root / 'stream.yaml'}: expected keys 'tasks' and 'instructions'")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for p in folders:
        if (p / "train.json").is_file() and not (p / "labels.json").is_file():
            raise UserError(f"{p}: task folder has no labels.json (the list of options)")
    tasks_here = {p.name: p for p in folders if (p / "labels.json").is_file()}
    order = spec.get("tasks") or sorted(tasks_here)
    if not isinstance(order, list) or not all(isinstance(t, str) for t in order):
        raise UserError(f"{root / 'stream.yaml'}: tasks: expected a list of task folder names, got {order!r}")
    repeated = sorted({t for t in order if order.count(t) > 1})
    if repeated:
        raise UserError(f"{root / 'stream.yaml'}: tasks: {repeated[0]!r} is listed twice; each task must appear once")
    if not order:
        raise UserError(f"data.stream {str(root)!r}: no task folders (subfolders with train.json, test.json, labels.json)")
    missing = [t for t in order if t not in tasks_here]
    if missing:
        raise UserError(f"{root / 'stream.yaml'}: tasks {missing} have no task folder in {root}")
    instructions = spec.get("instructions") or {}
    if not isinstance(instructions, dict):
        raise UserError(f"{root / 'stream.yaml'}: instructions: expected a mapping of task name to instruction, "
                        f"got {type(instructions).__name__}")
    return [StreamTask(t, tasks_here[t], instructions.get(t, GENERIC_INSTRUCTION)) for t in order]
