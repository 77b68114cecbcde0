import io
import json

import pytest
from PIL import Image

from atrl.cli import main
from atrl.data.synthetic import (
    COLOURS,
    IMAGE_FAMILIES,
    ColourChangeKnobs,
    ArithmeticKnobs,
    BarKnobs,
    CompareKnobs,
    CountKnobs,
    QuadrantKnobs,
    export_jsonl,
    generate,
    make_example,
    to_hf_dataset,
)


def _asked_quadrant_object(s) -> dict:
    vert, horiz = s["asked"].split("-")
    half = s["image_size"] / 2
    inside = [o for o in s["objects"] if (o["y"] < half) == (vert == "top") and (o["x"] < half) == (horiz == "left")]
    assert len(inside) == 1
    return inside[0]


def _recompute(ex) -> str:
    """The answer from the scene description alone (geometry and values), not from the drawn text."""
    s = ex.scene
    if ex.family == "count":
        t = s["target"]
        return str(sum(o["colour"] == t["colour"] and o["shape"] == t["shape"] for o in s["objects"]))
    if ex.family == "bar_value":
        return str(s["bars"][s["asked"]]["value"])
    if ex.family == "compare":
        mid = s["image_size"] / 2
        left = sum(o["x"] < mid for o in s["objects"])
        right = sum(o["x"] >= mid for o in s["objects"])
        assert left != right
        return "left" if left > right else "right"
    if ex.family == "arithmetic":
        a, b = s["a"], s["b"]
        return str({"+": a + b, "-": a - b, "*": a * b}[s["op"]])
    if ex.family == "quadrant":
        return _asked_quadrant_object(s)["colour"]
    raise AssertionError(ex.family)


def test_answers_match_an_independent_recomputation_from_the_scene():
    examples = generate(250, seed=7)
    assert {ex.family for ex in examples} == set(IMAGE_FAMILIES)  # the video family only when named
    for ex in examples:
        assert ex.answer == _recompute(ex), ex.uid


