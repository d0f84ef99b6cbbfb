"""The vision benchmarks: their names, where their files live, and loading their examples.

``VISION_TASKS`` names every task (other modules key on these names) with its kind, splits, the
documented file layout under a data root (docs/evaluation_data.md) and vlm-evaluation's prepared
layout. :func:`load_examples` reads a task from its annotation files as the user passes them,
in the benchmark's own format (:mod:`.task_formats`) or vlm-evaluation's ``metadata.json``
(:mod:`.task_prepared`); :func:`task_files` finds those files under one data root, and
:func:`load_task` does both.

The contract every loader keeps:

* Examples come sorted by (split in ``TaskInfo.splits`` order, id), ids compared number by
  number where they are numbers, so the order never depends on the file's order or on
  ``PYTHONHASHSEED``. ``limit`` keeps the first N of each split in that order.
* ``Example.example_id`` is built from the benchmark's own ids and is unique within the task:
  VQAv2/TextVQA ``question_id``; GQA its question key; POPE ``<split>/<question_id>``;
  RefCOCO/+/g ``<ref_id>/<sent_id>``; OCID-Ref its expression key; VizWiz the image's file stem;
  ShapesWorld VQA ``question_id``, POPE ``<split>/<question_id>``, grounding ``id``.
* ``Example.image`` is relative to ``Example.image_root`` (the key a precomputed embedding
  directory uses): VQAv2 ``COCO_val2014_{image_id:012d}.jpg``, GQA ``{imageId}.jpg``, TextVQA
  ``{image_id}.jpg``, POPE/VizWiz the file's ``image``, RefCOCO the COCO ``file_name``,
  OCID-Ref ``scene_path``, ShapesWorld ``eval-{image_id:06d}.jpg``.
* Boxes are normalized ``[x1, y1, x2, y2]`` in [0, 1]. Grounding tasks keep only the ``val``
  split. OCID-Ref puts the clutter level in ``extra["clutter"]`` ("minimum", "medium",
  "maximum"); VizWiz puts ``extra["answerable"]`` (bool); TextVQA ``extra["ocr_tokens"]``.
* A missing file is a FileNotFoundError naming it and the task; a malformed record is a
  ValueError naming the file, the record (index or line, and id) and the field.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_vlm.evaluation import task_formats as formats
from megatron_vlm.evaluation.records import Example
from megatron_vlm.evaluation.task_prepared import is_prepared_index, read_prepared

KINDS = ("vqa", "gqa", "textvqa", "pope", "box")
POPE_SPLITS = ("adversarial", "popular", "random")
DOCS = "docs/evaluation_data.md"


@dataclass(frozen=True)
class TaskInfo:
    """One vision task: what it is and where its files live."""

    name: str
    kind: str
    """"vqa", "gqa", "textvqa", "pope" or "box" (the scorer family)."""
    splits: tuple[str, ...]
    files: tuple[str, ...]
    """Annotation files under the data root, in the documented layout."""
    images: str
    """Image folder under the data root."""
    description: str
    prepared: Optional[tuple[str, str]] = None
    """vlm-evaluation's prepared layout under its root: (index file, image folder)."""

    def annotation_format(self) -> str:
        """How the official files are read (the key of ``_OFFICIAL_READERS``)."""
        return _FORMAT_BY_TASK.get(self.name, self.kind)


def _task(name: str, kind: str, splits: Sequence[str], files: Sequence[str], images: str,
          description: str, prepared: Optional[tuple[str, str]] = None) -> TaskInfo:
    return TaskInfo(name, kind, tuple(splits), tuple(files), images, description, prepared)


_REFER_PREPARED = ("datasets/refcoco/metadata-full.json", "download/refcoco/train2014")
_POPE_FILES = tuple(f"pope/coco_pope_{s}.json" for s in POPE_SPLITS)

