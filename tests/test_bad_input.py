"""Bad input files stop a run with exit status 2 and one line naming the file and the place:
text that is not UTF-8 (every reader of a user's text files), a labels.json that repeats an
option, and a recipe path that is a folder; a bad recipe or run directory before torch, transformers and PEFT load."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, write_task_folder
from skillstream.config import SourceConfig, find_recipe, load_recipe
from skillstream.data.examples import load_examples
from skillstream.data.stream import read_stream
from skillstream.errors import UserError

LATIN1 = "caf\xe9 cr\xe8me".encode("latin-1")  # b"caf\xe9 ...": byte 3 (0xe9) does not start a UTF-8 sequence


def _one_error_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    return lines[0]


# -- 1. text that is not UTF-8: the file and the byte offset -------------------------------------

def _task_folder(tmp_path: Path) -> Path:
    rows = [{"sentence": "lovely", "label": "Good"}, {"sentence": "awful", "label": "Bad"}]
    return write_task_folder(tmp_path / "task", rows, rows, ["Good", "Bad"])


def _bad_recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"name: latin\ndescription: " + LATIN1 + b"\n")
    return path, lambda: load_recipe(path)


def _bad_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    line = b'{"prompt": "a", "completion": "b"}\n'
    path.write_bytes(line + b'{"prompt": "' + LATIN1 + b'", "completion": "b"}\n')
    return path, lambda: load_examples(SourceConfig(source=str(path)))


def _bad_json(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(b'[{"text": "' + LATIN1 + b'"}]')
    return path, lambda: load_examples(SourceConfig(source=str(path)))


def _bad_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_bytes(b"prompt,completion\n" + LATIN1 + b",b\n")
    return path, lambda: load_examples(SourceConfig(source=str(path)))


def _bad_labels(tmp_path):
    folder = _task_folder(tmp_path)
    (folder / "labels.json").write_bytes(b'["Good", "' + LATIN1 + b'"]')
    return folder / "labels.json", lambda: load_examples(SourceConfig(source=str(folder)))


def _bad_task_rows(tmp_path):
    folder = _task_folder(tmp_path)
    (folder / "test.json").write_bytes(b'[{"sentence": "' + LATIN1 + b'", "label": "Good"}]')
    return folder / "test.json", lambda: load_examples(SourceConfig(source=str(folder), split="test"))


def _bad_stream_yaml(tmp_path):
    root = tmp_path / "stream"
    _task_folder(root)
    (root / "stream.yaml").write_bytes(b"tasks: [task]\ninstructions: {task: " + LATIN1 + b"}\n")
    return root / "stream.yaml", lambda: read_stream(root)


@pytest.mark.parametrize("make", [_bad_recipe, _bad_jsonl, _bad_json, _bad_csv, _bad_labels, _bad_task_rows,
                                  _bad_stream_yaml], ids=lambda f: f.__name__[5:])
def test_a_file_that_is_not_utf8_is_named_with_its_byte_offset(tmp_path, make):
    path, read = make(tmp_path)
    offset = path.read_bytes().index(b"\xe9")  # the first byte that is not UTF-8
    with pytest.raises(UserError) as e:
        read()
    assert str(e.value).startswith(f"{path}: not valid UTF-8 at byte {offset} ")
    assert "0xe9" in str(e.value) and "\n" not in str(e.value)


def test_the_cli_reports_a_latin1_recipe_and_a_latin1_data_file_in_one_line_before_the_run_directory(tmp_path):
    recipe, _ = _bad_recipe(tmp_path)
    offset = recipe.read_bytes().index(b"\xe9")
    line = _one_error_line(run_cli("train", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path))
    assert line == f"error: {recipe}: not valid UTF-8 at byte {offset} (line 2, byte 0xe9); save the file as UTF-8"

    labels, _ = _bad_labels(tmp_path)
    offset = labels.read_bytes().index(b"\xe9")
    line = _one_error_line(run_cli("train", "quickstart", "--out", str(tmp_path / "run"), "--set", "model=tiny",
                                   "--set", "report_to=[]", "--set", f"data.stream={tmp_path}", cwd=tmp_path))
    assert line.startswith(f"error: {labels}: not valid UTF-8 at byte {offset} ")
    assert not (tmp_path / "run").exists()


# -- 2. a labels.json that repeats an option ----------------------------------------------------

def test_a_labels_json_that_lists_an_option_twice_is_rejected_naming_the_option(tmp_path):
    folder = _task_folder(tmp_path)
    (folder / "labels.json").write_text(json.dumps(["Good", "Bad", "Good"]))
    with pytest.raises(UserError, match=r"labels.json: option 'Good' is listed twice"):
        load_examples(SourceConfig(source=str(folder)))
    line = _one_error_line(run_cli("train", "quickstart", "--out", str(tmp_path / "run"), "--set", "model=tiny",
                                   "--set", "report_to=[]", "--set", f"data.stream={tmp_path}", cwd=tmp_path))
    assert line == f"error: {folder / 'labels.json'}: option 'Good' is listed twice; each option must appear once"
    assert not (tmp_path / "run").exists()


# -- 3. a recipe path that is a folder ----------------------------------------------------------

def test_a_bad_recipe_or_run_directory_is_refused_before_torch_transformers_and_peft_load(tmp_path):
    """The checks come first, so a typo costs a fraction of a second, not the seconds these take to import."""
    (tmp_path / "runs" / "quickstart").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart" / "config.yaml").write_text("name: quickstart\n")
    probe = ("import sys\nfrom skillstream.cli import main\nsys.argv = ['skillstream', *sys.argv[1:]]\n"
             "try:\n    main()\nexcept SystemExit as e:\n"
             "    print(e.code, [m for m in ('torch', 'transformers', 'peft') if m in sys.modules])")
    for args, message in [(["train", "missing.yaml"], "file not found"),
                          (["train", "quickstart", "--set", "train.lr=fast"], "train.lr"),
                          (["train", "quickstart"], "already exists"),
                          (["eval", "runs"], "not a run directory"),
                          (["generate", "runs", "list files"], "not a run directory")]:
        res = subprocess.run([sys.executable, "-c", probe, *args], cwd=tmp_path, capture_output=True, text=True)
        assert res.stdout.split("\n")[0] == "2 []" and message in res.stderr, (args, res.stdout, res.stderr)


def test_a_recipe_path_that_is_a_folder_is_called_a_folder(tmp_path):
    (tmp_path / "recipes.yaml").mkdir()
    line = _one_error_line(run_cli("train", str(tmp_path / "recipes.yaml"), "--out", str(tmp_path / "run"), cwd=tmp_path))
    assert line.startswith(f"error: recipe '{tmp_path / 'recipes.yaml'}': is a folder, not a recipe file")
    assert "not found" not in line
    # a finished run directory: its recipe is named
    run = tmp_path / "runs" / "mine"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("name: mine\n")
    with pytest.raises(UserError, match=rf"is a folder, not a recipe file .*; its recipe is {run / 'config.yaml'}$"):
        find_recipe(run)


def test_a_bundled_recipe_name_still_works_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "quickstart").mkdir()  # e.g. `--out quickstart` of an earlier run
    monkeypatch.chdir(tmp_path)
    assert find_recipe("quickstart").name == "quickstart.yaml"
