"""Readers of the benchmarks' own annotation files, one function per file format.

Each reader turns the records of one format into :class:`~megatron_vlm.evaluation.records.Example`
objects and checks every field it uses: a malformed record is a ValueError naming the file, the
record (its index or line, and its id when it has one) and the field. Readers do not sort, limit
or check ids for uniqueness; :func:`megatron_vlm.evaluation.tasks.load_examples` does that for
every format alike. Field layouts (official sources; docs/evaluation_data.md):

* VQAv2 (and ShapesWorld VQA): questions ``{"questions": [{question_id, image_id, question}],
  "data_subtype"}`` + annotations ``{"annotations": [{question_id, image_id, answers: [{answer}],
  multiple_choice_answer, answer_type, question_type}]}``.
* GQA ``testdev_balanced_questions.json``: ``{question_id: {imageId, question, answer, ...}}``.
* TextVQA ``TextVQA_0.5.1_val.json``: ``{"data": [{question_id, image_id, question, answers,
  ocr_tokens}]}``.
* POPE: JSON Lines ``{question_id, image, text, label}`` (the official ``coco_pope_*.json`` are
  JSON Lines despite their extension).
* RefCOCO/+/g: the ``refs(unc).p`` / ``refs(umd).p`` pickle (a list of ``{ref_id, image_id, ann_id,
  split, sentences: [{sent_id, sent, raw}]}``) + ``instances.json`` (``images`` with id, width,
  height, file_name; ``annotations`` with id and bbox ``[x, y, w, h]`` in pixels); or our JSONL
  ``{id, image, sent, bbox: [x1, y1, x2, y2] normalized}`` (ShapesWorld's).
* OCID-Ref ``val_expressions.json``: ``{id: {scene_path, sentence, bbox: "[x1, y1, x2, y2]"
  (pixels of the 640x480 image), take_id}}``.
* VizWiz ``val.json``: ``[{image, question, answers: [{answer, answer_confidence}], answerable,
  answer_type}]``.

vlm-evaluation's prepared ``metadata*.json`` files are read by
:mod:`megatron_vlm.evaluation.task_prepared`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any, Optional, Sequence

from megatron_vlm.evaluation.records import Box, Example

# OCID-Ref images are all 640 x 480 (the OCID camera); its boxes are pixels of that frame.
OCID_IMAGE_SIZE = (640, 480)
# OCID's take_id counts the photos of one table top as objects are added: 0-9 are free-standing
# objects, 10-16 touching, 17-20 stacked (vlm-evaluation's minimum/medium/maximum clutter).
CLUTTER_LEVELS = ("minimum", "medium", "maximum")
# A box edge may overshoot the image by rounding in the annotation tools; more than this many
# pixels is an annotation error, not rounding.
BOX_PIXEL_TOLERANCE = 0.5


class Source:
    """One annotation file being read; builds error messages that name it."""

    def __init__(self, path: str | os.PathLike, task: str):
        self.path = str(path)
        self.task = task

    def error(self, where: str, field: Optional[str], message: str) -> ValueError:
        field_part = f", field {field!r}" if field else ""
        return ValueError(f"{self.path}: {where}{field_part}: {message} (task {self.task})")

    def get(self, record: Any, field: str, where: str, kind: str = "str") -> Any:
        """``record[field]`` checked to be of ``kind``: "str" (non-empty), "id" (int or
        non-empty str), "int", "list", "dict" or "any"."""
        if not isinstance(record, dict):
            raise self.error(where, None, f"expected an object, got {type(record).__name__}")
        if field not in record:
            raise self.error(where, field, "missing")
        value = record[field]
        ok = {
            "str": isinstance(value, str) and bool(value.strip()),
            "id": (isinstance(value, int) and not isinstance(value, bool))
                  or (isinstance(value, str) and bool(value.strip())),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "list": isinstance(value, list),
            "dict": isinstance(value, dict),
            "any": True,
        }[kind]
        if not ok:
            wanted = {"str": "a non-empty string", "id": "an integer or a non-empty string",
                      "int": "an integer", "list": "a list", "dict": "an object"}[kind]
            raise self.error(where, field, f"expected {wanted}, got {value!r:.80}")
        return value


def record_where(index: int | str, record_id: Any = None, unit: str = "record") -> str:
    """``record 3`` or ``record 3 (id 42)``: how an error names a record."""
    where = f"{unit} {index}"
    return where if record_id is None else f"{where} (id {record_id!r})"


# ---------------------------------------------------------------------------------------------
# Files


def read_json(path: str | os.PathLike, task: str) -> Any:
    """The parsed JSON of ``path``; a ValueError naming the file when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}) (task {task})") from err


