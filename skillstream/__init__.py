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


def load(run_dir, expert="default"):
    """The trained model of a run directory: `.generate(prompt)`, `.evaluate()`."""
    from .trained import load as _load
    return _load(run_dir, expert)
