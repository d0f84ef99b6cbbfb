"""The paper's figure types from a sweep's results table.

A figure is computed as data first (:func:`figure_data`: panels of series, exactly the table's
values) and then drawn (:func:`render`, matplotlib with the Agg backend), so what is plotted
can be checked against the table. Kinds:

* ``text_checkpoint``, ``image_ratio``, ``instruction_fraction``, ``finetune_epochs``: metrics
  against that axis (paper Figures 4-8), one panel per metric, by default the vision and the
  text stable score side by side; one line per combination of the other axes that vary. Text
  checkpoints 0 and 100 are drawn hollow: their LR was re-warmed (paper Figure 4).
* ``tasks``: every task's accuracy as grouped bars, one bar per grid point (vision and text
  tasks in two panels).
* ``ablation``: the seed-ablation comparison: one bar per encoder x projector arm, in panels
  for the vision stable score, the text stable score, VQAv2 and ARC-easy (on ShapesWorld their
  counterparts ``shapesworld_vqa`` and ``shapesworld_arith``, both open-ended / 4-choice like
  the originals).

Where the table has a metric's 95% interval (its ``_lo``/``_hi`` columns) the point or bar gets
an error bar spanning it.

:func:`pick_kinds` chooses from the grid columns that vary: the ablation when ``encoder`` or
``projector`` varies, else one line figure per varying line axis; ``tasks`` whenever the
table has task results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_vlm.experiments.results_table import STABLE_COLUMNS, ResultsTable
from megatron_vlm.experiments.sweep_spec import AXES

LINE_KINDS = ("text_checkpoint", "image_ratio", "instruction_fraction", "finetune_epochs")
KINDS = (*LINE_KINDS, "tasks", "ablation")
ABLATION_AXES = ("encoder", "projector")
# The seed ablation's four metrics, each with its ShapesWorld counterpart.
ABLATION_METRICS = (("stable_score.vision",), ("stable_score.text",),
                    ("vision.vqav2", "vision.shapesworld_vqa"),
                    ("text.arc_easy", "text.shapesworld_arith"))
METRIC_LABELS = {
    "stable_score.vision": "vision stable score", "stable_score.text": "text stable score",
    "vision.vqav2": "VQAv2 accuracy", "text.arc_easy": "ARC-easy accuracy",
    "vision.shapesworld_vqa": "ShapesWorld VQA accuracy (VQAv2 counterpart)",
    "text.shapesworld_arith": "ShapesWorld arith accuracy (ARC-easy counterpart)",
}
REWARMED_CHECKPOINTS = (0, 100)


@dataclass
class Series:
    label: str
    x: list[Any]
    y: list[float]
    hollow: list[bool] = field(default_factory=list)
    intervals: list[Optional[tuple[float, float]]] = field(default_factory=list)
    """Each point's 95% interval (lo, hi), or None; empty: none at all."""


def _interval(row: dict, column: str) -> Optional[tuple[float, float]]:
    lo, hi = row.get(f"{column}_lo"), row.get(f"{column}_hi")
    return None if lo is None or hi is None else (lo, hi)


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    categories: Optional[list[str]] = None
    """Bar panels: the x categories (series are bar groups over them); None for lines."""


@dataclass
class FigureData:
    kind: str
    title: str
    panels: list[Panel]
    note: str = ""


def metric_label(column: str) -> str:
    if column in METRIC_LABELS:
        return METRIC_LABELS[column]
    kind, _, task = column.partition(".")
    return f"{task} accuracy" if kind in ("vision", "text") else column


def _value_label(column: str) -> str:
    """The y-axis label of a metric column."""
    return "stable score" if column.startswith("stable_score.") else "accuracy"


def _axis_label(axis: str) -> str:
    return AXES[axis].label if axis in AXES else axis


def pick_kinds(table: ResultsTable) -> list[str]:
    """The figures a table calls for (see the module docstring)."""
    varying = table.varying_axes()
    tasks = ["tasks"] if any(row[m] is not None for row in table.rows for m in table.metrics
                             if not m.startswith("stable_score.")) else []
    if any(a in varying for a in ABLATION_AXES):
        return ["ablation", *tasks]
    return [a for a in LINE_KINDS if a in varying] + tasks


