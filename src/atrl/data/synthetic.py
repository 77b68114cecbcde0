"""Procedural visual-reasoning tasks with verifiable answers, drawn with PIL alone.

Each task family draws a scene from a seeded random generator, renders it, and states a question
whose answer follows from the scene. Every example carries:

- `image` (PIL), `question`, `answer` (a string), `answer_type` ("integer", "choice" or "text"),
  `choices` (for "choice"), the `scene` description it was drawn from (JSON-able);
- `reasoning`: a reference response in the project's format `<think>...</think><answer>...</answer>`;
- `perception_spans`: character spans `[start, end)` of `reasoning` that state what was read from the
  image. They are the ground truth later used to check whether anchor tokens land on perception.

Families (each with difficulty knobs, see the `*Knobs` dataclasses):

    count       how many objects of one colour and shape
    bar_value   the value of one labelled bar in a bar chart
    compare     which of two panels holds more dots
    arithmetic  evaluate `a op b` drawn as digits
    quadrant    the colour of the shape in a given quadrant

and one video family (`VIDEO_FAMILIES`: its examples also carry `frames`, `image` being the last of them; it is
left out of "all families" unless named):

    colour_change  a shape changes colour once; its colour in the first or the last frame

Determinism: example `i` of a data set with seed `s` is drawn from `random.Random(f"{family}:{s}:{i}")`,
so the same seed gives the same data set, byte for byte, whatever else was generated before.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from PIL import Image, ImageDraw, ImageFont

from .._checks import check_keys

RESPONSE_INSTRUCTION = "Reply as <think>...</think><answer>...</answer>."

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
BACKGROUND = (255, 255, 255)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """PIL's built-in font (no font files on disk are needed)."""
    return ImageFont.load_default(size=size)


@dataclass
class Example:
    """One synthetic task. `perception_spans` index into `reasoning`."""

    uid: str
    family: str
    image: Image.Image
    question: str
    answer: str
    answer_type: str
    reasoning: str
    perception_spans: list[tuple[int, int]]
    scene: dict[str, Any]
    choices: list[str] | None = None
    knobs: dict[str, Any] = field(default_factory=dict)
    frames: list[Image.Image] | None = None  # a video family's frames (`image` is the last)
    fps: float | None = None  # the frames' rate

    def perception_texts(self) -> list[str]:
        return [self.reasoning[a:b] for a, b in self.perception_spans]


def _check_positive(knobs: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(knobs, name)
        if not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
            need = "a non-negative" if allow_zero else "a positive"
            raise ValueError(f"{type(knobs).__name__}.{name} must be {need} integer, got {value!r}")


def _response(parts: list[tuple[str, bool]], answer: str) -> tuple[str, list[tuple[int, int]]]:
    """Join text parts into `<think>...</think><answer>...</answer>`; parts flagged True are perception spans."""
    text = "<think>"
    spans = []
    for part, perceived in parts:
        if perceived and spans and spans[-1][1] == len(text):  # adjacent perceived parts form one span
            spans[-1] = (spans[-1][0], len(text) + len(part))
        elif perceived:
            spans.append((len(text), len(text) + len(part)))
        text += part
    return text + f"</think><answer>{answer}</answer>", spans


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour: str) -> None:
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _grid_cells(image_size: int, cell: int) -> list[tuple[int, int]]:
    n = image_size // cell
    return [(i, j) for i in range(n) for j in range(n)]


# ----------------------------------------------------------------------------------------------
# count


