"""Scorers of the vision benchmarks, one per kind of task, and the predictions file reader.

``score(task, examples, predictions)`` picks the rule from :data:`TASK_SCORING` and returns a
flat dict: ``accuracy`` and the task's breakdowns, every metric a fraction in [0, 1], plus the
counts ``n`` (examples scored) and ``missing`` (examples without a prediction, scored wrong;
only allowed with ``allow_missing=True``). ``item_scores`` gives, by the same code, each
example's own score (what ``accuracy`` averages; :mod:`.items`), ``score_items`` both at once,
and ``item_groups`` the split of each POPE example (its accuracy averages the splits). The
rules follow TRI's vlm-evaluation, which the paper's numbers come from:

* VQA (``vqav2``, ``shapesworld_vqa``; ``vizwiz`` too). The prediction is ALWAYS normalised
  (:func:`~megatron_vlm.evaluation.answer_normalize.normalize_vqa_answer`: punctuation, then
  lowercase, number words, articles, contractions); the ground-truth answers only lose their
  punctuation. Accuracy of a question = the mean over its annotators of min(1, matches among
  the other answers / 3). This is vlm-evaluation's rule. The official VQA script normalises
  the prediction only when the annotators disagree, so on a unanimous question the two differ:
  prediction "Two" against ten "2" scores 1 here and 0 there. Either way the ground truth is
  never lowercased, so "Two" against ten "two" scores 0. Breakdowns: ``accuracy/<answer type>``
  when examples carry ``extra["answer_type"]`` (``accuracy/yes/no``, ``accuracy/number``,
  ``accuracy/other``). VizWiz adds ``accuracy/answerable`` and ``accuracy/unanswerable`` (the
  accuracy over the questions with ``extra["answerable"]`` true / false); these win over an
  answer type of the same name.
* TextVQA (``textvqa``, ``textvqa_ocr``): TextVQA's evaluator. The EvalAI processor is applied
  to the prediction and to every answer, then the same leave-one-annotator-out min(1, m / 3).
* GQA: punctuation (``string.punctuation``) deleted and lowercase on both sides, exact match.
* POPE (``pope``, ``shapesworld_pope``). With ``yes_prob``/``no_prob`` the answer is "yes" when
  yes_prob > no_prob; an exact tie counts as "no" (vlm-evaluation's ``np.argmax`` would pick
  "yes"; a tie only happens for a degenerate model). Without them the text is read like POPE's
  official script: only the text before the first "." counts, commas are deleted, and the
  answer is "no" when a space-separated word is exactly "no", "No" or "not", else "yes" (so
  "No!" reads as "yes", as it does there). Per split (``Example.split``): ``accuracy/<split>``,
  ``precision/``, ``recall/``, ``f1/`` ("yes" is the positive class; 0 where undefined) and
  ``yes_ratio/`` (the share of "yes" answers). ``accuracy`` is the MEAN OF THE SPLIT
  ACCURACIES (the paper's number), not the pooled accuracy. A missing prediction counts as the
  wrong answer.
* Exact match (the tasks of ``evaluation.custom_tasks``, :mod:`.custom_task`): correct when the
  normalised prediction equals a normalised answer, the VQA normalisation on both sides
  (punctuation, lowercase, number words, articles). Examples with ``extra["choices"]`` add
  ``off_choices``: the share of them whose prediction is none of its choices (a missing
  prediction included); the answers are among the choices, so such a prediction is wrong.
* Grounding (``refcoco``, ``refcoco+``, ``refcocog``, ``shapesworld_ref``: IoU >= 0.5;
  ``ocid_ref``: IoU >= 0.25, the OCID-Ref paper's threshold). ``Prediction.box`` when given,
  else the first group of four numbers in the text (brackets optional, commas or spaces
  between). A box counts only with every value in [0, 1], x1 < x2 and y1 < y2. Metrics:
  ``accuracy``; ``unparsable`` (no four numbers) and ``invalid`` (four numbers that are not
  such a box), both scored wrong; OCID-Ref adds ``accuracy/<clutter>`` when examples carry
  ``extra["clutter"]``. Unlike vlm-evaluation (which ``ast.literal_eval``s the whole output)
  a box followed or preceded by other words is still read.

Metrics are not rounded (vlm-evaluation reports percent rounded to 2 places).
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from megatron_vlm.evaluation.answer_normalize import (EvalAIAnswerProcessor, normalize_vqa_answer,
                                                      strip_answer_punctuation)
from megatron_vlm.evaluation.records import Example, Prediction
from megatron_vlm.fsutil import write_text_atomic

Metrics = dict[str, Union[float, int]]
Scored = tuple[Metrics, list[float]]
"""What a scorer returns: the metrics and each example's headline score, in example order."""


