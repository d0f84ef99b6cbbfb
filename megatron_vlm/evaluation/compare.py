"""Paired comparison of two evaluations of the same items (``tools/compare_runs.py``, and
``tools/sweep.py --compare`` for every arm of a sweep against one of them).

Arm A is the baseline, arm B the one compared with it; every difference is B - A. For each task
both evaluated (or those asked for) the items of the two ``items/TASK.jsonl`` files are matched
by example id (only ids in both count; a differing set is noted with its counts), and:

* the values of A and B over the matched items, and B - A with its paired bootstrap 95%
  interval (one index set per resample for both arms, :func:`.statistics.paired_bootstrap`);
* the p-value of "no difference": McNemar's exact test where every item is right or wrong (0/1)
  and the value is the plain mean (or the mean of equal-sized parts, the same thing), else the
  paired bootstrap's;
* the same for each stable score, over the compared tasks it averages (chance cancels in the
  difference), always by paired bootstrap;
* Holm's adjustment over every p-value of the comparison (of all the comparisons of a sweep).

:func:`write_comparison` writes ``comparison.md``, ``comparison.json`` and a forest plot
``comparison.png`` (each difference with its interval, a line at 0).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from megatron_vlm.evaluation import statistics
from megatron_vlm.evaluation.items import TaskItems
from megatron_vlm.evaluation.uncertainty import task_items

RESULTS_NAME = "results.json"
OUTPUT_NAMES = ("comparison.md", "comparison.json", "comparison.png")
STABLE_PREFIX = "stable_score."


@dataclass
class Arm:
    """One evaluation: its results.json and the folder its items files are relative to."""

    label: str
    directory: Path
    results: dict

    @property
    def path(self) -> Path:
        return self.directory / RESULTS_NAME

    def items(self, task: str) -> TaskItems:
        return task_items(self.results, self.directory, task, required=True, where=str(self.path))


def find_results(path: str | Path) -> Path:
    """The results.json that ``path`` stands for: the file itself, the one in the folder, or
    the one in the default evaluation folder of the checkpoint (or run) at ``path``."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / RESULTS_NAME).is_file():
        return path / RESULTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (give an evaluation folder holding "
                                f"{RESULTS_NAME}, or a checkpoint)")
    from megatron_vlm.evaluation.runner import default_output_dir
    from megatron_vlm.training.checkpointing import resolve_checkpoint

    try:
        default = default_output_dir(resolve_checkpoint(path)) / RESULTS_NAME
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {RESULTS_NAME} there, and not a checkpoint") from None
    if not default.is_file():
        raise FileNotFoundError(f"{path}: no {RESULTS_NAME} there, nor in its checkpoint's "
                                f"evaluation folder ({default}); evaluate it first "
                                "(tools/evaluate_vlm.py)")
    return default


def load_arm(path: str | Path, label: Optional[str] = None) -> Arm:
    """An arm from an evaluation folder, a results.json or a checkpoint (:func:`find_results`)."""
    results_path = find_results(path)
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{results_path}: not valid JSON ({err})") from None
    if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict):
        raise ValueError(f"{results_path}: no 'tasks' (not a results.json of "
                         "tools/evaluate_vlm.py)")
    return Arm(label or str(path), results_path.parent, results)


@dataclass
class Row:
    """One compared quantity: a task, or a stable score (``stable_score.KIND``)."""

    name: str
    kind: str
    a: float
    b: float
    difference: float
    ci95: tuple[float, float]
    p_value: float
    test: str
    n: int
    """Matched items (a stable score: over all its tasks)."""
    note: str = ""
    p_holm: Optional[float] = None


@dataclass
class Comparison:
    """B against A: one row per task, then the stable scores."""

    a: str
    b: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    resamples: int = statistics.RESAMPLES
    seed: int = statistics.SEED

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "difference": "b - a",
                "uncertainty": {"method": "paired " + statistics.METHOD,
                                "resamples": self.resamples, "seed": self.seed,
                                "level": statistics.LEVEL},
                "rows": [asdict(row) for row in self.rows], "notes": self.notes}


