"""LLaVA-1.5-format conversations about ShapesWorld images, and text-only ones.

A record is ``{"id", "image", "conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}``; the first human turn of a record with an image starts
with ``"<image>\\n"`` and no other turn holds ``<image>``; text-only records have no
``image`` key. Turns mix the prompt styles of the LLaVA-1.5 mix: free questions answered in a
sentence, short-answer questions ("Answer the question using a single word or phrase."),
a description request answered by the caption, and box requests answered with a normalized
``[x1, y1, x2, y2]`` (two decimals), the same prompts the evaluation uses.
"""

from __future__ import annotations

import random

from megatron_vlm.synthetic.language import caption, referring_expressions, with_article
from megatron_vlm.synthetic.questions import pick_questions
from megatron_vlm.synthetic.scenes import COMBOS, Scene

SHORT_ANSWER = "Answer the question using a single word or phrase."
BOX_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "
DESCRIBE = ("Describe the image briefly.", "What is in this picture?",
            "Give a short description of the image.", "What do you see in the image?")


def format_box(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"


def image_conversation(scene: Scene, rng: random.Random, max_turns: int = 4) -> list[dict]:
    """1..max_turns question/answer pairs about the scene."""
    # Question kinds take turns (as in the evaluation's VQA set): a flat draw would be mostly
    # counting questions, of which every scene has five or more.
    questions = pick_questions(scene, rng, max_turns)
    boxes = [(e, scene.bbox(i)) for i in range(len(scene.objects))
             for e in referring_expressions(scene, i)]
    n_turns = rng.randint(1, max_turns)
    turns: list[dict] = []
    used: set[str] = set()
    for t in range(n_turns):
        style = rng.choices(("sentence", "short", "describe", "box", "exist"),
                            weights=(4, 4, 1, 1, 3))[0]
        if style == "describe" and t == 0:
            human, gpt = rng.choice(DESCRIBE), caption(scene, rng)
        elif style == "exist":
            human, gpt = existence_question(scene, rng)
        elif style == "box" and boxes:
            expr, box = rng.choice(boxes)
            human, gpt = f'{BOX_PROMPT}"{expr}"', format_box(box)
        else:
            q = next((q for q in questions if q.question not in used), None)
            if q is None:
                break
            used.add(q.question)
            if style == "short":
                human, gpt = f"{q.question}\n{SHORT_ANSWER}", q.answer
            else:
                human, gpt = q.question, q.sentence
        if t == 0:
            human = "<image>\n" + human
        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return turns


def existence_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A POPE-style turn: is a (colour, shape) kind in the image, present or absent with equal
    odds, answered yes or no."""
    present = scene.kinds()
    if rng.random() < 0.5:
        (color, shape), answer = rng.choice(present), "yes"
    else:
        (color, shape), answer = rng.choice([k for k in COMBOS if k not in present]), "no"
    return f"Is there {with_article(color)} {shape} in the image?\n{SHORT_ANSWER}", answer


def text_conversation(rng: random.Random, max_turns: int = 3) -> list[dict]:
    """A text-only chat: arithmetic, counting and facts about shapes."""
    sides = {"triangle": 3, "square": 4, "circle": 0}
    turns: list[dict] = []
    for _ in range(rng.randint(1, max_turns)):
        kind = rng.randrange(4)
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if kind == 0:
            human, gpt = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        elif kind == 1:
            hi, lo = max(a, b), min(a, b)
            human, gpt = f"What is {hi} minus {lo}?", f"{hi} minus {lo} is {hi - lo}."
        elif kind == 2:
            shape = rng.choice(sorted(sides))
            n = sides[shape]
            human = f"How many corners does a {shape} have?"
            gpt = f"A {shape} has {'no' if n == 0 else n} corners."
        else:
            big, small = (a, b) if a > b else (b, a)
            if big == small:
                big += 1
            human, gpt = f"Which is larger, {small} or {big}?", f"{big} is larger than {small}."
        turns += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return turns
