"""skillstream: teach a language model skill after skill.

    import skillstream
    run = skillstream.train("quickstart", overrides={"model": "tiny"}, smoke=True)
    model = skillstream.load(run.run_dir)
    print(model.generate("find all .log files under /var"))
"""
__version__ = "0.1.0"


def train(recipe="quickstart", **kwargs):
    """Train a recipe (bundled name, YAML path or dict); returns a `Run`. See `skillstream.run.train`."""
    from .run import train as _train
    return _train(recipe, **kwargs)


def load(run_dir, expert=None):
    """The trained model of a run directory: `.generate(prompt)`, `.evaluate()`. `expert`: the adapter that
    answers (default: the run's only one; a skill-stream run's router picks per input)."""
    from .trained import load as _load
    return _load(run_dir, expert)
