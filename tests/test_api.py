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
