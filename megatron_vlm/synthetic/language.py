"""Words for ShapesWorld scenes: captions, unique descriptions and referring expressions.

Everything here reads a :class:`~megatron_vlm.synthetic.scenes.Scene` and returns text that
is true of it. Descriptions used in questions ("the red circle") name exactly one shape of
the scene; referring expressions may add a position ("the circle on the left") and are only
produced when that position singles the shape out by a clear margin.
"""

from __future__ import annotations

import random

from megatron_vlm.synthetic.scenes import Scene

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty")


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def plural(noun: str, n: int) -> str:
    return noun if n == 1 else noun + "s"


def with_article(word: str) -> str:
    """``word`` with its indefinite article: ``a red``, ``an orange``."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def counted(n: int, color: str, shape: str) -> str:
    """``a red circle``, ``an orange square``, ``two red circles``."""
    if n == 1:
        return f"{with_article(color)} {shape}"
    return f"{number_word(n)} {color} {shape}s"


def join_list(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def region(scene: Scene, i: int) -> str:
    """Where object ``i`` is in the image, by thirds: ``in the top left``, ``on the right``,
    ``at the bottom``, ``in the center`` ..."""
    o = scene.objects[i]
    fx, fy = o.cx / scene.width, o.cy / scene.height
    col = "left" if fx < 1 / 3 else "right" if fx > 2 / 3 else "center"
    row = "top" if fy < 1 / 3 else "bottom" if fy > 2 / 3 else "middle"
    if row == "middle":
        return "in the center" if col == "center" else f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"in the {row} {col}"


def side(scene: Scene, i: int, margin: float = 0.12) -> str | None:
    """``left`` or ``right`` when object ``i``'s centre is clearly off the vertical midline."""
    fx = scene.objects[i].cx / scene.width - 0.5
    if fx < -margin:
        return "left"
    if fx > margin:
        return "right"
    return None


def caption(scene: Scene, rng: random.Random) -> str:
    """A one-sentence caption naming every shape (grouped by kind, with counts)."""
    groups = [counted(scene.count(c, s), c, s) for c, s in scene.kinds()]
    listing = join_list(groups)
    n = len(scene.objects)
    bg = scene.background
    template = rng.randrange(5)
    if template == 0:
        text = f"{listing}."
    elif template == 1:
        text = f"{number_word(n)} {plural('shape', n)} on a {bg} background: {listing}."
    elif template == 2:
        text = f"a picture of {listing} on a {bg} background."
    elif template == 3:
        text = f"{listing} drawn on a plain {bg} background."
    else:  # every shape with its place
        parts = [f"{counted(1, o.color, o.shape)} {region(scene, i)}"
                 for i, o in enumerate(scene.objects)]
        text = f"{join_list(parts)}."
    return text[0].upper() + text[1:]


def unique_descriptions(scene: Scene, i: int) -> list[str]:
    """Position-free noun phrases (without article) naming object ``i`` and no other object."""
    o = scene.objects[i]
    out = []
    if scene.count(shape=o.shape) == 1:
        out.append(o.shape)
    if scene.count(o.color, o.shape) == 1:
        out.append(f"{o.color} {o.shape}")
    if scene.count(color=o.color) == 1:
        out.append(f"{o.color} shape")
    return out


_EXTREMES = {  # axis, sign, word for a pair, word for three or more
    "left": (0, -1, "on the left", "leftmost"),
    "right": (0, 1, "on the right", "rightmost"),
    "top": (1, -1, "at the top", "topmost"),
    "bottom": (1, 1, "at the bottom", "bottommost"),
}


def referring_expressions(scene: Scene, i: int, margin: float = 0.1) -> list[str]:
    """Expressions that pick out object ``i`` alone.

    Position-free descriptions come first ("the red circle"), then the same with its place in
    the image ("the red circle on the left"), then relative ones among shapes of the same kind
    or shape ("the circle on the left" of two circles, "the leftmost red circle" of three),
    used only when object ``i``'s centre beats the runner-up by ``margin`` of the image size.
    """
    o = scene.objects[i]
    out = [f"the {d}" for d in unique_descriptions(scene, i)]
    if f"the {o.color} {o.shape}" in out:
        out.append(f"the {o.color} {o.shape} {region(scene, i)}")
    same_kind = [j for j, p in enumerate(scene.objects) if p.kind == o.kind]
    same_shape = [j for j, p in enumerate(scene.objects) if p.shape == o.shape]
    for noun, members in ((f"{o.color} {o.shape}", same_kind), (o.shape, same_shape)):
        if len(members) < 2:
            continue
        for axis, sign, pair_word, many_word in _EXTREMES.values():
            size = scene.width if axis == 0 else scene.height
            pos = {j: (scene.objects[j].cx if axis == 0 else scene.objects[j].cy) * sign
                   for j in members}
            others = [pos[j] for j in members if j != i]
            if pos[i] - max(others) > margin * size:  # i is the extreme one, clearly
                phrase = (f"the {noun} {pair_word}" if len(members) == 2
                          else f"the {many_word} {noun}")
                out.append(phrase)
    return out


def resolve(scene: Scene, expression: str) -> list[int]:
    """The objects an expression from :func:`referring_expressions` could mean (for checks)."""
    return [i for i in range(len(scene.objects)) if expression in referring_expressions(scene, i)]