VISION_TASKS: dict[str, TaskInfo] = {t.name: t for t in (
    _task("vqav2", "vqa", ["val"],
          ["vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
           "vqav2/v2_mscoco_val2014_annotations.json"], "vqav2/val2014",
          "VQAv2 val (214,354 questions), 10 answers each, VQA accuracy",
          ("datasets/vqa-v2/metadata.json", "download/vqa-v2/images_val2014")),
    _task("gqa", "gqa", ["testdev"], ["gqa/testdev_balanced_questions.json"], "gqa/images",
          "GQA test-dev balanced (12,578 questions), exact match",
          ("datasets/gqa/metadata-full.json", "download/gqa/images")),
    _task("textvqa", "textvqa", ["val"], ["textvqa/TextVQA_0.5.1_val.json"],
          "textvqa/train_images", "TextVQA val (5,000 questions), no OCR tokens in the prompt",
          ("datasets/text-vqa/metadata.json", "download/text-vqa/train_val_images")),
    _task("textvqa_ocr", "textvqa", ["val"], ["textvqa/TextVQA_0.5.1_val.json"],
          "textvqa/train_images", "TextVQA val with the OCR tokens in the prompt (LLaVA-1.5)",
          ("datasets/text-vqa/metadata.json", "download/text-vqa/train_val_images")),
    _task("pope", "pope", POPE_SPLITS, _POPE_FILES, "pope/val2014",
          "POPE adversarial/popular/random (3,000/3,000/2,910 yes-no questions on COCO val2014)",
          ("datasets/pope/metadata-full.json", "download/pope/val_images")),
    _task("refcoco", "box", ["val"], ["refcoco/refcoco/refs(unc).p", "refcoco/refcoco/instances.json"],
          "refcoco/train2014", "RefCOCO val (UNC split), box at IoU >= 0.5", _REFER_PREPARED),
    _task("refcoco+", "box", ["val"],
          ["refcoco/refcoco+/refs(unc).p", "refcoco/refcoco+/instances.json"],
          "refcoco/train2014", "RefCOCO+ val (UNC split), box at IoU >= 0.5", _REFER_PREPARED),
    _task("refcocog", "box", ["val"],
          ["refcoco/refcocog/refs(umd).p", "refcoco/refcocog/instances.json"],
          "refcoco/train2014", "RefCOCOg val (UMD split), box at IoU >= 0.5", _REFER_PREPARED),
    _task("ocid_ref", "box", ["val"], ["ocid_ref/val_expressions.json"], "ocid_ref/OCID-dataset",
          "OCID-Ref val (18,342 expressions) by clutter level, box at IoU >= 0.25",
          ("datasets/ocid-ref/metadata-full.json", "download/ocid-ref/OCID-dataset")),
    _task("vizwiz", "vqa", ["val"], ["vizwiz/val.json"], "vizwiz/val",
          "VizWiz val (4,319 questions, some unanswerable), reported, not averaged",
          ("datasets/vizwiz/metadata.json", "download/vizwiz/val_images")),
    _task("shapesworld_vqa", "vqa", ["val"],
          ["eval/vqav2/questions.json", "eval/vqav2/annotations.json"], "eval/images",
          "ShapesWorld questions in the VQAv2 format (synthetic)"),
    _task("shapesworld_pope", "pope", POPE_SPLITS,
          [f"eval/pope/{s}.jsonl" for s in POPE_SPLITS], "eval/images",
          "ShapesWorld POPE splits (synthetic)"),
    _task("shapesworld_ref", "box", ["val"], ["eval/refcoco/val.jsonl"], "eval/images",
          "ShapesWorld referring expressions with normalized boxes (synthetic)"),
)}

_FORMAT_BY_TASK = {"vizwiz": "vizwiz", "ocid_ref": "ocid", "shapesworld_ref": "ref_jsonl",
                   "refcoco": "refcoco", "refcoco+": "refcoco", "refcocog": "refcoco"}
_VQAV2_IMAGE = {"vqav2": "COCO_{subtype}_{image_id:012d}.jpg",
                "shapesworld_vqa": "eval-{image_id:06d}.jpg"}


def task_info(task: str) -> TaskInfo:
    """The :class:`TaskInfo` of ``task``; a ValueError listing the names for an unknown one."""
    if task not in VISION_TASKS:
        raise ValueError(f"unknown vision task {task!r}; known: {', '.join(VISION_TASKS)}")
    return VISION_TASKS[task]


# ---------------------------------------------------------------------------------------------
# Files under a data root


def task_files(task: str, data_root: str | os.PathLike) -> tuple[list[str], str]:
    """(annotation files, image root) of ``task`` under ``data_root`` in the documented layout
    (docs/evaluation_data.md); for the ShapesWorld tasks ``data_root`` is the ShapesWorld
    directory. When none of the official files is there, vlm-evaluation's prepared layout under
    ``data_root`` is used (``datasets/<family>/metadata*.json``, images under ``download/``).
    Image folders are not required to exist (precomputed embeddings need none)."""
    info = task_info(task)
    root = str(data_root)
    official = [os.path.join(root, f) for f in info.files]
    present = [os.path.exists(p) for p in official]
    if all(present):
        return official, os.path.join(root, info.images)
    if not any(present) and info.prepared:
        index = os.path.join(root, info.prepared[0])
        if os.path.exists(index):
            return [index], os.path.join(root, info.prepared[1])
    missing = official[present.index(False)]
    alternative = (f", nor vlm-evaluation's prepared {os.path.join(root, info.prepared[0])}"
                   if info.prepared and not any(present) else "")
    raise FileNotFoundError(f"task {task}: {missing} not found{alternative}; see {DOCS} for the "
                            "layout under the data root")


def load_task(task: str, data_root: str | os.PathLike, limit: Optional[int] = None) -> list[Example]:
    """The examples of ``task`` under ``data_root``: :func:`task_files` + :func:`load_examples`."""
    files, image_root = task_files(task, data_root)
    return load_examples(task, files, image_root, limit=limit)


# ---------------------------------------------------------------------------------------------
# Loading


