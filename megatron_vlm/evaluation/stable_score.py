"""Stable score: the mean over tasks of (accuracy - chance accuracy), vision and text apart.

Subtracting chance puts a 2-choice task (chance 0.5) and a 5-choice task (chance 0.2) on one
scale, so a mean over tasks is not dominated by the easy-to-guess ones; the paper reports the
vision and the text stable score separately. Chance levels (REFERENCE.md section 4):

* text (0-shot multiple choice): the uniform guess 1 / choices, except BoolQ, whose level is a
  documented choice (``evaluation.boolq_chance``): 'uniform' 0.5, or 'majority' 0.62 (the share
  of its majority class, as DCLM reports it);
* vision: POPE 0.5 (yes/no); the open-ended tasks (VQAv2, GQA, TextVQA, referring boxes) 0.
* ``evaluation.chance`` overrides any entry; tasks from a local suite bring their own levels
  (ShapesWorld's ``text/tasks.json``).

VizWiz and the OCR-token variant of TextVQA are reported but not averaged (the paper averages
the plain TextVQA prompt only). A text task with no known chance level is an error, not a 0.
"""

from __future__ import annotations

from typing import Mapping, Optional

TEXT_CHANCE = {
    "agieval_lsat": 0.20,
    "arc_easy": 0.25,
    "bigbench_conceptual_combinations": 0.25,
    "boolq": 0.50,
    "copa": 0.50,
    "hellaswag": 0.25,
    "mathqa": 0.20,
    "piqa": 0.50,
    "pubmedqa": 1.0 / 3.0,
}
BOOLQ_CHANCE = {"uniform": 0.50, "majority": 0.62}
VISION_CHANCE = {"pope": 0.50, "shapesworld_pope": 0.50}
"""Vision tasks not listed are open-ended: chance 0."""
REPORTED_ONLY = frozenset({"vizwiz", "textvqa_ocr"})
"""Vision tasks that are reported but not part of the vision stable score."""


def chance_levels(boolq_chance: str = "uniform", overrides: Optional[Mapping[str, float]] = None,
                  suite_levels: Optional[Mapping[str, float]] = None) -> dict[str, float]:
    """The chance table in force: built-in levels, then a local suite's own levels, then the
    user's ``evaluation.chance`` overrides."""
    if boolq_chance not in BOOLQ_CHANCE:
        raise ValueError(f"evaluation.boolq_chance={boolq_chance!r} is not one of "
                         f"{', '.join(BOOLQ_CHANCE)}")
    table = {**TEXT_CHANCE, **VISION_CHANCE, "boolq": BOOLQ_CHANCE[boolq_chance]}
    table.update(suite_levels or {})
    table.update(overrides or {})
    return table


def stable_score(accuracies: Mapping[str, float], chance: Mapping[str, float], kind: str) -> dict:
    """``{"score", "tasks", "terms": {task: accuracy - chance}}`` over the tasks of one kind
    ('vision' or 'text'); ``score`` is None when no task counts. Accuracies are fractions."""
    if kind not in ("vision", "text"):
        raise ValueError(f"kind must be 'vision' or 'text', got {kind!r}")
    terms: dict[str, float] = {}
    for task, accuracy in sorted(accuracies.items()):
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"task {task}: accuracy {accuracy!r} is not a fraction in [0, 1]")
        if kind == "vision":
            if task in REPORTED_ONLY:
                continue
            level = chance.get(task, 0.0)
        else:
            if task not in chance:
                raise ValueError(f"no chance level for text task {task!r}: set "
                                 f"evaluation.chance.{task}=LEVEL (1 / number of choices)")
            level = chance[task]
        terms[task] = accuracy - level
    score = sum(terms.values()) / len(terms) if terms else None
    return {"score": score, "tasks": len(terms), "terms": terms}