def read_json_lines(path: str | os.PathLike, task: str) -> list[tuple[int, Any]]:
    """(line number from 1, parsed object) of every non-blank line of a JSON Lines file."""
    out = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                out.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number}: not valid JSON ({err}) "
                                 f"(task {task})") from err
    return out


def read_records(path: str | os.PathLike, task: str) -> list[tuple[str, Any]]:
    """(where, record) of a JSON Lines file, or of a JSON file holding one list of records, or
    JSON Lines under a ``.json`` name (the official POPE files)."""
    if str(path).endswith(".jsonl"):
        return [(f"line {n}", r) for n, r in read_json_lines(path, task)]
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":  # more than one JSON value: JSON Lines
            raise ValueError(f"{path}: not valid JSON ({err}) (task {task})") from err
        return [(f"line {n}", r) for n, r in read_json_lines(path, task)]
    if isinstance(data, list):
        return [(f"record {i}", r) for i, r in enumerate(data)]
    if isinstance(data, dict) and "question_id" in data:  # JSON Lines of one record
        return [("line 1", data)]
    raise ValueError(f"{path}: expected JSON Lines or a JSON list of records, got a "
                     f"{type(data).__name__} (task {task})")


# ---------------------------------------------------------------------------------------------
# Field helpers


def answer_strings(source: Source, record: dict, where: str,
                   field: str = "answers") -> tuple[str, ...]:
    """The ``answer`` text of each ``{"answer": ...}`` of a VQA-style answers list."""
    answers = source.get(record, field, where, "list")
    if not answers:
        raise source.error(where, field, "empty list")
    out = []
    for j, item in enumerate(answers):
        text = item.get("answer") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise source.error(where, f"{field}[{j}]", f"expected an answer string or "
                               f"{{'answer': str}}, got {item!r:.80}")
        out.append(text)
    return tuple(out)


def normalized_box(source: Source, where: str, field: str, value: Any) -> Box:
    """A normalized ``[x1, y1, x2, y2]`` checked to lie in [0, 1] with x1 < x2 and y1 < y2."""
    box = _four_numbers(source, where, field, value)
    x1, y1, x2, y2 = box
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise source.error(where, field, f"expected a normalized [x1, y1, x2, y2] with "
                           f"0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1, got {list(box)}")
    return box


def pixel_box_to_normalized(source: Source, where: str, field: str, value: Any, width: float,
                            height: float, xywh: bool) -> Box:
    """A pixel box (``[x, y, w, h]`` when ``xywh``, else ``[x1, y1, x2, y2]``) of a ``width`` x
    ``height`` image as normalized ``[x1, y1, x2, y2]``. Edges may overshoot the image by
    ``BOX_PIXEL_TOLERANCE`` pixels (clamped); anything else outside the image is an error."""
    a, b, c, d = _four_numbers(source, where, field, value)
    x1, y1, x2, y2 = (a, b, a + c, b + d) if xywh else (a, b, c, d)
    tol = BOX_PIXEL_TOLERANCE
    if not (-tol <= x1 < x2 <= width + tol and -tol <= y1 < y2 <= height + tol):
        layout = "[x, y, w, h]" if xywh else "[x1, y1, x2, y2]"
        raise source.error(where, field, f"pixel box {layout} {[a, b, c, d]} is empty or outside "
                           f"the {width:g}x{height:g} image")
    x1, x2 = max(x1, 0.0), min(x2, float(width))
    y1, y2 = max(y1, 0.0), min(y2, float(height))
    return (x1 / width, y1 / height, x2 / width, y2 / height)