@dataclass(frozen=True)
class CountKnobs:
    """Difficulty of `count`: more objects, more colours and shapes make it harder.

    Attributes:
        min_objects / max_objects: total number of objects drawn (targets included).
        max_target: most objects matching the asked colour and shape.
        num_colours / num_shapes: how many colours / shapes the distractors use.
        image_size: canvas side in pixels; objects sit in non-overlapping cells of `cell` pixels.
    """

    min_objects: int = 3
    max_objects: int = 8
    max_target: int = 4
    num_colours: int = 3
    num_shapes: int = 2
    image_size: int = 224
    cell: int = 44

    def validate(self) -> None:
        _check_positive(self, "min_objects", "max_objects", "max_target", "num_colours", "num_shapes",
                        "image_size", "cell")
        if self.min_objects > self.max_objects:
            raise ValueError(f"CountKnobs.min_objects ({self.min_objects}) > max_objects ({self.max_objects})")
        fit = len(_grid_cells(self.image_size, self.cell))
        if self.max_objects > fit:
            raise ValueError(f"CountKnobs.max_objects={self.max_objects}: more objects than fit; a "
                             f"{self.image_size}px canvas with {self.cell}px cells holds at most {fit}")
        if self.num_colours > len(COLOURS) or self.num_shapes > len(SHAPES):
            raise ValueError(f"CountKnobs: at most {len(COLOURS)} colours and {len(SHAPES)} shapes")


def _make_count(rng: random.Random, k: CountKnobs) -> dict[str, Any]:
    colours = rng.sample(sorted(COLOURS), k.num_colours)
    shapes = rng.sample(SHAPES, k.num_shapes)
    target = (colours[0], shapes[0])
    total = rng.randint(k.min_objects, k.max_objects)
    n_target = rng.randint(1, min(k.max_target, total))
    others = [(c, s) for c in colours for s in shapes if (c, s) != target]
    kinds = [target] * n_target + [rng.choice(others) for _ in range(total - n_target)] if others else \
        [target] * total
    cells = rng.sample(_grid_cells(k.image_size, k.cell), len(kinds))
    objects = []
    for (colour, shape), (i, j) in zip(kinds, cells):
        r = k.cell * rng.uniform(0.25, 0.4)
        cx = (i + 0.5) * k.cell + rng.uniform(-0.08, 0.08) * k.cell
        cy = (j + 0.5) * k.cell + rng.uniform(-0.08, 0.08) * k.cell
        objects.append({"shape": shape, "colour": colour, "x": round(cx, 2), "y": round(cy, 2), "r": round(r, 2)})
    return {"image_size": k.image_size, "objects": objects, "target": {"colour": target[0], "shape": target[1]}}


