"""The ShapesWorld text corpus and its small multiple-choice tasks.

The corpus is short documents of procedural sentences: scenes of shapes told in words,
facts about shapes, arithmetic, counting and comparisons. The tasks ask the same kind of
things, so a model trained on the corpus can beat chance on them:

- ``shapesworld_arith`` (4 choices): sums and differences of small numbers.
- ``shapesworld_count`` (4 choices): how many shapes a described collection holds.
- ``shapesworld_order`` (2 choices, yes/no, balanced): left-of reasoning over a chain of shapes.

Task files are ``{"query", "choices", "gold"}`` JSONL read by lm-eval through a YAML config
(``dataset_path: json`` with a local ``data_files``).
"""

from __future__ import annotations

import random

from megatron_vlm.synthetic.language import counted, join_list, number_word
from megatron_vlm.synthetic.scenes import COLORS, SHAPES, World

_SIDES = {"triangle": 3, "square": 4, "circle": 0}
_NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun")


def _shape_facts(rng: random.Random) -> list[str]:
    shape = rng.choice(SHAPES)
    n = _SIDES[shape]
    facts = {
        "triangle": ["A triangle has three sides and three corners.",
                     "Every triangle has three corners."],
        "square": ["A square has four equal sides and four corners.",
                   "All four sides of a square are the same length."],
        "circle": ["A circle is round and has no corners.", "A circle has no straight sides."],
    }[shape]
    out = [rng.choice(facts)]
    k = rng.randint(2, 5)
    out.append(f"{number_word(k).capitalize()} {shape}s have {n * k if n else 'no'} corners in all."
               if n else f"{number_word(k).capitalize()} circles still have no corners.")
    return out


def _scene_story(rng: random.Random, world: World) -> list[str]:
    kinds = world.sample_kinds(rng, rng.randint(2, 4))
    rng.shuffle(kinds)
    names = [f"{c} {s}" for c, s in kinds]
    out = [f"There are {number_word(len(kinds))} shapes in a row."]
    for a, b in zip(names, names[1:]):
        out.append(f"The {a} is to the left of the {b}.")
    out.append(f"The {names[0]} is the leftmost and the {names[-1]} is the rightmost.")
    shapes = [s for _, s in kinds]
    for s in sorted(set(shapes)):
        c = shapes.count(s)
        noun = s if c == 1 else s + "s"
        out.append(f"There {'is' if c == 1 else 'are'} {number_word(c)} {noun}.")
    return out


def _arithmetic(rng: random.Random) -> list[str]:
    out = []
    for _ in range(rng.randint(2, 5)):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        op = rng.randrange(3)
        if op == 0:
            out.append(f"{a} plus {b} is {a + b}.")
        elif op == 1:
            hi, lo = max(a, b), min(a, b)
            out.append(f"{hi} minus {lo} is {hi - lo}.")
        else:
            a, b = a % 10, b % 10
            out.append(f"{a} times {b} is {a * b}.")
    return out


def _counting(rng: random.Random) -> list[str]:
    start = rng.randint(0, 10)
    n = rng.randint(3, 7)
    seq = [number_word(v) for v in range(start, start + n)]
    out = [f"Counting up: {', '.join(seq)}."]
    a = rng.randint(0, 19)
    out.append(f"After {a} comes {a + 1}.")
    x, y = rng.sample(range(21), 2)
    out.append(f"{max(x, y)} is more than {min(x, y)}.")
    return out


def _collection_groups(rng: random.Random) -> tuple[str, list[tuple[int, str, str]]]:
    name = rng.choice(_NAMES)
    groups = [(rng.randint(1, 4), c, s) for c, s in rng.sample(
        [(c, s) for c in COLORS for s in SHAPES], rng.randint(2, 3))]
    return name, groups


def _collection(rng: random.Random) -> list[str]:
    name, groups = _collection_groups(rng)
    total = sum(g[0] for g in groups)
    return [f"{name} has {join_list([counted(*g) for g in groups])}.",
            f"So {name} has {total} shapes in all."]


def corpus_document(world: World, index: int) -> str:
    """Document ``index`` of the corpus: a few paragraphs of sentences from random topics."""
    rng = world.rng("text", index)
    makers = (_shape_facts, lambda r: _scene_story(r, world), _arithmetic, _counting, _collection)
    sentences: list[str] = []
    for _ in range(rng.randint(1, 3)):
        sentences += rng.choice(makers)(rng)
    return " ".join(sentences)


def _distractors(rng: random.Random, answer: int, k: int, lo: int = 0) -> list[int]:
    pool = [v for v in range(max(lo, answer - 5), answer + 6) if v != answer]
    return rng.sample(pool, k)


def _mc_numbers(rng: random.Random, query: str, answer: int) -> dict:
    choices = _distractors(rng, answer, 3) + [answer]
    rng.shuffle(choices)
    return {"query": query, "choices": [str(c) for c in choices], "gold": choices.index(answer)}


def arith_item(world: World, index: int) -> dict:
    rng = world.rng("task-arith", index)
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    if rng.random() < 0.5:
        return _mc_numbers(rng, f"Question: What is {a} plus {b}?\nAnswer:", a + b)
    hi, lo = max(a, b), min(a, b)
    return _mc_numbers(rng, f"Question: What is {hi} minus {lo}?\nAnswer:", hi - lo)


def count_item(world: World, index: int) -> dict:
    rng = world.rng("task-count", index)
    name, groups = _collection_groups(rng)
    doc = f"{name} has {join_list([counted(*g) for g in groups])}."
    total = sum(g[0] for g in groups)
    return _mc_numbers(rng, f"{doc}\nQuestion: How many shapes does {name} have?\nAnswer:", total)


def order_item(world: World, index: int) -> dict:
    """Half the items (by index parity) have answer yes, so the task is balanced."""
    rng = world.rng("task-order", index)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], rng.randint(3, 4))
    names = [f"{c} {s}" for c, s in kinds]
    facts = [f"The {a} is to the left of the {b}." for a, b in zip(names, names[1:])]
    rng.shuffle(facts)
    i, j = sorted(rng.sample(range(len(names)), 2))
    yes = index % 2 == 0
    a, b = (names[i], names[j]) if yes else (names[j], names[i])
    query = f"{' '.join(facts)}\nQuestion: Is the {a} to the left of the {b}?\nAnswer:"
    return {"query": query, "choices": ["yes", "no"], "gold": 0 if yes else 1}


TASKS = {
    "shapesworld_arith": (arith_item, 4),
    "shapesworld_count": (count_item, 4),
    "shapesworld_order": (order_item, 2),
}
"""Task name -> (item builder, number of choices); chance accuracy is 1 / choices."""


def task_yaml(name: str, data_file: str) -> str:
    """An lm-eval 0.4 task config reading ``data_file`` (an absolute path) as its test split."""
    return (
        f"# ShapesWorld multiple-choice task (generated by tools/make_synthetic_data.py).\n"
        f"tag:\n  - shapesworld\n"
        f"task: {name}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data_file}\n"
        f"output_type: multiple_choice\n"
        f"test_split: test\n"
        f"doc_to_text: \"{{{{query}}}}\"\n"
        f"doc_to_choice: choices\n"
        f"doc_to_target: gold\n"
        f"metric_list:\n"
        f"  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        f"  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        f"metadata:\n  version: 1.0\n"
    )
