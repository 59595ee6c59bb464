"""Turn rows of any source into `Example`s: prompt/completion, chat messages (with tool calls and
a `tools` column), plain text, classification, or preference pairs (TRL's prompt/chosen/rejected,
plain or conversational, explicit or implicit prompt). Checks every row; a bad one stops the run
with one line naming it."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import SourceConfig
from ..errors import UserError
from .builtin import BUILTINS, builtin_source
from .readers import Row, read_file, read_split, read_text
from .stream import GENERIC_INSTRUCTION
from .tool_chat import check_tool_calls, check_tools


@dataclass
class Example:
    kind: str                                   # prompt_completion | messages | text | classification | preference
    prompt: str = ""                            # the user's request (before chat templating)
    completion: str = ""                        # the target answer
    messages: list[dict] | None = None          # chat conversation (kind == messages)
    text: str = ""                              # kind == text
    options: list[str] | None = None            # classification options, in labels.json order
    references: list[str] = field(default_factory=list)  # acceptable answers for generative metrics
    instruction: str | None = None
    where: str = ""
    tools: list[dict] | None = None             # JSON-Schema function descriptions (tool-calling chats)
    chosen: str | list[dict] | None = None      # kind == preference: the preferred continuation
    rejected: str | list[dict] | None = None    # ... and the dispreferred one (prompt in prompt / messages)
    meta: dict = field(default_factory=dict)    # extra row fields a metric needs (tool_call: functions, ground_truth, category)


def is_task_folder(path: Path) -> bool:
    return path.is_dir() and (path / "labels.json").is_file()


def _mapped(row: Row, columns: dict[str, str], needed: list[str]) -> dict:
    out = dict(row.data)
    for ours, theirs in columns.items():
        if theirs not in row.data:
            raise UserError(f"{row.where}: missing column {theirs!r} (mapped to {ours!r}); has {sorted(row.data)}")
        out[ours] = row.data[theirs]
    for name in needed:
        if name not in out or out[name] is None:
            raise UserError(f"{row.where}: missing column {name!r}; has {sorted(row.data)} (map yours with columns: {{{name}: YOUR_COLUMN}})")
    return out


def _detect_format(row: Row, columns: dict[str, str]) -> str:
    keys = set(row.data) | set(columns)
    for fmt, needed in (("preference", {"chosen", "rejected"}), ("messages", {"messages"}), ("prompt_completion", {"prompt", "completion"}), ("text", {"text"})):
        if needed <= keys:
            return fmt
    raise UserError(f"{row.where}: cannot tell the format from columns {sorted(row.data)}; "
                    "expected 'messages', 'prompt'+'completion', 'chosen'+'rejected' or 'text' (or set format/columns)")


def _classification(folder: Path, src: SourceConfig) -> list[Example]:
    path, rows, options, bad = _classification_rows(folder, src)
    if bad and src.invalid_labels != "skip":
        row, label = bad[0]
        raise UserError(f"{row.where}: label {label!r} is not one of the options {options} in labels.json "
                        "(set data.invalid_labels=skip to skip such rows, counted and reported)")
    if bad:  # skipped on request: counted and reported, never silently
        info = _skip_info(str(path), len(rows), bad)
        shown = ", ".join(info["items"][:5]) + (", ..." if len(bad) > 5 else "")
        print(f"warning: {info['file']}: skipped {len(bad)} of {len(rows)} rows whose label is not in labels.json "
              f"({shown}; data.invalid_labels=skip)", file=sys.stderr, flush=True)
    skip = {id(row) for row, _ in bad}
    return [Example("classification", prompt=str(data["sentence"]), completion=label, options=options,
                    references=[label], instruction=src.instruction or GENERIC_INSTRUCTION, where=row.where)
            for row, data, label in rows if id(row) not in skip]


def _classification_rows(folder: Path, src: SourceConfig) -> tuple[Path, list, list[str], list]:
    """(split file, [(row, mapped data, label)], options, [(row, label) whose label is not an option])."""
    labels_path = folder / "labels.json"
    try:
        options = json.loads(read_text(labels_path))
    except json.JSONDecodeError as e:
        raise UserError(f"{labels_path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
        raise UserError(f"{labels_path}: expected a non-empty JSON list of option strings")
    repeated = next((o for i, o in enumerate(options) if o in options[:i]), None)
    if repeated is not None:  # a repeated option would be scored twice and skew option scoring
        raise UserError(f"{labels_path}: option {repeated!r} is listed twice; each option must appear once")
    path = folder / f"{src.split}.json"
    if not path.is_file():
        raise UserError(f"{folder}: missing {src.split}.json (a task folder has train.json, test.json, labels.json)")
    rows = []
    for row in read_file(path):
        data = _mapped(row, src.columns, ["sentence", "label"])
        rows.append((row, data, str(data["label"])))
    return path, rows, options, [(row, label) for row, _, label in rows if label not in options]


def _skip_info(file: str, n_rows: int, bad: list) -> dict:
    items = [row.where[len(file):].strip() for row, _ in bad]  # "item 56" (JSON) / "line 57" (JSONL)
    return {"file": file, "skipped": len(bad), "rows": n_rows, "items": items[:20],
            "labels": sorted({label for _, label in bad})}


def skipped_rows(cfg) -> dict[str, dict]:
    """{file: {skipped, rows, items (first 20), labels}} of the classification files a recipe reads
    whose rows it skips under `invalid_labels: skip` (results.json's `skipped_rows`)."""
    out = {}
    for _, data, _, _ in cfg.resolved_stages():
        for src in [*data.train, *data.eval]:
            folder = Path(src.source)
            if src.invalid_labels != "skip" or src.build or builtin_source(src.source) or not (
                    is_task_folder(folder) or src.format == "classification"):
                continue
            path, rows, _, bad = _classification_rows(folder, src)
            if bad:
                out[str(path)] = _skip_info(str(path), len(rows), bad)
    return out


def _from_row(row: Row, src: SourceConfig, fmt: str, instruction: str | None) -> Example:
    if fmt == "messages":
        data = _mapped(row, src.columns, ["messages"])
        msgs = data["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise UserError(f"{row.where}: 'messages' must be a list of {{role, content}} objects")
        if not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{row.where}: 'messages' has no assistant turn to learn from")
        tools = check_tools(data["tools"], row.where) if data.get("tools") not in (None, "") else None
        check_tool_calls(msgs, tools, row.where)
        meta = {k: data[k] for k in META_FIELDS if k in data}
        return Example("messages", messages=msgs, where=row.where, tools=tools, meta=meta)
    if fmt == "preference":
        return _preference(_mapped(row, src.columns, ["chosen", "rejected"]), row.where)
    if fmt == "text":
        data = _mapped(row, src.columns, ["text"])
        return Example("text", text=str(data["text"]), where=row.where)
    data = _mapped(row, src.columns, ["prompt", "completion"])
    refs = data.get("references") or [str(data["completion"])]
    return Example("prompt_completion", prompt=str(data["prompt"]), completion=str(data["completion"]),
                   references=[str(r) for r in refs], instruction=instruction, where=row.where,
                   meta={k: data[k] for k in META_FIELDS if k in data})


META_FIELDS = ("functions", "ground_truth", "category", "id", "tests", "entry_point")


def _messages_of(value, where: str, what: str) -> list[dict]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) and "role" in m for m in value):
        raise UserError(f"{where}: {what!r} must be a list of {{role, content}} messages (conversational) "
                        "or a string (plain), like the other columns of the row")
    return value


