"""ShapesWorld scenes: what is in an image (the scene record) and how it is drawn.

A scene holds one to four coloured shapes on a plain background. Every question, caption,
conversation and referring expression is derived from the scene record, never from the
pixels, so every answer is exactly right. Boxes are integer pixel boxes ``[x1, y1, x2, y2]``
with exclusive ends (the shape covers columns ``x1 .. x2-1``); shapes never touch.

Randomness: every scene has its own ``random.Random`` seeded from a string naming the world
seed, the image set and the index (string seeds are hashed with SHA-512 by Python, so they do
not depend on ``PYTHONHASHSEED``). Image ``i`` of a set is therefore the same whatever the
number of images asked for.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
"""Shape names, as used in every text."""

COLORS = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 200, 20),
    "purple": (148, 70, 190),
    "orange": (250, 127, 14),
}
"""Shape colours (American spelling, as VQAv2 questions use) and their RGB values."""

BACKGROUNDS = {
    "white": (248, 248, 248),
    "light gray": (196, 196, 196),
    "dark gray": (56, 56, 56),
}
"""Background names and RGB values; none of these names is a shape colour."""

COMBOS = tuple((c, s) for c in COLORS for s in SHAPES)
"""All 18 (colour, shape) kinds, in a fixed order used to break ties."""

_SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled, for smooth edges


@dataclass(frozen=True)
class Obj:
    """One shape in a scene: its kind and its integer pixel box (exclusive ends)."""

    shape: str
    color: str
    box: tuple[int, int, int, int]

    @property
    def kind(self) -> tuple[str, str]:
        return (self.color, self.shape)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2


@dataclass
class Scene:
    """A scene record: image key, size, background and shapes."""

    key: str
    width: int
    height: int
    background: str
    objects: list[Obj] = field(default_factory=list)

    def bbox(self, i: int) -> list[float]:
        """Normalized box of object ``i``: ``[x1, y1, x2, y2]`` in [0, 1], rounded to 4 places."""
        x1, y1, x2, y2 = self.objects[i].box
        return [round(x1 / self.width, 4), round(y1 / self.height, 4),
                round(x2 / self.width, 4), round(y2 / self.height, 4)]

    def count(self, color: str | None = None, shape: str | None = None) -> int:
        return sum(1 for o in self.objects
                   if (color is None or o.color == color) and (shape is None or o.shape == shape))

    def kinds(self) -> list[tuple[str, str]]:
        """Distinct (colour, shape) kinds present, in order of first appearance."""
        seen: list[tuple[str, str]] = []
        for o in self.objects:
            if o.kind not in seen:
                seen.append(o.kind)
        return seen

    def to_record(self, image: str, **extra) -> dict:
        """The JSON scene record (``image`` is the image path relative to the output root)."""
        rec = {"key": self.key, "image": image, **extra, "width": self.width,
               "height": self.height, "background": self.background,
               "objects": [{"shape": o.shape, "color": o.color, "box": list(o.box),
                            "bbox": self.bbox(i)} for i, o in enumerate(self.objects)]}
        return rec

    @classmethod
    def from_record(cls, rec: dict) -> "Scene":
        return cls(rec["key"], rec["width"], rec["height"], rec["background"],
                   [Obj(o["shape"], o["color"], tuple(o["box"])) for o in rec["objects"]])


class World:
    """The seed-dependent statistics scenes are drawn from.

    Kinds are not equally common (a Zipf-like popularity over the 18 kinds), and each kind has
    a companion kind that often appears beside it. This gives POPE's "popular" and
    "adversarial" splits something real to pick from.
    """

    def __init__(self, seed: int, min_shapes: int = 1, max_shapes: int = 4):
        if not 1 <= min_shapes <= max_shapes <= 6:
            raise ValueError(f"shapes per image must satisfy 1 <= min_shapes <= max_shapes <= 6, "
                             f"got min_shapes={min_shapes}, max_shapes={max_shapes}")
        self.seed = seed
        self.min_shapes = min_shapes
        self.max_shapes = max_shapes
        rng = random.Random(f"shapesworld:{seed}:world")
        order = list(COMBOS)
        rng.shuffle(order)
        self.popularity = {k: 1.0 / (rank + 1) ** 0.8 for rank, k in enumerate(order)}
        self.companion = {}
        for k in COMBOS:
            self.companion[k] = rng.choice([c for c in COMBOS if c != k])

    def rng(self, part: str, index: int) -> random.Random:
        """A generator private to one item (``part`` names the image set or task)."""
        return random.Random(f"shapesworld:{self.seed}:{part}:{index}")

    def draw_kind(self, rng: random.Random) -> tuple[str, str]:
        return rng.choices(COMBOS, weights=[self.popularity[k] for k in COMBOS])[0]

    def sample_kinds(self, rng: random.Random, n: int) -> list[tuple[str, str]]:
        kinds = [self.draw_kind(rng)]
        while len(kinds) < n:
            if rng.random() < 0.5:
                kinds.append(self.companion[rng.choice(kinds)])
            else:
                kinds.append(self.draw_kind(rng))
        return kinds

    def sample_scene(self, key: str, size: int, rng: random.Random) -> Scene:
        """A scene of ``min_shapes..max_shapes`` non-touching shapes in a ``size`` px square."""
        if size < 16:
            raise ValueError(f"image size must be at least 16 px, got {size}")
        n = rng.randint(self.min_shapes, self.max_shapes)
        kinds = self.sample_kinds(rng, n)
        background = rng.choice(list(BACKGROUNDS))
        lo, hi = 0.2, 0.42
        while True:
            objects = _place(rng, kinds, size, lo, hi)
            if objects is not None:
                return Scene(key, size, size, background, objects)
            lo, hi = lo * 0.85, hi * 0.85  # crowded: shrink and retry (still deterministic)


def _place(rng: random.Random, kinds, size: int, lo: float, hi: float) -> list[Obj] | None:
    objects: list[Obj] = []
    margin = max(1, size // 32)
    for color, shape in kinds:
        for _ in range(60):
            side = max(6, int(round(size * rng.uniform(lo, hi))))
            if side > size - 2 * margin:
                side = size - 2 * margin
            x1 = rng.randint(margin, size - margin - side)
            y1 = rng.randint(margin, size - margin - side)
            box = (x1, y1, x1 + side, y1 + side)
            if all(not _touch(box, o.box, gap=1) for o in objects):
                objects.append(Obj(shape, color, box))
                break
        else:
            return None
    return objects


def _touch(a, b, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0]
                or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def render(scene: Scene) -> Image.Image:
    """Draws a scene: shapes filled with their colour, drawn at 4x and downsampled."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (scene.width * s, scene.height * s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        x1, y1, x2, y2 = (v * s for v in o.box)
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
        elif o.shape == "square":
            draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
        else:  # triangle pointing up, base on the box's bottom edge
            draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=fill)
    return img.resize((scene.width, scene.height), Image.Resampling.BOX)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    """JPEG-encodes an image (baseline, no metadata: same pixels give the same bytes)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()
