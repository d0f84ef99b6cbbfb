"""Reader of vlm-evaluation's prepared ``metadata*.json`` index files (TRI-ML/vlm-evaluation,
``scripts/datasets/prepare.py``), so a directory prepared by that tool evaluates unchanged.

vlm-evaluation keeps its data under one root: the raw downloads in ``download/<family>/`` and
one index per dataset in ``datasets/<family>/metadata(-full).json``, a JSON object mapping an id
to a record. ``img_path`` in a record is relative to that root
(``download/vqa-v2/images_val2014/COCO_val2014_000000000042.jpg``). Example images here are
made relative to the image folder (``download/vqa-v2/images_val2014``), so the image keys are
the same file names as with the official files, and a precomputed embedding directory serves
both layouts.

Record fields by family (``question_id`` / ``example_id`` keys of some families are Python
``hash()`` values there, which change from run to run; ids here are built from the stable
fields instead, equal to the ids the official files give):

* vqa-v2: question_id, question, img_path, answer, all_answers, answer_type, question_type.
* gqa: question_id, question, img_path, answer.
* text-vqa: question_id, question (LLaVA's text: question + ``"\\nReference OCR token: ..."``
  + the short-answer instruction), img_path, answers.
* vizwiz: question_id (the list index), question, img_path, answers (``[[{answer, ...}]]``),
  answerable. The id is the image's file stem, as with the official ``val.json``.
* pope: split, split_question_id, question, img_path, answer. Id ``<split>/<split_question_id>``.
* refcoco: refer_dataset (RefCOCO, RefCOCO+, RefCOCOg: the three share one file), ref_id,
  sent_id, ref_expression, img_path, bbox (normalized, rounded to 2 places), split.
* ocid-ref: example_id, ref_expression, img_path, bbox, clutter_split ("Minimum Clutter" ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from megatron_vlm.evaluation.records import Example
from megatron_vlm.evaluation.task_formats import (CLUTTER_LEVELS, Source, answer_strings,
                                                  normalized_box, read_json, record_where)

OCR_MARKER = "\nReference OCR token: "
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
# vlm-evaluation's RefCOCO index holds all three datasets; its name for each task's records.
REFER_DATASETS = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg"}


def is_prepared_index(data: Any) -> bool:
    """Whether parsed JSON looks like a vlm-evaluation index: {id: {"img_path": ...}}."""
    if not isinstance(data, dict) or not data:
        return False
    first = next(iter(data.values()))
    return isinstance(first, dict) and "img_path" in first


def prepared_root(index_path: str | os.PathLike) -> Path:
    """vlm-evaluation's root, the folder holding ``datasets/<family>/<index file>``."""
    return Path(index_path).resolve().parent.parent.parent


def read_prepared(task: str, kind: str, path: str, image_root: Optional[str],
                  default_image_dir: Optional[str], data: Any = None) -> list[Example]:
    """The examples of ``task`` in a vlm-evaluation index file. ``kind`` is the task kind
    ("vqa", "gqa", "textvqa", "pope", "box"); ``default_image_dir`` (relative to the
    vlm-evaluation root) is the image root when ``image_root`` is None."""
    source = Source(path, task)
    if data is None:
        data = read_json(path, task)
    if not is_prepared_index(data):
        raise source.error("top level", None, "expected a vlm-evaluation index "
                           "{id: {img_path, ...}}")
    root = prepared_root(path)
    if image_root is None:
        image_root = str(root / default_image_dir) if default_image_dir else str(root)
    images_abs = os.path.abspath(image_root)
    examples = []
    for i, (key, record) in enumerate(data.items()):
        where = record_where(i, key)
        image_abs = os.path.abspath(root / source.get(record, "img_path", where, "str"))
        image = os.path.relpath(image_abs, images_abs)
        if image.startswith(os.pardir + os.sep) or image == os.pardir:
            raise source.error(where, "img_path", f"{record['img_path']!r} is not inside the "
                               f"image root {image_root}")
        example = _example(task, kind, source, where, key, record, image, image_root)
        if example is not None:
            examples.append(example)
    return examples


