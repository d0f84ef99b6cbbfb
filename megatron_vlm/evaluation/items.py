"""Per-item scores of an evaluated task: ``EVAL_DIR/items/TASK.jsonl``.

One line per example, ``{"id": EXAMPLE_ID, "score": FLOAT}``: the task's headline metric for
that example, in [0, 1] (VQA soft accuracy, exact match / POPE answer / grounding hit 0 or 1,
lm-eval's per-document ``acc`` or ``acc_norm``). A task whose value is the unweighted mean of
its parts' means (POPE's splits, AGIEval LSAT's sections) adds ``"group": PART`` to every line;
the task's value is then the mean over parts of their mean score, and the bootstrap resamples
within each part (:mod:`.statistics`). The mean of the file reproduces the task's reported
accuracy.

``results.json`` names the file in the task's entry (``"items": "items/TASK.jsonl"``, relative
to the evaluation directory); the intervals of results.json and ``tools/compare_runs.py`` are
computed from these files. Ids are the examples' ids (``Example.example_id``; lm-eval's
``doc_id``, prefixed with the section's lm-eval task for a task made of sections), unique in a
file, so two evaluations of the same items can be paired by id.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

ITEMS_DIR = "items"


@dataclass
class TaskItems:
    """A task's items: ids, scores and (optionally) each item's part."""

    ids: list[str]
    scores: list[float]
    groups: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.scores) or (self.groups is not None
                                                 and len(self.groups) != len(self.ids)):
            raise ValueError(f"TaskItems: {len(self.ids)} ids, {len(self.scores)} scores, "
                             f"{None if self.groups is None else len(self.groups)} groups")

    def __len__(self) -> int:
        return len(self.ids)

    def value(self) -> float:
        """The task's value: the mean score, or the mean of the parts' mean scores."""
        from megatron_vlm.evaluation.statistics import grouped_mean

        return grouped_mean(self.scores, self.groups)

    def subset(self, ids: Sequence[str]) -> "TaskItems":
        """These items only, in the order of ``ids`` (each must be one of the task's)."""
        position = {item: i for i, item in enumerate(self.ids)}
        where = [position[item] for item in ids]
        return TaskItems(list(ids), [self.scores[i] for i in where],
                         None if self.groups is None else [self.groups[i] for i in where])


def items_path(output_dir: str | os.PathLike, task: str) -> Path:
    return Path(output_dir) / ITEMS_DIR / f"{task}.jsonl"


def write_items(path: str | os.PathLike, items: TaskItems) -> None:
    """Writes ``items`` as JSON Lines, atomically (the folder is created)."""
    from megatron_vlm.fsutil import write_text_atomic

    lines = []
    for i, (item, score) in enumerate(zip(items.ids, items.scores)):
        record = {"id": item, "score": score}
        if items.groups is not None:
            record["group"] = items.groups[i]
        lines.append(json.dumps(record, ensure_ascii=False))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(line + "\n" for line in lines))


def read_items(path: str | os.PathLike) -> TaskItems:
    """An items file back; a ValueError naming the file and line for anything that is not
    one (a missing or mistyped field, a score outside [0, 1], a repeated id, a group on some
    lines only, no lines at all); FileNotFoundError naming a missing file."""
    from megatron_vlm.evaluation.task_formats import read_json_lines

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"items file {path} does not exist")
    ids: list[str] = []
    scores: list[float] = []
    groups: list = []
    seen: set[str] = set()
    for number, record in read_json_lines(path, path.stem):
        where = f"{path}: line {number}"
        if not isinstance(record, dict) or "id" not in record or "score" not in record:
            raise ValueError(f"{where}: expected {{\"id\": ID, \"score\": NUMBER}}")
        item, score = record["id"], record["score"]
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise ValueError(f"{where}: field 'id' must be a string or an integer, got {item!r}")
        if isinstance(score, bool) or not isinstance(score, (int, float)) \
                or not math.isfinite(score) or not 0.0 <= score <= 1.0:
            raise ValueError(f"{where}: field 'score' must be a number in [0, 1], got {score!r}")
        item = str(item)
        if item in seen:
            raise ValueError(f"{where}: field 'id': {item!r} appears twice")
        seen.add(item)
        ids.append(item)
        scores.append(float(score))
        groups.append(record.get("group"))
    if not ids:
        raise ValueError(f"{path}: no items")
    has_group = [g is not None for g in groups]
    if any(has_group) and not all(has_group):
        first = has_group.index(not has_group[0])
        raise ValueError(f"{path}: item {ids[first]!r}: field 'group' is on some lines only")
    return TaskItems(ids, scores, [str(g) for g in groups] if all(has_group) else None)
