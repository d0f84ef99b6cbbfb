"""ShapesWorld (megatron_vlm.synthetic, tools/make_synthetic_data.py): determinism, the real
formats of every file, and answers that agree with the scene records and the pixels."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest

from megatron_vlm.synthetic import (BACKGROUNDS, COLORS, SHAPES, Scene, ShapesWorldConfig,
                                    generate, verify)
from megatron_vlm.synthetic.language import referring_expressions, resolve

SMALL = dict(images=24, llava_images=24, eval_images=24, text_docs=200, task_items=40,
             shard_size=10)
LOCATION_DEPENDENT = {"manifest.json"}  # plus text/tasks/*.yaml (absolute data paths)


def _small(**kw) -> ShapesWorldConfig:
    return ShapesWorldConfig(**{**SMALL, **kw})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapesworld")
    generate(out, _small(seed=3), progress=False)
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scenes(root: Path) -> dict[str, dict]:
    return {r["image"]: r for r in _read_jsonl(root / "scenes.jsonl")}


def _portable(files: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in files.items()
            if k not in LOCATION_DEPENDENT and not k.endswith(".yaml")}


# ---------------------------------------------------------------- determinism and the tool


def test_same_seed_same_bytes_across_processes(world, tmp_path):
    """The CLI in a fresh process writes byte-identical files for the same seed and options."""
    args = [sys.executable, "tools/make_synthetic_data.py", "--out", str(tmp_path / "a"),
            "--seed", "3", "--no-progress", "--json"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    repo = Path(__file__).resolve().parent.parent
    res = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["counts"]["caption_pairs"] == SMALL["images"] and not summary["skipped"]
    mine = json.loads((world / "manifest.json").read_text())["files"]
    theirs = json.loads((tmp_path / "a" / "manifest.json").read_text())["files"]
    assert _portable(mine) == _portable(theirs)
    assert set(mine) == set(theirs)
    # the task YAMLs differ only by the directory they point at
    for rel in (k for k in mine if k.endswith(".yaml")):
        a = (world / rel).read_text().replace(str(world.resolve()), "ROOT")
        b = (tmp_path / "a" / rel).read_text().replace(str((tmp_path / "a").resolve()), "ROOT")
        assert a == b
    assert verify(world) == []


def test_different_seed_different_data(world, tmp_path):
    generate(tmp_path, _small(seed=4), progress=False)
    mine = json.loads((world / "manifest.json").read_text())["files"]
    other = json.loads((tmp_path / "manifest.json").read_text())["files"]
    for rel in ("captions_folder/images/cap-000000.jpg", "eval/vqav2/annotations.json",
                "text/corpus.jsonl", "eval/pope/adversarial.jsonl", "llava/llava_instruct.json"):
        assert mine[rel] != other[rel], rel


def test_rerun_is_skipped_and_interrupted_run_is_redone(tmp_path):
    cfg = _small(images=4, llava_images=2, eval_images=2, text_docs=20, task_items=4)
    first = generate(tmp_path, cfg, progress=False)
    assert not first["skipped"]
    again = generate(tmp_path, cfg, progress=False)
    assert again["skipped"] and again["files"] == first["files"]
    # a tampered file is noticed and the data set regenerated
    (tmp_path / "text" / "corpus.jsonl").write_text("{}\n")
    assert verify(tmp_path) == ["text/corpus.jsonl"]
    redo = generate(tmp_path, cfg, progress=False)
    assert not redo["skipped"] and verify(tmp_path) == [] and redo["files"] == first["files"]
    # a moved directory is regenerated (its task YAMLs point at the old place)
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    shutil.copytree(tmp_path, moved)
    assert not generate(moved, cfg, progress=False)["skipped"]
    assert str(moved.resolve()) in (moved / "text/tasks/shapesworld_arith.yaml").read_text()
    # an interrupted run leaves its marker: the next run redoes everything
    (tmp_path / ".shapesworld-incomplete").write_text("")
    assert not generate(tmp_path, cfg, progress=False)["skipped"]
    assert not (tmp_path / ".shapesworld-incomplete").exists()


def test_refuses_foreign_directory_and_bad_options(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        generate(tmp_path, _small(images=1), progress=False)
    with pytest.raises(ValueError, match="size"):
        ShapesWorldConfig(size=8)
    with pytest.raises(ValueError, match="max_shapes"):
        ShapesWorldConfig(min_shapes=3, max_shapes=2)


def test_cli_help_lists_every_option():
    repo = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "tools/make_synthetic_data.py", "--help"], cwd=repo,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for flag in ("--out", "--seed", "--images", "--size", "--text-docs", "--corrupt",
                 "--eval-images", "--vocab-size", "--no-sentencepiece", "--force"):
        assert flag in res.stdout, flag


# ---------------------------------------------------------------- images and scene records


def test_scenes_match_pixels_and_do_not_overlap(world):
    from PIL import Image

    palette = {**COLORS, **{f"bg:{k}": v for k, v in BACKGROUNDS.items()}}
    records = list(_scenes(world).values())
    assert len(records) == SMALL["images"] + SMALL["llava_images"] + SMALL["eval_images"]
    n_objects = Counter()
    for rec in records:
        scene = Scene.from_record(rec)
        assert 1 <= len(scene.objects) <= 4
        n_objects[len(scene.objects)] += 1
        img = Image.open(world / rec["image"])
        assert img.format == "JPEG" and img.size == (64, 64) and img.mode == "RGB"
        px = img.load()
        for i, o in enumerate(scene.objects):
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
            assert rec["objects"][i]["bbox"] == [round(v / 64, 4) for v in o.box]
            for p in scene.objects[i + 1:]:  # no two shapes share a pixel
                assert (x2 <= p.box[0] or p.box[2] <= x1 or y2 <= p.box[1] or p.box[3] <= y1)
            # the pixel at the box centre (inside every shape kind) has the shape's colour
            c = px[int(o.cx), int((o.cy + y2) / 2) if o.shape == "triangle" else int(o.cy)]
            nearest = min(palette, key=lambda k: sum((a - b) ** 2 for a, b in zip(c, palette[k])))
            assert nearest == o.color, (rec["key"], o, c)
    assert len(n_objects) >= 3  # a mix of scene sizes


def test_captions_name_every_shape(world):
    count_words = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
    pattern = re.compile(r"\b(a|an|one|two|three|four) (%s) (%s)s?\b"
                         % ("|".join(COLORS), "|".join(SHAPES)), re.IGNORECASE)
    for rec in _scenes(world).values():
        named = Counter()
        for word, color, shape in pattern.findall(rec["caption"]):
            named[(color, shape)] += count_words[word.lower()]
        truth = Counter((o["color"], o["shape"]) for o in rec["objects"])
        assert named == truth, (rec["caption"], truth)


def test_caption_tar_shards_are_datacomp_layout(world):
    manifest = json.loads((world / "manifest.json").read_text())
    shards = manifest["paths"]["caption_shards"]
    assert shards == [f"captions/shard-{i:05d}.tar" for i in range(3)]  # 24 pairs, 10 a shard
    scenes = {r["key"]: r for r in _scenes(world).values()}
    keys = []
    for rel in shards:
        with tarfile.open(world / rel) as tar:
            names = tar.getnames()
            assert len(names) % 3 == 0
            for j in range(0, len(names), 3):
                key = names[j].rsplit(".", 1)[0]
                assert names[j:j + 3] == [f"{key}.jpg", f"{key}.txt", f"{key}.json"]
                meta = json.loads(tar.extractfile(f"{key}.json").read())
                text = tar.extractfile(f"{key}.txt").read().decode()
                assert meta == {"key": key, "caption": text, "width": 64, "height": 64}
                assert text == scenes[key]["caption"]
                jpg = tar.extractfile(f"{key}.jpg").read()
                assert jpg == (world / "captions_folder" / "images" / f"{key}.jpg").read_bytes()
                keys.append(key)
    folder = _read_jsonl(world / "captions_folder" / "captions.jsonl")
    assert [r["key"] for r in folder] == keys == [f"cap-{i:06d}" for i in range(24)]
    for r in folder:
        assert set(r) == {"key", "image", "caption"}
        assert (world / "captions_folder" / r["image"]).is_file()


# ---------------------------------------------------------------- LLaVA


def test_llava_json_structure(world):
    records = json.loads((world / "llava" / "llava_instruct.json").read_text())
    with_image = [r for r in records if "image" in r]
    assert len(with_image) == SMALL["llava_images"]
    assert 0 < len(records) - len(with_image)  # some text-only conversations
    assert len({r["id"] for r in records}) == len(records)
    index = {r["key"]: r for r in _read_jsonl(world / "llava" / "images.jsonl")}
    for r in records:
        turns = r["conversations"]
        assert len(turns) >= 2 and len(turns) % 2 == 0
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(isinstance(t["value"], str) and t["value"] for t in turns)
        assert turns[0]["value"].startswith("<image>\n") == ("image" in r)
        assert not any("<image>" in t["value"] for t in turns[1:])
        if "image" in r:
            assert (world / "llava" / "images" / r["image"]).is_file()
            assert index[r["id"]]["image"] == f"images/{r['image']}"


def test_llava_answers_follow_the_scene(world):
    scenes = _scenes(world)
    openings = Counter()
    for r in json.loads((world / "llava" / "llava_instruct.json").read_text()):
        if "image" not in r:
            continue
        scene = scenes[f"llava/images/{r['image']}"]
        shapes = Counter(o["shape"] for o in scene["objects"])
        for q, a in zip(r["conversations"][::2], r["conversations"][1::2]):
            openings[" ".join(q["value"].removeprefix("<image>\n").split()[:2])] += 1
            m = re.match(r"(?:<image>\n)?Is there an? (\w+) (\w+)(?: in the image)?\?",
                         q["value"])
            if m:
                present = any((o["color"], o["shape"]) == m.groups() for o in scene["objects"])
                assert a["value"].lower().startswith("yes" if present else "no"), (q, a)
            m = re.match(r"(?:<image>\n)?How many (circle|square|triangle)s are there\?\n",
                         q["value"])
            if m:
                assert a["value"] == str(shapes[m.group(1)])
            m = re.search(r'describes: "(.*)"$', q["value"])
            if m:
                box = json.loads(a["value"])
                i = resolve(Scene.from_record(scene), m.group(1))
                assert len(i) == 1
                assert box == [round(v, 2) for v in scene["objects"][i[0]]["bbox"]]
    # Question kinds take turns: counting (five or more per scene) does not crowd out the
    # rest, and existence questions (POPE's kind) are common.
    total = sum(openings.values())
    assert openings["How many"] < 0.3 * total, openings
    assert openings["Is there"] > 0.15 * total, openings


# ---------------------------------------------------------------- evaluation sets


def test_vqav2_official_format_and_answers(world):
    qs = json.loads((world / "eval" / "vqav2" / "questions.json").read_text())
    ans = json.loads((world / "eval" / "vqav2" / "annotations.json").read_text())
    assert qs["task_type"] == "Open-Ended" and qs["data_subtype"] == ans["data_subtype"]
    assert len(qs["questions"]) == len(ans["annotations"]) == 3 * SMALL["eval_images"]
    scenes = {r["image_id"]: r for r in _scenes(world).values() if r["set"] == "eval"}
    by_id = {a["question_id"]: a for a in ans["annotations"]}
    types = Counter()
    for q in qs["questions"]:
        assert set(q) == {"image_id", "question", "question_id"}
        a = by_id[q["question_id"]]
        assert set(a) == {"question_id", "image_id", "answers", "multiple_choice_answer",
                          "answer_type", "question_type"}
        assert a["image_id"] == q["image_id"]
        assert len(a["answers"]) == 10
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert all(x["answer_confidence"] in ("yes", "maybe", "no") for x in a["answers"])
        counts = Counter(x["answer"] for x in a["answers"])
        assert counts.most_common(1)[0][0] == a["multiple_choice_answer"]
        assert counts[a["multiple_choice_answer"]] >= 7
        assert a["answer_type"] in ("yes/no", "number", "other")
        types[a["answer_type"]] += 1
        # answers agree with the scene record
        objs = scenes[q["image_id"]]["objects"]
        right = a["multiple_choice_answer"]
        if m := re.fullmatch(r"How many (circle|square|triangle)s are there\?", q["question"]):
            assert right == str(sum(o["shape"] == m.group(1) for o in objs))
        elif q["question"] == "How many shapes are there?":
            assert right == str(len(objs))
        elif m := re.fullmatch(r"What color is the (circle|square|triangle)\?", q["question"]):
            assert [o["color"] for o in objs if o["shape"] == m.group(1)] == [right]
        elif m := re.fullmatch(r"Is there an? (\w+) (\w+)(?: in the image)?\?", q["question"]):
            present = any((o["color"], o["shape"]) == m.groups() for o in objs)
            assert right == ("yes" if present else "no")
    assert set(types) == {"yes/no", "number", "other"}


def test_pope_balanced_and_true(world):
    scenes = {Path(r["image"]).name: r for r in _scenes(world).values() if r["set"] == "eval"}
    negatives = {}
    for split in ("random", "popular", "adversarial"):
        recs = _read_jsonl(world / "eval" / "pope" / f"{split}.jsonl")
        labels = Counter(r["label"] for r in recs)
        assert labels["yes"] == labels["no"] > 0 and set(labels) == {"yes", "no"}
        assert [r["question_id"] for r in recs] == list(range(1, len(recs) + 1))
        negatives[split] = Counter()
        for r in recs:
            assert set(r) == {"question_id", "image", "text", "label"}
            assert (world / "eval" / "images" / r["image"]).is_file()
            m = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", r["text"])
            color, shape = m.groups()
            present = any((o["color"], o["shape"]) == (color, shape)
                          for o in scenes[r["image"]]["objects"])
            assert r["label"] == ("yes" if present else "no")
            if not present:
                negatives[split][(color, shape)] += 1
    # popular and adversarial negatives concentrate on fewer kinds than random ones
    assert len(negatives["popular"]) < len(negatives["random"])
    assert negatives["popular"] != negatives["adversarial"]


def test_refcoco_boxes_are_normalized_and_point_at_the_referred_shape(world):
    scenes = {Path(r["image"]).name: r for r in _scenes(world).values() if r["set"] == "eval"}
    recs = _read_jsonl(world / "eval" / "refcoco" / "val.jsonl")
    assert len(recs) >= SMALL["eval_images"]
    positional = 0
    for r in recs:
        assert set(r) == {"id", "image", "sent", "bbox"}
        x1, y1, x2, y2 = r["bbox"]
        assert 0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0
        rec = scenes[r["image"]]
        matches = [o for o in rec["objects"] if o["bbox"] == r["bbox"]]
        assert len(matches) == 1
        obj = matches[0]
        words = r["sent"].split()
        assert obj["shape"] in words or f"{obj['color']} shape" in r["sent"]
        if any(c in words for c in COLORS):
            assert obj["color"] in words
        # the expression picks out that shape and no other
        scene = Scene.from_record(rec)
        i = rec["objects"].index(obj)
        assert r["sent"] in referring_expressions(scene, i)
        assert resolve(scene, r["sent"]) == [i]
        positional += any(w in words for w in ("left", "right", "top", "bottom", "leftmost",
                                               "rightmost", "topmost", "bottommost", "center"))
    assert positional > 0


# ---------------------------------------------------------------- text, tasks and tokenizer


def test_text_corpus_and_task_files(world):
    docs = _read_jsonl(world / "text" / "corpus.jsonl")
    assert len(docs) == SMALL["text_docs"] and all(set(d) == {"text"} and d["text"] for d in docs)
    tasks = json.loads((world / "text" / "tasks.json").read_text())["tasks"]
    assert set(tasks) == {"shapesworld_arith", "shapesworld_count", "shapesworld_order"}
    for name, t in tasks.items():
        items = _read_jsonl(world / t["data"])
        assert len(items) == t["items"] == SMALL["task_items"]
        assert t["chance"] == pytest.approx(1 / t["num_choices"])
        for it in items:
            assert len(it["choices"]) == t["num_choices"] == len(set(it["choices"]))
            assert 0 <= it["gold"] < t["num_choices"]
        if name == "shapesworld_arith":
            for it in items:
                a, op, b = re.search(r"What is (\d+) (plus|minus) (\d+)\?", it["query"]).groups()
                want = int(a) + int(b) if op == "plus" else int(a) - int(b)
                assert it["choices"][it["gold"]] == str(want)
        if name == "shapesworld_order":
            golds = Counter(it["gold"] for it in items)
            assert golds[0] == golds[1]


def test_lm_eval_task_loads_offline(world, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    tm = TaskManager(include_path=str(world / "text" / "tasks"), include_defaults=False)
    assert {"shapesworld_arith", "shapesworld_count", "shapesworld_order"} <= set(tm.all_tasks)
    loaded = tm.load(["shapesworld"])["tasks"]  # the tag every ShapesWorld task carries
    assert set(loaded) == {"shapesworld_arith", "shapesworld_count", "shapesworld_order"}
    task = loaded["shapesworld_order"]
    docs = list(task.test_docs())
    assert len(docs) == SMALL["task_items"]
    doc = docs[0]
    assert task.doc_to_text(doc) == doc["query"]
    assert task.doc_to_choice(doc) == ["yes", "no"]
    assert task.doc_to_target(doc) == doc["gold"]
    assert task.OUTPUT_TYPE == "multiple_choice"
    assert time.perf_counter() - start < 20  # fast enough to stay in the default suite


def test_tokenizers_round_trip_with_special_ids(world):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(world / "tokenizer" / "tokenizer.json"))
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.token_to_id("<|sep|>") == 1
    text = ("Is there an orange circle?\nAnswer the question using a single word or phrase."
            "<|sep|>yes<|endoftext|> 17 plus 25 is 42.  Ünïcode ✓")
    ids = tok.encode(text, add_special_tokens=False).ids
    assert 0 in ids and 1 in ids  # specials are single tokens
    assert tok.decode(ids, skip_special_tokens=False) == text
    caption = _read_jsonl(world / "captions_folder" / "captions.jsonl")[0]["caption"]
    assert len(tok.encode(caption).ids) < 0.6 * len(caption)  # merges learnt on the data
    assert tok.encode("red circle", add_special_tokens=True).ids[0] != 0  # no BOS added

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(world / "tokenizer" / "tokenizer.model"))
    assert sp.get_piece_size() == 512 and sp.eos_id() == 0 and sp.bos_id() == -1
    assert sp.piece_to_id("<|sep|>") == 1
    plain = text.replace("<|endoftext|>", "")
    assert sp.decode(sp.encode(plain)) == plain


def test_project_tokenizer_loader_reads_both(world):
    tokenizer = pytest.importorskip("megatron_vlm.data.tokenizer")
    for name in ("tokenizer.json", "tokenizer.model"):
        tok = tokenizer.load_tokenizer(world / "tokenizer" / name)
        assert tok.vocab_size == 512 and tok.eos_id == 0 and tok.token_to_id("<|sep|>") == 1
        assert tok.decode(tok.encode("Two red squares.")) == "Two red squares."


# ---------------------------------------------------------------- corrupt items


def test_no_corrupt_files_unless_asked(world):
    from PIL import Image

    manifest = json.loads((world / "manifest.json").read_text())
    assert manifest["corrupt"] == []
    for rel in manifest["files"]:
        if rel.endswith(".jpg"):
            with Image.open(world / rel) as im:
                im.load()
    for jsonl in ("captions_folder/captions.jsonl", "llava/images.jsonl", "eval/images.jsonl"):
        for r in _read_jsonl(world / jsonl):
            assert (world / Path(jsonl).parent / r["image"]).is_file()


def test_corrupt_items_when_asked(tmp_path):
    from PIL import Image

    generate(tmp_path, _small(images=6, llava_images=4, eval_images=2, text_docs=20,
                              task_items=4, corrupt=2), progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    kinds = Counter((c["set"], c["kind"]) for c in manifest["corrupt"])
    assert kinds == {("captions", "truncated"): 1, ("captions", "missing"): 1,
                     ("llava", "truncated"): 1, ("llava", "missing"): 1}
    assert manifest["counts"]["caption_pairs"] == 6  # good pairs; corrupt ones come on top
    folder = {r["key"]: r for r in _read_jsonl(tmp_path / "captions_folder" / "captions.jsonl")}
    llava = {r["id"]: r for r in json.loads((tmp_path / "llava/llava_instruct.json").read_text())}
    for c in manifest["corrupt"]:
        path = tmp_path / c["image"]
        if c["kind"] == "missing":
            assert not path.exists()
        else:
            with pytest.raises(OSError):
                with Image.open(path) as im:
                    im.load()
        if c["set"] == "captions":
            assert folder[c["key"]]["image"] == f"images/{c['key']}.jpg"
            with tarfile.open(tmp_path / c["in"][0]) as tar:
                names = tar.getnames()
            assert f"{c['key']}.txt" in names and f"{c['key']}.json" in names
            assert (f"{c['key']}.jpg" in names) == (c["kind"] == "truncated")
        else:
            assert llava[c["key"]]["image"] == f"shapes/{c['key']}.jpg"
    # corrupt items sit among the good ones, not only at the end
    keys = list(folder)
    assert keys[-1].startswith("cap-") and any(k.startswith("corrupt-") for k in keys)
