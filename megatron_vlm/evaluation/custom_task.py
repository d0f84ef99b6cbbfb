"""Your own image questions as an evaluation task: a JSON Lines file, scored by exact match or
by the VQA rule.

A task is named in ``evaluation.custom_tasks``: ``{NAME: FILE}`` or ``{NAME: {file: FILE,
scoring: exact|vqa, prompt: TEMPLATE}}`` (:func:`parse_custom_tasks` checks it when the config
is built). Each non-blank line of FILE is one question::

    {"image": "images/cat.jpg", "question": "What animal is this?", "answers": ["cat"]}
    {"image": "/data/x.png", "question": "Which colour?", "answers": ["red"],
     "choices": ["red", "green", "blue"], "id": "q7"}

* ``image``: the image's path, relative to FILE's folder (or absolute). It is the
  ``Example.image`` key of a precomputed embedding directory, with FILE's folder as the image
  folder. Images are read when they are encoded, as for every task
  (:class:`~megatron_vlm.evaluation.eval_images.ImageSource`).
* ``question``: the question; ``answers``: a non-empty list of the correct answers.
* ``choices`` (optional): two or more options; every answer must be one of them.
* ``id`` (optional): a string or an integer, unique in the file; default the line number.

Any other field, or a field of the wrong type, is a ValueError naming FILE, the line and the
field. Examples keep the file's order (``limit`` keeps the first N), in the split ``val``.

The prompt is ``TEMPLATE`` with ``{question}`` and ``{choices}`` (the choices joined by ", ")
filled in, laid out as a fine-tuning conversation like every evaluation prompt
(:func:`megatron_vlm.data.samples.tokenize_prompt`: the checkpoint's system prompt, the image,
the question). The default template is the question alone (:data:`DEFAULT_PROMPT`), followed
by the choices on a line of their own when the record has choices
(:data:`DEFAULT_CHOICES_PROMPT`). The answer is generated greedily, as for VQAv2, and scored by
:func:`megatron_vlm.evaluation.scorers.score` with ``TaskScoring("exact")`` or
``TaskScoring("vqa")``. The engine scores log-likelihoods of text only (no image), so choices
are not ranked by likelihood: the generated text must match a choice.
"""

from __future__ import annotations

import os
import re
import string
from dataclasses import dataclass
from typing import Any, Optional

from megatron_vlm.evaluation.records import Example

SCORINGS = ("exact", "vqa")
DEFAULT_PROMPT = "{question}"
DEFAULT_CHOICES_PROMPT = "{question}\n{choices}"
PROMPT_FIELDS = frozenset({"question", "choices"})
FIELDS = ("image", "question", "answers", "choices", "id")
SPLIT = "val"
# The VQA rule credits a prediction by the matches among the OTHER answers, min(1, m / 3): full
# credit needs 4 equal answers, so a question with fewer can never score 1 (use "exact").
VQA_MIN_ANSWERS = 4
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
KEY = "evaluation.custom_tasks"


@dataclass(frozen=True)
class CustomTask:
    """One task of ``evaluation.custom_tasks``."""

    name: str
    file: str
    """The JSON Lines file of questions (as configured: relative to the working directory)."""
    scoring: str = "exact"
    """``exact`` (normalised exact match with any answer) or ``vqa`` (VQA accuracy)."""
    prompt: Optional[str] = None
    """The question's template; None: :data:`DEFAULT_PROMPT` / :data:`DEFAULT_CHOICES_PROMPT`."""

    def template(self, has_choices: bool) -> str:
        if self.prompt is not None:
            return self.prompt
        return DEFAULT_CHOICES_PROMPT if has_choices else DEFAULT_PROMPT


def _template_fields(template: str, key: str) -> set[str]:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ValueError(f"{key}={template!r} is not a template ({err}; write a literal brace "
                         "as {{ or }})") from None
    unknown = names - PROMPT_FIELDS
    if unknown or "question" not in names:
        raise ValueError(f"{key}={template!r} must hold {{question}} and may hold {{choices}}, "
                         f"nothing else in braces (found {sorted(unknown or names)})")
    return names


def parse_custom_tasks(raw: Any) -> dict[str, CustomTask]:
    """The tasks of ``evaluation.custom_tasks``; a ValueError naming the key for a bad entry."""
    if not isinstance(raw, dict):
        raise ValueError(f"{KEY} must be a mapping {{NAME: FILE}}, got {raw!r}")
    tasks = {}
    for name, entry in raw.items():
        key = f"{KEY}.{name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{key}: a task name is letters, digits, '_', '.' and '-' (it names "
                             "the predictions file)")
        if isinstance(entry, str):
            entry = {"file": entry}
        if not isinstance(entry, dict):
            raise ValueError(f"{key}={entry!r} must be a file or {{file: FILE, scoring: "
                             "exact|vqa, prompt: TEMPLATE}")
        unknown = sorted(set(entry) - {"file", "scoring", "prompt"})
        if unknown:
            raise ValueError(f"{key}.{unknown[0]}: unknown field (fields: file, scoring, prompt)")
        file = entry.get("file")
        if not isinstance(file, str) or not file.strip():
            raise ValueError(f"{key}.file={file!r} must be the path of a JSON Lines file")
        scoring = entry.get("scoring", "exact")
        if scoring not in SCORINGS:
            raise ValueError(f"{key}.scoring={scoring!r} must be one of "
                             f"{', '.join(map(repr, SCORINGS))}")
        prompt = entry.get("prompt")
        if prompt is not None:
            if not isinstance(prompt, str):
                raise ValueError(f"{key}.prompt={prompt!r} must be a string")
            _template_fields(prompt, f"{key}.prompt")
        tasks[name] = CustomTask(name, file, scoring, prompt)
    return tasks


