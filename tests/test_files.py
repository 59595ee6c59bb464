"""skillstream.files: whole-file writes, cache folders built once, installed packages' folders."""
import os

import pytest

from skillstream.errors import UserError
from skillstream.files import build_folder, package_dir, write_atomic, write_jsonl


def test_write_atomic_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    write_atomic(path, "néw")
    write_atomic(tmp_path / "weights.bin", b"\x00\x01")
    assert path.read_text(encoding="utf-8") == "néw" and (tmp_path / "weights.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "weights.bin"]
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert path.stat().st_mode == plain.stat().st_mode  # a plain file's permissions, not a private temp file's


def test_write_atomic_that_fails_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    with pytest.raises(TypeError):
        write_atomic(path, None)  # neither text nor bytes: fails after the temporary file is made
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_write_jsonl_makes_the_folder_and_keeps_non_ascii_text(tmp_path):
    write_jsonl(tmp_path / "a" / "rows.jsonl", [{"t": "é"}, {"t": 1}])
    assert (tmp_path / "a" / "rows.jsonl").read_text(encoding="utf-8") == '{"t": "é"}\n{"t": 1}\n'


def test_build_folder_builds_once_and_a_failed_build_leaves_nothing(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "f").write_text("built")

    target = tmp_path / "cache" / "thing"
    assert build_folder(target, build) == target and build_folder(target, build) == target
    assert len(calls) == 1 and (target / "f").read_text() == "built" and (target / ".complete").is_file()
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~_umask())

    def broken(folder):
        (folder / "half").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_folder(tmp_path / "cache" / "other", broken)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["thing"]


def test_package_dir_finds_an_installed_package_and_says_how_to_install_a_missing_one():
    assert (package_dir("yaml", "pyyaml==6", "a test") / "__init__.py").is_file()
    with pytest.raises(UserError, match=r"^a test needs the package no-such-pkg \(pip install --no-deps no-such-pkg==1\.0\)$"):
        package_dir("no_such_pkg_zq", "no-such-pkg==1.0", "a test")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
