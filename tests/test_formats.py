"""Fixture files in each supported format, written here, load into one schema; bad rows are named."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from atrl.data.formats import DataError, build_prompt_messages, check_prompt_lengths, load_samples, to_trl_dataset


def _png(path, colour="red", size=(40, 30)):
    Image.new("RGB", size, colour).save(path)
    return path


def _png_bytes(colour="blue"):
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


MATHVISTA_ROWS = [
    {"pid": "1", "question": "What is the value of x?", "image": "images/1.png", "choices": None, "unit": None,
     "precision": 1.0, "answer": "2.5", "question_type": "free_form", "answer_type": "float",
     "metadata": {"category": "math-targeted-vqa", "task": "geometry problem solving"},
     "query": "Hint: answer with one decimal. Question: What is the value of x?"},
    {"pid": "2", "question": "Which bar is tallest?", "image": "images/2.png", "choices": ["A", "B", "C"],
     "unit": None, "precision": None, "answer": "B", "question_type": "multi_choice", "answer_type": "text",
     "metadata": {"category": "general-vqa", "task": "figure question answering"}, "query": "Which bar?"},
]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "images").mkdir()
    _png(tmp_path / "images" / "1.png", "red")
    _png(tmp_path / "images" / "2.png", "green")
    # MathVista JSON: a dict keyed by pid
    (tmp_path / "mv.json").write_text(json.dumps({r["pid"]: {k: v for k, v in r.items() if k != "pid"}
                                                  for r in MATHVISTA_ROWS}))
    # MathVista parquet with decoded_image bytes (no image files needed)
    rows = [dict(r, decoded_image={"bytes": _png_bytes(), "path": r["image"]}, metadata=json.dumps(r["metadata"]))
            for r in MATHVISTA_ROWS]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mv.parquet")
    # Geometry3K / ViRL39K style JSONL
    with (tmp_path / "geo.jsonl").open("w") as fh:
        fh.write(json.dumps({"id": "g1", "problem": "Find the angle.", "answer": "30",
                             "images": ["images/1.png"]}) + "\n")
        fh.write(json.dumps({"id": "g2", "problem": "Find x.", "answer": "\\frac{1}{2}",
                             "images": ["images/1.png", "images/2.png"]}) + "\n")
    # generic JSONL
    with (tmp_path / "generic.jsonl").open("w") as fh:
        fh.write(json.dumps({"question": "Colour?", "answer": "red", "image": "images/1.png"}) + "\n")
        fh.write(json.dumps({"prompt": "How many?", "answer": 3, "answer_type": "integer",
                             "images": ["images/2.png"]}) + "\n")
    return tmp_path


def test_each_format_loads_into_the_same_schema(files):
    mv_json, _ = load_samples(files / "mv.json")
    mv_parquet, _ = load_samples(files / "mv.parquet")
    geo, _ = load_samples(files / "geo.jsonl")
    gen, _ = load_samples(files / "generic.jsonl")
    for samples in (mv_json, mv_parquet, geo, gen):
        assert len(samples) == 2
        for s in samples:
            assert isinstance(s.answer, str) and s.question and s.images
            assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in s.load_images())
    a, b = mv_json
    assert (a.answer_type, a.precision, a.metadata["category"]) == ("float", 1.0, "math-targeted-vqa")
    assert a.question.startswith("Hint:")  # MathVista's query is the prompt
    assert (b.answer_type, b.choices) == ("choice", ["A", "B", "C"])
    assert [s.answer_type for s in mv_parquet] == ["float", "choice"]
    assert mv_parquet[0].load_images()[0].getpixel((0, 0)) == (0, 0, 255)  # the embedded bytes, not the path
    assert mv_json[0].load_images()[0].getpixel((0, 0)) == (255, 0, 0)
    assert [len(s.images) for s in geo] == [1, 2] and geo[0].answer_type == "math"
    assert gen[1].answer == "3" and gen[1].answer_type == "integer"
    assert gen[0].source.endswith("generic.jsonl:1")  # line 1: numbered as editors and grep number lines


def test_trl_dataset_is_conversational_and_lazy(files):
    geo, _ = load_samples(files / "geo.jsonl")
    ds = to_trl_dataset(geo)
    row = ds[1]
    assert [p["type"] for p in row["prompt"][0]["content"]] == ["image", "image", "text"]
    assert len(row["images"]) == 2 and isinstance(row["images"][0], Image.Image)
    assert row["answer"] == "\\frac{1}{2}" and row["answer_type"] == "math"
    raw = ds.with_format("arrow")[:1]["images"].to_pylist()[0][0]
    assert raw["path"].endswith("1.png") and raw["bytes"] is None  # stored as a path, decoded on read


def test_missing_image_names_file_and_row(files):
    with (files / "bad.jsonl").open("w") as fh:
        fh.write(json.dumps({"question": "q", "answer": "1", "image": "images/1.png"}) + "\n")
        fh.write(json.dumps({"question": "q", "answer": "1", "image": "images/missing.png"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: image file .*missing\.png' does not exist"):
        load_samples(files / "bad.jsonl")


def test_corrupt_image_names_file_and_row(files):
    (files / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with (files / "corrupt.jsonl").open("w") as fh:
        fh.write(json.dumps({"question": "q", "answer": "1", "image": "images/broken.png"}) + "\n")
    with pytest.raises(DataError, match=r"corrupt\.jsonl:1: image .*broken\.png cannot be read"):
        load_samples(files / "corrupt.jsonl")
    # lazily: the same error surfaces when the image is first used
    samples, _ = load_samples(files / "corrupt.jsonl", verify_images=False)
    with pytest.raises(DataError, match=r"corrupt\.jsonl:1"):
        samples[0].load_images()


def test_images_verified_side_by_side_report_the_first_bad_row(files, monkeypatch):
    """Images are opened by several threads (a ViRL39K file has 39k of them), yet the error raised is the first bad
    row's in file order, and skip mode counts every bad row."""
    from atrl.data import formats

    (files / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rows = [{"question": "q", "answer": "1", "image": "images/broken.png" if i in (150, 90) else "images/1.png"}
            for i in range(200)]
    (files / "many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    used = []
    real = formats._in_threads
    monkeypatch.setattr(formats, "_in_threads", lambda func, items: used.append(len(items)) or real(func, items))
    monkeypatch.setattr("os.cpu_count", lambda: 4)  # 200 rows: 3 threads
    with pytest.raises(DataError, match=r"many\.jsonl:91: image .*broken\.png cannot be read"):
        load_samples(files / "many.jsonl")
    samples, report = load_samples(files / "many.jsonl", on_error="skip")
    assert len(samples) == 198 and report.skipped == {"cannot be read": 2} and used == [200, 200]
    assert [s.source for s in samples[88:91]] == [f"{files / 'many.jsonl'}:{n}" for n in (89, 90, 92)]


def test_prompt_length_from_image_headers_equals_the_processors(tiny_models):
    """For Qwen-VL processors the prompt-length check reads each image's size from its header (no decoding: ~700
    times faster on a 1024 x 768 PNG) and expands the placeholders as the processor does: the same count as the
    processor's own output, for sizes, aspect ratios and pixel ranges that shrink, keep and grow images."""
    from atrl.data.formats import ImageRef, Sample, _header_only_counter, _processed_length
    from atrl.models.zoo import build_tiny_vlm, set_pixel_range

    def png(width, height):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), "blue").save(buffer, format="PNG")
        return ImageRef(data=buffer.getvalue())

    sizes = [(10, 10), (224, 224), (1024, 768), (300, 2000), (5000, 100), (57, 29)]
    for pixels in [None, (3136, 1003520), (3136, 50176), (100, 20000)]:
        processor = build_tiny_vlm("qwen2_5_vl")[1]
        if pixels:
            set_pixel_range(processor, *pixels)
        count = _header_only_counter(processor)
        for width, height in sizes:
            sample = Sample("u", "How many?", "3", "integer", [png(width, height), png(height, width)], source="f:1")
            text = processor.apply_chat_template(build_prompt_messages(sample), add_generation_prompt=True)
            assert count(processor, sample, text) == _processed_length(processor, sample, text), (pixels, width)
    assert _header_only_counter(tiny_models["llava"][1]) is None  # a fixed-size processor: processed exactly


