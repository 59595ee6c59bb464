"""A complete objective in one file, as a user would write one: named in a recipe by dotted path,

    objective: {name: toy_objective:ToyObjective, weight: 0.5}

it defines the four required parts and inherits every optional one (tests/test_extension.py).
"""
from skillstream.data.batching import collate
from skillstream.objectives.base import Objective


class ToyObjective(Objective):
    """`weight` times the model's own next-token cross-entropy, which it also logs."""

    name = "toy"

    def __init__(self, weight: float = 1.0, **context):
        self.weight = weight

    def tokenize(self, example, renderer):
        return renderer.tokenize(example)

    def collate(self, items, pad_id: int):
        return collate(items, pad_id)

    def __call__(self, model, batch):
        cross_entropy = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
        return self.weight * cross_entropy, {"toy/cross_entropy": cross_entropy.item()}, None


class NotAnObjective:
    """Not a subclass of Objective: a recipe naming it is refused before anything trains."""

    name = "not_an_objective"

    def __init__(self, **context):
        pass


class IncompleteObjective(Objective):
    """Leaves out collate and __call__: a recipe naming it is refused in one line naming them."""

    name = "incomplete"

    def tokenize(self, example, renderer):
        return renderer.tokenize(example)