def test_colour_change_answers_the_colour_drawn_in_the_asked_frame():
    """The answer, from the frames' pixels alone: the colour at the centre of the first or the last frame; the
    colour changes once, at an even frame, and the trace names both colours as perception spans."""
    names = {rgb: name for name, rgb in COLOURS.items()}
    examples = generate(40, seed=5, families=["colour_change"])
    assert {ex.scene["asked"] for ex in examples} == {"first", "last"}
    for ex in examples:
        centre = [names[f.getpixel((f.width // 2, f.height // 2))] for f in ex.frames]
        change = next(i for i in range(len(centre)) if centre[i] != centre[0])
        assert change % 2 == 0 and len(set(centre[change:])) == 1 and len(set(centre)) == 2
        assert ex.answer == (centre[0] if ex.question.endswith("first frame?") else centre[-1]), ex.uid
        assert ex.perception_texts() == [centre[0], centre[-1]]
        assert ex.image is ex.frames[-1] and ex.fps == 2.0 and len(ex.frames) == 6
    long = generate(4, seed=5, families=["colour_change"], knobs={"colour_change": ColourChangeKnobs(frames=10)})
    assert all(len(ex.frames) == 10 for ex in long)
    with pytest.raises(ValueError, match="frames=5: an even number"):
        ColourChangeKnobs(frames=5).validate()


def test_drawn_objects_have_the_colour_the_scene_says():
    for ex in generate(60, seed=8, families=["count", "quadrant", "compare"]):
        for o in ex.scene["objects"]:
            # The centre of a circle/square and a point just below a triangle's centre are inside the shape.
            y = o["y"] + (o["r"] * 0.3 if o["shape"] == "triangle" else 0)
            assert ex.image.getpixel((round(o["x"]), round(y))) == COLOURS[o["colour"]], ex.uid


def test_bar_heights_follow_the_values():
    ex = make_example("bar_value", 0, 0, BarKnobs(show_values=False, min_bars=4, max_bars=4))
    img = ex.image
    size = ex.scene["image_size"]
    slot = size * 0.9 / 4
    heights = []
    for i, bar in enumerate(ex.scene["bars"]):
        x = round(size * 0.08 + (i + 0.5) * slot)
        column = [img.getpixel((x, y)) == COLOURS[bar["colour"]] for y in range(size)]
        heights.append(sum(column))
    values = [b["value"] for b in ex.scene["bars"]]
    # Taller bars draw more coloured pixels; equal values draw equal heights (within a pixel).
    for (h1, v1) in zip(heights, values):
        for (h2, v2) in zip(heights, values):
            if v1 > v2:
                assert h1 > h2
            if v1 == v2:
                assert abs(h1 - h2) <= 1


def test_reasoning_format_and_perception_spans():
    for ex in generate(100, seed=9):
        assert ex.reasoning.startswith("<think>")
        assert ex.reasoning.endswith(f"</think><answer>{ex.answer}</answer>")
        think_end = ex.reasoning.index("</think>")
        assert ex.perception_spans
        for a, b in ex.perception_spans:
            assert 7 <= a < b <= think_end  # inside <think>...</think>
        texts = ex.perception_texts()
        s = ex.scene
        if ex.family == "count":
            t = s["target"]
            assert texts == [f"{ex.answer} {t['colour']} {t['shape']}" + ("" if ex.answer == "1" else "s")]
        elif ex.family == "bar_value":
            bar = s["bars"][s["asked"]]
            assert texts == [f"Bar {bar['label']} is {bar['value']}"]
        elif ex.family == "compare":
            mid = s["image_size"] / 2
            left = sum(o["x"] < mid for o in s["objects"])
            assert texts == [f"left has {left}", f"right has {len(s['objects']) - left}"]
        elif ex.family == "arithmetic":
            assert texts == [f"{s['a']}{s['op']}{s['b']}"]
        elif ex.family == "quadrant":
            obj = _asked_quadrant_object(s)
            assert texts == [ex.answer, obj["shape"]] and ex.answer == obj["colour"]


def _fingerprint(examples):
    out = []
    for ex in examples:
        buf = io.BytesIO()
        ex.image.save(buf, format="PNG")
        out.append((ex.uid, ex.question, ex.answer, ex.reasoning, json.dumps(ex.scene), buf.getvalue()))
    return out


def test_same_seed_same_data_set_other_seed_other():
    a, b = _fingerprint(generate(30, seed=11)), _fingerprint(generate(30, seed=11))
    c = _fingerprint(generate(30, seed=12))
    assert a == b
    assert sum(x != y for x, y in zip(a, c)) >= 25
    # Example i does not depend on what was generated before it.
    names = list(IMAGE_FAMILIES)
    assert a[10:] == _fingerprint([make_example(names[i % len(names)], 11, i) for i in range(10, 30)])


def test_knobs_change_difficulty():
    hard = generate(20, seed=0, families=["count"], knobs={"count": CountKnobs(min_objects=10, max_objects=16)})
    assert all(10 <= len(ex.scene["objects"]) <= 16 for ex in hard)
    mult = generate(20, seed=0, families=["arithmetic"], knobs={"arithmetic": ArithmeticKnobs(ops=("*",))})
    assert all(ex.scene["op"] == "*" for ex in mult)


def test_quadrant_tiles_fill_their_quadrant():
    """Squares of size 0.5 with no jitter are tiles: every pixel of a quadrant has that quadrant's colour."""
    knobs = QuadrantKnobs(shape_size=0.5, jitter=0.0, shapes=("square",), image_size=112)
    for ex in generate(6, seed=2, families=["quadrant"], knobs={"quadrant": knobs}):
        pixels = ex.image.load()
        for obj in ex.scene["objects"]:
            x0, y0 = int(obj["x"] // 56) * 56, int(obj["y"] // 56) * 56
            inside = {pixels[x, y] for x in range(x0 + 1, x0 + 55, 6) for y in range(y0 + 1, y0 + 55, 6)}
            assert inside == {COLOURS[obj["colour"]]}
        assert ex.answer == _recompute(ex)
        assert ex.perception_texts() == [ex.answer]  # all tiles are squares: only the colour is read


@pytest.mark.parametrize("family,knobs,match", [
    ("count", CountKnobs(min_objects=-1), "CountKnobs.min_objects"),
    ("count", CountKnobs(max_objects=40), "CountKnobs.max_objects=40: more objects than fit"),
    ("count", CountKnobs(min_objects=9, max_objects=5), "min_objects"),
    ("bar_value", BarKnobs(max_value=-3), "BarKnobs.max_value"),
    ("bar_value", BarKnobs(max_bars=30), "BarKnobs.max_bars"),
    ("compare", CompareKnobs(max_dots=500), "CompareKnobs.max_dots=500: more objects than fit"),
    ("arithmetic", ArithmeticKnobs(ops=("/",)), "ArithmeticKnobs.ops"),
    ("quadrant", QuadrantKnobs(num_colours=2), "QuadrantKnobs.num_colours"),
    ("quadrant", QuadrantKnobs(shape_size=0.4), "QuadrantKnobs.shape_size=0.4"),
    ("quadrant", QuadrantKnobs(shapes=("star",)), "QuadrantKnobs.shapes"),
])
def test_impossible_knobs_name_the_knob(family, knobs, match):
    with pytest.raises(ValueError, match=match):
        make_example(family, 0, 0, knobs)


def test_bad_generate_arguments():
    with pytest.raises(ValueError, match="unknown task family 'nope'"):
        generate(3, families=["nope"])
    with pytest.raises(ValueError, match="n must be"):
        generate(-2)


def test_hf_dataset_is_trl_conversational():
    examples = generate(6, seed=3)
    ds = to_hf_dataset(examples)
    assert {"prompt", "image", "answer", "answer_type", "perception_spans"} <= set(ds.column_names)
    row = ds[0]
    assert row["prompt"][0]["role"] == "user"
    assert [part["type"] for part in row["prompt"][0]["content"]] == ["image", "text"]
    assert examples[0].question in row["prompt"][0]["content"][1]["text"]
    assert isinstance(row["image"], Image.Image) and row["image"].size == examples[0].image.size
    assert row["answer"] == examples[0].answer
    assert [tuple(s) for s in row["perception_spans"]] == examples[0].perception_spans


def test_jsonl_export_round_trip(tmp_path):
    examples = generate(7, seed=4)
    path = export_jsonl(examples, tmp_path / "out")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 7
    for ex, row in zip(examples, rows):
        img = Image.open(tmp_path / "out" / row["image"])
        assert list(img.convert("RGB").getdata()) == list(ex.image.getdata())
        assert row["answer"] == ex.answer and json.loads(row["scene"]) == ex.scene


def test_cli_preview_writes_a_png(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["data", "preview", "--n", "7", "--columns", "4", "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.format == "PNG" and img.width > 4 * 224 and img.height > 2 * 224


def test_cli_export_and_bad_arguments(tmp_path, capsys):
    assert main(["data", "export", "--n", "5", "--out", str(tmp_path / "d"), "--knob", "count.max_objects=6"]) == 0
    assert len((tmp_path / "d" / "data.jsonl").read_text().splitlines()) == 5
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["data", "export", "--n", "2", "--out", str(blocker / "sub")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["data", "preview", "--knob", "count.max_objects=99", "--out", str(tmp_path / "g.png")]) == 2
    assert "max_objects=99" in capsys.readouterr().err
    assert main(["data", "preview", "--knob", "count.bogus=1", "--out", str(tmp_path / "g.png")]) == 2
    assert "--knob.count has unknown keys ['bogus']" in capsys.readouterr().err