def _preference(data: dict, where: str) -> Example:
    """TRL's preference format: prompt + chosen + rejected, all strings (plain) or all messages
    (conversational); without a prompt, conversational chosen/rejected share it as a prefix."""
    chosen, rejected, prompt = data["chosen"], data["rejected"], data.get("prompt")
    tools = check_tools(data["tools"], where) if data.get("tools") not in (None, "") else None
    meta = {k: data[k] for k in META_FIELDS if k in data}
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise UserError(f"{where}: plain preference rows need a string 'prompt' (got {type(prompt).__name__})")
        if chosen == rejected:
            raise UserError(f"{where}: 'chosen' and 'rejected' are identical; a pair must differ")
        return Example("preference", prompt=prompt, chosen=chosen, rejected=rejected, where=where, tools=tools, meta=meta)
    chosen, rejected = _messages_of(chosen, where, "chosen"), _messages_of(rejected, where, "rejected")
    if prompt is None:  # implicit prompt: the messages chosen and rejected share
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    prompt = _messages_of(prompt, where, "prompt")
    if chosen == rejected:
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical; a pair must differ")
    for what, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise UserError(f"{where}: {what!r} must end with an assistant message")
        check_tool_calls(prompt + msgs, tools, where)
    return Example("preference", messages=prompt, chosen=chosen, rejected=rejected, where=where, tools=tools, meta=meta)


def load_examples(src: SourceConfig) -> list[Example]:
    """All examples of one source's split; raises UserError on an empty split or a bad row."""
    builtin = builtin_source(src.source)
    if builtin:
        (reader, instruction, _), arg = builtin
        rows = reader(src.split, arg) if arg is not None else reader(src.split)
        fmt = src.format if src.format != "auto" else _detect_format(rows[0], src.columns) if rows else "text"
        examples = [_from_row(r, src, fmt, src.instruction or instruction) for r in rows]
    elif is_task_folder(Path(src.source)) or src.format == "classification":
        examples = _classification(Path(src.source), src)
    else:
        rows = read_split(src.source, src.split)
        if not rows:
            raise UserError(f"{src.source}: split {src.split!r} is empty")
        fmt = src.format if src.format != "auto" else _detect_format(rows[0], src.columns)
        examples = [_from_row(r, src, fmt, src.instruction) for r in rows]
    if not examples:
        raise UserError(f"{src.source}: split {src.split!r} is empty")
    if src.offset >= len(examples):
        raise UserError(f"{src.source}: offset {src.offset} leaves no examples (split {src.split!r} has {len(examples)})")
    examples = examples[src.offset:]
    return examples[: src.limit] if src.limit else examples


def default_metric(src: SourceConfig, examples: list[Example]) -> str:
    builtin = builtin_source(src.source)
    if builtin:
        return builtin[0][2]
    kind = examples[0].kind
    return {"classification": "accuracy", "text": "perplexity", "messages": "perplexity",
            "preference": "preference"}.get(kind, "exact_match")
