"""The sections of a run's report. Each returns a Section, or None when the run has no data for it:
a section is left out rather than drawn empty (a plain run has no router, novelty or curriculum).
"""
from __future__ import annotations

from html import escape
from typing import NamedTuple

from . import plots
from .rundata import RunData, fmt, numeric

MAIN_METRICS = [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tokens_per_s", "tokens/s")]
# keys that are bookkeeping, or drawn by a section of their own
NOT_PLOTTED = {"step", "global_step", "epoch", "stage", "stage_index"} | {k for k, _ in MAIN_METRICS}
OWN_SECTION = ("curriculum/weight/", "router/share/")


class Section(NamedTuple):
    id: str
    title: str
    body: str


def table(header: list[str], rows: list[list], cls: str = "") -> str:
    """An HTML table; every cell is escaped (cells come from logs and model outputs)."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "n/a"
    if seconds < 120:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60} h {m % 60:02d} m" if m >= 60 else f"{m} m {s:02d} s"


def bounds(run: RunData) -> list[tuple[float, str]]:
    return sorted((x, name) for name, x in run.offsets.items())


def series(run: RunData, key: str) -> dict[str, plots.Series]:
    """Values of one metric per stage, on the whole-run step axis."""
    out: dict[str, plots.Series] = {}
    for r in run.metrics:
        v = numeric(r.get(key))
        if v is not None:
            xs, ys = out.setdefault(str(r.get("stage")), ([], []))
            xs.append(run.global_step(r))
            ys.append(v)
    return out


def merged(run: RunData, key: str) -> plots.Series:
    xs, ys = [], []
    for sx, sy in series(run, key).values():
        xs += sx
        ys += sy
    return xs, ys


def _keys(run: RunData, prefix: str) -> list[str]:
    return list(dict.fromkeys(k for r in run.metrics for k in r if k.startswith(prefix)))


# ---- sections ------------------------------------------------------------------------------------

def summary(run: RunData) -> Section | None:
    r = run.results
    if not r or not r.get("matrix"):
        return None
    tasks, matrix = r["tasks"], r["matrix"]
    stage_names = [s["name"] for s in r.get("stages", [])]
    if len(stage_names) != len(matrix):
        stage_names = [f"stage {i + 1}" for i in range(len(matrix))]
    rows = ([("before training", r["initial"])] if r.get("initial") else []) + \
        [(f"after {n}", row) for n, row in zip(stage_names, matrix)]
    ci = r.get("ci95", {})
    cards = "".join(
        f'<div class="card"><div class="k">{label}</div><div class="v" data-metric="{key}">{fmt(r.get(key))}</div>'
        + (f'<div class="h" data-ci="{key}">95% interval [{fmt(ci[key][0])}, {fmt(ci[key][1])}]</div>' if ci.get(key) else "")
        + f'<div class="h">{escape(hint)}</div></div>'
        for label, key, hint in [("AvgAcc", "avg_acc", "mean of the last row"),
                                 ("BWT", "bwt", "backward transfer: < 0 is forgetting"),
                                 ("FWT", "fwt", "forward transfer: gain before training a task")])
    img = plots.heatmap([l for l, _ in rows], tasks, [row for _, row in rows], "accuracy matrix")
    metric = r.get("metric", {})
    n = r.get("n") or [None] * len(tasks)
    head = ["", *[f"{t} ({metric.get(t, '')}{'' if k is None else f', n={k}'})" for t, k in zip(tasks, n)]]
    evals = ([r["initial_details"]] if r.get("initial") else []) + (r.get("details") or [])
    if len(evals) != len(rows) or not all(len(ev) == len(tasks) for ev in evals):
        evals = [[{}] * len(tasks)] * len(rows)  # no rows beside the matrix: the scores alone
    tab = table(head, [[label, *[fmt(v) + _interval(ev[j]) for j, v in enumerate(row)]]
                       for (label, row), ev in zip(rows, evals)], "num")
    forgetting = r.get("forgetting")
    if forgetting and any(f is not None for f in forgetting):
        tab += table(["forgetting", *tasks], [["max earlier score − final", *[fmt(f) for f in forgetting]]], "num")
    learned = r.get("learned")
    if learned and len(learned) <= len(tasks):
        tab += table(["learned", *tasks[:len(learned)]],
                     [["after its own stage − before (paired 95%)", *[_learned(d) for d in learned]]], "num")
    tab += _other_scores(r, [label for label, _ in rows])
    note = "" if len(tasks) > 1 else \
        '<p class="note">One task: BWT and FWT need at least two tasks, so they are not defined.</p>'
    return Section("summary", "Accuracy matrix", f'<div class="cards">{cards}</div>{note}{img}{tab}')


def _learned(d: dict) -> str:
    """A task's gain from its own stage, its interval, and whether that interval excludes 0."""
    lo, hi = d["ci95"]
    return f"{fmt(d['difference'])} [{fmt(lo)}, {fmt(hi)}] {'excludes 0' if d['excludes_zero'] else 'includes 0'}"


def _interval(row: dict) -> str:
    """' [lo, hi]' after a score whose evaluation row has its 95% interval (evaluation/intervals.py)."""
    ci = row.get("score_ci95")
    return f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else ""


def _other_scores(r: dict, row_labels: list[str]) -> str:
    """Secondary per-task scores an evaluator reports beside the main one (e.g. bash 'structure')."""
    evals = ([r["initial_details"]] if r.get("initial_details") and r.get("initial") else []) + (r.get("details") or [])
    if len(evals) != len(row_labels):
        return ""
    rows = []
    for j, task in enumerate(r["tasks"]):
        metric = r.get("metric", {}).get(task)
        keys = dict.fromkeys(k for ev in evals if j < len(ev) for k, v in ev[j].items()
                             if isinstance(v, float) and k not in ("score", metric))
        for k in keys:
            rows.append([task, k, *[fmt(ev[j].get(k)) if j < len(ev) else "" for ev in evals]])
    return table(["task", "also measured", *row_labels], rows, "num") if rows else ""


def task_scores(run: RunData) -> Section | None:
    r = run.results
    if not r or not r.get("matrix"):
        return None
    names = [s["name"] for s in r.get("stages", [])]
    names = names if len(names) == len(r["matrix"]) else [f"stage {i + 1}" for i in range(len(r["matrix"]))]
    x = (["before"] if r.get("initial") else []) + [f"after {n}" for n in names]
    per_task = {t: ([r["initial"][j]] if r.get("initial") else []) + [row[j] for row in r["matrix"]]
                for j, t in enumerate(r["tasks"])}
    return Section("tasks", "Each task across stages",
                   plots.categorical_lines(x, per_task, "score of each task after each stage", "score"))


def training(run: RunData) -> Section | None:
    groups = {title: series(run, key) for key, title in MAIN_METRICS}
    groups = {t: s for t, s in groups.items() if s}
    parts = []
    if groups:
        parts.append(plots.panels(groups, bounds(run), "training curves (dashed: a new stage starts)"))
    stages = (run.results or {}).get("stages") or []
    if stages:
        parts.append(table(["stage", "steps", "time", "tokens", "tokens/s", "examples", "truncated",
                            "not trained (no token left)"],
                           [[s.get("name"), s.get("steps"), duration(s.get("seconds")), s.get("tokens"),
                             f"{s.get('tokens_per_s', 0):.0f}", s.get("examples"), s.get("truncated"),
                             s.get("untrainable", 0)]
                            for s in stages], "num"))
    return Section("training", "Training", "".join(parts)) if parts else None


def objective_metrics(run: RunData) -> Section | None:
    """What each objective or plugin adds to the log (rewards/margins, objective/kl, neuromod/gain, ...),
    grouped by the prefix before the first '/'."""
    keys = [k for k in dict.fromkeys(k for r in run.metrics for k in r)
            if k not in NOT_PLOTTED and not k.startswith(OWN_SECTION)]
    groups: dict[str, dict[str, plots.Series]] = {}
    for k in keys:
        s = merged(run, k)
        if s[0]:
            groups.setdefault(k.split("/")[0], {})[k] = s
    if not groups:
        return None
    # numbers beside the plots: the final value is what a reader compares across runs
    rows = [[k, fmt(ys[-1]), fmt(min(ys)), fmt(max(ys))] for g in groups.values() for k, (_, ys) in g.items()]
    return Section("objective", "Objective and plugin metrics",
                   plots.panels(groups, bounds(run), "logged metrics by group")
                   + table(["metric", "last", "min", "max"], rows, "num"))


def routing(run: RunData) -> Section | None:
    parts = []
    info = (run.results or {}).get("routing")
    if isinstance(info, dict) and info:
        flat = {k: v for k, v in info.items() if not isinstance(v, dict)}
        parts.append(table(["routing", "value"], [[k, fmt(v) if isinstance(v, float) else v] for k, v in flat.items()], "num"))
        per_task = info.get("per_task") or {}
        if per_task:  # a skill stream: each task's test inputs routed to the expert trained on its skill
            parts.append(table(["task", "expert of its skill", "routed there", "inputs"],
                               [[t, d.get("expert"), fmt(d.get("accuracy")), d.get("n")] for t, d in per_task.items()], "num"))
    details = (run.results or {}).get("details") or []
    tasks = (run.results or {}).get("tasks") or []
    if details and any("routed_to" in r for row in details for r in row):  # which experts answered each task, per stage
        stages = [s.get("name", f"stage {i}") for i, s in enumerate((run.results or {}).get("stages") or [])]
        rows = [[t] + [", ".join(f"{e} {fmt(v)}" for e, v in sorted(row[j].get("routed_to", {}).items(),
                                                                       key=lambda kv: -kv[1]))
                       for row in details] for j, t in enumerate(tasks)]
        parts.append(table(["task"] + [f"after {n}" for n in stages][:len(details)], rows))
    shares = {k.removeprefix("router/share/"): merged(run, k) for k in _keys(run, "router/share/")}
    if shares:
        parts.append(plots.panels({"share of routed inputs": shares}, bounds(run), "router share per expert over time", cols=1))
    return Section("routing", "Routing", "".join(parts)) if parts else None


def experts(run: RunData) -> Section | None:
    pool = (run.results or {}).get("experts") or []
    parts = []
    detailed = [e for e in pool if isinstance(e, dict)]
    if detailed:
        cols = list(dict.fromkeys(k for e in detailed for k in e))
        cols = ["name"] + [c for c in cols if c != "name"]
        parts.append(table(cols, [[_cell(e.get(c)) for c in cols] for e in detailed], "num"))
    elif len(pool) > 1:  # plain names: only a pool (not the single default adapter) is worth a section
        parts.append(table(["expert"], [[e] for e in pool]))
    decisions = read_decisions(run)
    if decisions:
        xs = [d["chunk"] if isinstance(d.get("chunk"), (int, float)) else i for i, d in enumerate(decisions)]
        new_at = [x for x, d in zip(xs, decisions) if str(d.get("decision", "")).lower() in ("create", "new")]
        parts.append(plots.novelty(xs, [numeric(d.get("entropy")) for d in decisions],
                                   [numeric(d.get("similarity")) for d in decisions], new_at, "novelty per chunk"))
        parts.append(table(["chunk", "entropy", "similarity", "decision", "expert"],
                           [[d.get("chunk"), _cell(d.get("entropy")), _cell(d.get("similarity")),
                             d.get("decision"), d.get("expert", "")] for d in decisions], "num novelty"))
    calibration = ((run.results or {}).get("novelty") or {}).get("calibration") if isinstance(
        (run.results or {}).get("novelty"), dict) else None
    if calibration:  # the calibrated reuse decider (experts/calibration.py): scored on its past decisions
        parts.append(plots.reliability(calibration["reliability"], calibration["brier"],
                                       "reuse decider calibration"))
        parts.append(table(["outcomes", "successes", "Brier score"],
                           [[calibration["outcomes"], calibration["successes"], _cell(calibration["brier"])]], "num"))
    return Section("experts", "Expert pool and novelty decisions", "".join(parts)) if parts else None


def read_decisions(run: RunData) -> list[dict]:
    """A skill stream's reuse-or-create decisions: RUN_DIR/decisions.jsonl (or a list in results.json)."""
    from ..monitor.metrics_log import read_jsonl

    path = run.path / "decisions.jsonl"
    if path.exists():
        return read_jsonl(path)
    listed = (run.results or {}).get("novelty")
    return listed if isinstance(listed, list) else []


def _cell(v) -> str:
    if isinstance(v, float):
        return fmt(v)
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10_000:
        return f"{v:,}"  # parameter counts
    return "" if v is None else str(v)


def curriculum(run: RunData) -> Section | None:
    weights = {k.removeprefix("curriculum/weight/"): merged(run, k) for k in _keys(run, "curriculum/weight/")}
    if not weights:
        return None
    return Section("curriculum", "Curriculum weights",
                   plots.panels({"mixture weight per dataset": weights}, bounds(run), "curriculum weights over time", cols=1))


def alerts(run: RunData) -> Section | None:
    if not run.alerts:
        return None
    pts = [(float(run.global_step(a)), str(a.get("severity", ""))) for a in run.alerts]
    img = plots.alert_timeline(pts, merged(run, "loss"), bounds(run), "alerts over the loss curve")
    rows = "".join(
        f'<tr class="sev-{escape(str(a.get("severity", "")))}"><td>{escape(str(a.get("stage", "")))}</td>'
        f'<td>{escape(str(a.get("step", "")))}</td><td>{escape(str(a.get("severity", "")))}</td>'
        f'<td>{escape(str(a.get("kind", "")))}</td><td>{escape(str(a.get("message", "")))}</td></tr>'
        for a in run.alerts)
    tab = ('<table class="alerts"><thead><tr><th>stage</th><th>step</th><th>severity</th><th>kind</th>'
           f'<th>message</th></tr></thead><tbody>{rows}</tbody></table>')
    return Section("alerts", f"Alerts ({len(run.alerts)})", img + tab)


def _text(s) -> str:
    """Model output shown exactly: newlines made visible, since small models often emit only whitespace."""
    s = "" if s is None else str(s)
    if not s.strip():
        return f'<span class="empty">{escape(repr(s))}</span>'
    return escape(s)


def samples(run: RunData) -> Section | None:
    r = run.results or {}
    details = r.get("details") or []
    if not details:
        return None
    before = r.get("initial_details") or [{}] * len(details[-1])
    parts = []
    for j, task in enumerate(r.get("tasks", [])):
        after = (details[-1][j].get("samples") or []) if j < len(details[-1]) else []
        earlier = (before[j].get("samples") or []) if j < len(before) else []
        if not after:
            continue
        rows = []
        for k, s in enumerate(after):
            refs = s.get("references", s.get("reference", s.get("label", "")))
            refs = refs if isinstance(refs, list) else [refs]
            old = earlier[k].get("output") if k < len(earlier) and earlier[k].get("prompt") == s.get("prompt") else None
            rows.append(f"<tr><td><pre>{_text(s.get('prompt'))}</pre></td>"
                        f"<td><pre>{''.join(_text(x) + chr(10) for x in refs)}</pre></td>"
                        f"<td><pre>{_text(old) if old is not None else ''}</pre></td>"
                        f"<td><pre>{_text(s.get('output'))}</pre></td></tr>")
        parts.append(f"<h3>{escape(task)}</h3><table class=\"samples\"><thead><tr><th>prompt</th><th>reference</th>"
                     f"<th>before training</th><th>after last stage</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return Section("samples", "Sample generations", "".join(parts)) if parts else None


def training_samples(run: RunData) -> Section | None:
    """The newest generation of each `train.sample_prompts` prompt (samples.jsonl), with when it was made."""
    from ..monitor.metrics_log import SAMPLES, read_jsonl
    latest: dict[str, dict] = {}
    records = read_jsonl(run.path / SAMPLES)
    for r in records:
        latest[str(r.get("prompt", ""))] = r  # in file order, so the last one of each prompt stays
    if not latest:
        return None
    rows = "".join(f"<tr><td>{escape(str(r.get('stage', '')))}</td><td>{escape(str(r.get('step', '')))}</td>"
                   f"<td><pre>{_text(p)}</pre></td><td><pre>{_text(r.get('output'))}</pre></td></tr>"
                   for p, r in latest.items())
    return Section("training-samples", "Samples during training",
                   f"<p>The newest of {len(records)} generations in {SAMPLES} (greedy, every train.sample_every "
                   f"steps and at each stage end), one per prompt.</p><table class=\"samples\"><thead><tr><th>stage</th>"
                   f"<th>step</th><th>prompt</th><th>output</th></tr></thead><tbody>{rows}</tbody></table>")


def config(run: RunData) -> Section:
    return Section("config", "Resolved config", f"<pre class=\"config\">{escape(run.config_text)}</pre>")


RUN_SECTIONS = [summary, task_scores, training, objective_metrics, routing, experts, curriculum, alerts, samples,
                training_samples, config]