def _four_numbers(source: Source, where: str, field: str, value: Any) -> Box:
    if isinstance(value, str):  # OCID-Ref stores its boxes as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if (not isinstance(value, (list, tuple)) or len(value) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise source.error(where, field, f"expected 4 numbers, got {value!r:.80}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# VQAv2 (and ShapesWorld VQA)


def read_vqav2(task: str, paths: Sequence[str], image_root: Optional[str],
               image_name: str) -> list[Example]:
    """VQAv2 questions + annotations files, in either order (told apart by their top-level
    ``questions`` / ``annotations`` key). ``image_name`` formats the image file name from
    ``image_id`` and the questions file's ``data_subtype`` (e.g. ``COCO_{subtype}_{id:012d}.jpg``)."""
    parsed = {}
    for path in paths:
        data = read_json(path, task)
        kind = ("questions" if isinstance(data, dict) and "questions" in data
                else "annotations" if isinstance(data, dict) and "annotations" in data else None)
        if kind is None or kind in parsed:
            raise ValueError(f"task {task}: expected one VQAv2 questions file (with a top-level "
                             f"'questions' list) and one annotations file (with 'annotations'), "
                             f"got {list(paths)}")
        parsed[kind] = (path, data)
    (questions_path, qdata), (annotations_path, adata) = parsed["questions"], parsed["annotations"]
    qsrc, asrc = Source(questions_path, task), Source(annotations_path, task)
    questions = qsrc.get(qdata, "questions", "top level", "list")
    annotations = asrc.get(adata, "annotations", "top level", "list")
    subtype = qdata.get("data_subtype") or "val2014"
    by_qid: dict[str, tuple[str, dict]] = {}
    for i, ann in enumerate(annotations):
        where = record_where(i)
        qid = str(asrc.get(ann, "question_id", where, "id"))
        where = record_where(i, qid)
        if qid in by_qid:
            raise asrc.error(where, "question_id", f"duplicate (also {by_qid[qid][0]})")
        by_qid[qid] = (where, ann)
    examples = []
    seen = set()
    for i, q in enumerate(questions):
        qid = str(qsrc.get(q, "question_id", record_where(i), "id"))
        where = record_where(i, qid)
        if qid in seen:
            raise qsrc.error(where, "question_id", "duplicate")
        image_id = qsrc.get(q, "image_id", where, "int")
        text = qsrc.get(q, "question", where, "str")
        if qid not in by_qid:
            raise qsrc.error(where, "question_id", f"has no annotation in {annotations_path}")
        awhere, ann = by_qid[qid]
        if asrc.get(ann, "image_id", awhere, "int") != image_id:
            raise asrc.error(awhere, "image_id", f"{ann['image_id']} differs from the question's "
                             f"image_id {image_id} in {questions_path}")
        answers = answer_strings(asrc, ann, awhere)
        seen.add(qid)
        extra = {"image_id": image_id}
        for name in ("multiple_choice_answer", "answer_type", "question_type"):
            if isinstance(ann.get(name), str):
                extra[name] = ann[name]
        examples.append(Example(task=task, split="val", example_id=qid, question=text,
                                image=image_name.format(subtype=subtype, image_id=image_id),
                                image_root=image_root, answers=answers, extra=extra))
    extra_annotations = [qid for qid in by_qid if qid not in seen]
    if extra_annotations:
        where, _ = by_qid[extra_annotations[0]]
        raise asrc.error(where, "question_id", f"has no question in {questions_path} "
                         f"({len(extra_annotations)} annotations without a question)")
    return examples


