"""Every evaluation of a sweep in one table, one row per grid point, keyed by its grid values.

Columns of ``OUTPUT_ROOT/results.csv`` (and the same table in ``results.md``):

* ``sweep``: the sweep's name; ``run``: the grid point's name (its values' tags);
* one column per grid axis (``text_checkpoint``, ``image_ratio``, ...), in the grid's order;
* ``status``: ``ok`` (every task of the evaluation scored), ``partial`` or ``missing``;
* ``stable_score.vision``, ``stable_score.text``: the paper's stable scores;
* ``vision.<task>`` and ``text.<task>``: each task's headline accuracy (a fraction in [0, 1]:
  ``metrics.accuracy`` of results.json), vision tasks first, in suite order;
* ``<metric>_lo`` and ``<metric>_hi`` after each metric: its 95% bootstrap interval over the
  evaluated items (results.json's ``accuracy_ci95`` / ``ci95``; empty for results without
  items);
* ``step``: the step of the evaluated checkpoint; ``results``: the results.json it came from;
* ``real_tokens.<source>`` (text, captions, instructions): the real (non-padding) tokens of each
  source that went into the evaluated checkpoint along its whole chain (the text run up to the
  checkpoint branched from, then each run's own), from the lineage in results.json.

A cell without a value is empty; ``results.md`` shows an interval as ``value [lo, hi]``.
:func:`read_table` reads a CSV back (tools/plot_results.py), turning grid values and metrics
into numbers where they are numbers.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_vlm.config import DATA_SOURCES
from megatron_vlm.evaluation.uncertainty import CI_KEY, STABLE_CI_KEY, interval_text
from megatron_vlm.experiments.plan import Plan
from megatron_vlm.experiments.sweep_spec import AXES
from megatron_vlm.training.lineage import chain_real_tokens

CSV_NAME = "results.csv"
MARKDOWN_NAME = "results.md"
STABLE_COLUMNS = ("stable_score.vision", "stable_score.text")
METRIC_PREFIXES = ("stable_score.", "vision.", "text.")
REAL_TOKEN_COLUMNS = tuple(f"real_tokens.{source}" for source in DATA_SOURCES)
INTERVAL_SUFFIXES = ("_lo", "_hi")


@dataclass
class ResultsTable:
    """A sweep's results: ``rows`` are dicts keyed by ``columns``."""

    sweep: str
    axes: list[str]
    metrics: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        metrics = [f"{m}{suffix}" for m in self.metrics for suffix in ("", *INTERVAL_SUFFIXES)]
        return ["sweep", "run", *self.axes, "status", *metrics, "step", *REAL_TOKEN_COLUMNS,
                "results"]

    def varying_axes(self) -> list[str]:
        """Grid axes that take more than one value in the table's rows."""
        return [a for a in self.axes if len({row[a] for row in self.rows}) > 1]


def _headline(metrics: dict) -> Optional[float]:
    value = metrics.get("accuracy", metrics.get("acc"))
    return float(value) if isinstance(value, (int, float)) else None


def _put(row: dict, column: str, value: Optional[float], interval) -> None:
    """A metric and its interval (None, None without one) into ``row``."""
    row[column] = value
    ok = isinstance(interval, (list, tuple)) and len(interval) == 2
    row[f"{column}_lo"], row[f"{column}_hi"] = (float(interval[0]), float(interval[1])) if ok \
        else (None, None)


