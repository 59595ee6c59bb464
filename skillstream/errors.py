"""The one error type users see: bad input, reported as a single line (CLI exit status 2)."""


class UserError(Exception):
    """Bad input from the user: a recipe key, a data file row, a run directory.

    The message must be one line that names what is wrong and what was expected,
    e.g. ``data/train.jsonl line 7: missing column 'prompt'``.
    """


class TrainingDiverged(Exception):
    """A run that stopped because its numbers went bad (CLI exit status 3): one line saying which
    steps, what was kept, and what `--resume` would do."""