def load_custom_task(task: CustomTask, limit: Optional[int] = None) -> list[Example]:
    """The questions of ``task``'s file in file order, the first ``limit`` of them (every line
    is checked, also with a limit)."""
    from megatron_vlm.evaluation.task_formats import Source, read_json_lines

    if not os.path.isfile(task.file):
        raise FileNotFoundError(f"{KEY}.{task.name}: {task.file} not found")
    source = Source(task.file, task.name)
    # A template of the user's that shows the choices needs them on every line.
    needs_choices = (task.prompt is not None
                     and "choices" in _template_fields(task.prompt, f"{KEY}.{task.name}.prompt"))
    image_root = os.path.dirname(os.path.abspath(task.file))
    examples, seen = [], {}
    for line, record in read_json_lines(task.file, task.name):
        where = f"line {line}"
        if not isinstance(record, dict):
            raise source.error(where, None, f"expected an object {{{', '.join(FIELDS)}}}, got "
                               f"{type(record).__name__}")
        unknown = sorted(set(record) - set(FIELDS))
        if unknown:
            raise source.error(where, unknown[0], f"unknown field (fields: {', '.join(FIELDS)})")
        example_id = str(source.get(record, "id", where, "id")) if "id" in record else str(line)
        if example_id in seen:
            raise source.error(where, "id", f"{example_id!r} is also the id of line "
                               f"{seen[example_id]}")
        seen[example_id] = line
        answers = _strings(source, record, "answers", where)
        choices = _strings(source, record, "choices", where) if "choices" in record else None
        if choices is not None:
            _check_choices(source, where, answers, choices)
        elif needs_choices:
            raise source.error(where, "choices", f"missing; the prompt of task {task.name} "
                               "shows {choices}")
        if task.scoring == "vqa" and len(answers) < VQA_MIN_ANSWERS:
            raise source.error(where, "answers", f"{len(answers)} answer(s); scoring 'vqa' needs "
                               f"at least {VQA_MIN_ANSWERS} (full credit is 4 matching answers: "
                               "give the annotators' answers, or use scoring 'exact')")
        extra = {} if choices is None else {"choices": choices}
        examples.append(Example(
            task=task.name, split=SPLIT, example_id=example_id,
            question=source.get(record, "question", where, "str"),
            image=source.get(record, "image", where, "str"), image_root=image_root,
            answers=answers, extra=extra))
    if not examples:
        raise ValueError(f"{task.file}: no questions (task {task.name})")
    return examples[:limit]


def _strings(source, record: dict, field: str, where: str) -> tuple[str, ...]:
    values = source.get(record, field, where, "list")
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise source.error(where, field, f"expected a non-empty list of non-empty strings, got "
                           f"{values!r:.80}")
    return tuple(values)


def _check_choices(source, where: str, answers: tuple[str, ...],
                   choices: tuple[str, ...]) -> None:
    from megatron_vlm.evaluation.answer_normalize import normalize_vqa_answer

    normalized = [normalize_vqa_answer(c) for c in choices]
    if len(choices) < 2 or len(set(normalized)) != len(normalized):
        raise source.error(where, "choices", f"expected two or more different choices, got "
                           f"{list(choices)!r:.80}")
    for answer in answers:
        if normalize_vqa_answer(answer) not in normalized:
            raise source.error(where, "answers", f"{answer!r} is not one of the choices "
                               f"{list(choices)!r:.80}")


def prompt_text(task: CustomTask, example: Example) -> str:
    """The human turn that asks ``example``'s question (the image placeholder in front)."""
    from megatron_vlm.data.samples import IMAGE_PLACEHOLDER

    choices = example.extra.get("choices")
    text = task.template(bool(choices)).format(question=example.question.strip(),
                                               choices=", ".join(choices or ()))
    return f"{IMAGE_PLACEHOLDER}\n{text}"


def prompt_tokens(task: CustomTask, example: Example, tokenizer, separator_id: int,
                  system_prompt: Optional[str] = None) -> list[int]:
    """The prompt's token ids as the model was fine-tuned (no image positions: the generation
    engine adds them in front), as :func:`megatron_vlm.evaluation.prompts.prompt_tokens`."""
    from megatron_vlm.data.samples import tokenize_prompt

    return tokenize_prompt(prompt_text(task, example), tokenizer, separator_id, system_prompt)