def collect(plan: Plan) -> ResultsTable:
    """Reads every grid point's results.json (where it exists) into one table."""
    loaded: list[tuple[Any, Optional[dict]]] = []
    vision_tasks: list[str] = []
    text_tasks: list[str] = []
    for point in plan.points:
        path = point.results_path(plan)
        results = None
        if path is not None and path.is_file():
            try:
                results = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err}); rerun the sweep to redo the "
                                 f"evaluation of {point.name}") from None
            for task, entry in (results.get("tasks") or {}).items():
                kind = entry.get("kind")
                buckets = {"vision": vision_tasks, "text": text_tasks}
                bucket = buckets.get(kind)
                if bucket is None:
                    raise ValueError(f"{path}: tasks.{task}.kind={kind!r} is neither 'vision' nor "
                                     "'text'")
                if task not in bucket:
                    bucket.append(task)
        loaded.append((point, results))
    metrics = [*STABLE_COLUMNS, *(f"vision.{t}" for t in vision_tasks),
               *(f"text.{t}" for t in text_tasks)]
    table = ResultsTable(plan.spec.name, list(plan.spec.grid), metrics)
    for point, results in loaded:
        row: dict[str, Any] = {"sweep": plan.spec.name, "run": point.name, **point.values}
        row.update({c: None for m in metrics for c in (m, f"{m}_lo", f"{m}_hi")})
        path = point.results_path(plan)
        row.update(status="missing", step=None, results=str(path) if results else None)
        if results is not None:
            tasks = results.get("tasks") or {}
            for task, entry in tasks.items():
                task_metrics = entry.get("metrics") or {}
                _put(row, f"{entry['kind']}.{task}", _headline(task_metrics),
                     task_metrics.get(CI_KEY))
            for kind in ("vision", "text"):
                score = (results.get("stable_score") or {}).get(kind) or {}
                _put(row, f"stable_score.{kind}", score.get("score"), score.get(STABLE_CI_KEY))
            expected = plan.run(point.evaluation).tasks
            row["status"] = "ok" if all(t in tasks for t in expected) else "partial"
            row["step"] = (results.get("checkpoint") or {}).get("step")
            real = chain_real_tokens(results.get("lineage"))
            row.update({f"real_tokens.{source}": real.get(source) for source in DATA_SOURCES})
        table.rows.append(row)
    return table


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def write_csv(table: ResultsTable, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(table.columns)
        for row in table.rows:
            writer.writerow([_cell(row.get(c)) for c in table.columns])
    tmp.replace(path)
    return path


def markdown(table: ResultsTable) -> str:
    ok = sum(1 for row in table.rows if row["status"] == "ok")
    lines = [f"# Results of sweep {table.sweep}", "",
             f"{ok} of {len(table.rows)} grid points evaluated; accuracies and stable scores are "
             "fractions (stable score: mean of accuracy - chance); [lo, hi]: 95% bootstrap "
             "interval over the evaluated items.", ""]
    columns = ["run", *table.axes, "status", *table.metrics, "step", *REAL_TOKEN_COLUMNS]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table.rows:
        cells = []
        for c in columns:
            value = row.get(c)
            if isinstance(value, float) and c in table.metrics:
                lo, hi = row.get(f"{c}_lo"), row.get(f"{c}_hi")
                cells.append(f"{value:.4f}" + ("" if lo is None or hi is None
                                               else interval_text([lo, hi])))
            else:
                cells.append("-" if value is None else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(table: ResultsTable, out_dir: Path) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` in ``out_dir``."""
    csv_path = write_csv(table, out_dir / CSV_NAME)
    md_path = out_dir / MARKDOWN_NAME
    md_path.write_text(markdown(table), encoding="utf-8")
    return csv_path, md_path


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_table(path: str | Path) -> ResultsTable:
    """A results.csv written by :func:`write_csv` (FileNotFoundError / ValueError naming the
    file and the row or column when it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results table {path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or "run" not in header:
            raise ValueError(f"{path}: no header with a 'run' column (not a sweep results table)")
        records = list(reader)
    axes = [c for c in header if c in AXES]
    intervals = {f"{c}{suffix}" for c in header for suffix in INTERVAL_SUFFIXES}
    numeric = [c for c in header if c.startswith(METRIC_PREFIXES)]
    metrics = [c for c in numeric if c not in intervals]
    sweep = ""
    rows = []
    for i, record in enumerate(records, 2):
        if len(record) != len(header):
            raise ValueError(f"{path}: line {i} has {len(record)} cells, the header {len(header)}")
        raw = dict(zip(header, record))
        row: dict[str, Any] = {k: v for k, v in raw.items()}
        for column in axes:
            row[column] = _number(raw[column])
        for column in numeric:
            text = raw[column].strip()
            if not text:
                row[column] = None
                continue
            try:
                row[column] = float(text)
            except ValueError:
                raise ValueError(f"{path}: line {i}, column {column}: {text!r} is not a "
                                 "number") from None
        sweep = sweep or raw.get("sweep", "")
        rows.append(row)
    return ResultsTable(sweep or path.stem, axes, metrics, rows)