def _matched(task: str, a: Arm, b: Arm) -> tuple[TaskItems, TaskItems, str]:
    """The items of ``task`` that both arms scored, in A's order, and a note on the others."""
    items_a, items_b = a.items(task), b.items(task)
    in_b = set(items_b.ids)
    common = [i for i in items_a.ids if i in in_b]
    if not common:
        raise ValueError(f"task {task}: no example id in common between {a.directory} and "
                         f"{b.directory} (items/{task}.jsonl): not the same items")
    matched_a, matched_b = items_a.subset(common), items_b.subset(common)
    if matched_a.groups != matched_b.groups:
        raise ValueError(f"task {task}: the items of {a.directory} and {b.directory} put the same "
                         "ids in different groups (splits): not the same items")
    only_a, only_b = len(items_a) - len(common), len(items_b) - len(common)
    note = (f"{len(common)} common items; {only_a} only in A, {only_b} only in B"
            if only_a or only_b else "")
    return matched_a, matched_b, note


def _mcnemar_applies(items_a: TaskItems, items_b: TaskItems) -> bool:
    """0/1 items whose value is their plain mean (no parts, or parts of equal size)."""
    if not (statistics.is_binary(items_a.scores) and statistics.is_binary(items_b.scores)):
        return False
    if items_a.groups is None:
        return True
    sizes = {items_a.groups.count(g) for g in set(items_a.groups)}
    return len(sizes) == 1


def _task_row(task: str, kind: str, items_a: TaskItems, items_b: TaskItems, note: str,
              resamples: int, seed: int) -> Row:
    paired = statistics.paired_bootstrap(items_a.scores, items_b.scores, items_a.groups,
                                         resamples=resamples, seed=seed, task=task)
    p_value, test = paired.p_value, paired.test
    if _mcnemar_applies(items_a, items_b):
        p_value, test = statistics.mcnemar_exact(items_a.scores, items_b.scores), "McNemar exact"
    return Row(task, kind, paired.a, paired.b, paired.difference, paired.ci, p_value, test,
               len(items_a), note)


def _tasks_to_compare(a: Arm, b: Arm, tasks: Optional[Sequence[str]]) -> tuple[list[str], list]:
    """(tasks in both arms, in A's order, or ``tasks``; notes on the tasks left out)."""
    in_a, in_b = list(a.results["tasks"]), set(b.results["tasks"])
    if tasks:
        for task in tasks:
            for arm in (a, b):
                if task not in arm.results["tasks"]:
                    raise ValueError(f"{arm.path}: no task {task!r} (its tasks: "
                                     f"{', '.join(arm.results['tasks'])})")
        return list(tasks), []
    common = [t for t in in_a if t in in_b]
    if not common:
        raise ValueError(f"{a.path} and {b.path} have no task in common")
    notes = []
    for arm, other, name in ((a, in_b, "A"), (b, set(in_a), "B")):
        alone = [t for t in arm.results["tasks"] if t not in other]
        if alone:
            notes.append(f"tasks only in {name}, not compared: {', '.join(alone)}")
    return common, notes


def _chance(arm: Arm, task: str) -> float:
    return float((arm.results.get("chance") or {}).get(task, 0.0))


def compare(a: Arm, b: Arm, tasks: Optional[Sequence[str]] = None,
            resamples: int = statistics.RESAMPLES, seed: int = statistics.SEED) -> Comparison:
    """B against A on ``tasks`` (default: every task both evaluated), with the stable scores
    over the compared tasks; Holm-adjusted within this comparison."""
    names, notes = _tasks_to_compare(a, b, tasks)
    rows, matched = [], {}
    for task in names:
        kind = a.results["tasks"][task].get("kind", "vision")
        items_a, items_b, note = _matched(task, a, b)
        matched[task] = (items_a, items_b)
        rows.append(_task_row(task, kind, items_a, items_b, note, resamples, seed))
        if note:
            notes.append(f"{task}: {note}")
    for kind in ("vision", "text"):
        row = _stable_row(kind, a, b, matched, resamples, seed)
        if row is not None:
            rows.append(row)
    comparison = Comparison(a.label, b.label, rows, notes, resamples, seed)
    apply_holm([comparison])
    return comparison