# ---------------------------------------------------------------------------------------------
# GQA, TextVQA, VizWiz


def read_gqa(task: str, path: str, image_root: Optional[str]) -> list[Example]:
    """GQA ``testdev_balanced_questions.json``: {question_id: {imageId, question, answer}}."""
    source = Source(path, task)
    data = read_json(path, task)
    if not isinstance(data, dict):
        raise source.error("top level", None, "expected an object {question_id: question}")
    examples = []
    for i, (qid, record) in enumerate(data.items()):
        where = record_where(i, qid)
        image_id = str(source.get(record, "imageId", where, "id"))
        examples.append(Example(
            task=task, split="testdev", example_id=str(qid),
            question=source.get(record, "question", where, "str"),
            image=f"{image_id}.jpg", image_root=image_root,
            answers=(source.get(record, "answer", where, "str"),),
            extra={"image_id": image_id}))
    return examples


def read_textvqa(task: str, path: str, image_root: Optional[str]) -> list[Example]:
    """TextVQA ``TextVQA_0.5.1_val.json``: {"data": [{question_id, image_id, question, answers,
    ocr_tokens}]}; ``extra["ocr_tokens"]`` keeps the OCR tokens (the textvqa_ocr prompt)."""
    source = Source(path, task)
    data = source.get(read_json(path, task), "data", "top level", "list")
    examples = []
    for i, record in enumerate(data):
        qid = str(source.get(record, "question_id", record_where(i), "id"))
        where = record_where(i, qid)
        image_id = str(source.get(record, "image_id", where, "id"))
        tokens = source.get(record, "ocr_tokens", where, "list")
        if not all(isinstance(t, str) for t in tokens):
            raise source.error(where, "ocr_tokens", "expected a list of strings")
        examples.append(Example(
            task=task, split="val", example_id=qid,
            question=source.get(record, "question", where, "str"),
            image=f"{image_id}.jpg", image_root=image_root,
            answers=answer_strings(source, record, where),
            extra={"image_id": image_id, "ocr_tokens": tuple(tokens)}))
    return examples


def read_vizwiz(task: str, path: str, image_root: Optional[str]) -> list[Example]:
    """VizWiz ``val.json``: [{image, question, answers, answerable, answer_type}]; the example id
    is the image's file stem (VizWiz has one question per image)."""
    source = Source(path, task)
    data = read_json(path, task)
    if not isinstance(data, list):
        raise source.error("top level", None, "expected a list of questions")
    examples = []
    for i, record in enumerate(data):
        image = source.get(record, "image", record_where(i), "str")
        example_id = Path(image).stem
        where = record_where(i, example_id)
        answerable = source.get(record, "answerable", where, "any")
        if answerable not in (0, 1) or isinstance(answerable, float):
            raise source.error(where, "answerable", f"expected 0 or 1, got {answerable!r}")
        extra: dict = {"answerable": bool(answerable)}
        if isinstance(record.get("answer_type"), str):
            extra["answer_type"] = record["answer_type"]
        examples.append(Example(
            task=task, split="val", example_id=example_id,
            question=source.get(record, "question", where, "str"),
            image=image, image_root=image_root,
            answers=answer_strings(source, record, where), extra=extra))
    return examples


# ---------------------------------------------------------------------------------------------
# POPE


def pope_split(path: str, splits: Sequence[str], task: str) -> str:
    """The POPE split a file holds, from its name: ``coco_pope_adversarial.json`` ->
    ``adversarial``, ``random.jsonl`` -> ``random``."""
    words = set(re.split(r"[^a-z0-9]+", Path(path).name.lower()))
    found = [s for s in splits if s in words]
    if len(found) != 1:
        raise ValueError(f"{path}: cannot tell the POPE split from the file name (it must name "
                         f"exactly one of {', '.join(splits)}) (task {task})")
    return found[0]


