"""The records every part of evaluation shares: one benchmark example, one prediction.

An :class:`Example` is what a task loader (:mod:`megatron_vlm.evaluation.tasks`) reads from a
benchmark's annotation files and what a scorer (:mod:`megatron_vlm.evaluation.scorers`) scores a
prediction against. ``example_id`` is deterministic (built from the benchmark's own ids, never
from Python's ``hash()``) and unique within its task: predictions files name examples by it.

A predictions file is JSON Lines, one object per example:
``{"question_id": ID, "answer": TEXT}`` where ``ID`` is the example's ``example_id`` (an integer
id may be written as a number); grounding tasks may give ``"box": [x1, y1, x2, y2]`` instead of
(or besides) the answer text; POPE may add ``"yes_prob"`` and ``"no_prob"`` (the probabilities of
the "Yes" and "No" tokens at the first generated position, which decide its answer when given).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Example:
    """One benchmark example."""

    task: str
    """Task name (``vqav2``, ``pope``, ``refcoco`` ...; see ``tasks.VISION_TASKS``)."""
    split: str
    """The split it belongs to (``val``, ``testdev``, ``adversarial`` ...)."""
    example_id: str
    """Deterministic id, unique within the task (the key of its prediction)."""
    question: str
    """The question, or the referring sentence of a grounding task (raw, before the prompt)."""
    image: Optional[str] = None
    """Image path relative to ``image_root``; also the key of the image in a precomputed
    embedding directory. None for a text-only example."""
    image_root: Optional[str] = None
    """Folder that ``image`` is relative to."""
    answers: tuple[str, ...] = ()
    """Ground-truth answers as annotated (VQAv2/TextVQA/VizWiz: 10; GQA: 1; POPE: "yes"/"no")."""
    box: Optional[Box] = None
    """Ground-truth box of a grounding task, normalized [x1, y1, x2, y2] in [0, 1]."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Task-specific fields (e.g. ``ocr_tokens``, ``clutter``, ``answer_type``)."""

    @property
    def image_path(self) -> Optional[str]:
        if self.image is None:
            return None
        import os

        return os.path.join(self.image_root or "", self.image)


@dataclass
class Prediction:
    """A model's output for one example."""

    example_id: str
    answer: str = ""
    """Generated text (stripped)."""
    box: Optional[list] = None
    """A box given directly (grounding tasks); otherwise the scorer parses ``answer``."""
    yes_prob: Optional[float] = None
    """POPE: probability of "Yes" (all its token spellings) at the first generated position."""
    no_prob: Optional[float] = None
    """POPE: probability of "No" at the first generated position."""

    def to_json(self) -> dict:
        out: dict = {"question_id": self.example_id, "answer": self.answer}
        for name in ("box", "yes_prob", "no_prob"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out
