"""Bad input to the dragon_hatching curriculum, through the CLI as a user meets it: a stage whose
weights do not sum to a positive number, an unknown task name, or stages that cover zero steps
get one line on stderr, exit status 2, and no run directory."""
from __future__ import annotations

import pytest

from conftest import run_cli
from skillstream.config import list_recipes, load_recipe


def _bad_cli(tmp_path, *sets: str) -> str:
    args = [a for s in ("report_to=[]", *sets) for a in ("--set", s)]
    res = run_cli("train", "dragon_hatching", "--out", str(tmp_path / "run"), *args, cwd=tmp_path, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr
    assert not (tmp_path / "run").exists(), "bad input must leave no run directory"
    return lines[0]


def _bad(tmp_path, *sets: str) -> str:
    """The same checks in-process (the CLI turns this UserError into one line and exit status 2, as
    the two CLI tests below show), so the suite does not start a process per case."""
    from skillstream.config import parse_override
    from skillstream.errors import UserError
    from skillstream.run import train

    overrides = dict(parse_override(s) for s in ("report_to=[]", *sets))
    with pytest.raises(UserError) as err:
        train("dragon_hatching", out=tmp_path / "run", overrides=overrides, show_progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists(), "bad input must leave no run directory"
    return str(err.value)


def test_through_the_cli_a_weight_of_inf_is_one_line_and_status_2(tmp_path):
    assert "stages.1.data.train.0.weight" in _bad_cli(tmp_path, "stages.1.data.train.0.weight=.inf")


def test_through_the_cli_zero_steps_is_one_line_and_status_2(tmp_path):
    line = _bad_cli(tmp_path, "train.steps=0")
    assert "zero training steps" in line and "text_coherence: 0" in line and "full_multitask: 0" in line


@pytest.mark.parametrize("weight", ["0", "-1", ".nan"])
def test_stage_weights_that_do_not_sum_to_a_positive_number(tmp_path, weight):
    line = _bad(tmp_path, f"stages.1.data.train.0.weight={weight}")
    assert "stages.1.data.train.0.weight" in line


def test_stage_without_sources(tmp_path):
    assert "data.train is empty" in _bad(tmp_path, "stages.0.data.train=[]")


@pytest.mark.parametrize("key", ["stages.2.data.train.1.source", "data.eval.0.source"])
def test_unknown_task_name(tmp_path, key):
    assert "'no_such_task'" in _bad(tmp_path, f"{key}=no_such_task")


def test_zero_steps_through_stage_overrides_too(tmp_path):
    line = _bad(tmp_path, "train.steps=0", "stages.3.train={steps: 0}")
    assert "zero training steps" in line


def test_some_zero_step_stages_are_fine_and_bundled_recipes_load():
    cfg = load_recipe("dragon_hatching", {"train.steps": 0, "stages.3.train": {"steps": 5}})
    assert [s.train.steps for s in cfg.resolved_stages()] == [0, 0, 0, 5]
    for name, _ in list_recipes():
        load_recipe(name)