def test_row_without_answer_and_unknown_type(files):
    with (files / "noanswer.jsonl").open("w") as fh:
        fh.write(json.dumps({"question": "q", "answer": "1", "image": "images/1.png"}) + "\n")
        fh.write(json.dumps({"question": "q", "answer": "", "image": "images/1.png"}) + "\n")
        fh.write(json.dumps({"question": "q", "answer": "5", "answer_type": "date", "image": "images/1.png"}) + "\n")
        fh.write(json.dumps({"question": "q", "answer": "5", "image": "images/nope.png"}) + "\n")
    with pytest.raises(DataError, match=r"noanswer\.jsonl:2: no answer"):
        load_samples(files / "noanswer.jsonl")
    samples, report = load_samples(files / "noanswer.jsonl", on_error="skip")
    assert len(samples) == 1 and report.kept == 1
    assert report.skipped == {"no answer": 1, "answer_type": 1, "does not exist": 1}
    assert "skipped 3" in str(report)
    assert any("unknown answer_type 'date'" in e for e in report.examples)


def test_prompt_that_would_cut_image_tokens(files, tiny_models):
    _, processor = tiny_models["qwen2_5_vl"]
    samples, report = load_samples(files / "geo.jsonl")
    kept = check_prompt_lengths(samples, processor, max_prompt_length=10_000)
    assert len(kept) == 2
    # row 0 (one image) is 51 tokens with the tiny models' tokenizer, row 1 (two images) 72
    with pytest.raises(DataError, match=r"geo\.jsonl:2: prompt is 72 tokens .* max_prompt_length=60"):
        check_prompt_lengths(samples, processor, max_prompt_length=60)
    kept = check_prompt_lengths(samples, processor, max_prompt_length=60, on_error="skip", report=report)
    assert [s.uid for s in kept] == ["g1"] and report.skipped["prompt too long"] == 1 and report.kept == 1