def _stable_row(kind: str, a: Arm, b: Arm, matched: dict, resamples: int,
                seed: int) -> Optional[Row]:
    """The stable score of ``kind`` over the compared tasks it averages in A (None if none)."""
    counted = list(((a.results.get("stable_score") or {}).get(kind) or {}).get("terms") or {})
    terms = [t for t in counted if t in matched]
    if not terms:
        return None
    for task in terms:
        if abs(_chance(a, task) - _chance(b, task)) > 1e-12:
            raise ValueError(f"task {task}: chance level {_chance(a, task)} in {a.path} but "
                             f"{_chance(b, task)} in {b.path}: the stable scores do not compare")
    paired = statistics.paired_stable_score(
        {t: statistics.PairedTask(matched[t][0].scores, matched[t][1].scores, _chance(a, t),
                                  matched[t][0].groups) for t in terms},
        resamples=resamples, seed=seed)
    left_out = [t for t in counted if t not in matched]
    note = f"over {len(terms)} of its {len(counted)} tasks" if left_out else ""
    return Row(STABLE_PREFIX + kind, kind, paired.a, paired.b, paired.difference, paired.ci,
               paired.p_value, paired.test, sum(len(matched[t][0]) for t in terms), note)


def apply_holm(comparisons: Sequence[Comparison]) -> None:
    """Holm-adjusts every row's p-value over all rows of ``comparisons`` (one family)."""
    rows = [row for comparison in comparisons for row in comparison.rows]
    for row, adjusted in zip(rows, statistics.holm([row.p_value for row in rows])):
        row.p_holm = adjusted


# ---------------------------------------------------------------------------------------------
# Output


def _p_text(p: Optional[float]) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def markdown(comparisons: Sequence[Comparison], title: str) -> str:
    """One table per comparison (rows: tasks, then stable scores), notes below each."""
    lines = [f"# {title}", "",
             "Differences are B - A over the items both evaluated, matched by example id; "
             "[lo, hi] is the paired bootstrap 95% interval; p tests \"no difference\" (McNemar "
             "exact for right/wrong items, else paired bootstrap), Holm-adjusted over every row "
             "of this file."]
    for comparison in comparisons:
        lines += ["", f"A: `{comparison.a}`  ", f"B: `{comparison.b}`", "",
                  "| | A | B | B - A [95% CI] | p | p (Holm) | test | items |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in comparison.rows:
            name = f"**{row.name}**" if row.name.startswith(STABLE_PREFIX) else row.name
            lines.append(f"| {name} | {row.a:.4f} | {row.b:.4f} | {row.difference:+.4f} "
                         f"[{row.ci95[0]:+.4f}, {row.ci95[1]:+.4f}] | {_p_text(row.p_value)} | "
                         f"{_p_text(row.p_holm)} | {row.test} | {row.n} |")
        lines += [""] + [f"* {note}" for note in comparison.notes] if comparison.notes else []
    return "\n".join(lines) + "\n"


def forest_plot(comparisons: Sequence[Comparison], path: Path, title: str) -> Path:
    """Each row's difference (dot) and 95% interval (bar), a vertical line at 0; one colour per
    comparison, rows from the top in table order (stable scores last)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(row.name for c in comparisons for row in c.rows))
    height = max(2.5, 0.32 * len(names) * max(1, len(comparisons)) ** 0.5 + 1.2)
    fig, ax = plt.subplots(figsize=(7.5, height))
    step = 0.7 / max(1, len(comparisons))
    for k, comparison in enumerate(comparisons):
        offset = (k - (len(comparisons) - 1) / 2) * step
        ys = [names.index(row.name) + offset for row in comparison.rows]
        xs = [row.difference for row in comparison.rows]
        errors = [[row.difference - row.ci95[0] for row in comparison.rows],
                  [row.ci95[1] - row.difference for row in comparison.rows]]
        ax.errorbar(xs, ys, xerr=errors, fmt="o", capsize=3, color=f"C{k % 10}",
                    label=comparison.b if len(comparisons) > 1 else None)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("B - A (paired bootstrap 95% interval)")
    ax.grid(axis="x", alpha=0.3)
    if len(comparisons) > 1:
        ax.legend(fontsize=7, title=f"B (A: {comparisons[0].a})", title_fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_comparison(comparisons: Sequence[Comparison], out_dir: str | Path, title: str,
                     several: bool = False) -> list[Path]:
    """``comparison.md``, ``comparison.json`` and ``comparison.png`` in ``out_dir``. The JSON is
    the comparison's object, or with ``several`` (or more than one) ``{"comparisons": [...]}``."""
    from megatron_vlm.fsutil import write_json_atomic, write_text_atomic

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path, png_path = (out_dir / name for name in OUTPUT_NAMES)
    write_text_atomic(md_path, markdown(comparisons, title))
    payload = [c.to_json() for c in comparisons]
    write_json_atomic(json_path, {"comparisons": payload} if several or len(payload) > 1
                      else payload[0])
    forest_plot(comparisons, png_path, title)
    return [md_path, json_path, png_path]
