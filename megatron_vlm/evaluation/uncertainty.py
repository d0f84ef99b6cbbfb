"""The intervals in ``results.json``: each task's accuracy and each stable score get a 95%
percentile bootstrap interval over the items they average (:mod:`.statistics`, from the items
files of :mod:`.items`).

* ``tasks.TASK.metrics.accuracy_ci95``: ``[lo, hi]`` of the task's accuracy;
* ``stable_score.KIND.ci95``: ``[lo, hi]`` of the stable score, each of its tasks' items
  resampled on their own; only when every task it averages has items;
* ``uncertainty``: how they were made, ``{"method", "resamples", "seed", "level"}``.

A result without items (one written before items were kept) gets no interval, and renders
without one. An items file whose mean is not the task's reported accuracy is refused: it is
not this result's file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Optional

from megatron_vlm.evaluation.items import TaskItems, read_items

logger = logging.getLogger("megatron_vlm")

CI_KEY = "accuracy_ci95"
STABLE_CI_KEY = "ci95"
UNCERTAINTY_KEY = "uncertainty"
# An items file's mean and the reported accuracy come from the same scores, summed in another
# order: they agree to rounding.
VALUE_TOLERANCE = 1e-9


def task_items(results: dict, output_dir: str | os.PathLike, task: str,
               required: bool = False, where: str = "results.json") -> Optional[TaskItems]:
    """The items of ``task`` named in ``results`` (relative to ``output_dir``), checked against
    its reported accuracy; None where the entry names no items file, or (unless ``required``)
    names one that is gone. ``where`` names the results file in errors."""
    entry = results["tasks"][task]
    relative = entry.get("items")
    if not relative:
        if required:
            raise ValueError(f"{where}: task {task} has no items file (evaluated before items "
                             "were kept: evaluate it again with --redo)")
        return None
    path = Path(output_dir) / relative
    if not path.is_file() and not required:
        logger.warning("%s: the items file %s of task %s is gone: no interval", where, path,
                       task)
        return None
    items = read_items(path)
    check_items(items, entry.get("metrics") or {}, path, task)
    return items


def check_items(items: TaskItems, metrics: Mapping, path, task: str) -> None:
    """ValueError naming ``path`` when its items do not average to the task's accuracy."""
    accuracy = metrics.get("accuracy")
    if isinstance(accuracy, (int, float)) and abs(items.value() - accuracy) > VALUE_TOLERANCE:
        raise ValueError(f"{path}: its {len(items)} items average {items.value():.6f}, but task "
                         f"{task}'s accuracy is {accuracy:.6f}: not this result's items file")


def add_intervals(results: dict, output_dir: str | os.PathLike,
                  items: Mapping[str, TaskItems], resamples: int, seed: int) -> None:
    """Puts the intervals into ``results`` (in place): ``items`` holds the tasks scored now;
    the others' items are read from the files their entries name."""
    from megatron_vlm.evaluation import statistics

    # Each task's bootstrap values, drawn once: its own interval and the stable score's are
    # both made from them (statistics.task_draws).
    draws: dict = {}
    for task, entry in results["tasks"].items():
        entry["metrics"].pop(CI_KEY, None)
        found = items.get(task)
        if found is not None:
            check_items(found, entry["metrics"], f"items of task {task}", task)
        else:
            found = task_items(results, output_dir, task)
        if found is None:
            continue
        draws[task] = statistics.task_draws(found.scores, found.groups, resamples, seed, task)
        entry["metrics"][CI_KEY] = list(statistics.percentile_interval(draws[task]))
    chance = results.get("chance") or {}
    for kind, stable in (results.get("stable_score") or {}).items():
        stable.pop(STABLE_CI_KEY, None)
        terms = stable.get("terms") or {}
        if not terms or any(t not in draws for t in terms):
            continue
        stable[STABLE_CI_KEY] = list(statistics.percentile_interval(
            statistics.stable_score_draws({t: draws[t] for t in terms}, chance)))
    results[UNCERTAINTY_KEY] = {"method": statistics.METHOD, "resamples": resamples,
                                "seed": seed, "level": statistics.LEVEL}


def interval_text(interval, digits: int = 4) -> str:
    """`` [lo, hi]`` for a table cell beside its value; '' without an interval."""
    if not isinstance(interval, (list, tuple)) or len(interval) != 2:
        return ""
    return f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
