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


def test_the_accelerate_internals_train_resets_are_still_there():
    """train() clears accelerate's process-wide state (AcceleratorState._shared_state, _reset_state) so
    that a second train() in one process may pick another precision; accelerate has no public way. An
    accelerate upgrade that renames them must fail here, not in a user's second run."""
    import accelerate
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    where = f"accelerate {accelerate.__version__}"
    assert isinstance(AcceleratorState._shared_state, dict), f"{where}: AcceleratorState._shared_state is gone"
    Accelerator(mixed_precision="bf16", cpu=True)
    assert AcceleratorState._shared_state, f"{where}: an Accelerator no longer fills AcceleratorState._shared_state"
    AcceleratorState._reset_state(True)
    assert not AcceleratorState._shared_state, f"{where}: AcceleratorState._reset_state(True) no longer clears it"
    assert Accelerator(mixed_precision="no", cpu=True).mixed_precision == "no"  # another precision, same process
    AcceleratorState._reset_state(True)
