"""A complete plugin in one file: named in a recipe as `plugins: [{name: toy_plugin:StepCounter}]`
(tests/test_extension.py)."""
from skillstream.plugins import Plugin, StepContext


class StepCounter(Plugin):
    """Logs how many optimizer steps it has seen, across stages and resumes."""

    name = "step_counter"

    def __init__(self, **context):
        self.steps = 0

    def after_step(self, ctx: StepContext, metrics: dict) -> dict:
        self.steps += 1
        return {"toy/steps_seen": self.steps}

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state.get("steps", 0)