def test_unreadable_file_types(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        load_samples(tmp_path / "nothing.jsonl")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_samples(tmp_path / "x.csv")
    (tmp_path / "broken.jsonl").write_text('{"question": "q"\n')
    with pytest.raises(DataError, match=r"broken\.jsonl:1: not valid JSON"):
        load_samples(tmp_path / "broken.jsonl")


def test_rows_are_named_where_an_editor_finds_them(tmp_path):
    """JSONL: the 1-based line, blank lines counted; a JSON list or a parquet file: the row's index."""
    rows = [{"question": "q", "answer": "1"}, {"question": "q2", "answer": ""}]
    (tmp_path / "gaps.jsonl").write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match=r"gaps\.jsonl:3: no answer"):
        load_samples(tmp_path / "gaps.jsonl")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"rows\.json\[1\]: no answer"):
        load_samples(tmp_path / "rows.json")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    with pytest.raises(DataError, match=r"rows\.parquet\[1\]: no answer"):
        load_samples(tmp_path / "rows.parquet")
    samples, report = load_samples(tmp_path / "gaps.jsonl", on_error="skip")
    assert [s.source for s in samples] == [f"{tmp_path / 'gaps.jsonl'}:1"] and report.skipped["no answer"] == 1


def test_image_placeholders_leave_the_question(tmp_path):
    """Geometry3K / ViRL39K-style questions mark images with <image>; the prompt carries the images themselves."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rows = [{"problem": "<image>Find x.", "answer": "3", "images": ["a.png"]},
            {"problem": "Compare <image> and\n<image> .", "answer": "A", "images": ["a.png", "a.png"]},
            {"problem": "<image><image>Find y.", "answer": "1", "images": ["a.png"]}]
    (tmp_path / "geo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, report = load_samples(tmp_path / "geo.jsonl", on_error="skip")
    assert [s.question for s in samples] == ["Find x.", "Compare and ."]
    assert report.skipped == {"placeholders": 1}
    assert "2 <image> placeholders but the row has 1 images" in report.examples[0]
    prompt = build_prompt_messages(samples[0])[0]["content"]
    assert [c["type"] for c in prompt] == ["image", "text"] and "<image>" not in prompt[1]["text"]


@pytest.mark.parametrize("fmt", ["geometry3k", "auto"])
def test_virl39k_rows_with_image_lists_and_boxed_answers(tmp_path, fmt):
    """ViRL39K's own file: `question` with <image>, `image` a list of paths, the answer written boxed. The row is
    kept (not refused as "no usable image (got list)") and a completion with the right answer scores 1."""
    from atrl.rl.rewards import accuracy_reward

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rows = [{"qid": "q1", "question": "<image>How many?", "answer": "\\boxed{3}", "image": ["a.png"],
             "category": "(GradeSchool) Science"},
            {"qid": "q2", "question": "<image> vs <image>: which is larger?", "answer": "\\boxed{B}",
             "image": ["a.png", "a.png"], "category": "Spatial"}]
    (tmp_path / "virl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "virl.parquet")  # as the data set ships
    samples, _ = load_samples(tmp_path / "virl.jsonl", fmt)
    from_parquet, _ = load_samples(tmp_path / "virl.parquet", fmt)
    assert [(s.question, s.answer, len(s.images)) for s in from_parquet] == \
        [(s.question, s.answer, len(s.images)) for s in samples]
    assert [len(s.images) for s in samples] == [1, 2] and samples[0].question == "How many?"
    rows = [dict(r) for r in to_trl_dataset(samples)]
    completions = [[{"role": "assistant", "content": "<think>...</think><answer>3</answer>"}],
                   [{"role": "assistant", "content": "<answer>B</answer>"}]]
    scores = accuracy_reward([r["prompt"] for r in rows], completions,
                             **{k: [r[k] for r in rows] for k in ("answer", "answer_type", "choices", "precision")})
    assert scores == [1.0, 1.0]
    from atrl.eval.score import _category

    assert [_category(r) for r in rows] == ["(GradeSchool) Science", "Spatial"]  # what `atrl eval` scores by
    # metadata given as JSON text (as to_trl_dataset writes it) is read as the mapping it holds
    (tmp_path / "meta.jsonl").write_text(json.dumps({"question": "q", "answer": "1", "image": "a.png",
                                                     "metadata": json.dumps({"category": "Charts"})}) + "\n")
    assert load_samples(tmp_path / "meta.jsonl", "jsonl")[0][0].metadata == {"category": "Charts"}


def test_a_datasets_folder_loads_like_the_same_rows_as_jsonl(tmp_path):
    """`atrl data export --format hf` (datasets' save_to_disk) and the JSONL export of the same seed give the same
    samples; images stay encoded until used. A folder of several splits names them."""
    from atrl.cli import main

    for fmt in ("hf", "jsonl"):
        assert main(["data", "export", "--n", "5", "--seed", "2", "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    folder, _ = load_samples(tmp_path / "hf")
    jsonl, _ = load_samples(tmp_path / "jsonl" / "data.jsonl")
    assert [(s.question, s.answer, s.answer_type) for s in folder] == [(s.question, s.answer, s.answer_type)
                                                                       for s in jsonl]
    assert folder[0].images[0].data is not None and folder[0].source == f"{tmp_path / 'hf'}[0]"
    assert list(folder[0].load_images()[0].getdata()) == list(jsonl[0].load_images()[0].getdata())
    import datasets

    datasets.DatasetDict({"train": datasets.load_from_disk(str(tmp_path / "hf"))}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"a data set with splits \['train'\]: give one split's folder"):
        load_samples(tmp_path / "dd")
    with pytest.raises(DataError, match="not a data set saved by datasets"):
        load_samples(tmp_path / "jsonl")
    # a hub data set's files as downloaded: each split in parquet shards under data/
    shards = tmp_path / "hub" / "data"
    shards.mkdir(parents=True)
    whole = datasets.load_from_disk(str(tmp_path / "hf"))
    whole.select(range(3)).to_parquet(str(shards / "train-00000-of-00002.parquet"))
    whole.select(range(3, 5)).to_parquet(str(shards / "train-00001-of-00002.parquet"))
    whole.select(range(1)).to_parquet(str(shards / "test-00000-of-00001.parquet"))
    with pytest.raises(DataError, match=r"a folder of parquet files \(test, train\): give one split's files, e\.g\. "
                                        r".*data/test-\*\.parquet"):
        load_samples(tmp_path / "hub")
    sharded, _ = load_samples(shards / "train-*.parquet")
    assert [(s.question, s.answer) for s in sharded] == [(s.question, s.answer) for s in folder]
    assert [s.source for s in sharded][2:4] == [f"{shards / 'train-00000-of-00002.parquet'}[2]",
                                                f"{shards / 'train-00001-of-00002.parquet'}[0]"]
    assert list(sharded[4].load_images()[0].getdata()) == list(folder[4].load_images()[0].getdata())
    with pytest.raises(FileNotFoundError, match="no file matches"):
        load_samples(shards / "validation-*.parquet")