def _check_metrics(table: ResultsTable, metrics: Sequence[str]) -> list[str]:
    unknown = [m for m in metrics if m not in table.metrics]
    if unknown:
        raise ValueError(f"--metrics names {', '.join(unknown)}, not columns of the table "
                         f"(metrics: {', '.join(table.metrics)})")
    return list(metrics)


def _group_label(row: dict, axes: Sequence[str]) -> str:
    return ", ".join(f"{a}={row[a]}" for a in axes)


def figure_data(table: ResultsTable, kind: str,
                metrics: Optional[Sequence[str]] = None) -> FigureData:
    """The panels and series of one figure kind; rows without a value are left out."""
    if kind not in KINDS:
        raise ValueError(f"unknown figure kind {kind!r}; kinds: {', '.join(KINDS)}")
    if kind in LINE_KINDS:
        return _line_figure(table, kind, metrics)
    if kind == "tasks":
        return _tasks_figure(table, metrics)
    return _ablation_figure(table, metrics)


def _line_figure(table: ResultsTable, axis: str, metrics: Optional[Sequence[str]]) -> FigureData:
    if axis not in table.axes:
        raise ValueError(f"figure {axis!r} needs a {axis} column; the table's grid columns are "
                         f"{', '.join(table.axes) or 'none'}")
    metrics = _check_metrics(table, metrics or STABLE_COLUMNS)
    others = [a for a in table.varying_axes() if a != axis]
    groups: dict[str, list[dict]] = {}
    for row in table.rows:
        groups.setdefault(_group_label(row, others), []).append(row)
    panels = []
    for metric in metrics:
        series = []
        for label, rows in groups.items():
            points = sorted(((row[axis], row[metric], _interval(row, metric)) for row in rows
                             if row[metric] is not None), key=lambda p: (p[0], p[1]))
            series.append(Series(
                label=label or metric_label(metric), x=[p[0] for p in points],
                y=[p[1] for p in points],
                hollow=[axis == "text_checkpoint" and p[0] in REWARMED_CHECKPOINTS
                        for p in points], intervals=[p[2] for p in points]))
        panels.append(Panel(metric_label(metric), _axis_label(axis), _value_label(metric),
                            series))
    note = ("hollow markers: LR re-warmed (text checkpoint 0% and 100%)"
            if axis == "text_checkpoint" and any(any(s.hollow) for p in panels for s in p.series)
            else "")
    return FigureData(axis, f"metrics against {_axis_label(axis)}", panels, note)


def _tasks_figure(table: ResultsTable, metrics: Optional[Sequence[str]]) -> FigureData:
    asked = [m for m in _check_metrics(table, metrics or []) if not m.startswith("stable_score.")]
    columns = asked or [m for m in table.metrics if not m.startswith("stable_score.")]
    panels = []
    for kind in ("vision", "text"):
        tasks = [c for c in columns if c.startswith(f"{kind}.")
                 and any(row[c] is not None for row in table.rows)]
        if not tasks:
            continue
        series = [Series(row["run"], [c.partition(".")[2] for c in tasks],
                         [row[c] for c in tasks], intervals=[_interval(row, c) for c in tasks])
                  for row in table.rows if any(row[c] is not None for c in tasks)]
        panels.append(Panel(f"{kind} tasks", "task", "accuracy", series,
                            categories=[c.partition(".")[2] for c in tasks]))
    if not panels:
        raise ValueError("the table holds no task results yet (every row is missing)")
    return FigureData("tasks", "accuracy per task", panels)


def _ablation_figure(table: ResultsTable, metrics: Optional[Sequence[str]]) -> FigureData:
    arms = [a for a in ABLATION_AXES if a in table.axes]
    if not arms:
        raise ValueError("figure 'ablation' needs an encoder or projector column; the table's "
                         f"grid columns are {', '.join(table.axes) or 'none'}")
    if metrics:
        chosen = _check_metrics(table, metrics)
    else:
        chosen = [next((c for c in options if c in table.metrics), None)
                  for options in ABLATION_METRICS]
        chosen = [c for c in chosen if c is not None]
    others = [a for a in table.varying_axes() if a not in arms]
    rows = [row for row in table.rows]
    categories = list(dict.fromkeys(" / ".join(str(row[a]) for a in arms) for row in rows))
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(_group_label(row, others), []).append(row)
    panels = []
    for metric in chosen:
        series = []
        for label, members in groups.items():
            by_arm = {" / ".join(str(r[a]) for a in arms): r for r in members}
            cats = [c for c in categories if c in by_arm and by_arm[c][metric] is not None]
            series.append(Series(label or " / ".join(arms), cats,
                                 [by_arm[c][metric] for c in cats],
                                 intervals=[_interval(by_arm[c], metric) for c in cats]))
        panels.append(Panel(metric_label(metric), " / ".join(arms), _value_label(metric),
                            series, categories=categories))
    return FigureData("ablation", f"seed ablations ({' x '.join(arms)})", panels)


