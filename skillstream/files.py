"""Where skillstream reads and writes files outside a model: whole files and cache folders that a
reader never sees half done, the cache folder, and the data folders of installed packages."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

from .errors import UserError


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path` whole: into a temporary file beside it, then renamed over
    it, so a reader (a browser, a concurrent run, a resumed one) sees the old file or the new one,
    never a torn one. The temporary name is unique, so concurrent writers of one path do not collide;
    it is removed if the write fails. The parent folder must exist."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """`rows` as JSON lines (non-ASCII text as is), written whole (`write_atomic`), parent folders made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def build_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built once: `build(folder)` fills a temporary folder beside it, which is marked
    complete (`.complete`) and renamed to `target`, so a killed build leaves nothing half written.
    A folder already marked complete is returned as it is; one without the mark (a build killed
    elsewhere) is replaced; when another process renames its copy first, that copy is kept. The
    folder gets the permissions of a plain one (the umask's), not mkdtemp's private ones."""
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        build(tmp)
        (tmp / ".complete").touch()
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def cache_dir() -> Path:
    """skillstream's cache folder: $SKILLSTREAM_CACHE, else $XDG_CACHE_HOME/skillstream, else
    ~/.cache/skillstream (built models and tokenizers, packaged streams)."""
    root = os.environ.get("SKILLSTREAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "skillstream")
    return Path(root)


def package_dir(module: str, pip_spec: str, needed_for: str) -> Path:
    """The folder of the installed package `module` (its data ships inside it), or a UserError that
    says what needs it and how to install it (`pip_spec`, e.g. "icalfa==0.3.6")."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip_name = pip_spec.split("==")[0]
        raise UserError(f"{needed_for} needs the package {pip_name} (pip install --no-deps {pip_spec})")
    return Path(spec.submodule_search_locations[0])
