"""Matplotlib figures rendered to inline PNG <img> tags, so the report needs no network or files beside it.

Uses matplotlib's object API (Figure, not pyplot): no global figure state and no GUI backend, so it
works headless and from several threads.
"""
from __future__ import annotations

import base64
import html
import io
import math

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

SEVERITY_COLOURS = {"info": "#1f77b4", "warning": "#e69500", "error": "#d62728", "critical": "#7b0000"}
Series = tuple[list[float], list[float]]


def to_img(fig: Figure, alt: str, cls: str = "plot") -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="{cls}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _boundaries(ax, bounds: list[tuple[float, str]]) -> None:
    """Dashed lines where a new stage starts: losses jump there and a reader should see why."""
    for x, _name in bounds[1:]:
        ax.axvline(x, color="#999", linestyle="--", linewidth=0.8)


def heatmap(row_labels: list[str], col_labels: list[str], values: list[list[float | None]], title: str,
            xlabel: str = "evaluated on task", ylabel: str | None = None) -> str:
    vals = [[math.nan if v is None else v for v in row] for row in values]
    finite = [v for row in vals for v in row if not math.isnan(v)]
    vmax = max([1.0] + finite)  # scores are usually in [0, 1]; keep the scale fixed so runs compare by eye
    fig = Figure(figsize=(1.6 + 1.1 * len(col_labels), 1.0 + 0.55 * len(row_labels)))
    ax = fig.add_subplot()
    im = ax.imshow(vals, cmap="viridis", vmin=min([0.0] + finite), vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=30, ha="right")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    for i, row in enumerate(vals):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center",
                        color="white" if v < 0.6 * vmax else "black", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    return to_img(fig, title, "plot heatmap")


def categorical_lines(x_labels: list[str], series: dict[str, list[float | None]], title: str, ylabel: str) -> str:
    fig = Figure(figsize=(7, 3.2))
    ax = fig.add_subplot()
    for label, ys in series.items():
        ax.plot(range(len(ys)), [math.nan if y is None else y for y in ys], marker="o", label=label)
    ax.set_xticks(range(len(x_labels)), x_labels, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend(ax, len(series))
    return to_img(fig, title)


def _legend(ax, n: int) -> None:
    if 1 <= n <= 12:  # past a dozen lines a legend hides the plot (e.g. firing rate per layer)
        ax.legend(fontsize=8, loc="best")


def panels(groups: dict[str, dict[str, Series]], bounds: list[tuple[float, str]], title: str,
           xlabel: str = "step (whole run)", cols: int = 2) -> str:
    """One subplot per group, one line per series; stage boundaries drawn on each."""
    n = len(groups)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.2 * cols, 2.8 * rows + 0.4))
    if n > 1:
        fig.suptitle(title)
    for k, (name, series) in enumerate(groups.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, label=label, linewidth=1.2, marker="." if len(xs) < 30 else None)
        _boundaries(ax, bounds)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and stages are whole numbers
        ax.set_title(name if n > 1 else f"{title}\n{name}", fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            _legend(ax, len(series))
    fig.tight_layout()
    return to_img(fig, title)


def novelty(xs: list[float], entropy: list[float | None], similarity: list[float | None],
            new_at: list[float], title: str) -> str:
    fig = Figure(figsize=(8, 3.2))
    ax = fig.add_subplot()
    if any(v is not None for v in entropy):
        ax.plot(xs, [math.nan if v is None else v for v in entropy], marker="o", label="entropy")
    if any(v is not None for v in similarity):
        ax.plot(xs, [math.nan if v is None else v for v in similarity], marker="s", label="similarity")
    for i, x in enumerate(new_at):
        ax.axvline(x, color="#d62728", alpha=0.5, label="new expert" if i == 0 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("chunk")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_img(fig, title)


def reliability(curve: list[dict], brier: float | None, title: str) -> str:
    """A reliability curve: per probability bin, the mean predicted probability against the observed
    rate (the diagonal is perfect calibration); marker sizes follow the bins' counts."""
    fig = Figure(figsize=(4, 4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999999", linestyle="--", label="perfect")
    if curve:
        ax.plot([b["mean_predicted"] for b in curve], [b["observed"] for b in curve], marker="o", label="decider")
        ax.scatter([b["mean_predicted"] for b in curve], [b["observed"] for b in curve],
                   s=[20 + 10 * b["n"] for b in curve], alpha=0.4)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("predicted P(reuse succeeds)")
    ax.set_ylabel("observed success rate")
    ax.set_title(title + ("" if brier is None else f" (Brier {brier:.3f})"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_img(fig, title)


def alert_timeline(points: list[tuple[float, str]], loss: Series | None, bounds: list[tuple[float, str]],
                   title: str) -> str:
    """Alerts as coloured ticks over the loss curve: when they fired relative to what training did."""
    fig = Figure(figsize=(9, 3.0))
    ax = fig.add_subplot()
    if loss and loss[0]:
        ax.plot(*loss, color="#888", linewidth=1, label="loss")
        ax.set_ylabel("loss")
    for sev in dict.fromkeys(s for _, s in points):
        xs = [x for x, s in points if s == sev]
        for i, x in enumerate(xs):
            ax.axvline(x, color=SEVERITY_COLOURS.get(sev, "#555"), linewidth=2, alpha=0.8,
                       label=sev if i == 0 else None)
    _boundaries(ax, bounds)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step (whole run)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return to_img(fig, title)