def _example(task: str, kind: str, source: Source, where: str, key: str, record: dict,
             image: str, image_root: str) -> Optional[Example]:
    get = source.get
    if kind == "pope":
        split = get(record, "split", where, "str")
        qid = get(record, "split_question_id", where, "id")
        answer = get(record, "answer", where, "str").strip().lower()
        if answer not in ("yes", "no"):
            raise source.error(where, "answer", f"expected 'yes' or 'no', got {record['answer']!r}")
        return Example(task=task, split=split, example_id=f"{split}/{qid}",
                       question=get(record, "question", where, "str"), image=image,
                       image_root=image_root, answers=(answer,), extra={"question_id": qid})
    if kind == "box":
        return _box_example(task, source, where, key, record, image, image_root)
    qid = str(get(record, "question_id", where, "id"))
    question = get(record, "question", where, "str")
    if task == "vizwiz":
        answers_field = get(record, "answers", where, "list")
        if len(answers_field) == 1 and isinstance(answers_field[0], list):  # wrapped once there
            record = {**record, "answers": answers_field[0]}
        answerable = get(record, "answerable", where, "any")
        if answerable not in (0, 1) or isinstance(answerable, float):
            raise source.error(where, "answerable", f"expected 0 or 1, got {answerable!r}")
        return Example(task=task, split="val", example_id=Path(image).stem, question=question,
                       image=image, image_root=image_root,
                       answers=answer_strings(source, record, where),
                       extra={"answerable": bool(answerable)})
    if kind == "gqa":
        return Example(task=task, split="testdev", example_id=qid, question=question, image=image,
                       image_root=image_root, answers=(get(record, "answer", where, "str"),))
    if kind == "textvqa":
        question, tokens = split_llava_ocr_question(question)
        return Example(task=task, split="val", example_id=qid, question=question, image=image,
                       image_root=image_root, answers=answer_strings(source, record, where),
                       extra={"ocr_tokens": tokens})
    # VQAv2: all ten answers are kept under all_answers ("answer" is only the majority one).
    answers = answer_strings(source, record, where, "all_answers")
    extra = {name: record[name] for name in ("answer_type", "question_type")
             if isinstance(record.get(name), str)}
    if isinstance(record.get("answer"), str):
        extra["multiple_choice_answer"] = record["answer"]
    return Example(task=task, split="val", example_id=qid, question=question, image=image,
                   image_root=image_root, answers=answers, extra=extra)


def _box_example(task: str, source: Source, where: str, key: str, record: dict, image: str,
                 image_root: str) -> Optional[Example]:
    get = source.get
    if get(record, "split", where, "str") != "val":
        return None
    box = normalized_box(source, where, "bbox", get(record, "bbox", where, "any"))
    text = get(record, "ref_expression", where, "str")
    if task in REFER_DATASETS:
        if get(record, "refer_dataset", where, "str") != REFER_DATASETS[task]:
            return None  # another of the three RefCOCO datasets
        ref_id, sent_id = get(record, "ref_id", where, "int"), get(record, "sent_id", where, "int")
        return Example(task=task, split="val", example_id=f"{ref_id}/{sent_id}", question=text,
                       image=image, image_root=image_root, box=box,
                       extra={"ref_id": ref_id, "sent_id": sent_id})
    clutter_name = get(record, "clutter_split", where, "str")
    clutter = clutter_name.split()[0].lower()
    if clutter not in CLUTTER_LEVELS:
        raise source.error(where, "clutter_split", f"expected one of 'Minimum Clutter', 'Medium "
                           f"Clutter', 'Maximum Clutter', got {clutter_name!r}")
    return Example(task=task, split="val", example_id=str(get(record, "example_id", where, "id")),
                   question=text, image=image, image_root=image_root, box=box,
                   extra={"clutter": clutter})


def split_llava_ocr_question(text: str) -> tuple[str, tuple[str, ...]]:
    """LLaVA's TextVQA question text -> (question, OCR tokens): ``"Q\\nReference OCR token: A, B
    \\nAnswer the question using a single word or phrase."`` -> ``("Q", ("A", "B"))``."""
    if text.endswith(SHORT_ANSWER_SUFFIX):
        text = text[: -len(SHORT_ANSWER_SUFFIX)]
    question, marker, ocr = text.partition(OCR_MARKER)
    if not marker:
        return question, ()
    return question, tuple(ocr.split(", ")) if ocr else ()
