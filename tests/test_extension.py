"""A new objective or plugin is one file named in a recipe by dotted path (module:Class)."""
import json

import pytest

import skillstream
from skillstream.errors import UserError


def _smoke(tmp_path, **overrides):
    """quickstart on the tiny model: 3 steps, every one logged."""
    return skillstream.train("quickstart", out=tmp_path / "run", smoke=True, show_progress=False,
                             overrides={"model": "tiny", "report_to": [], **overrides})


def test_a_toy_objective_and_plugin_from_test_modules_train_in_a_recipe(tmp_path):
    run = _smoke(tmp_path, objective={"name": "toy_objective:ToyObjective", "weight": 0.5},
                 plugins=[{"name": "toy_plugin:StepCounter"}])
    records = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:  # the loss is the toy's: half its cross-entropy; the plugin saw every step
        assert r["loss"] == pytest.approx(0.5 * r["toy/cross_entropy"], rel=1e-6)
        assert r["toy/steps_seen"] == r["step"]


@pytest.mark.parametrize("key, value, message", [
    ("objective", "toy_objective:NotAnObjective",
     "objective 'toy_objective:NotAnObjective': NotAnObjective must subclass skillstream.objectives.base.Objective"),
    ("objective", "toy_objective:IncompleteObjective",
     "objective 'toy_objective:IncompleteObjective': IncompleteObjective does not define __call__, collate "
     "(required by Objective)"),
    ("plugins", [{"name": "toy_objective:ToyObjective"}],
     "plugin 'toy_objective:ToyObjective': ToyObjective must subclass skillstream.plugins.Plugin"),
])
def test_a_class_that_breaks_the_contract_is_refused_in_one_line(tmp_path, key, value, message):
    with pytest.raises(UserError) as refused:
        _smoke(tmp_path, **{key: value})
    assert str(refused.value) == message