def load_examples(task: str, annotations: Sequence[str | os.PathLike],
                  image_root: Optional[str | os.PathLike] = None,
                  limit: Optional[int] = None) -> list[Example]:
    """The examples of ``task`` from its annotation files, sorted, ``limit`` per split.

    ``annotations`` as the benchmark ships them: VQAv2 questions + annotations JSON (either
    order); GQA/TextVQA/OCID-Ref/VizWiz one JSON; POPE one file per split, the split named by the
    file name; RefCOCO/+/g the refs pickle + instances.json, or a JSONL ``{id, image, sent,
    bbox}``; or for any task except ShapesWorld's, one vlm-evaluation ``metadata*.json``.
    ``image_root`` is what ``Example.image`` is relative to (vlm-evaluation indexes default to
    their image folder; other formats to None)."""
    info = task_info(task)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    paths = [str(p) for p in annotations]
    if not paths:
        raise ValueError(f"task {task}: no annotation files given")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"task {task}: annotation file {path} not found (see {DOCS})")
    root = None if image_root is None else str(image_root)
    examples = _read(info, paths, root)
    _check_unique(info, examples, paths)
    return _sorted_limited(info, examples, limit)


def _read(info: TaskInfo, paths: list[str], image_root: Optional[str]) -> list[Example]:
    task = info.name
    if len(paths) == 1 and paths[0].endswith(".json") and info.prepared:
        data = _maybe_prepared(paths[0], task)
        if data is not None:
            default_images = info.prepared[1] if image_root is None else None
            return read_prepared(task, info.kind, paths[0], image_root, default_images, data)
    fmt = info.annotation_format()
    if fmt == "pope":
        by_split: dict[str, str] = {}
        for path in paths:
            split = formats.pope_split(path, info.splits, task)
            if split in by_split:
                raise ValueError(f"task {task}: {by_split[split]} and {path} both hold the POPE "
                                 f"split {split!r}")
            by_split[split] = path
        return [e for split, path in by_split.items()
                for e in formats.read_pope(task, path, split, image_root)]
    if fmt == "vqa" and len(paths) == 2:
        return formats.read_vqav2(task, paths, image_root, _VQAV2_IMAGE[task])
    if fmt == "refcoco" and len(paths) == 2:
        pickles = [p for p in paths if p.endswith((".p", ".pkl", ".pickle"))]
        if len(pickles) != 1:
            raise ValueError(f"task {task}: expected a refs pickle (refs(unc).p / refs(umd).p) and "
                             f"instances.json, got {paths}")
        instances = paths[1 - paths.index(pickles[0])]
        return formats.read_refcoco_refs(task, pickles[0], instances, image_root)
    if fmt in ("refcoco", "ref_jsonl") and len(paths) == 1 and paths[0].endswith(".jsonl"):
        return formats.read_ref_jsonl(task, paths[0], image_root)
    single = {"gqa": formats.read_gqa, "textvqa": formats.read_textvqa,
              "vizwiz": formats.read_vizwiz, "ocid": formats.read_ocid_ref}
    if fmt in single and len(paths) == 1:
        return single[fmt](task, paths[0], image_root)
    raise ValueError(f"task {task}: cannot read {paths}; expected {_expected_files(info)} "
                     f"(see {DOCS})")


def _expected_files(info: TaskInfo) -> str:
    names = " + ".join(os.path.basename(f) for f in info.files)
    if info.kind == "pope":
        names = "one file per split named after it (" + ", ".join(
            os.path.basename(f) for f in info.files) + ")"
    if info.annotation_format() == "refcoco":
        names += ", or one JSONL {id, image, sent, bbox}"
    if info.prepared:
        names += f", or vlm-evaluation's {os.path.basename(info.prepared[0])}"
    return names


def _maybe_prepared(path: str, task: str):
    """The parsed file when it is a vlm-evaluation index, else None (cheap check first: the
    official single-JSON files are read again by their reader, which is rare enough)."""
    with open(path, encoding="utf-8") as handle:
        head = handle.read(4096)
    if '"img_path"' not in head:
        return None
    data = formats.read_json(path, task)
    return data if is_prepared_index(data) else None


def _check_unique(info: TaskInfo, examples: list[Example], paths: list[str]) -> None:
    counts = Counter(e.example_id for e in examples)
    duplicates = [i for i, n in counts.items() if n > 1]
    if duplicates:
        first = duplicates[0]
        raise ValueError(f"task {info.name}: example id {first!r} occurs {counts[first]} times in "
                         f"{', '.join(paths)} ({len(duplicates)} duplicated ids)")
    unknown = {e.split for e in examples} - set(info.splits)
    if unknown:
        raise ValueError(f"task {info.name}: unknown split {sorted(unknown)[0]!r} in "
                         f"{', '.join(paths)} (expected {', '.join(info.splits)})")


def id_sort_key(example_id: str) -> tuple:
    """Numbers compare as numbers, text as text: "9" < "10", "random/2" < "random/10"."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", example_id) if part)


def _sorted_limited(info: TaskInfo, examples: list[Example], limit: Optional[int]) -> list[Example]:
    order = {s: i for i, s in enumerate(info.splits)}
    examples = sorted(examples, key=lambda e: (order[e.split], id_sort_key(e.example_id)))
    if limit is None:
        return examples
    kept: Counter = Counter()
    out = []
    for example in examples:
        if kept[example.split] < limit:
            kept[example.split] += 1
            out.append(example)
    return out
