"""The Python API the CLI is built on: train a recipe, load the run, generate and evaluate."""
import skillstream


def test_train_load_generate_evaluate(tmp_path):
    run = skillstream.train("quickstart", out=tmp_path / "run", smoke=True, show_progress=False,
                            overrides={"model": "tiny", "report_to": []})
    assert run.results["tasks"] == ["nl2bash"]
    model = skillstream.load(run.run_dir)
    assert isinstance(model.generate("list all files", max_new_tokens=4), str)
    scores = model.evaluate()["tasks"]["nl2bash"]
    assert scores["score"] == run.results["matrix"][-1][0]   # same model, same data, same number


def test_full_weight_training_without_lora(tmp_path):
    """lora: null trains the backbone itself and saves it as model/model.safetensors."""
    run = skillstream.train("quickstart", out=tmp_path / "run", smoke=True, show_progress=False,
                            overrides={"model": {"name": "tiny", "freeze_backbone": False}, "lora": None,
                                       "report_to": []})
    assert (run.run_dir / "model" / "model.safetensors").exists() and not (run.run_dir / "experts").exists()
    model = skillstream.load(run.run_dir)
    assert model.evaluate()["tasks"]["nl2bash"]["score"] == run.results["matrix"][-1][0]


def test_lora_null_with_a_frozen_backbone_is_refused(tmp_path):
    import pytest
    from skillstream.errors import UserError
    with pytest.raises(UserError, match="freeze_backbone: false"):
        skillstream.train("quickstart", out=tmp_path / "run", smoke=True, overrides={"model": "tiny", "lora": None})