def read_pope(task: str, path: str, split: str, image_root: Optional[str]) -> list[Example]:
    """One POPE split: {question_id, image, text, label}; ids are ``<split>/<question_id>``
    (question ids restart in every split)."""
    source = Source(path, task)
    examples = []
    for where, record in read_records(path, task):
        qid = source.get(record, "question_id", where, "id")
        where = f"{where} (id {qid!r})"
        label = source.get(record, "label", where, "str").strip().lower()
        if label not in ("yes", "no"):
            raise source.error(where, "label", f"expected 'yes' or 'no', got {record['label']!r}")
        examples.append(Example(
            task=task, split=split, example_id=f"{split}/{qid}",
            question=source.get(record, "text", where, "str"),
            image=source.get(record, "image", where, "str"), image_root=image_root,
            answers=(label,), extra={"question_id": qid}))
    return examples


# ---------------------------------------------------------------------------------------------
# Referring expressions


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data only: any global (a class or function) is refused, except the plain
    builtin types, so a tampered pickle cannot run code."""

    ALLOWED = frozenset({"dict", "list", "str", "int", "float", "tuple"})

    def find_class(self, module: str, name: str):  # noqa: D102
        if module in ("builtins", "__builtin__") and name in self.ALLOWED:
            import builtins

            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refusing global {module}.{name}: only plain builtins "
                                     "(dict, list, str, int, float, tuple) are allowed")


_PLAIN_SCALARS = (str, int, float, bool, type(None))


def load_plain_pickle(path: str, task: str) -> Any:
    """A pickle holding only plain builtins; anything else (or a corrupt file) is a ValueError.
    Python 2 byte strings (the official RefCOCO pickles were written by Python 2) are UTF-8."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        value = _BuiltinsOnlyUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, AttributeError,
            ImportError, IndexError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a plain-data pickle ({err}) (task {task})") from err
    # Sets, bytes and the like are built by opcodes, without a global: refuse them here.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif not isinstance(item, _PLAIN_SCALARS):
            raise ValueError(f"{path}: not a plain-data pickle (it holds a "
                             f"{type(item).__name__}; only dict, list, tuple, str, int, float, "
                             f"bool and None are allowed) (task {task})")
    return value


def read_refcoco_refs(task: str, refs_path: str, instances_path: str,
                      image_root: Optional[str]) -> list[Example]:
    """RefCOCO/+/g refs pickle + instances.json: one example per sentence of each ``val`` ref,
    id ``<ref_id>/<sent_id>``, box from the ref's annotation normalized by the image size."""
    rsrc, isrc = Source(refs_path, task), Source(instances_path, task)
    refs = load_plain_pickle(refs_path, task)
    if not isinstance(refs, list):
        raise rsrc.error("top level", None, f"expected a list of refs, got {type(refs).__name__}")
    instances = read_json(instances_path, task)
    images = {}
    for i, image in enumerate(isrc.get(instances, "images", "top level", "list")):
        where = record_where(i, image.get("id") if isinstance(image, dict) else None, "image")
        image_id = isrc.get(image, "id", where, "int")
        size = [isrc.get(image, k, where, "any") for k in ("width", "height")]
        for key, value in zip(("width", "height"), size):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise isrc.error(where, key, f"expected a positive number, got {value!r}")
        name = image.get("file_name") or f"COCO_train2014_{image_id:012d}.jpg"
        images[image_id] = (where, size[0], size[1], name)
    boxes = {}
    for i, ann in enumerate(isrc.get(instances, "annotations", "top level", "list")):
        where = record_where(i, ann.get("id") if isinstance(ann, dict) else None, "annotation")
        boxes[isrc.get(ann, "id", where, "int")] = (where, isrc.get(ann, "bbox", where, "any"),
                                                    isrc.get(ann, "image_id", where, "int"))
    examples = []
    for i, ref in enumerate(refs):
        ref_id = rsrc.get(ref, "ref_id", record_where(i, unit="ref"), "int")
        where = record_where(i, ref_id, "ref")
        if rsrc.get(ref, "split", where, "str") != "val":
            continue  # the pickle holds every split; the benchmark is val
        image_id = rsrc.get(ref, "image_id", where, "int")
        ann_id = rsrc.get(ref, "ann_id", where, "int")
        if ann_id not in boxes:
            raise rsrc.error(where, "ann_id", f"{ann_id} is not an annotation of {instances_path}")
        awhere, raw_box, ann_image = boxes[ann_id]
        if ann_image != image_id:
            raise rsrc.error(where, "image_id", f"{image_id} differs from annotation {ann_id}'s "
                             f"image_id {ann_image} in {instances_path}")
        if image_id not in images:
            raise rsrc.error(where, "image_id", f"{image_id} is not an image of {instances_path}")
        _, width, height, file_name = images[image_id]
        box = pixel_box_to_normalized(isrc, awhere, "bbox", raw_box, width, height, xywh=True)
        for j, sentence in enumerate(rsrc.get(ref, "sentences", where, "list")):
            swhere = f"{where}, sentence {j}"
            sent_id = rsrc.get(sentence, "sent_id", swhere, "int")
            text = sentence.get("sent") if isinstance(sentence, dict) else None
            if not isinstance(text, str) or not text.strip():
                text = rsrc.get(sentence, "raw", swhere, "str")
            examples.append(Example(
                task=task, split="val", example_id=f"{ref_id}/{sent_id}", question=text,
                image=file_name, image_root=image_root, box=box,
                extra={"ref_id": ref_id, "sent_id": sent_id, "image_id": image_id,
                       "ann_id": ann_id, "width": width, "height": height}))
    return examples


