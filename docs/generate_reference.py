"""Write docs/config.md, the recipe reference, from the pydantic models in skillstream/config.py.

    .venv/bin/python docs/generate_reference.py           # rewrite docs/config.md
    .venv/bin/python docs/generate_reference.py --check   # exit 1 if docs/config.md is out of date

Each model class gives one section and each field one row: name, type (with its bounds), default
and the field's own `description`. Nothing is written by hand, so the reference changes only when
config.py does; tests/test_docs.py regenerates it in memory and compares.

This lives in docs/ and not in the package: it is a build step for the documentation, not
something a training run or the CLI needs.
"""
from __future__ import annotations

import inspect
import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "config.md"

if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))


def _models(module) -> list[type[BaseModel]]:
    """The module's own pydantic models: RecipeConfig and the sections it reaches, in the order its
    fields name them (what a reader follows), then any other model in source order."""
    own = [c for c in vars(module).values()
           if inspect.isclass(c) and issubclass(c, BaseModel) and c.__module__ == module.__name__
           and not c.__name__.startswith("_")]
    order: list[type[BaseModel]] = []

    def visit(cls):
        if cls in order or cls not in own:
            return
        order.append(cls)
        for f in cls.model_fields.values():
            for sub in _model_args(f.annotation):
                visit(sub)

    if hasattr(module, "RecipeConfig"):
        visit(module.RecipeConfig)
    rest = sorted((c for c in own if c not in order), key=lambda c: inspect.getsourcelines(c)[1])
    for cls in rest:
        visit(cls)
    return order


def _model_args(tp) -> list[type[BaseModel]]:
    """Pydantic model classes inside an annotation (list[StageConfig] -> [StageConfig])."""
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _model_args(a)]


def _paths(root: type[BaseModel]) -> dict[type[BaseModel], list[str]]:
    """Where each section sits in a recipe, shortest paths first: {DataConfig: ['data', 'stages[].data'], ...}.
    A section's own keys are listed under its first path only (stages[].data.train[] is data.train[]'s)."""
    found: dict[type[BaseModel], list[str]] = {}
    queue: list[tuple[type[BaseModel], str]] = [(root, "")]
    expanded = {root}
    while queue:
        cls, prefix = queue.pop(0)
        for name, f in cls.model_fields.items():
            list_like = typing.get_origin(f.annotation) is list or any(
                typing.get_origin(a) is list for a in typing.get_args(f.annotation))
            for sub in _model_args(f.annotation):
                path = f"{prefix}{name}" + ("[]" if list_like else "")
                if path not in found.setdefault(sub, []):
                    found[sub].append(path)
                if sub not in expanded:
                    expanded.add(sub)
                    queue.append((sub, path + "."))
    return found


def _anchor(cls) -> str:
    return cls.__name__.lower()


def fmt_type(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is typing.Any:
        return "any"
    if inspect.isclass(tp) and issubclass(tp, BaseModel):
        return f"[{tp.__name__}](#{_anchor(tp)})"
    if origin is typing.Literal:
        return " \\| ".join(f"`{fmt_value(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(fmt_type(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(fmt_type(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if inspect.isclass(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def fmt_value(v) -> str:
    """A value as a recipe would spell it (YAML flow style)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v if v else '""'
    if isinstance(v, BaseModel):  # only what the factory sets; the rest is that section's defaults
        return fmt_value({k: getattr(v, k) for k in type(v).model_fields if k in v.model_fields_set})
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt_value(x)}" for k, x in v.items()) + "}"
    return repr(v)


_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def _bounds(field) -> list[str]:
    out = []
    for m in field.metadata:
        for attr, sign in _BOUNDS:
            if getattr(m, attr, None) is not None:
                out.append(f"{sign} {fmt_value(getattr(m, attr))}")
        if getattr(m, "allow_inf_nan", None) is False:
            out.append("finite")
    return out


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel) and not value.model_fields_set:
            return f"{type(value).__name__} defaults"
        return f"`{fmt_value(value)}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{fmt_value(field.default)}`"


def _description(cls, name) -> str:
    """The field's description, or the one a base class gives the same field (a subclass that only
    changes the default, like EvalTaskConfig.split, keeps its meaning)."""
    for base in cls.__mro__:
        f = getattr(base, "model_fields", {}).get(name) if isinstance(base, type) and issubclass(base, BaseModel) else None
        if f is not None and f.description:
            return f.description
    return ""


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _table(cls) -> list[str]:
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, f in cls.model_fields.items():
        tp = fmt_type(f.annotation)
        bounds = _bounds(f)
        if bounds:
            tp += ", " + ", ".join(bounds)
        desc = _description(cls, name) or "—"
        rows.append(f"| `{name}` | {tp} | {_default(f)} | {_cell(desc)} |")
    return rows


def generate() -> str:
    from skillstream import config

    models = _models(config)
    paths = _paths(config.RecipeConfig) if hasattr(config, "RecipeConfig") else {}
    lines = [
        "# Recipe reference",
        "",
        "<!-- Generated by docs/generate_reference.py from skillstream/config.py; do not edit by hand. -->",
        "",
        "Every key a recipe accepts, generated from the pydantic models in "
        "[skillstream/config.py](../skillstream/config.py) (their field descriptions), so it changes only when "
        "that file does. Regenerate with `.venv/bin/python docs/generate_reference.py`; "
        "`tests/test_docs.py` fails while this page is out of date.",
        "",
        "Any key can be overridden on the command line with `--set key.path=value` (the value is read as YAML; "
        "a number indexes a list: `--set data.train.0.limit=100`). How recipes, data and overrides work: "
        "[recipes.md](recipes.md). Unknown keys are refused (every section but a component's keyword arguments).",
        "",
        "Sections:",
        "",
    ]
    for cls in models:
        where = ", ".join(f"`{p}`" for p in paths.get(cls, [])) or (
            "the recipe file itself" if cls.__name__ == "RecipeConfig" else "not reached from a recipe")
        lines.append(f"- [{cls.__name__}](#{_anchor(cls)}) — {where}")
    for cls in models:
        lines += ["", f"## {cls.__name__}", ""]
        where = paths.get(cls)
        if where:
            lines += ["Recipe key: " + ", ".join(f"`{p}`" for p in where) + ".", ""]
        doc = cls.__dict__.get("__doc__")
        if doc:
            lines += [" ".join(inspect.cleandoc(doc).split()), ""]
        if cls.model_config.get("extra") == "allow":
            lines += ["Further keys are allowed: they are passed to the component as keyword arguments.", ""]
        lines += _table(cls)
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = generate()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run .venv/bin/python docs/generate_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