@dataclass(frozen=True)
class TaskScoring:
    """How a task is scored."""

    kind: str
    """``vqa``, ``vizwiz``, ``textvqa``, ``gqa``, ``pope``, ``grounding`` or ``exact``."""
    iou_threshold: float = 0.5
    """Grounding only: the IoU at or above which a box is correct."""


TASK_SCORING: dict[str, TaskScoring] = {
    "vqav2": TaskScoring("vqa"),
    "shapesworld_vqa": TaskScoring("vqa"),
    "vizwiz": TaskScoring("vizwiz"),
    "textvqa": TaskScoring("textvqa"),
    "textvqa_ocr": TaskScoring("textvqa"),
    "gqa": TaskScoring("gqa"),
    "pope": TaskScoring("pope"),
    "shapesworld_pope": TaskScoring("pope"),
    "refcoco": TaskScoring("grounding", 0.5),
    "refcoco+": TaskScoring("grounding", 0.5),
    "refcocog": TaskScoring("grounding", 0.5),
    "shapesworld_ref": TaskScoring("grounding", 0.5),
    "ocid_ref": TaskScoring("grounding", 0.25),
}


SPLIT_MEAN_KINDS = frozenset({"pope"})
"""Kinds whose ``accuracy`` is the mean of the split accuracies, not of all examples."""


def task_scoring(task: str) -> TaskScoring:
    """The scoring rule of ``task``; an unknown name is a ValueError listing the known ones."""
    try:
        return TASK_SCORING[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASK_SCORING)}") from None


# ---------------------------------------------------------------------------------------------
# Per-example rules
# ---------------------------------------------------------------------------------------------

