"""Questions about a scene, with exact answers: the shared pool behind VQAv2-style evaluation
questions and LLaVA-style conversations.

Each question is a :class:`Question` with its kind (``color``, ``shape``, ``count``,
``exist``, ``side``, ``relation``), its answer and the VQAv2 question and answer types.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_vlm.synthetic.language import (number_word, side, unique_descriptions,
                                             with_article)
from megatron_vlm.synthetic.scenes import COLORS, SHAPES, Scene


@dataclass(frozen=True)
class Question:
    kind: str
    question: str
    answer: str
    answer_type: str  # VQAv2: "yes/no" | "number" | "other"
    question_type: str  # VQAv2: the question's opening words
    sentence: str  # the answer as a full sentence (for conversations)


def candidate_questions(scene: Scene, rng: random.Random) -> dict[str, list[Question]]:
    """All question kinds that have at least one true, unambiguous instance in the scene."""
    out: dict[str, list[Question]] = {}

    def add(q: Question) -> None:
        out.setdefault(q.kind, []).append(q)

    n = len(scene.objects)
    for i, o in enumerate(scene.objects):
        descs = unique_descriptions(scene, i)
        if o.shape in descs:
            add(Question("color", f"What color is the {o.shape}?", o.color, "other",
                         "what color is the", f"The {o.shape} is {o.color}."))
        if f"{o.color} shape" in descs:
            add(Question("shape", f"What shape is the {o.color} object?", o.shape, "other",
                         "what shape is the", f"The {o.color} object is a {o.shape}."))
        s = side(scene, i)
        if descs and s is not None:
            d = descs[-1] if len(descs) > 1 else descs[0]
            add(Question("side", f"Is the {d} on the left or the right?", s, "other", "is the",
                         f"The {d} is on the {s} side of the image."))
    # counting: every shape (absent ones give 0), colours present, all shapes
    for shape in SHAPES:
        c = scene.count(shape=shape)
        add(Question("count", f"How many {shape}s are there?", str(c), "number", "how many",
                     f"There {'is' if c == 1 else 'are'} {number_word(c)} "
                     f"{shape if c == 1 else shape + 's'}."))
    for color in sorted({o.color for o in scene.objects}):
        c = scene.count(color=color)
        add(Question("count", f"How many {color} shapes are there?", str(c), "number",
                     "how many", f"There {'is' if c == 1 else 'are'} {number_word(c)} {color} "
                     f"{'shape' if c == 1 else 'shapes'}."))
    add(Question("count", "How many shapes are there?", str(n), "number", "how many",
                 f"There {'is' if n == 1 else 'are'} {number_word(n)} "
                 f"{'shape' if n == 1 else 'shapes'} in the image."))
    # existence: one present kind and one absent kind, so yes and no are equally likely
    # Half of them end "in the image?", as POPE's questions do.
    present = scene.kinds()
    color, shape = rng.choice(present)
    where = " in the image" if rng.random() < 0.5 else ""
    add(Question("exist", f"Is there {with_article(color)} {shape}{where}?", "yes", "yes/no",
                 "is there a", f"Yes, there is {with_article(color)} {shape}."))
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    color, shape = rng.choice(absent)
    where = " in the image" if rng.random() < 0.5 else ""
    add(Question("exist", f"Is there {with_article(color)} {shape}{where}?", "no", "yes/no",
                 "is there a", f"No, there is no {color} {shape}."))
    # left-of relations between uniquely described shapes, clearly apart horizontally
    named = [(i, unique_descriptions(scene, i)) for i in range(n)]
    named = [(i, d[-1]) for i, d in named if d]
    for i, di in named:
        for j, dj in named:
            if i == j:
                continue
            dx = (scene.objects[j].cx - scene.objects[i].cx) / scene.width
            if abs(dx) > 0.15:
                yes = dx > 0
                add(Question("relation", f"Is the {di} to the left of the {dj}?",
                             "yes" if yes else "no", "yes/no", "is the",
                             f"{'Yes' if yes else 'No'}, the {di} is to the "
                             f"{'left' if yes else 'right'} of the {dj}."))
    return out


def pick_questions(scene: Scene, rng: random.Random, k: int) -> list[Question]:
    """``k`` distinct questions, cycling through the kinds in a random order so every kind
    is represented across a data set."""
    pool = candidate_questions(scene, rng)
    kinds = sorted(pool)
    rng.shuffle(kinds)
    for kind in kinds:
        rng.shuffle(pool[kind])
    chosen: list[Question] = []
    seen: set[str] = set()
    while len(chosen) < k and any(pool.values()):
        for kind in kinds:
            if pool[kind] and len(chosen) < k:
                q = pool[kind].pop()
                if q.question not in seen:
                    seen.add(q.question)
                    chosen.append(q)
    return chosen


_VARIANTS = {
    "red": ["orange", "dark red", "pink"],
    "green": ["dark green", "lime", "teal"],
    "blue": ["dark blue", "navy", "purple"],
    "yellow": ["gold", "orange", "light yellow"],
    "purple": ["violet", "blue", "magenta"],
    "orange": ["red", "yellow", "dark orange"],
    "circle": ["oval", "round", "ball"],
    "square": ["rectangle", "box", "diamond"],
    "triangle": ["pyramid", "cone", "arrow"],
    "left": ["left side", "right", "on left"],
    "right": ["right side", "left", "on right"],
    "yes": ["no"],
    "no": ["yes"],
}


def ten_answers(q: Question, rng: random.Random) -> list[dict]:
    """Ten annotator answers in VQAv2's format: mostly the right answer, up to three plausible
    variants (so the right answer is always the most common, at 7 or more of 10)."""
    n_var = rng.choice((0, 0, 0, 1, 1, 2, 3))
    if q.answer_type == "number":
        n = int(q.answer)
        options = [str(n + 1), number_word(n)] + ([str(n - 1)] if n > 0 else [])
    else:
        options = _VARIANTS.get(q.answer, [])
    answers = [q.answer] * 10
    slots = rng.sample(range(10), n_var) if options else []
    for slot in slots:
        answers[slot] = rng.choice(options)
    return [{"answer": a,
             "answer_confidence": "yes" if a == q.answer else rng.choice(("maybe", "no")),
             "answer_id": j + 1} for j, a in enumerate(answers)]
