"""Resumable checkpoints, written atomically.

A checkpoint is a folder: trainable weights (safetensors), optimizer state (torch.save, read back
with weights_only=True so nothing arbitrary is unpickled), RNG states, and `state.json` with the
data position, results so far and each plugin's and the objective's state (their tensors go to
`state.safetensors`). It is written under a
temporary name and renamed, so a kill at any instant leaves the previous checkpoint intact.

`manifest.json`, written last, holds every file's size and SHA-256. A resume verifies it and takes
the newest checkpoint that verifies, saying on stderr which one it skipped and why: a file cut
short or changed after the rename (a full disk, a copy that stopped, a bad sector) costs one
checkpoint interval, not the run. Non-finite weights are never written (:func:`require_finite`).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import TrainingDiverged, UserError

PREFIX = "ckpt-"
CHECKPOINTS = "checkpoints"  # the run directory's folder of them
MANIFEST = "manifest.json"


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return meta, tensors


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    v, state, gauss = meta["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, *rest = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def split_tensors(obj, prefix: str = "", out: dict | None = None):
    """Replace every tensor in a nested dict/list by {"__tensor__": key}; return (json_obj, tensors)."""
    out = {} if out is None else out
    if torch.is_tensor(obj):
        out[prefix] = obj.detach().contiguous().cpu()
        return {"__tensor__": prefix}, out
    if isinstance(obj, dict):
        return {k: split_tensors(v, f"{prefix}/{k}", out)[0] for k, v in obj.items()}, out
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, f"{prefix}/{i}", out)[0] for i, v in enumerate(obj)], out
    return obj, out


def join_tensors(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def save(root: Path, name: str, weights: dict[str, torch.Tensor], optimizer_state: dict, state: dict,
         keep: int = 2, rank_rng: list | None = None) -> Path:
    """`rank_rng`: every process's rng_state() (process 0 first) when several train; else this one's."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    (rng_meta, rng_tensors), *others = rank_rng or [rng_state()]
    rng_tensors = {**rng_tensors, **{f"rank{i}/{k}": v for i, (_, t) in enumerate(others, 1) for k, v in t.items()}}
    require_finite(weights, f"checkpoint {name}")
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    state_json, state_tensors = split_tensors(state)  # plugin state such as EWC's Fisher stays binary
    save_file(state_tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state_json, "rng": rng_meta,
                                                **({"rng_ranks": [m for m, _ in others]} if others else {})}))
    write_manifest(tmp)
    for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    final = root / f"{PREFIX}{name}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (ordered by the sequence number saved in each)."""
    if not root.is_dir():
        return []
    found = []
    for p in root.glob(f"{PREFIX}*"):
        try:
            found.append((json.loads((p / "state.json").read_text())["seq"], p))
        except (OSError, ValueError, KeyError):
            continue  # a folder without a readable state.json is not a complete checkpoint
    return [p for _, p in sorted(found)]


def load(path: Path, rank: int = 0) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, optimizer_state, state); restores process `rank`'s RNG states as a side effect
    (process 0's where the checkpoint has none for it)."""
    state = json.loads((path / "state.json").read_text())
    meta, tensors, ranks = state.pop("rng"), load_file(str(path / "rng.safetensors")), state.pop("rng_ranks", [])
    if 0 < rank <= len(ranks):
        meta, tensors = ranks[rank - 1], {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(f"rank{rank}/")}
    set_rng_state(meta, {k: v for k, v in tensors.items() if "/" not in k})
    state = join_tensors(state, load_file(str(path / "state.safetensors")))
    optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
    return load_file(str(path / "weights.safetensors")), optimizer_state, state


def clean_temporaries(root: Path) -> None:
    for p in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(p, ignore_errors=True)


def resume_hint(root: Path) -> str:
    """What `--resume` would do for the run whose checkpoints are in `root`, said truthfully."""
    candidates = _candidates(root)
    intact = [p for p in candidates if damage(p) is None]
    if intact:
        return f"--resume continues from {intact[-1]}"
    if candidates:
        return f"no checkpoint in {root} is intact, so --resume cannot continue this run"
    return "no checkpoint was written yet, so --resume starts the run over"


def _candidates(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first, whole or not (their names are zero-padded sequence numbers)."""
    return sorted(root.glob(f"{PREFIX}*")) if root.is_dir() else []


def pick(root: Path, name: str) -> Path:
    """The resumable checkpoint `name` of a run: its folder name (ckpt-000004) or the sequence number
    in it (ckpt-4); it must exist and be intact. One line naming what is there otherwise."""
    seq = name[len(PREFIX):] if name.startswith(PREFIX) else ""
    if not seq.isdigit():
        raise UserError(f"checkpoint {name!r}: expected {PREFIX}N (e.g. {PREFIX}4), best or final")
    found = {int(p.name[len(PREFIX):]): p for p in _candidates(root) if p.name[len(PREFIX):].isdigit()}
    if int(seq) not in found:
        have = ", ".join(p.name for p in found.values()) or "none"
        raise UserError(f"checkpoint {name!r}: not in {root} (there: {have}; train.keep_checkpoints says how "
                        "many are kept)")
    path = found[int(seq)]
    why = damage(path)
    if why is not None:
        raise UserError(f"checkpoint {path} is damaged ({why}): pick another")
    return path


SUPERSEDED = "superseded"  # checkpoints/superseded/: the ones after a --resume-from point, kept aside


def set_aside_newer(root: Path, path: Path) -> list[Path]:
    """Move the checkpoints newer than `path` to checkpoints/superseded/ (a run resumed from `path`
    writes its own after it; left in place they would be taken as newer). Returns where they went."""
    moved = []
    for p in _candidates(root):
        if p.name > path.name:  # zero-padded sequence numbers: name order is age order
            dest = root / SUPERSEDED / p.name
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(exist_ok=True)
            os.replace(p, dest)
            moved.append(dest)
    return moved


def require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse to save a NaN or infinite weight: a run whose numbers went bad stops instead."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise TrainingDiverged(f"{what}: {key} holds non-finite values; refusing to save them")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """Every file's size and hash, written after them (so a manifest vouches only for whole files)."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def damage(folder: Path) -> str | None:
    """Why the checkpoint cannot be trusted (one phrase), or None when every file matches its manifest."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:  # written before checkpoints had manifests: whole if its state.json reads
        try:
            json.loads((folder / "state.json").read_text())["seq"]
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST} is missing and state.json is unreadable"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, want in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, the manifest says {want['bytes']}"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def newest_intact(root: Path) -> Path | None:
    """The newest checkpoint whose files all match its manifest; each newer one skipped is named on
    stderr with the reason. None when there is no checkpoint; an error when none is intact."""
    candidates = _candidates(root)
    skipped = []
    for folder in reversed(candidates):
        why = damage(folder)
        if why is None:
            for bad, reason in skipped:
                print(f"warning: checkpoint {bad} is damaged ({reason}): resuming from {folder.name}",
                      file=sys.stderr, flush=True)
            return folder
        skipped.append((folder.name, why))
    if skipped:
        raise UserError(f"--resume: no checkpoint in {root} is intact ("
                        + "; ".join(f"{n}: {why}" for n, why in skipped) + "): start a new run with --out")
    return None
