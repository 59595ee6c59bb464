"""Swappable parts named in a recipe: a short name from a registry, or a dotted path.

    objective: dpo                                   # a registered name
    objective: {name: dpo, beta: 0.1}                # with keyword arguments
    plugins: [{name: mypkg.plugins:MyPlugin, k: 1}]  # anything importable (torchtune's _component_)

An objective must subclass skillstream.objectives.base.Objective and a plugin skillstream.plugins.Plugin:
the engine calls every part of their contract, never probing for one.

Registries are plain dicts of name -> "module:attr" strings, imported only when used, so a
recipe that never names PPO never imports it.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any

from .errors import UserError

OBJECTIVES = {
    "lm": "skillstream.objectives.lm:LMObjective",
    "sft": "skillstream.objectives.lm:LMObjective",
    "dpo": "skillstream.objectives.dpo:DPOObjective",
    "ppo": "skillstream.objectives.ppo:PPOObjective",
}
PLUGINS: dict[str, str] = {
    "auto_curriculum": "skillstream.curriculum.auto:AutoCurriculum",
    "monitor": "skillstream.monitor.alerts:Monitor",
    "bdh_monitor": "skillstream.monitor.alerts:Monitor",
    "best_final": "skillstream.checkpoint_plugin:BestFinalCheckpoints",
    "ewc": "skillstream.continual.ewc:EWC",
    "replay": "skillstream.continual.replay:Replay",
    "generative_replay": "skillstream.continual.generative_replay:GenerativeReplay",
    "neuromod": "skillstream.continual.neuromod:Neuromodulation",
    "early_stop": "skillstream.continual.early_stop:EarlyStopping",
    "preference_eval": "skillstream.objectives.preference_eval:PreferenceEval",
}
# Data builders: functions run at the start of a stage on the current model to write a source
# file (`data.train[].build`); called as fn(out_path, model=, tokenizer=, renderer=, recipe=, **kwargs).
BUILDERS = {
    "verifier_pairs": "skillstream.objectives.preference_pairs:verifier_pairs",
    "toolformer": "skillstream.tools.toolformer_chats:toolformer_chats",
}
# model name -> builder(seed=..., **model.args) -> (model, tokenizer), for models that are not
# Hugging Face causal LMs loaded by id or path (those need no entry).
MODELS: dict[str, str] = {
    "bdh": "skillstream.models.bdh_lm:build_bdh",
    "bdh-spiking": "skillstream.models.bdh_lm:build_spiking_bdh",
}


def resolve(name: str, registry: dict[str, str], what: str) -> Any:
    target = registry.get(name, name)
    module, _, attr = target.replace(":", ".").rpartition(".") if ":" not in target else target.partition(":")
    if not module:
        known = ", ".join(sorted(registry))
        raise UserError(f"{what} {name!r}: unknown (known: {known}; or give module:Class)")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{what} {name!r}: cannot import {target} ({e})") from None


def build(spec, registry: dict[str, str], what: str, base: type, **context):
    """Instantiate a component from a ComponentConfig; `context` passes run objects (tokenizer...).
    `base`: the contract class the component must subclass (Objective, Plugin), so the engine can
    call every part of it without probing."""
    cls = resolve(spec.name, registry, what)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        shown = cls.__name__ if isinstance(cls, type) else repr(cls)
        raise UserError(f"{what} {spec.name!r}: {shown} must subclass {base.__module__}.{base.__qualname__}")
    if inspect.isabstract(cls):  # a required part left out: say which, before anything runs
        raise UserError(f"{what} {spec.name!r}: {cls.__name__} does not define "
                        f"{', '.join(sorted(cls.__abstractmethods__))} (required by {base.__qualname__})")
    kwargs = dict(spec.model_extra or {})
    try:
        return cls(**kwargs, **context) if context else cls(**kwargs)
    except TypeError as e:
        raise UserError(f"{what} {spec.name!r}: bad arguments {sorted(kwargs)} ({e})") from None