# ---------------------------------------------------------------------------------------------
# Drawing


def render(data: FigureData, sweep: str):
    """A matplotlib Figure of ``data`` (Agg backend), titled with the sweep's name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(data.panels)
    cols = 2 if n == 4 else n  # four panels as 2 x 2, fewer in one row
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows + 0.4), squeeze=False)
    for ax, panel in zip(axes.flat, data.panels):
        if panel.categories is None:
            _draw_lines(ax, panel)
        else:
            _draw_bars(ax, panel)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    title = f"sweep {sweep}: {data.title}" + (f"\n{data.note}" if data.note else "")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _error_bars(series: Series) -> Optional[list[list[float]]]:
    """matplotlib's yerr (distances below and above each point) from the series' intervals;
    None when it has none. A bar's value can be None (a missing task's bar is drawn at 0)."""
    if not any(series.intervals):
        return None
    below, above = [], []
    for y, interval in zip(series.y, series.intervals):
        lo, hi = interval if interval is not None and y is not None else (y, y)
        below.append(0.0 if y is None else y - lo)
        above.append(0.0 if y is None else hi - y)
    return [below, above]


def _draw_lines(ax, panel: Panel) -> None:
    for series in panel.series:
        (line,) = ax.plot(series.x, series.y, marker="o", label=series.label)
        errors = _error_bars(series)
        if errors is not None:
            ax.errorbar(series.x, series.y, yerr=errors, fmt="none", capsize=3,
                        ecolor=line.get_color(), alpha=0.7)
        hollow = [(x, y) for x, y, h in zip(series.x, series.y, series.hollow) if h]
        if hollow:  # overdraw the re-warmed points as open circles (not in ax.lines' data)
            ax.scatter([p[0] for p in hollow], [p[1] for p in hollow], s=64, zorder=3,
                       facecolors="white", edgecolors=line.get_color())


def _draw_bars(ax, panel: Panel) -> None:
    positions = {c: i for i, c in enumerate(panel.categories)}
    if len(panel.series) == 1:  # one bar per category, each its own colour and legend entry
        (series,) = panel.series
        errors = _error_bars(series)
        for k, (c, y) in enumerate(zip(series.x, series.y)):
            ax.bar([positions[c]], [y], width=0.7, color=f"C{positions[c] % 10}", label=c,
                   yerr=None if errors is None else [[errors[0][k]], [errors[1][k]]],
                   capsize=3)
    else:
        width = 0.8 / len(panel.series)
        for k, series in enumerate(panel.series):
            xs = [positions[c] - 0.4 + width * (k + 0.5) for c in series.x]
            ax.bar(xs, series.y, width=width, label=series.label, yerr=_error_bars(series),
                   capsize=2)
    ax.set_xticks(range(len(panel.categories)))
    ax.set_xticklabels(panel.categories, rotation=30 if len(panel.categories) > 4 else 0,
                       ha="right" if len(panel.categories) > 4 else "center", fontsize=8)


def plot_table(table: ResultsTable, out_dir: Path, kinds: Optional[Sequence[str]] = None,
               metrics: Optional[Sequence[str]] = None,
               title: Optional[str] = None) -> list[Path]:
    """Writes ``<kind>.png`` in ``out_dir`` for each kind (default :func:`pick_kinds`)."""
    import matplotlib.pyplot as plt

    if not table.rows:
        raise ValueError("the results table has no rows")
    kinds = list(kinds) if kinds else pick_kinds(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in kinds:
        data = figure_data(table, kind, metrics)
        fig = render(data, title or table.sweep)
        path = out_dir / f"{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
