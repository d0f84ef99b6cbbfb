"""Vision task loaders (megatron_vlm.evaluation.tasks): each benchmark's official files, written
here as small fixtures in their real layouts, vlm-evaluation's prepared index, and ShapesWorld."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vlm.evaluation.tasks import (VISION_TASKS, id_sort_key, load_examples, load_task,
                                           task_files)

REPO = Path(__file__).resolve().parent.parent


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def ten(*answers: str) -> list[dict]:
    out = [a for a in answers for _ in range(10 // len(answers))]
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(out)]


# ---------------------------------------------------------------------------------------------
# Fixture data sets in the official layouts under one data root


def make_vqav2(root: Path) -> None:
    questions = [{"image_id": 42, "question": "What is on the plate?", "question_id": 42002},
                 {"image_id": 7, "question": "How many dogs?", "question_id": 7000},
                 {"image_id": 42, "question": "Is it hot?", "question_id": 42000}]
    annotations = [{"question_id": q["question_id"], "image_id": q["image_id"],
                    "answers": ten("pizza", "pie") if q["question_id"] == 42002 else ten("2"),
                    "multiple_choice_answer": "pizza", "answer_type": "other",
                    "question_type": "what"} for q in reversed(questions)]
    write_json(root / "vqav2/v2_OpenEnded_mscoco_val2014_questions.json",
               {"data_subtype": "val2014", "task_type": "Open-Ended", "questions": questions})
    write_json(root / "vqav2/v2_mscoco_val2014_annotations.json",
               {"data_subtype": "val2014", "annotations": annotations})


def make_gqa(root: Path) -> None:
    write_json(root / "gqa/testdev_balanced_questions.json", {
        "20968434": {"imageId": "n288870", "question": "Is the tray on the left?", "answer": "yes",
                     "fullAnswer": "Yes, it is."},
        "201307251": {"imageId": "n161313", "question": "What color is the car?", "answer": "red",
                      "fullAnswer": "The car is red."}})


def make_textvqa(root: Path) -> None:
    write_json(root / "textvqa/TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34603, "image_id": "b9dc400eb20bad64", "question": "what does the text spell?",
         "answers": ["copenhagen"] * 10, "ocr_tokens": ["D", "PALCON", "COPENHAGEN"]},
        {"question_id": 34602, "image_id": "003a8ae2ef43b901",
         "question": "what is the brand of this camera?", "answers": ["dakota"] * 10,
         "ocr_tokens": []}]})


POPE_ROWS = {
    "adversarial": [(1, "yes"), (2, "no"), (10, "yes"), (3, "no")],
    "popular": [(1, "no"), (2, "yes")],
    "random": [(1, "yes"), (2, "no"), (3, "yes")],
}


def make_pope(root: Path) -> None:
    for split, rows in POPE_ROWS.items():
        write_jsonl(root / f"pope/coco_pope_{split}.json", [
            {"question_id": qid, "image": f"COCO_val2014_{qid:012d}.jpg",
             "text": f"Is there a {split} thing in the image?", "label": label} for qid, label in rows])


# Refs of several splits; only the val ones (ref 5 and ref 9) make examples.
REFS = [
    {"ref_id": 9, "image_id": 100, "ann_id": 1001, "split": "val", "category_id": 1,
     "sentences": [{"sent_id": 31, "sent": "man on left", "raw": "Man on left."},
                   {"sent_id": 30, "sent": "left guy", "raw": "left guy"}]},
    {"ref_id": 4, "image_id": 100, "ann_id": 1002, "split": "train", "category_id": 1,
     "sentences": [{"sent_id": 12, "sent": "train ref", "raw": "train ref"}]},
    {"ref_id": 5, "image_id": 200, "ann_id": 2001, "split": "val", "category_id": 2,
     "sentences": [{"sent_id": 15, "sent": "red car", "raw": "red car"}]},
    {"ref_id": 6, "image_id": 200, "ann_id": 2001, "split": "testA", "category_id": 2,
     "sentences": [{"sent_id": 16, "sent": "testA ref", "raw": "testA ref"}]},
]
INSTANCES = {
    "images": [{"id": 100, "width": 640, "height": 480, "file_name": "COCO_train2014_000000000100.jpg"},
               {"id": 200, "width": 500, "height": 400, "file_name": "COCO_train2014_000000000200.jpg"}],
    "annotations": [{"id": 1001, "image_id": 100, "bbox": [64.0, 48.0, 256.0, 192.0], "category_id": 1},
                    {"id": 1002, "image_id": 100, "bbox": [0, 0, 10, 10], "category_id": 1},
                    {"id": 2001, "image_id": 200, "bbox": [100, 40, 400, 360], "category_id": 2}],
    "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}],
}


def make_refcoco(root: Path, dataset: str = "refcoco", split_by: str = "unc", refs=REFS) -> Path:
    folder = root / "refcoco" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    write_json(folder / "instances.json", INSTANCES)
    return folder


def make_ocid(root: Path) -> None:
    write_json(root / "ocid_ref/val_expressions.json", {
        "12": {"scene_path": "ARID20/table/top/seq08/rgb/a.png", "sentence": "the blue mug",
               "bbox": "[64, 48, 320, 240]", "take_id": 9, "class": "mug"},
        "3": {"scene_path": "ARID10/floor/seq01/rgb/b.png", "sentence": "the apple",
              "bbox": "[0, 0, 640, 480]", "take_id": 10},
        "7": {"scene_path": "ARID10/floor/seq01/rgb/c.png", "sentence": "the top box",
              "bbox": [320, 240, 640, 480], "take_id": 17}})


def make_vizwiz(root: Path) -> None:
    write_json(root / "vizwiz/val.json", [
        {"image": "VizWiz_val_00000001.jpg", "question": "What is this?", "answers": ten("soup"),
         "answer_type": "other", "answerable": 1},
        {"image": "VizWiz_val_00000000.jpg", "question": "What color?", "answers": ten("unanswerable"),
         "answer_type": "unanswerable", "answerable": 0}])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_data")
    make_vqav2(root)
    make_gqa(root)
    make_textvqa(root)
    make_pope(root)
    for dataset, split_by in (("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd")):
        make_refcoco(root, dataset, split_by)
    make_ocid(root)
    make_vizwiz(root)
    return root


@pytest.fixture(scope="module")
def shapesworld(tmp_path_factory) -> Path:
    from evaluation_helpers import small_shapesworld

    return small_shapesworld(tmp_path_factory.mktemp("sw"), eval_images=6)


# ---------------------------------------------------------------------------------------------
# The official layouts


def test_vqav2_joins_questions_and_answers_sorted_by_question_id(data_root):
    examples = load_task("vqav2", data_root)
    assert [e.example_id for e in examples] == ["7000", "42000", "42002"]
    first, last = examples[0], examples[-1]
    assert first.image == "COCO_val2014_000000000007.jpg" and first.split == "val"
    assert first.image_root == str(data_root / "vqav2/val2014")
    assert last.question == "What is on the plate?"
    assert last.answers == ("pizza",) * 5 + ("pie",) * 5  # all ten, in the file's order
    assert last.extra["image_id"] == 42 and last.extra["answer_type"] == "other"
    # the two files in either order
    files, images = task_files("vqav2", data_root)
    assert load_examples("vqav2", files[::-1], images) == examples


def test_gqa_textvqa_and_vizwiz_ids_images_and_extras(data_root):
    gqa = load_task("gqa", data_root)
    assert [e.example_id for e in gqa] == ["20968434", "201307251"]
    assert gqa[0].image == "n288870.jpg" and gqa[0].answers == ("yes",) and gqa[0].split == "testdev"

    for task in ("textvqa", "textvqa_ocr"):
        text = load_task(task, data_root)
        assert [e.example_id for e in text] == ["34602", "34603"]
        assert text[1].image == "b9dc400eb20bad64.jpg"
        assert text[1].extra["ocr_tokens"] == ("D", "PALCON", "COPENHAGEN")
        assert text[0].extra["ocr_tokens"] == () and len(text[0].answers) == 10

    vizwiz = load_task("vizwiz", data_root)
    assert [e.example_id for e in vizwiz] == ["VizWiz_val_00000000", "VizWiz_val_00000001"]
    assert [e.extra["answerable"] for e in vizwiz] == [False, True]
    assert vizwiz[1].answers == ("soup",) * 10 and vizwiz[1].image == "VizWiz_val_00000001.jpg"


def test_pope_splits_from_file_names_ids_and_limit_per_split(data_root):
    examples = load_task("pope", data_root)
    assert len(examples) == sum(len(rows) for rows in POPE_ROWS.values())
    assert [e.example_id for e in examples[:4]] == ["adversarial/1", "adversarial/2",
                                                   "adversarial/3", "adversarial/10"]
    assert [e.split for e in examples] == ["adversarial"] * 4 + ["popular"] * 2 + ["random"] * 3
    by_id = {e.example_id: e for e in examples}
    assert by_id["popular/2"].answers == ("yes",) and by_id["popular/1"].answers == ("no",)
    assert by_id["random/3"].image == "COCO_val2014_000000000003.jpg"
    assert by_id["random/3"].question == "Is there a random thing in the image?"

    limited = load_task("pope", data_root, limit=2)
    assert [e.example_id for e in limited] == ["adversarial/1", "adversarial/2", "popular/1",
                                              "popular/2", "random/1", "random/2"]
    assert load_task("pope", data_root, limit=0) == []


def test_pope_split_is_named_by_the_file_name(tmp_path):
    path = write_jsonl(tmp_path / "random.jsonl", [{"question_id": 5, "image": "a.jpg",
                                                    "text": "Is there a cat?", "label": "no"}])
    (example,) = load_examples("pope", [path])
    assert example.split == "random" and example.example_id == "random/5"
    unnamed = write_jsonl(tmp_path / "pope_questions.jsonl", [])
    with pytest.raises(ValueError, match=r"pope_questions\.jsonl.*split.*adversarial, popular, random"):
        load_examples("pope", [unnamed])
    again = write_jsonl(tmp_path / "x_random.jsonl", [])
    with pytest.raises(ValueError, match="both hold the POPE split 'random'"):
        load_examples("pope", [path, again])


def test_refcoco_keeps_val_refs_and_normalizes_boxes(data_root):
    examples = load_task("refcoco", data_root)
    # refs 5 and 9 are val; ref 4 (train) and ref 6 (testA) are dropped
    assert [e.example_id for e in examples] == ["5/15", "9/30", "9/31"]
    car, left_guy, man = examples
    # [x, y, w, h] = [100, 40, 400, 360] on 500 x 400 -> [100/500, 40/400, 500/500, 400/400]
    assert car.box == pytest.approx((0.2, 0.1, 1.0, 1.0))
    # [64, 48, 256, 192] on 640 x 480 -> [0.1, 0.1, 320/640, 240/480]
    assert man.box == pytest.approx((0.1, 0.1, 0.5, 0.5)) and left_guy.box == man.box
    assert man.question == "man on left" and man.image == "COCO_train2014_000000000100.jpg"
    assert man.image_root == str(data_root / "refcoco/train2014")
    assert man.extra["ref_id"] == 9 and man.extra["sent_id"] == 31
    for task in ("refcoco+", "refcocog"):
        assert [e.example_id for e in load_task(task, data_root)] == ["5/15", "9/30", "9/31"]


def test_ocid_ref_clutter_levels_and_pixel_boxes(data_root):
    examples = load_task("ocid_ref", data_root)
    assert [e.example_id for e in examples] == ["3", "7", "12"]
    assert [e.extra["clutter"] for e in examples] == ["medium", "maximum", "minimum"]
    assert examples[2].box == pytest.approx((0.1, 0.1, 0.5, 0.5))  # [64, 48, 320, 240] on 640x480
    assert examples[1].box == pytest.approx((0.5, 0.5, 1.0, 1.0))
    assert examples[2].image == "ARID20/table/top/seq08/rgb/a.png"


def test_grounding_jsonl_and_box_checks(tmp_path):
    good = write_jsonl(tmp_path / "val.jsonl", [
        {"id": 2, "image": "a.jpg", "sent": "the cat", "bbox": [0.1, 0.2, 0.3, 0.4]},
        {"id": 1, "image": "b.jpg", "sent": "the dog", "bbox": [0, 0, 1, 1]}])
    examples = load_examples("refcoco", [good], "/imgs")
    assert [(e.example_id, e.box) for e in examples] == [("1", (0, 0, 1, 1)), ("2", (0.1, 0.2, 0.3, 0.4))]
    assert examples[0].image_path == os.path.join("/imgs", "b.jpg")
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"id": 1, "image": "b.jpg", "sent": "x", "bbox": [0, 0, 1, 1]},
        {"id": 7, "image": "b.jpg", "sent": "x", "bbox": [0.5, 0.2, 0.4, 0.9]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 \(id 7\), field 'bbox': .*x1 < x2"):
        load_examples("shapesworld_ref", [bad])


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_files_name_the_file_the_task_and_the_docs(tmp_path, data_root):
    with pytest.raises(FileNotFoundError, match=r"task vqav2: .*v2_OpenEnded_mscoco_val2014_questions"
                                                r"\.json not found.*datasets/vqa-v2/metadata\.json"
                                                r".*docs/evaluation_data\.md"):
        task_files("vqav2", tmp_path)
    # a partial official layout names the missing file (no silent fall-back to another layout)
    make_pope(tmp_path)
    (tmp_path / "pope/coco_pope_popular.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"coco_pope_popular\.json not found"):
        task_files("pope", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"task gqa: annotation file .*nope\.json not found"):
        load_examples("gqa", [tmp_path / "nope.json"])
    with pytest.raises(ValueError, match="unknown vision task 'vqa3'"):
        load_task("vqa3", data_root)


@pytest.mark.parametrize("case", ["no_annotation", "bad_answers", "image_mismatch", "bad_label",
                                  "missing_field", "bad_json", "duplicate"])
def test_malformed_records_name_file_record_and_field(tmp_path, case):
    q = {"questions": [{"image_id": 1, "question": "Q?", "question_id": 11},
                       {"image_id": 2, "question": "R?", "question_id": 21}]}
    a = {"annotations": [{"question_id": 11, "image_id": 1, "answers": ten("x")},
                         {"question_id": 21, "image_id": 2, "answers": ten("y")}]}
    if case == "no_annotation":
        del a["annotations"][1]
        expected = r"questions\.json: record 1 \(id '21'\), field 'question_id': has no annotation"
    elif case == "bad_answers":
        a["annotations"][1]["answers"][3] = {"text": "y"}
        expected = r"annotations\.json: record 1 \(id '21'\), field 'answers\[3\]'"
    elif case == "image_mismatch":
        a["annotations"][0]["image_id"] = 5
        expected = r"annotations\.json: record 0 \(id '11'\), field 'image_id': 5 differs"
    elif case == "missing_field":
        del q["questions"][1]["question"]
        expected = r"questions\.json: record 1 \(id '21'\), field 'question': missing"
    elif case == "duplicate":
        q["questions"][1]["question_id"] = 11
        expected = r"questions\.json: record 1 \(id '11'\), field 'question_id': duplicate"
    if case in ("bad_label", "bad_json"):
        lines = [{"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"},
                 {"question_id": 2, "image": "a.jpg", "text": "Is there a dog?", "label": "maybe"}]
        path = write_jsonl(tmp_path / "coco_pope_random.json", lines)
        expected = r"coco_pope_random\.json: line 2 \(id 2\), field 'label': expected 'yes' or 'no'"
        if case == "bad_json":
            path.write_text(path.read_text() + '{"question_id": 3,\n')
            expected = r"coco_pope_random\.json: line 3: not valid JSON"
        with pytest.raises(ValueError, match=expected):
            load_examples("pope", [path])
        return
    files = [write_json(tmp_path / "questions.json", q), write_json(tmp_path / "annotations.json", a)]
    with pytest.raises(ValueError, match=expected):
        load_examples("vqav2", files)


def test_duplicate_example_ids_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl", [
        {"id": 3, "image": "a.jpg", "sent": "x", "bbox": [0, 0, 1, 1]},
        {"id": 3, "image": "b.jpg", "sent": "y", "bbox": [0, 0, 1, 1]}])
    with pytest.raises(ValueError, match=r"example id '3' occurs 2 times in .*val\.jsonl"):
        load_examples("shapesworld_ref", [path])


def test_refcoco_errors_name_the_ref_and_field(tmp_path):
    refs = [dict(REFS[0], ann_id=999)]
    folder = make_refcoco(tmp_path, refs=refs)
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: ref 0 \(id 9\), field 'ann_id': 999 is not"):
        load_examples("refcoco", [folder / "refs(unc).p", folder / "instances.json"])
    refs = [dict(REFS[0], sentences=[{"sent_id": 1}])]
    folder = make_refcoco(tmp_path, refs=refs)
    with pytest.raises(ValueError, match=r"ref 0 \(id 9\), sentence 0, field 'raw': missing"):
        load_examples("refcoco", [folder / "refs(unc).p", folder / "instances.json"])
    instances = json.loads(json.dumps(INSTANCES))
    instances["annotations"][0]["bbox"] = [600, 0, 100, 10]  # 600 + 100 > 640
    write_json(folder / "instances.json", instances)
    make_refcoco_refs = [REFS[0]]
    (folder / "refs(unc).p").write_bytes(pickle.dumps(make_refcoco_refs))
    with pytest.raises(ValueError, match=r"instances\.json: annotation 0 \(id 1001\), field 'bbox'"
                                         r".*outside the 640x480 image"):
        load_examples("refcoco", [folder / "refs(unc).p", folder / "instances.json"])


class Evil:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class PlainClass:
    def __init__(self):
        self.ref_id = 1


@pytest.mark.parametrize("payload", ["evil", "class", "set"])
def test_refs_pickle_with_anything_but_plain_builtins_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    value = {"evil": [Evil(str(marker))], "class": [PlainClass()], "set": [{1, 2}]}[payload]
    folder = make_refcoco(tmp_path)
    (folder / "refs(unc).p").write_bytes(pickle.dumps(value))
    reason = "it holds a set" if payload == "set" else "refusing global"
    with pytest.raises(ValueError, match=rf"refs\(unc\)\.p: not a plain-data pickle \({reason}"):
        load_examples("refcoco", [folder / "refs(unc).p", folder / "instances.json"])
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# vlm-evaluation's prepared layout gives the same examples as the official files


def make_prepared(root: Path) -> None:
    """A vlm-evaluation root holding the fixture data as its prepare step writes it (hash()
    ids, shuffled order, img_path relative to the root, RefCOCO boxes rounded)."""
    img = "download/vqa-v2/images_val2014"
    write_json(root / "datasets/vqa-v2/metadata.json", {
        "42002": {"question_id": 42002, "question": "What is on the plate?",
                  "img_path": f"{img}/COCO_val2014_000000000042.jpg", "answer": "pizza",
                  "question_type": "what", "answer_type": "other",
                  "all_answers": ["pizza"] * 5 + ["pie"] * 5},
        "7000": {"question_id": 7000, "question": "How many dogs?",
                 "img_path": f"{img}/COCO_val2014_000000000007.jpg", "answer": "2",
                 "question_type": "what", "answer_type": "other", "all_answers": ["2"] * 10},
        "42000": {"question_id": 42000, "question": "Is it hot?",
                  "img_path": f"{img}/COCO_val2014_000000000042.jpg", "answer": "2",
                  "question_type": "what", "answer_type": "other", "all_answers": ["2"] * 10}})
    pope = {}
    for split, rows in POPE_ROWS.items():
        for qid, label in rows:
            pope[str(hash(f"{split}-{qid}"))] = {
                "question_id": hash(f"{split}-{qid}"), "split": split, "split_question_id": qid,
                "question": f"Is there a {split} thing in the image?", "answer": label,
                "img_path": f"download/pope/val_images/COCO_val2014_{qid:012d}.jpg"}
    write_json(root / "datasets/pope/metadata-full.json", pope)
    refer = {}
    for name, ref_id, sent_id, text, box in (("RefCOCO", 9, 31, "man on left", [0.1, 0.1, 0.5, 0.5]),
                                             ("RefCOCO+", 5, 15, "red car", [0.2, 0.1, 1.0, 1.0]),
                                             ("RefCOCO", 5, 15, "red car", [0.2, 0.1, 1.0, 1.0])):
        refer[str(hash((name, ref_id, sent_id)))] = {
            "example_id": 0, "ref_expression": text, "bbox": box, "refer_dataset": name,
            "split": "val", "ref_id": ref_id, "sent_id": sent_id,
            "img_path": f"download/refcoco/train2014/COCO_train2014_{100 if ref_id == 9 else 200:012d}.jpg"}
    write_json(root / "datasets/refcoco/metadata-full.json", refer)
    write_json(root / "datasets/text-vqa/metadata.json", {"34603": {
        "question_id": 34603, "img_path": "download/text-vqa/train_val_images/b9dc400eb20bad64.jpg",
        "question": "What does the text spell?\nReference OCR token: D, PALCON, COPENHAGEN\n"
                    "Answer the question using a single word or phrase.",
        "answers": ["copenhagen"] * 10}})
    write_json(root / "datasets/vizwiz/metadata.json", {"0": {
        "question_id": 0, "question": "What is this?", "answerable": 1,
        "img_path": "download/vizwiz/val_images/VizWiz_val_00000001.jpg", "answers": [ten("soup")]}})
    write_json(root / "datasets/ocid-ref/metadata-full.json", {"12": {
        "example_id": 12, "ref_expression": "the blue mug", "bbox": [0.1, 0.1, 0.5, 0.5],
        "img_path": "download/ocid-ref/OCID-dataset/ARID20/table/top/seq08/rgb/a.png",
        "clutter_split": "Minimum Clutter", "split": "val"}})


def _summary(examples):
    return [(e.split, e.example_id, e.image, e.answers, e.box and tuple(round(v, 2) for v in e.box))
            for e in examples]


def test_vlm_evaluation_prepared_layout_matches_the_official_files(tmp_path, data_root):
    make_prepared(tmp_path)
    for task in ("vqav2", "pope"):
        files, images = task_files(task, tmp_path)
        assert len(files) == 1 and files[0].startswith(str(tmp_path / "datasets"))
        prepared = load_task(task, tmp_path)
        assert _summary(prepared) == _summary(load_task(task, data_root)), task
        assert prepared[0].image_root == images
    refcoco = load_task("refcoco", tmp_path)
    assert _summary(refcoco) == _summary(load_task("refcoco", data_root)[::2])  # 5/15 and 9/31
    assert [e.example_id for e in load_task("refcoco+", tmp_path)] == ["5/15"]
    assert load_task("refcocog", tmp_path) == []
    (text,) = load_task("textvqa_ocr", tmp_path)
    assert text.question == "What does the text spell?"
    assert text.extra["ocr_tokens"] == ("D", "PALCON", "COPENHAGEN")
    (viz,) = load_task("vizwiz", tmp_path)
    assert viz.example_id == "VizWiz_val_00000001" and viz.answers == ("soup",) * 10
    assert viz.extra["answerable"] is True
    (mug,) = load_task("ocid_ref", tmp_path)
    assert (mug.example_id, mug.extra["clutter"]) == ("12", "minimum")
    assert mug.image == "ARID20/table/top/seq08/rgb/a.png"
    # an explicit image root elsewhere: images outside it are named, not guessed
    with pytest.raises(ValueError, match=r"metadata\.json: record 0 \(id '42002'\), field 'img_path'"
                                         r": .* is not inside the image root"):
        load_examples("vqav2", [tmp_path / "datasets/vqa-v2/metadata.json"], tmp_path / "elsewhere")


# ---------------------------------------------------------------------------------------------
# ShapesWorld and determinism


def test_shapesworld_tasks_load_every_record(shapesworld):
    manifest = json.loads((shapesworld / "manifest.json").read_text())
    questions = json.loads((shapesworld / "eval/vqav2/questions.json").read_text())["questions"]
    vqa = load_task("shapesworld_vqa", shapesworld)
    assert len(vqa) == len(questions) and len(vqa[0].answers) == 10
    by_id = {e.example_id: e for e in vqa}
    for q in questions:
        example = by_id[str(q["question_id"])]
        assert example.image == f"eval-{q['image_id']:06d}.jpg" and example.question == q["question"]
        assert (shapesworld / "eval/images" / example.image).is_file()
    pope = load_task("shapesworld_pope", shapesworld)
    for split in VISION_TASKS["pope"].splits:
        lines = (shapesworld / f"eval/pope/{split}.jsonl").read_text().splitlines()
        assert sum(e.split == split for e in pope) == len(lines) > 0
    ref = load_task("shapesworld_ref", shapesworld)
    assert len(ref) == len((shapesworld / "eval/refcoco/val.jsonl").read_text().splitlines()) > 0
    assert all((shapesworld / "eval/images" / e.image).is_file() for e in ref + pope)
    assert manifest  # a complete data set


def _ids_in_subprocess(task: str, root: Path, seed: str) -> list[str]:
    code = ("import json, sys; from megatron_vlm.evaluation.tasks import load_task; "
            "print(json.dumps([e.example_id for e in load_task(sys.argv[1], sys.argv[2])]))")
    env = {**os.environ, "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-c", code, task, str(root)], env=env, cwd=REPO,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def test_ids_and_order_are_deterministic_across_loads_and_hash_seeds(data_root, shapesworld):
    for task, root in (("pope", data_root), ("refcoco", data_root), ("shapesworld_pope", shapesworld)):
        ids = [e.example_id for e in load_task(task, root)]
        assert ids == [e.example_id for e in load_task(task, root)]
        assert _ids_in_subprocess(task, root, "1") == ids == _ids_in_subprocess(task, root, "2")


def test_id_sort_key_orders_numbers_numerically():
    ids = ["random/10", "random/2", "adversarial/3", "10/2", "9/31", "9/4", "abc"]
    assert sorted(ids, key=id_sort_key) == ["9/4", "9/31", "10/2", "abc", "adversarial/3",
                                            "random/2", "random/10"]


def test_task_table_is_complete():
    assert set(VISION_TASKS) == {"vqav2", "gqa", "textvqa", "textvqa_ocr", "pope", "refcoco",
                                 "refcoco+", "refcocog", "ocid_ref", "vizwiz", "shapesworld_vqa",
                                 "shapesworld_pope", "shapesworld_ref"}
    for name, info in VISION_TASKS.items():
        assert info.name == name and info.kind in ("vqa", "gqa", "textvqa", "pope", "box")
        assert info.splits and info.files and info.description