def _render_objects(scene: dict[str, Any]) -> Image.Image:
    img = Image.new("RGB", (scene["image_size"],) * 2, BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        _draw_shape(draw, o["shape"], o["x"], o["y"], o["r"], o["colour"])
    return img


def _text_count(scene: dict[str, Any], rng: random.Random):
    colour, shape = scene["target"]["colour"], scene["target"]["shape"]
    n = sum(o["colour"] == colour and o["shape"] == shape for o in scene["objects"])
    noun = f"{colour} {shape}" + ("s" if n != 1 else "")
    question = f"How many {colour} {shape}s are in the image?"
    reasoning, spans = _response([("I see ", False), (f"{n} {noun}", True), (".", False)], str(n))
    return question, str(n), "integer", None, reasoning, spans


# ----------------------------------------------------------------------------------------------
# bar_value


@dataclass(frozen=True)
class BarKnobs:
    """Difficulty of `bar_value`.

    Attributes:
        min_bars / max_bars: number of bars, labelled A, B, C, ...
        max_value: bar values are integers in [1, max_value].
        show_values: print each value above its bar (easier: read digits, not heights).
    """

    min_bars: int = 3
    max_bars: int = 5
    max_value: int = 9
    show_values: bool = True
    image_size: int = 224

    def validate(self) -> None:
        _check_positive(self, "min_bars", "max_bars", "max_value", "image_size")
        if self.min_bars > self.max_bars:
            raise ValueError(f"BarKnobs.min_bars ({self.min_bars}) > max_bars ({self.max_bars})")
        if self.max_bars > 26:
            raise ValueError(f"BarKnobs.max_bars={self.max_bars}: bars are labelled A-Z, at most 26")
        if self.image_size // (self.max_bars + 1) < 8:
            raise ValueError(f"BarKnobs.max_bars={self.max_bars}: more bars than fit in {self.image_size}px")


def _make_bar(rng: random.Random, k: BarKnobs) -> dict[str, Any]:
    n = rng.randint(k.min_bars, k.max_bars)
    bars = [{"label": chr(ord("A") + i), "value": rng.randint(1, k.max_value),
             "colour": rng.choice(sorted(COLOURS))} for i in range(n)]
    return {"image_size": k.image_size, "bars": bars, "max_value": k.max_value, "show_values": k.show_values,
            "asked": rng.randrange(n)}


def _render_bar(scene: dict[str, Any]) -> Image.Image:
    size = scene["image_size"]
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(max(10, size // 14))
    bars = scene["bars"]
    left, bottom, top = size * 0.08, size * 0.86, size * 0.14
    slot = (size * 0.9) / len(bars)
    draw.line([(left, bottom), (size * 0.98, bottom)], fill=(0, 0, 0), width=2)
    for i, bar in enumerate(bars):
        x0 = left + i * slot + slot * 0.18
        x1 = left + (i + 1) * slot - slot * 0.18
        y = bottom - (bottom - top) * bar["value"] / scene["max_value"]
        draw.rectangle([x0, y, x1, bottom], fill=COLOURS[bar["colour"]])
        cx = (x0 + x1) / 2
        draw.text((cx, bottom + 2), bar["label"], fill=(0, 0, 0), font=font, anchor="mt")
        if scene["show_values"]:
            draw.text((cx, y - 2), str(bar["value"]), fill=(0, 0, 0), font=font, anchor="mb")
    return img


def _text_bar(scene: dict[str, Any], rng: random.Random):
    bar = scene["bars"][scene["asked"]]
    question = f"What is the value of bar {bar['label']}?"
    reasoning, spans = _response([(f"Bar {bar['label']} is {bar['value']}", True), (".", False)], str(bar["value"]))
    return question, str(bar["value"]), "integer", None, reasoning, spans


# ----------------------------------------------------------------------------------------------
# compare


@dataclass(frozen=True)
class CompareKnobs:
    """Difficulty of `compare`: two panels of dots; closer counts are harder.

    Attributes:
        max_dots: most dots in one panel (each panel has at least one).
        min_gap: smallest difference between the two counts (at least 1, so there is no tie).
    """

    max_dots: int = 6
    min_gap: int = 1
    image_size: int = 224
    cell: int = 28

    def validate(self) -> None:
        _check_positive(self, "max_dots", "min_gap", "image_size", "cell")
        if self.max_dots < 1 + self.min_gap:
            raise ValueError(f"CompareKnobs.max_dots={self.max_dots} leaves no pair with gap {self.min_gap}")
        fit = (self.image_size // 2 // self.cell) * (self.image_size // self.cell)
        if self.max_dots > fit:
            raise ValueError(f"CompareKnobs.max_dots={self.max_dots}: more objects than fit; a panel holds "
                             f"at most {fit}")


def _make_compare(rng: random.Random, k: CompareKnobs) -> dict[str, Any]:
    while True:
        a, b = rng.randint(1, k.max_dots), rng.randint(1, k.max_dots)
        if abs(a - b) >= k.min_gap:
            break
    half = k.image_size // 2
    colour = rng.choice(sorted(COLOURS))
    cells = [(i, j) for i in range(half // k.cell) for j in range(k.image_size // k.cell)]
    objects = []
    for offset, count in ((0, a), (half, b)):
        for i, j in rng.sample(cells, count):
            objects.append({"shape": "circle", "colour": colour, "x": offset + (i + 0.5) * k.cell,
                            "y": (j + 0.5) * k.cell, "r": k.cell * 0.32})
    return {"image_size": k.image_size, "objects": objects, "divider": half}


def _render_compare(scene: dict[str, Any]) -> Image.Image:
    img = _render_objects(scene)
    draw = ImageDraw.Draw(img)
    draw.line([(scene["divider"], 0), (scene["divider"], scene["image_size"])], fill=(0, 0, 0), width=2)
    return img


def _text_compare(scene: dict[str, Any], rng: random.Random):
    left = sum(o["x"] < scene["divider"] for o in scene["objects"])
    right = len(scene["objects"]) - left
    answer = "left" if left > right else "right"
    question = "Which side has more dots, left or right?"
    reasoning, spans = _response(
        [(f"left has {left}", True), (", ", False), (f"right has {right}", True), (".", False)], answer)
    return question, answer, "choice", ["left", "right"], reasoning, spans


# ----------------------------------------------------------------------------------------------
# arithmetic


@dataclass(frozen=True)
class ArithmeticKnobs:
    """Difficulty of `arithmetic`: `a op b` is drawn; larger operands and more operators are harder.

    Attributes:
        max_operand: operands are integers in [0, max_operand].
        ops: operators to draw from ("+", "-", "*").
    """

    max_operand: int = 9
    ops: tuple[str, ...] = ("+", "-")
    image_size: int = 224

    def validate(self) -> None:
        _check_positive(self, "max_operand", "image_size")
        bad = [op for op in self.ops if op not in _OPS]
        if not self.ops or bad:
            raise ValueError(f"ArithmeticKnobs.ops={self.ops!r}: choose from {sorted(_OPS)}")


_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                              "*": lambda a, b: a * b}


def _make_arithmetic(rng: random.Random, k: ArithmeticKnobs) -> dict[str, Any]:
    return {"image_size": k.image_size, "a": rng.randint(0, k.max_operand), "b": rng.randint(0, k.max_operand),
            "op": rng.choice(k.ops), "colour": rng.choice(["blue", "red", "green", "purple"])}


def _render_arithmetic(scene: dict[str, Any]) -> Image.Image:
    size = scene["image_size"]
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    text = f"{scene['a']} {scene['op']} {scene['b']}"
    draw.text((size / 2, size / 2), text, fill=COLOURS[scene["colour"]], font=_font(size // 5), anchor="mm")
    return img


def _text_arithmetic(scene: dict[str, Any], rng: random.Random):
    a, b, op = scene["a"], scene["b"], scene["op"]
    value = _OPS[op](a, b)
    question = "What is the value of the expression in the image?"
    reasoning, spans = _response([("It shows ", False), (f"{a}{op}{b}", True), (f". {a}{op}{b}={value}.", False)],
                                 str(value))
    return question, str(value), "integer", None, reasoning, spans


# ----------------------------------------------------------------------------------------------
# quadrant


@dataclass(frozen=True)
class QuadrantKnobs:
    """Difficulty of `quadrant`: one shape per quadrant, distinct colours; asks for one quadrant's colour.

    Attributes:
        num_colours: size of the colour pool the four shapes are drawn from (at least 4).
        jitter: how far (as a share of the quadrant) a shape may move from the quadrant's centre.
        shape_size: a shape's radius as a share of the quadrant's side (bigger is easier to see); squares of
            size 0.5 with no jitter fill their quadrant.
        shapes: the shapes drawn from.
    """

    num_colours: int = 4
    jitter: float = 0.2
    image_size: int = 224
    shape_size: float = 0.22
    shapes: tuple[str, ...] = SHAPES

    def validate(self) -> None:
        _check_positive(self, "num_colours", "image_size")
        if not 4 <= self.num_colours <= len(COLOURS):
            raise ValueError(f"QuadrantKnobs.num_colours={self.num_colours}: need 4 to {len(COLOURS)}")
        if not 0 <= self.jitter < 0.25:
            raise ValueError(f"QuadrantKnobs.jitter={self.jitter}: must be in [0, 0.25) to stay in the quadrant")
        if not 0 < self.shape_size <= 0.5 - self.jitter:
            raise ValueError(f"QuadrantKnobs.shape_size={self.shape_size}: must be in (0, 0.5 - jitter] "
                             f"= (0, {0.5 - self.jitter:g}] to stay in the quadrant")
        if not self.shapes or set(self.shapes) - set(SHAPES):
            raise ValueError(f"QuadrantKnobs.shapes={self.shapes!r}: choose one or more of {SHAPES}")


def _make_quadrant(rng: random.Random, k: QuadrantKnobs) -> dict[str, Any]:
    colours = rng.sample(rng.sample(sorted(COLOURS), k.num_colours), 4)
    half = k.image_size / 2
    objects = []
    for q, colour in enumerate(colours):
        qx, qy = q % 2, q // 2
        cx = (qx + 0.5) * half + rng.uniform(-k.jitter, k.jitter) * half
        cy = (qy + 0.5) * half + rng.uniform(-k.jitter, k.jitter) * half
        objects.append({"shape": rng.choice(k.shapes), "colour": colour, "x": round(cx, 2), "y": round(cy, 2),
                        "r": round(half * k.shape_size, 2)})
    return {"image_size": k.image_size, "objects": objects, "asked": rng.choice(QUADRANTS), "shapes": list(k.shapes)}


def _quadrant_of(x: float, y: float, size: float) -> str:
    return ("top" if y < size / 2 else "bottom") + "-" + ("left" if x < size / 2 else "right")


def _text_quadrant(scene: dict[str, Any], rng: random.Random):
    asked = scene["asked"]
    (obj,) = [o for o in scene["objects"] if _quadrant_of(o["x"], o["y"], scene["image_size"]) == asked]
    question = f"What colour is the shape in the {asked} quadrant?"
    # The colour comes straight after "is", so the one word that needs the image is the colour itself (an
    # article in front would have to be "a" or "an" before the colour is written). The shape is read from the
    # image, and named, only when more than one shape can be drawn.
    parts = [(f"The {asked} shape is ", False), (obj["colour"], True)]
    if len(scene["shapes"]) > 1:
        parts += [(", a ", False), (obj["shape"], True)]
    reasoning, spans = _response([*parts, (".", False)], obj["colour"])
    return question, obj["colour"], "text", None, reasoning, spans


# ----------------------------------------------------------------------------------------------
# colour_change (video)


@dataclass(frozen=True)
class ColourChangeKnobs:
    """Difficulty of `colour_change`: one shape, the same place in every frame, changes colour once; asks for its
    colour in the first or the last frame.

    Attributes:
        frames: frames in the video (even, at least 4). The change comes at an even frame, so that each temporal
            patch of the Qwen towers (two frames) shows one colour.
        fps: the frames' rate (what the video processors' timestamps read).
        image_size: a frame's side in pixels.
        shape_size: the shape's radius as a share of the frame's side.
        shapes: the shapes drawn from.
    """

    frames: int = 6
    fps: float = 2.0
    image_size: int = 112
    shape_size: float = 0.3
    shapes: tuple[str, ...] = ("square",)

    def validate(self) -> None:
        _check_positive(self, "frames", "image_size")
        if self.frames < 4 or self.frames % 2:
            raise ValueError(f"ColourChangeKnobs.frames={self.frames}: an even number of at least 4")
        if not self.fps > 0:
            raise ValueError(f"ColourChangeKnobs.fps={self.fps}: must be > 0")
        if not 0 < self.shape_size <= 0.5:
            raise ValueError(f"ColourChangeKnobs.shape_size={self.shape_size}: must be in (0, 0.5]")
        unknown = [sh for sh in self.shapes if sh not in SHAPES]
        if not self.shapes or unknown:
            raise ValueError(f"ColourChangeKnobs.shapes={self.shapes}: choose one or more of {SHAPES}")


def _make_colour_change(rng: random.Random, k: ColourChangeKnobs) -> dict[str, Any]:
    before, after = rng.sample(sorted(COLOURS), 2)
    return {"image_size": k.image_size, "frames": k.frames, "fps": k.fps, "shape": rng.choice(k.shapes),
            "r": round(k.image_size * k.shape_size, 2), "before": before, "after": after,
            "change": rng.randrange(2, k.frames - 1, 2), "asked": rng.choice(("first", "last"))}


def _render_colour_change_frames(scene: dict[str, Any]) -> list[Image.Image]:
    frames = []
    for i in range(scene["frames"]):
        img = Image.new("RGB", (scene["image_size"],) * 2, BACKGROUND)
        colour = scene["before"] if i < scene["change"] else scene["after"]
        c = scene["image_size"] / 2
        _draw_shape(ImageDraw.Draw(img), scene["shape"], c, c, scene["r"], colour)
        frames.append(img)
    return frames


def _text_colour_change(scene: dict[str, Any], rng: random.Random):
    shape, asked = scene["shape"], scene["asked"]
    answer = scene["before"] if asked == "first" else scene["after"]
    question = f"What colour is the {shape} in the {asked} frame?"
    # both colours are read from the video: the first frames' and the last frames'
    parts = [(f"The {shape} is ", False), (scene["before"], True), (" at first, then ", False),
             (scene["after"], True), (".", False)]
    reasoning, spans = _response(parts, answer)
    return question, answer, "text", None, reasoning, spans


# ----------------------------------------------------------------------------------------------
# registry and data sets


@dataclass(frozen=True)
class TaskFamily:
    knobs: type
    make_scene: Callable[[random.Random, Any], dict[str, Any]]
    render: Callable[[dict[str, Any]], Image.Image]
    text: Callable[[dict[str, Any], random.Random], tuple]
    frames: Callable[[dict[str, Any]], list[Image.Image]] | None = None  # a video family's frames


TASK_FAMILIES: dict[str, TaskFamily] = {
    "count": TaskFamily(CountKnobs, _make_count, _render_objects, _text_count),
    "bar_value": TaskFamily(BarKnobs, _make_bar, _render_bar, _text_bar),
    "compare": TaskFamily(CompareKnobs, _make_compare, _render_compare, _text_compare),
    "arithmetic": TaskFamily(ArithmeticKnobs, _make_arithmetic, _render_arithmetic, _text_arithmetic),
    "quadrant": TaskFamily(QuadrantKnobs, _make_quadrant, _render_objects, _text_quadrant),
    "colour_change": TaskFamily(ColourChangeKnobs, _make_colour_change,
                                lambda scene: _render_colour_change_frames(scene)[-1], _text_colour_change,
                                frames=_render_colour_change_frames),
}
VIDEO_FAMILIES: tuple[str, ...] = tuple(name for name, spec in TASK_FAMILIES.items() if spec.frames is not None)
IMAGE_FAMILIES: tuple[str, ...] = tuple(name for name in TASK_FAMILIES if name not in VIDEO_FAMILIES)


def make_example(family: str, seed: int, index: int, knobs: Any | None = None) -> Example:
    """Draw example `index` of task `family` for data-set seed `seed`."""
    if family not in TASK_FAMILIES:
        raise ValueError(f"unknown task family {family!r}; choose from {sorted(TASK_FAMILIES)}")
    spec = TASK_FAMILIES[family]
    knobs = spec.knobs() if knobs is None else knobs
    if not isinstance(knobs, spec.knobs):
        raise TypeError(f"task family {family!r} takes {spec.knobs.__name__}, got {type(knobs).__name__}")
    knobs.validate()
    rng = random.Random(f"{family}:{seed}:{index}")
    scene = spec.make_scene(rng, knobs)
    question, answer, answer_type, choices, reasoning, spans = spec.text(scene, rng)
    frames = spec.frames(scene) if spec.frames is not None else None
    return Example(
        uid=f"{family}-{seed}-{index}",
        family=family,
        image=frames[-1] if frames is not None else spec.render(scene),
        question=question,
        answer=answer,
        answer_type=answer_type,
        reasoning=reasoning,
        perception_spans=spans,
        scene=scene,
        choices=choices,
        knobs=asdict(knobs),
        frames=frames,
        fps=scene.get("fps") if frames is not None else None,
    )


def generate(
    n: int,
    *,
    seed: int = 0,
    families: Iterable[str] | None = None,
    knobs: dict[str, Any] | None = None,
) -> list[Example]:
    """`n` examples cycling through `families` (the five image families by default), deterministic in `seed`.

    Args:
        n: number of examples (non-negative).
        seed: data-set seed; use different seeds for train and held-out splits.
        families: task family names.
        knobs: per-family difficulty, e.g. {"count": CountKnobs(max_objects=12)}.
    """
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    names = list(families) if families is not None else list(IMAGE_FAMILIES)
    if not names:
        raise ValueError("families is empty; choose from " + ", ".join(TASK_FAMILIES))
    knobs = knobs or {}
    unknown = [f for f in [*names, *knobs] if f not in TASK_FAMILIES]
    if unknown:
        raise ValueError(f"unknown task family {unknown[0]!r}; choose from {sorted(TASK_FAMILIES)}")
    return [make_example(names[i % len(names)], seed, i, knobs.get(names[i % len(names)])) for i in range(n)]


# The embedded default's task (`atrl demo`, `atrl train` with no recipe, the default base): four colour tiles,
# "what colour is the top-left quadrant's shape?". The tiny default model learns to read it from supervision in a
# couple of minutes and keeps room to improve under RL; at that size the other families stay near chance
# (docs/benchmarks.md, The default base), so they would show the trainer nothing. As plain mappings, the way a
# recipe writes them.
DEFAULT_FAMILIES: tuple[str, ...] = ("quadrant",)
DEFAULT_KNOBS: dict[str, dict[str, Any]] = {"quadrant": {"shape_size": 0.5, "jitter": 0.0, "shapes": ["square"]}}


@lru_cache(maxsize=1)
def task_words() -> tuple[str, ...]:
    """Every word (run of letters) that the tasks' prompts and reference traces can use, sorted.

    The tiny models' tokenizers hold each of these as one token (`atrl.models.tokenizer`), as a real VLM's
    vocabulary holds "orange" or "triangle", so that a colour is read from the image by one token, not spelt out
    letter by letter. The words come from the tasks' own vocabularies (colours, shapes, quadrants, bar labels)
    and from 64 drawn scenes per family with default knobs (the templates' words); numbers stay digits. The
    video families' templates are left out, so that the tiny vocabularies (and every build from them) stay as
    they are; their colour words, the words read from the video, are in it all the same.
    """
    texts = [RESPONSE_INSTRUCTION, *COLOURS, *SHAPES, *(s + "s" for s in SHAPES), *QUADRANTS,
             *(chr(c) for c in range(ord("A"), ord("Z") + 1)), "system", "user", "assistant"]
    for name, spec in TASK_FAMILIES.items():
        if spec.frames is not None:
            continue
        for index in range(64):
            rng = random.Random(f"{name}:words:{index}")
            question, answer, _, choices, reasoning, _ = spec.text(spec.make_scene(rng, spec.knobs()), rng)
            texts += [question, answer, reasoning, *(choices or [])]
    return tuple(sorted({w for text in texts for w in re.findall(r"[A-Za-z]+", text)}))


def knobs_from_mapping(raw: dict[str, dict[str, Any]] | None, where: str = "knobs") -> dict[str, Any]:
    """Per-family knob dataclasses from plain mappings, e.g. {"quadrant": {"shape_size": 0.4}} (YAML recipes).

    Errors name `where`, the family and the knob. Lists become tuples (the dataclasses are frozen).
    """
    out: dict[str, Any] = {}
    if not raw:
        return out
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping of task family -> {{knob: value}}, got {type(raw).__name__}")
    for family, values in raw.items():
        if family not in TASK_FAMILIES:
            raise ValueError(f"{where}: unknown task family {family!r}; choose from {sorted(TASK_FAMILIES)}")
        cls = TASK_FAMILIES[family].knobs
        check_keys(values, cls, f"{where}.{family}")
        knobs = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        try:
            knobs.validate()
        except ValueError as err:
            raise ValueError(f"{where}.{family}: {err}") from err
        out[family] = knobs
    return out


def build_prompt(question: str, kind: str = "image") -> list[dict[str, Any]]:
    """The conversational prompt TRL expects: one user turn with the image (or the video: `kind="video"`) then
    the question."""
    return [{"role": "user", "content": [{"type": kind},
                                         {"type": "text", "text": f"{question} {RESPONSE_INSTRUCTION}"}]}]


def _row(ex: Example) -> dict[str, Any]:
    return {
        "uid": ex.uid,
        "family": ex.family,
        "question": ex.question,
        "answer": ex.answer,
        "answer_type": ex.answer_type,
        "choices": ex.choices or [],
        "reasoning": ex.reasoning,
        "perception_spans": [list(s) for s in ex.perception_spans],
        "scene": json.dumps(ex.scene, sort_keys=True),
    }


def to_hf_dataset(examples: list[Example]):
    """A `datasets.Dataset` in TRL's conversational format: `prompt`, `image`, `answer` and metadata. Video
    examples have `videos` (one video: its frames and their rate) and no image; a data set of video examples
    only has no `image` column."""
    import datasets

    with_videos = any(ex.frames is not None for ex in examples)
    with_images = any(ex.frames is None for ex in examples)

    def media(ex: Example) -> dict[str, Any]:
        out = {"image": ex.image if ex.frames is None else None} if with_images else {}
        if with_videos:
            out["videos"] = [] if ex.frames is None else [{"images": ex.frames, "fps": ex.fps}]
        return out

    rows = [{"prompt": build_prompt(ex.question, "video" if ex.frames is not None else "image"), **media(ex),
             **_row(ex)} for ex in examples]
    features = datasets.Features({
        "prompt": [{"role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        **({"image": datasets.Image()} if with_images else {}),
        **({"videos": [{"images": [datasets.Image()], "fps": datasets.Value("float64")}]} if with_videos else {}),
        "uid": datasets.Value("string"),
        "family": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "answer_type": datasets.Value("string"),
        "choices": [datasets.Value("string")],
        "reasoning": datasets.Value("string"),
        "perception_spans": [[datasets.Value("int32")]],
        "scene": datasets.Value("string"),
    })
    return datasets.Dataset.from_list(rows, features=features)


def export_jsonl(examples: list[Example], out_dir: str | Path) -> Path:
    """Write `data.jsonl` plus `images/<uid>.png` (a video example: `videos/<uid>.mp4`, H.264 at the task's frame
    rate) under `out_dir`; image and video paths in the JSONL are relative."""
    import numpy as np

    from .._io import ensure_writable_dir
    from .video import write_video

    out = ensure_writable_dir(out_dir, argument="--out")
    (out / "images").mkdir(exist_ok=True)
    if any(ex.frames is not None for ex in examples):
        (out / "videos").mkdir(exist_ok=True)
    path = out / "data.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for ex in examples:
            if ex.frames is None:
                rel = f"images/{ex.uid}.png"
                ex.image.save(out / rel)
                media = {"image": rel}
            else:
                rel = f"videos/{ex.uid}.mp4"
                write_video(out / rel, np.stack([np.asarray(f.convert("RGB")) for f in ex.frames]), ex.fps)
                media = {"videos": [rel]}
            fh.write(json.dumps({**media, **_row(ex)}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