def leave_one_out_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over the answers of min(1, #OTHER answers equal to ``prediction`` / 3); the caller
    has already normalised both sides."""
    matches = sum(answer == prediction for answer in answers)
    # Leaving out a matching answer leaves matches - 1 among the others, any other leaves all.
    total = sum(min(1.0, (matches - (answer == prediction)) / 3.0) for answer in answers)
    return total / len(answers)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """vlm-evaluation's VQA accuracy of one question (see the module docstring)."""
    return leave_one_out_accuracy(normalize_vqa_answer(prediction),
                                  [strip_answer_punctuation(a) for a in answers])


_EVALAI = EvalAIAnswerProcessor()


def textvqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """TextVQA's accuracy of one question: EvalAI processor on both sides, leave-one-out."""
    return leave_one_out_accuracy(_EVALAI(prediction), [_EVALAI(a) for a in answers])


_DROP_PUNCTUATION = str.maketrans("", "", string.punctuation)


def gqa_match(prediction: str, answer: str) -> bool:
    """GQA: equal after deleting ``string.punctuation`` and lowercasing both sides."""
    def clean(text: str) -> str:
        return text.translate(_DROP_PUNCTUATION).lower()

    return clean(prediction) == clean(answer)


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the prediction equals one of ``answers``, both normalised by the VQA rule."""
    return normalize_vqa_answer(prediction) in {normalize_vqa_answer(a) for a in answers}


_POPE_NO_WORDS = frozenset({"no", "No", "not"})


def pope_text_answer(text: str) -> str:
    """POPE's official reading of a generated answer: "no" or "yes"."""
    first_sentence = text.split(".", 1)[0].replace(",", "")
    return "no" if _POPE_NO_WORDS.intersection(first_sentence.split(" ")) else "yes"


def pope_answer(prediction: Prediction) -> str:
    """"yes" / "no": from the probabilities when given (a tie is "no"), else from the text."""
    if prediction.yes_prob is not None or prediction.no_prob is not None:
        if prediction.yes_prob is None or prediction.no_prob is None:
            raise ValueError(f"prediction {prediction.example_id!r}: yes_prob and no_prob must be "
                             "given together")
        return "yes" if prediction.yes_prob > prediction.no_prob else "no"
    return pope_text_answer(prediction.answer)


_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_SEPARATOR = r"(?:\s*,\s*|\s+)"
_FOUR_NUMBERS = re.compile(rf"(?<![\w.])({_NUMBER}){_SEPARATOR}({_NUMBER}){_SEPARATOR}"
                           rf"({_NUMBER}){_SEPARATOR}({_NUMBER})(?!\w|\.\d)")


def parse_box(text: str) -> Optional[tuple[float, float, float, float]]:
    """The first group of four numbers in ``text`` (``[x1, y1, x2, y2]``, brackets optional,
    commas or spaces between), or None. No range check here: see :func:`is_valid_box`."""
    found = _FOUR_NUMBERS.search(text)
    if found is None:
        return None
    return tuple(float(value) for value in found.groups())  # type: ignore[return-value]


def is_valid_box(box: Sequence[float]) -> bool:
    """Four values in [0, 1] with x1 < x2 and y1 < y2."""
    return (len(box) == 4 and all(0.0 <= v <= 1.0 for v in box)
            and box[0] < box[2] and box[1] < box[3])


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes of positive area."""
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


# ---------------------------------------------------------------------------------------------
# Scorers: each takes the examples and their predictions (None = missing, scored wrong)
# ---------------------------------------------------------------------------------------------

def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def _group_means(scores: Sequence[float], keys: Sequence[Optional[str]], prefix: str) -> Metrics:
    """``{prefix/key: mean score of the examples with that key}``, keys in first-seen order."""
    groups: dict[str, list[float]] = {}
    for value, key in zip(scores, keys):
        if key is not None:
            groups.setdefault(str(key), []).append(value)
    return {f"{prefix}/{key}": _mean(values) for key, values in groups.items()}


def _answers(example: Example, where: str) -> tuple[str, ...]:
    if not example.answers or not all(isinstance(a, str) for a in example.answers):
        raise ValueError(f"{where}example {example.example_id!r}: field 'answers' must be a "
                         f"non-empty list of strings, got {example.answers!r}")
    return tuple(example.answers)


def _score_soft_vqa(examples: Sequence[Example], predictions: Sequence[Optional[Prediction]],
                    rule: Callable[[str, Sequence[str]], float], where: str,
                    answerable: bool = False) -> Scored:
    scores = []
    for example, prediction in zip(examples, predictions):
        answers = _answers(example, where)
        scores.append(0.0 if prediction is None else rule(prediction.answer, answers))
    metrics: Metrics = {"accuracy": _mean(scores)}
    metrics.update(_group_means(scores, [e.extra.get("answer_type") for e in examples], "accuracy"))
    if answerable:
        flags = [e.extra.get("answerable") for e in examples]
        names = [None if f is None else ("answerable" if f else "unanswerable") for f in flags]
        metrics.update(_group_means(scores, names, "accuracy"))
    return metrics, scores


def _score_vqa(examples, predictions, where, scoring) -> Scored:
    return _score_soft_vqa(examples, predictions, vqa_accuracy, where)


def _score_vizwiz(examples, predictions, where, scoring) -> Scored:
    return _score_soft_vqa(examples, predictions, vqa_accuracy, where, answerable=True)


def _score_textvqa(examples, predictions, where, scoring) -> Scored:
    return _score_soft_vqa(examples, predictions, textvqa_accuracy, where)


def _score_gqa(examples, predictions, where, scoring) -> Scored:
    scores = []
    for example, prediction in zip(examples, predictions):
        answers = _answers(example, where)
        if len(answers) != 1:
            raise ValueError(f"{where}example {example.example_id!r}: field 'answers' must hold "
                             f"exactly one GQA answer, got {len(answers)}")
        scores.append(float(prediction is not None and gqa_match(prediction.answer, answers[0])))
    return {"accuracy": _mean(scores)}, scores


def _score_exact(examples, predictions, where, scoring) -> Scored:
    scores, off_choices = [], []
    for example, prediction in zip(examples, predictions):
        answer = None if prediction is None else prediction.answer
        scores.append(float(answer is not None and exact_match(answer, _answers(example, where))))
        choices = example.extra.get("choices")
        if choices:
            off_choices.append(float(answer is None or not exact_match(answer, choices)))
    metrics: Metrics = {"accuracy": _mean(scores)}
    if off_choices:
        metrics["off_choices"] = _mean(off_choices)
    return metrics, scores


def _pope_label(example: Example, where: str) -> str:
    answers = _answers(example, where)
    label = answers[0].strip().lower()
    if len(answers) != 1 or label not in ("yes", "no"):
        raise ValueError(f"{where}example {example.example_id!r}: field 'answers' must be one "
                         f"label 'yes' or 'no', got {list(answers)!r}")
    return label


def _binary_metrics(labels: Sequence[str], answers: Sequence[str], split: str) -> Metrics:
    """POPE's numbers for one split, "yes" being the positive class."""
    pairs = list(zip(labels, answers))
    tp = sum(label == "yes" and answer == "yes" for label, answer in pairs)
    fp = sum(label == "no" and answer == "yes" for label, answer in pairs)
    fn = sum(label == "yes" and answer == "no" for label, answer in pairs)
    correct = sum(label == answer for label, answer in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {f"accuracy/{split}": correct / len(pairs), f"precision/{split}": precision,
            f"recall/{split}": recall, f"f1/{split}": f1,
            f"yes_ratio/{split}": (tp + fp) / len(pairs)}


def _score_pope(examples, predictions, where, scoring) -> Scored:
    by_split: dict[str, tuple[list[str], list[str]]] = {}
    correct = []
    for example, prediction in zip(examples, predictions):
        label = _pope_label(example, where)
        if prediction is None:
            answer = "no" if label == "yes" else "yes"  # a missing answer is the wrong one
        else:
            answer = pope_answer(prediction)
        labels, answers = by_split.setdefault(str(example.split), ([], []))
        labels.append(label)
        answers.append(answer)
        correct.append(float(answer == label))
    split_metrics: Metrics = {}
    for split, (labels, answers) in by_split.items():
        split_metrics.update(_binary_metrics(labels, answers, split))
    accuracy = _mean([split_metrics[f"accuracy/{split}"] for split in by_split])
    return {"accuracy": accuracy, **split_metrics}, correct


def _predicted_box(prediction: Prediction) -> Optional[Sequence[float]]:
    if prediction.box is not None:
        return prediction.box
    return parse_box(prediction.answer)


def _score_grounding(examples, predictions, where, scoring) -> Scored:
    correct, unparsable, invalid = [], 0, 0
    for example, prediction in zip(examples, predictions):
        truth = example.box
        if truth is None or len(truth) != 4 or not is_valid_box(truth):
            raise ValueError(f"{where}example {example.example_id!r}: field 'box' must be a "
                             f"normalized [x1, y1, x2, y2] with x1 < x2, y1 < y2, got {truth!r}")
        box = None if prediction is None else _predicted_box(prediction)
        if prediction is not None and box is None:
            unparsable += 1
        elif box is not None and not is_valid_box(box):
            invalid += 1
            box = None
        correct.append(float(box is not None and box_iou(box, truth) >= scoring.iou_threshold))
    metrics: Metrics = {"accuracy": _mean(correct)}
    metrics.update(_group_means(correct, [e.extra.get("clutter") for e in examples], "accuracy"))
    metrics["unparsable"] = unparsable / len(examples)
    metrics["invalid"] = invalid / len(examples)
    return metrics, correct


_SCORERS: dict[str, Callable[..., Scored]] = {
    "vqa": _score_vqa, "vizwiz": _score_vizwiz, "textvqa": _score_textvqa, "gqa": _score_gqa,
    "pope": _score_pope, "grounding": _score_grounding, "exact": _score_exact,
}


def _first_few(ids: Iterable[str], limit: int = 5) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" ... ({len(ids)} in all)" if len(ids) > limit else "")


def score(task: str, examples: Sequence[Example], predictions: Mapping[str, Prediction],
          allow_missing: bool = False, source: Optional[str] = None,
          scoring: Optional[TaskScoring] = None) -> Metrics:
    """Scores ``predictions`` (keyed by example id) against ``examples`` by ``task``'s rule, or
    by ``scoring`` when given (a task that is not in :data:`TASK_SCORING`, e.g. a custom one).

    A prediction for an id that is not among the examples is a ValueError; so are examples
    without a prediction, unless ``allow_missing`` (then they are scored wrong and counted in
    ``missing``). ``source`` names the predictions file in error messages.
    """
    return score_items(task, examples, predictions, allow_missing, source, scoring)[0]


def item_scores(task: str, examples: Sequence[Example], predictions: Mapping[str, Prediction],
                allow_missing: bool = False, source: Optional[str] = None,
                scoring: Optional[TaskScoring] = None) -> dict[str, float]:
    """Each example's headline score in [0, 1], keyed by example id, by the same rule as
    :func:`score`: VQA soft accuracy, exact match, POPE answer or grounding hit (0 or 1)."""
    return score_items(task, examples, predictions, allow_missing, source, scoring)[1]


def item_groups(task: str, examples: Sequence[Example],
                scoring: Optional[TaskScoring] = None) -> Optional[dict[str, str]]:
    """Each example's split, keyed by example id, where the task's accuracy is the mean of its
    splits' accuracies (POPE), so that the items' statistic is the reported one; else None."""
    if (scoring or task_scoring(task)).kind not in SPLIT_MEAN_KINDS:
        return None
    return {e.example_id: str(e.split) for e in examples}


def score_items(task: str, examples: Sequence[Example], predictions: Mapping[str, Prediction],
                allow_missing: bool = False, source: Optional[str] = None,
                scoring: Optional[TaskScoring] = None) -> tuple[Metrics, dict[str, float]]:
    """(:func:`score`'s metrics, :func:`item_scores`' per-example scores) from one pass."""
    scoring = scoring or task_scoring(task)
    where = f"{source}: " if source else ""
    if not examples:
        raise ValueError(f"{where}no examples to score for task {task!r}")
    by_id: dict[str, Example] = {}
    for example in examples:
        if example.example_id in by_id:
            raise ValueError(f"task {task!r}: example id {example.example_id!r} appears twice")
        by_id[example.example_id] = example
    unknown = [key for key in predictions if key not in by_id]
    if unknown:
        raise ValueError(f"{where}{len(unknown)} prediction(s) for ids that are not examples of "
                         f"task {task!r}: {_first_few(unknown)}")
    for key, prediction in predictions.items():
        if prediction.example_id != key:
            raise ValueError(f"{where}prediction keyed {key!r} has example_id "
                             f"{prediction.example_id!r}")
    missing = [e.example_id for e in examples if e.example_id not in predictions]
    if missing and not allow_missing:
        raise ValueError(f"{where}{len(missing)} of {len(examples)} examples of task {task!r} have "
                         f"no prediction: {_first_few(missing)} (allow_missing scores them wrong)")
    ordered = [predictions.get(e.example_id) for e in examples]
    metrics, per_example = _SCORERS[scoring.kind](examples, ordered, where, scoring)
    metrics["n"] = len(examples)
    metrics["missing"] = len(missing)
    return metrics, {e.example_id: value for e, value in zip(examples, per_example)}


# ---------------------------------------------------------------------------------------------
# Predictions files
# ---------------------------------------------------------------------------------------------

def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _prediction_from_record(record: Any, where: str) -> Prediction:
    """One predictions record (records.py's format) -> Prediction; ``where`` names it."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "question_id" not in record:
        raise ValueError(f"{where}: missing field 'question_id'")
    qid = record["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        raise ValueError(f"{where}: field 'question_id' must be a string or an integer, "
                         f"got {qid!r}")
    box = record.get("box")
    if box is not None and (not isinstance(box, list) or len(box) != 4
                            or not all(_finite_number(v) for v in box)):
        raise ValueError(f"{where}: field 'box' must be a list of four numbers, got {box!r}")
    probs = {}
    for name in ("yes_prob", "no_prob"):
        value = record.get(name)
        if value is not None and (not _finite_number(value) or value < 0):
            raise ValueError(f"{where}: field {name!r} must be a finite number >= 0, got {value!r}")
        probs[name] = None if value is None else float(value)
    if (probs["yes_prob"] is None) != (probs["no_prob"] is None):
        raise ValueError(f"{where}: fields 'yes_prob' and 'no_prob' must be given together")
    answer = record.get("answer")
    if answer is None:
        if box is None and probs["yes_prob"] is None:
            raise ValueError(f"{where}: missing field 'answer'")
        answer = ""
    elif not isinstance(answer, str):
        raise ValueError(f"{where}: field 'answer' must be a string, got {answer!r}")
    return Prediction(example_id=str(qid), answer=answer,
                      box=None if box is None else [float(v) for v in box], **probs)


def read_predictions(path: str | os.PathLike) -> dict[str, Prediction]:
    """Reads a predictions file: JSON Lines as :mod:`records` describes, or one JSON list of the
    same objects (the official VQA results format ``[{"question_id", "answer"}]``). Blank lines
    are skipped. A malformed record or a repeated id is a ValueError naming the file, the line
    (or list index) and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    located: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from None
        located = [(f"{path}: record {i}", record) for i, record in enumerate(records)]
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                located.append((f"{path}: line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number}: not valid JSON ({err.msg})") from None
    predictions: dict[str, Prediction] = {}
    for where, record in located:
        prediction = _prediction_from_record(record, where)
        if prediction.example_id in predictions:
            raise ValueError(f"{where}: field 'question_id': id {prediction.example_id!r} appears "
                             "twice")
        predictions[prediction.example_id] = prediction
    return predictions


def write_predictions(path: str | os.PathLike,
                      predictions: Union[Mapping[str, Prediction], Iterable[Prediction]]) -> None:
    """Writes predictions as JSON Lines (one :meth:`Prediction.to_json` per line), atomically;
    the parent directory is created. A repeated id is a ValueError."""
    items = list(predictions.items()) if isinstance(predictions, Mapping) else \
        [(p.example_id, p) for p in predictions]
    seen: set[str] = set()
    lines = []
    for key, prediction in items:
        if key != prediction.example_id:
            raise ValueError(f"prediction keyed {key!r} has example_id {prediction.example_id!r}")
        if key in seen:
            raise ValueError(f"{path}: prediction id {key!r} appears twice")
        seen.add(key)
        lines.append(json.dumps(prediction.to_json(), ensure_ascii=False))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(line + "\n" for line in lines))
