"""A sweep's report (DIR/report.html): every trial's setting and objective, the best one, plots of the
objective over the trials and over the grid, the trials' losses overlaid, and each trial's own report
folded below. Built from sweep.json's content and the trials' run directories (skillstream/sweep.py)."""
from __future__ import annotations

from datetime import datetime
from html import escape
from pathlib import Path

from ..errors import UserError
from ..files import write_atomic
from . import plots
from .html import page, run_details
from .rundata import RunData, fmt, load_run
from .sections import Section, duration, merged

REPORT = "report.html"


def write_sweep_report(sweep_dir: Path, sweep: dict) -> Path:
    """Write SWEEP_DIR/report.html from sweep.json's content; returns its path."""
    spec, trials = sweep["spec"], sweep["trials"]
    runs = _trial_runs(sweep_dir, trials)
    keys = list(spec["grid"])
    sections = [_overview(spec, sweep), _table(spec, trials, runs, sweep.get("best"), keys)]
    plots_section = _plots(spec, trials, runs, keys)
    if plots_section is not None:
        sections.append(plots_section)
    done = sum(t["state"] == "complete" for t in trials)
    subtitle = [f"{sweep_dir} · {spec['sampler']} sampler · {done} of {spec['trials']} trials done"
                f"{'' if sweep.get('finished') else ' (in progress)'} · written {datetime.now():%Y-%m-%d %H:%M}"]
    labels = [_label(t) for t in trials if t["number"] in runs]
    out = sweep_dir / REPORT
    write_atomic(out, page(f"skillstream sweep: {spec['recipe_config']['name']}", subtitle, sections,
                           [n for run in runs.values() for n in run.notes],
                           run_details(labels, [runs[t["number"]] for t in trials if t["number"] in runs])))
    return out


def _trial_runs(sweep_dir: Path, trials: list[dict]) -> dict[int, RunData]:
    """The run directories there is something to show of (a trial just started has no log yet)."""
    runs = {}
    for t in trials:
        if t["run_dir"] is None or t["state"] == "interrupted" or "same_as" in t:  # its run shows under another trial
            continue
        try:
            runs[t["number"]] = load_run(sweep_dir / t["run_dir"])
        except UserError:
            continue
    return runs


def _label(trial: dict) -> str:
    return f"trial {trial['number']}: {trial['run_dir']} ({' '.join(f'{k}={v}' for k, v in trial['params'].items())})"


def _overview(spec: dict, sweep: dict) -> Section:
    best = sweep.get("best")
    cards = [("objective", spec["metric"], f"{spec['direction']}, on validation data"),
             ("best value", fmt(best["value"]) if best else "n/a", f"trial {best['number']}" if best else "no trial done"),
             ("best setting", " ".join(f"{k}={v}" for k, v in best["params"].items()) if best else "n/a", "")]
    html = '<div class="cards">' + "".join(
        f'<div class="card"><div class="k">{escape(k)}</div><div class="v" data-metric="{escape(k)}">{escape(str(v))}'
        f'</div><div class="h">{escape(h)}</div></div>' for k, v, h in cards) + "</div>"
    fixed = " ".join(f"{k}={v}" for k, v in spec["overrides"].items())
    html += (f"<p>Each trial trains <code>{escape(spec['recipe'])}</code>{' (smoke)' if spec['smoke'] else ''} "
             f"with {escape(fixed) or 'no --set'} plus its own values, in its own run directory. The objective is read "
             f"from the trial's results.json: the evaluation tasks scored on training examples held out of "
             f"training (data.validation_fraction), never the test split. AvgAcc below is the test score after "
             f"the last stage, shown for information and not used to choose.</p>")
    return Section("sweep", "Sweep", html)


def _table(spec: dict, trials: list[dict], runs: dict[int, RunData], best: dict | None, keys: list[str]) -> Section:
    head = "".join(f"<th>{escape(h)}</th>" for h in ["trial", *keys, spec["metric"], "AvgAcc (test)", "state",
                                                      "train time", "run directory"])
    rows = []
    for t in trials:
        results = runs[t["number"]].results or {} if t["number"] in runs else {}
        state = t["state"] + (f" (same setting as trial {t['same_as']})" if "same_as" in t else "") + \
            (f" (resumes trial {t['resumes']})" if "resumes" in t else "") + (f": {t['error']}" if "error" in t else "")
        cells = [t["number"], *[t["params"].get(k, "") for k in keys], fmt(t["value"]), fmt(results.get("avg_acc")),
                 state, duration(results.get("seconds")), t["run_dir"] or ""]
        cls = ' class="best"' if best and t["number"] == best["number"] else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    return Section("trials", f"Trials ({len(trials)})",
                   f'<table class="num trials"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def _plots(spec: dict, trials: list[dict], runs: dict[int, RunData], keys: list[str]) -> Section | None:
    done = [t for t in trials if t["value"] is not None]
    parts = []
    if done:
        pick = max if spec["direction"] == "maximize" else min
        running, best_so_far = None, []
        for t in done:
            running = t["value"] if running is None else pick(running, t["value"])
            best_so_far.append(running)
        xs = [t["number"] for t in done]
        parts.append(plots.panels({spec["metric"]: {"trial": (xs, [t["value"] for t in done]),
                                                    "best so far": (xs, best_so_far)}}, [],
                                  f"{spec['metric']} of each trial", xlabel="trial", cols=1))
    if done and len(keys) == 2:  # the grid as a table of colours: rows the first key, columns the second
        rows_v, cols_v = spec["grid"][keys[0]], spec["grid"][keys[1]]
        value = {(t["params"].get(keys[0]), t["params"].get(keys[1])): t["value"] for t in done}
        parts.append(plots.heatmap([str(v) for v in rows_v], [str(v) for v in cols_v],
                                   [[value.get((r, c)) for c in cols_v] for r in rows_v],
                                   f"{spec['metric']} over {keys[0]} x {keys[1]}", xlabel=keys[1], ylabel=keys[0]))
    if done and len(keys) == 1:
        values = spec["grid"][keys[0]]
        by_value = {t["params"].get(keys[0]): t["value"] for t in done}
        parts.append(plots.categorical_lines([str(v) for v in values], {spec["metric"]: [by_value.get(v) for v in values]},
                                             f"{spec['metric']} over {keys[0]}", spec["metric"]))
    losses = {_label(t): merged(runs[t["number"]], "loss") for t in trials if t["number"] in runs}
    losses = {k: v for k, v in losses.items() if v[0]}
    if losses:
        parts.append(plots.panels({"loss": losses}, [], "training loss of each trial (overlaid)", cols=1))
    return Section("plots", "Objective and losses", "".join(parts)) if parts else None
