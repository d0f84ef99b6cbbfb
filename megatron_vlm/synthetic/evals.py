"""Evaluation sets over the ShapesWorld eval images, in the formats the real benchmarks use.

- VQAv2: the official questions and annotations JSON (10 answers per question).
- POPE: yes/no existence questions, one JSONL per split (random, popular, adversarial),
  exactly half "yes" in every split.
- RefCOCO: referring expressions with normalized ``[x1, y1, x2, y2]`` boxes, one JSONL.

Eval image ``image_id`` ``i`` is the file ``eval-{i:06d}.jpg`` in ``eval/images/``.
"""

from __future__ import annotations

from collections import Counter

from megatron_vlm.synthetic.language import referring_expressions, with_article
from megatron_vlm.synthetic.questions import pick_questions, ten_answers
from megatron_vlm.synthetic.scenes import COMBOS, Scene, World

POPE_SPLITS = ("random", "popular", "adversarial")


def eval_image_name(image_id: int) -> str:
    return f"eval-{image_id:06d}.jpg"


def build_vqav2(world: World, scenes: list[Scene], per_image: int) -> tuple[dict, dict]:
    """(questions JSON, annotations JSON) in VQAv2's official layout."""
    header = {"info": {"description": "ShapesWorld VQA (synthetic, VQAv2 format)",
                       "version": "1.0"},
              "license": {"name": "synthetic"}, "data_subtype": "val", "data_type": "shapesworld"}
    questions, annotations = [], []
    for image_id, scene in enumerate(scenes):
        rng = world.rng("vqav2", image_id)
        for j, q in enumerate(pick_questions(scene, rng, per_image)):
            qid = image_id * 1000 + j
            questions.append({"image_id": image_id, "question": q.question, "question_id": qid})
            annotations.append({"question_id": qid, "image_id": image_id,
                                "answers": ten_answers(q, rng),
                                "multiple_choice_answer": q.answer,
                                "answer_type": q.answer_type, "question_type": q.question_type})
    return ({**header, "task_type": "Open-Ended", "questions": questions},
            {**header, "annotations": annotations})


def build_pope(world: World, scenes: list[Scene], per_image: int) -> dict[str, list[dict]]:
    """POPE records per split. Per image, ``k = min(per_image, kinds present)`` present kinds
    are asked about (answer yes) and ``k`` absent ones (answer no), chosen at random (random),
    among the kinds most frequent over the eval images (popular), or among those that most often
    appear together with the image's kinds (adversarial)."""
    freq: Counter = Counter()
    cooc: Counter = Counter()
    for s in scenes:
        kinds = s.kinds()
        freq.update(kinds)
        for a in kinds:
            for b in kinds:
                if a != b:
                    cooc[(a, b)] += 1
    order = {k: n for n, k in enumerate(COMBOS)}
    out: dict[str, list[dict]] = {}
    for split in POPE_SPLITS:
        records = []
        for image_id, scene in enumerate(scenes):
            rng = world.rng(f"pope-{split}", image_id)
            present = scene.kinds()
            absent = [k for k in COMBOS if k not in present]
            k = min(per_image, len(present))
            pos = rng.sample(present, k)
            if split == "random":
                neg = rng.sample(absent, k)
            elif split == "popular":
                neg = sorted(absent, key=lambda a: (-freq[a], order[a]))[:k]
            else:
                neg = sorted(absent, key=lambda a: (-sum(cooc[(p, a)] for p in present),
                                                    -freq[a], order[a]))[:k]
            items = [(kind, "yes") for kind in pos] + [(kind, "no") for kind in neg]
            rng.shuffle(items)
            for (color, shape), label in items:
                records.append({"question_id": len(records) + 1, "image": eval_image_name(image_id),
                                "text": f"Is there {with_article(color)} {shape} in the image?",
                                "label": label})
        out[split] = records
    return out


def build_refcoco(world: World, scenes: list[Scene]) -> list[dict]:
    """One referring expression per shape that has one (chosen at random among its valid
    expressions), with the shape's normalized box."""
    records = []
    for image_id, scene in enumerate(scenes):
        rng = world.rng("refcoco", image_id)
        for i in range(len(scene.objects)):
            exprs = referring_expressions(scene, i)
            if not exprs:
                continue
            records.append({"id": len(records), "image": eval_image_name(image_id),
                            "sent": rng.choice(exprs), "bbox": scene.bbox(i)})
    return records