def read_ref_jsonl(task: str, path: str, image_root: Optional[str]) -> list[Example]:
    """Our simple referring-expression JSONL (ShapesWorld's): {id, image, sent, bbox}."""
    source = Source(path, task)
    examples = []
    for where, record in read_records(path, task):
        rid = source.get(record, "id", where, "id")
        where = f"{where} (id {rid!r})"
        examples.append(Example(
            task=task, split="val", example_id=str(rid),
            question=source.get(record, "sent", where, "str"),
            image=source.get(record, "image", where, "str"), image_root=image_root,
            box=normalized_box(source, where, "bbox", source.get(record, "bbox", where, "any"))))
    return examples


def clutter_level(source: Source, where: str, take_id: Any) -> str:
    """OCID's clutter level of a ``take_id`` (0-9 minimum, 10-16 medium, 17-20 maximum)."""
    if not isinstance(take_id, int) or isinstance(take_id, bool) or not 0 <= take_id <= 20:
        raise source.error(where, "take_id", f"expected an integer in [0, 20], got {take_id!r}")
    return CLUTTER_LEVELS[0 if take_id <= 9 else 1 if take_id <= 16 else 2]


def read_ocid_ref(task: str, path: str, image_root: Optional[str]) -> list[Example]:
    """OCID-Ref ``val_expressions.json``: {id: {scene_path, sentence, bbox, take_id}}; the
    clutter level goes to ``extra["clutter"]``."""
    source = Source(path, task)
    data = read_json(path, task)
    if not isinstance(data, dict):
        raise source.error("top level", None, "expected an object {id: expression}")
    width, height = OCID_IMAGE_SIZE
    examples = []
    for i, (rid, record) in enumerate(data.items()):
        where = record_where(i, rid)
        raw_box = source.get(record, "bbox", where, "any")
        clutter = clutter_level(source, where, source.get(record, "take_id", where, "any"))
        examples.append(Example(
            task=task, split="val", example_id=str(rid),
            question=source.get(record, "sentence", where, "str"),
            image=source.get(record, "scene_path", where, "str"), image_root=image_root,
            box=pixel_box_to_normalized(source, where, "bbox", raw_box, width, height, xywh=False),
            extra={"clutter": clutter}))
    return examples

