"""Recipes: bundled names, dotted overrides, and one-line errors that name the key."""
import pytest

from skillstream.config import load_recipe, parse_override
from skillstream.errors import UserError


def test_bundled_recipe_with_overrides():
    cfg = load_recipe("quickstart", {"model": "tiny", "train.lr": 1e-3, "lora.target_modules": ["q_proj", "v_proj"]})
    assert cfg.model.name == "tiny" and cfg.train.lr == 1e-3 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.trust_remote_code is False and cfg.model.freeze_backbone is True


def test_override_values_are_read_as_yaml():
    assert parse_override("train.steps=7") == ("train.steps", 7)
    assert parse_override("train.bf16=false") == ("train.bf16", False)


def test_smoke_shrinks_every_stage():
    [stage] = load_recipe("quickstart", smoke=True).resolved_stages()
    assert stage.train.steps <= 3 and stage.data.train[0].limit <= 8 and stage.data.eval[0].limit <= 4
    assert stage.objective.name == "lm"


@pytest.mark.parametrize("override, message", [
    ({"train.lr": "fast"}, "train.lr: Input should be a valid number"),
    ({"train.stepz": 3}, "train.stepz: Extra inputs are not permitted"),
    ({"train.schedule": "zigzag"}, "train.schedule"),
])
def test_bad_keys_are_named(override, message):
    with pytest.raises(UserError, match=message):
        load_recipe("quickstart", override)


def test_unknown_recipe_lists_the_bundled_ones():
    with pytest.raises(UserError, match="bundled: .*quickstart"):
        load_recipe("no-such-recipe")


def test_the_benchmark_streams_are_valid_recipes_whose_test_splits_are_scored_whole():
    from pathlib import Path

    from skillstream.data.examples import load_examples
    streams = sorted((Path(__file__).parent.parent / "bench" / "streams").glob("*.yaml"))
    assert streams
    for path in streams:
        cfg = load_recipe(path)
        assert cfg.experts is not None and len(cfg.stages) >= 2, path
        for task in cfg.data.eval:  # whole test splits: a limit is the split's size, not a sample of it
            assert task.split == "test" and task.limit == len(load_examples(task.model_copy(update={"limit": None}))), (path, task.name)
