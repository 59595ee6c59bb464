"""The repository's scripts (bench/*.py, docs/generate_reference.py) loaded as modules by their path:
they are run as `python bench/x.py`, not installed as a package, and the tests call their functions."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str) -> ModuleType:
    """`load_script("bench/routing.py")`: a fresh module of that file."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
