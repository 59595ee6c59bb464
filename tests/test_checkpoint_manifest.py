"""A damaged newest checkpoint costs one checkpoint interval, not the run: every checkpoint carries a
manifest of its files' sizes and hashes, and --resume takes the newest one that verifies, saying which
one it skipped and why."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from skillstream.checkpoint import MANIFEST, damage, list_checkpoints, write_manifest
from skillstream.errors import UserError
from skillstream.run import train

RECIPE = {"model": "tiny", "train.steps": 9, "train.checkpoint_every": 3, "train.keep_checkpoints": 10,
          "train.batch_size": 4, "train.log_every": 1, "data.train.0.limit": 24, "data.eval.0.limit": 2,
          "data.eval.0.max_new_tokens": 4, "report_to": []}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return train("quickstart", out=tmp_path_factory.mktemp("full") / "run", overrides=RECIPE, show_progress=False)


def killed_after_step_6(finished, dst):
    """The finished run's folder as a kill after step 6 would have left it: checkpoints at steps 3 and 6."""
    shutil.copytree(finished.run_dir, dst)
    for ckpt in list_checkpoints(dst / "checkpoints"):
        state = json.loads((ckpt / "state.json").read_text())["run_state"]
        if state["stage_done"] or state["stage_state"]["step"] > 6:
            shutil.rmtree(ckpt)
    shutil.rmtree(dst / "experts")
    (dst / "results.json").unlink()
    return sorted((dst / "checkpoints").iterdir())


def adapter(run_dir):
    return load_file(str(run_dir / "experts" / "default" / "adapter_model.safetensors"))


@pytest.mark.parametrize("cut", ["weights.safetensors", "optimizer.pt", "rng.safetensors", "state.safetensors",
                                 "state.json"])
def test_a_cut_file_in_the_newest_checkpoint_resumes_from_the_one_before(finished, tmp_path, capsys, cut):
    older, newest = killed_after_step_6(finished, tmp_path / "run")
    f = newest / cut
    whole = f.stat().st_size
    f.write_bytes(f.read_bytes()[:whole // 2])
    resumed = train("quickstart", out=tmp_path / "run", resume=True, show_progress=False)
    err = capsys.readouterr().err
    assert (f"warning: checkpoint {newest.name} is damaged ({cut} has {whole // 2} bytes, the manifest says "
            f"{whole}): resuming from {older.name}") in err
    a, b = adapter(finished.run_dir), adapter(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the steps after the older checkpoint, redone exactly
    assert resumed.results["matrix"] == finished.results["matrix"]


def test_a_changed_byte_is_caught_by_the_hash_and_no_intact_checkpoint_is_an_error(finished, tmp_path):
    checkpoints = killed_after_step_6(finished, tmp_path / "run")
    for ckpt in checkpoints:
        f = ckpt / "weights.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF  # same size, other bytes
        f.write_bytes(bytes(data))
        assert damage(ckpt) == "weights.safetensors does not match its SHA-256 in the manifest"
    with pytest.raises(UserError, match=r"--resume: no checkpoint in .* is intact \(ckpt-000002: weights\.safetensors "
                                        r"does not match .*; ckpt-000001: weights\.safetensors does not match"):
        train("quickstart", out=tmp_path / "run", resume=True, show_progress=False)


def test_the_manifest_lists_every_file_of_the_checkpoint(finished):
    ckpt = list_checkpoints(finished.run_dir / "checkpoints")[-1]
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    assert set(files) == {p.name for p in ckpt.iterdir()} - {MANIFEST}
    assert all(files[name]["bytes"] == (ckpt / name).stat().st_size for name in files)
    assert damage(ckpt) is None


def test_a_checkpoint_of_an_older_skillstream_is_refused_in_one_line(finished, tmp_path):
    """state.json as skillstream wrote it before run_state: the run's fields at its top level."""
    older, newest = killed_after_step_6(finished, tmp_path / "run")
    state = json.loads((newest / "state.json").read_text())
    old_layout = {**state.pop("run_state"), **state}
    (newest / "state.json").write_text(json.dumps(old_layout))
    write_manifest(newest)  # an intact checkpoint, only of the older layout
    with pytest.raises(UserError) as refused:
        train("quickstart", out=tmp_path / "run", resume=True, show_progress=False)
    assert str(refused.value) == (f"--resume: {newest} was written by an older skillstream (no run_state); "
                                  "start a new run with --out")
