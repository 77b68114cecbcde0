"""Loaders for the data-set files users have, into one example schema, then TRL's conversational format.

Supported shapes (local files only):

    mathvista   parquet, JSON (a dict keyed by pid, or a list) or JSONL with MathVista's fields: pid, question,
                image (path) and/or decoded_image (bytes), choices, unit, precision, answer, question_type,
                answer_type, metadata, query. `query` (the prompt with its hint) is used as the question when present.
    geometry3k  Geometry3K / ViRL39K style: problem (or question), answer (a boxed answer is read by its content),
                images or image (one or a list of paths, or {"bytes": ...}); parquet or JSONL.
    jsonl       generic JSONL: question (or prompt / problem), answer, image or images (paths), optional
                answer_type, choices, precision.

Any of them may have `videos` (or `video`): a list of videos, each a video file, its bytes, a folder of frame
images or a list of frame images (`atrl.data.video`), beside or instead of images. `<video>` placeholders in the
question are read as `<image>` ones are.

Image paths are resolved against `image_root` (default: the data file's folder). Images are loaded lazily
(`Sample.load_images()` or by `datasets` when a row is read); `verify_images=True` opens each once at load
time so that a corrupt file is found before training, not in the middle of it.

Bad rows (no answer, unknown answer type, missing or unreadable image): with `on_error="raise"` (default) a
`DataError` names the file and row; with `on_error="skip"` the row is left out and counted, by reason, in the
returned `LoadReport`. Nothing is dropped silently.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from .._io import read_text
from .answers import ANSWER_TYPES
from .synthetic import RESPONSE_INSTRUCTION
from .video import Video, VideoBounds, VideoError, VideoRef

FORMATS = ("mathvista", "geometry3k", "jsonl")


logger = logging.getLogger("atrl")


class DataError(ValueError):
    """A data-set row cannot be used; the message names the file and row."""


@dataclass(frozen=True)
class ImageRef:
    """An image to load later: a file path or encoded bytes."""

    path: str | None = None
    data: bytes | None = None

    def load(self) -> Image.Image:
        try:
            img = Image.open(self.path if self.data is None else io.BytesIO(self.data))
            img.load()
            return img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"image {self.path or '<embedded bytes>'} cannot be read: {err}") from err

    def size(self) -> tuple[int, int]:
        """(width, height) from the file's header, without decoding the pixels."""
        try:
            with Image.open(self.path if self.data is None else io.BytesIO(self.data)) as img:
                return img.size
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"image {self.path or '<embedded bytes>'} cannot be read: {err}") from err

    def as_feature(self) -> dict[str, Any]:
        """The value for a `datasets.Image()` column (decoded by datasets only when a row is read)."""
        return {"path": self.path, "bytes": self.data}


@dataclass
class Sample:
    """One example in the project's schema."""

    uid: str
    question: str
    answer: str
    answer_type: str
    images: list[ImageRef]
    choices: list[str] | None = None
    precision: float | None = None
    unit: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "file:row"
    videos: list[VideoRef] = field(default_factory=list)

    def load_images(self) -> list[Image.Image]:
        out = []
        for ref in self.images:
            try:
                out.append(ref.load())
            except DataError as err:
                raise DataError(f"{self.source}: {err}") from err
        return out

    def load_videos(self, bounds: VideoBounds) -> list[Video]:
        out = []
        for ref in self.videos:
            try:
                out.append(ref.load(bounds))
            except VideoError as err:
                raise DataError(f"{self.source}: {err}") from err
        return out


@dataclass
class LoadReport:
    """What a loader kept and what it skipped, by reason (`on_error="skip"`)."""

    path: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first skipped rows' messages
    first_rows: dict[str, list[str]] = field(default_factory=dict)  # reason -> where its first skipped rows are
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (row, the earlier row it repeats)

    def skip(self, reason: str, message: str) -> None:
        """Count a skipped row under `reason`, keeping where the first few are."""
        self.skipped[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(message)
        rows = self.first_rows.setdefault(reason, [])
        if len(rows) < 3:
            rows.append(message.split(": ", 1)[0])

    def __str__(self) -> str:
        def reason(k: str) -> str:
            rows = self.first_rows[k]
            return f"{k} at {', '.join(rows)}" + (", ..." if self.skipped[k] > len(rows) else "")

        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        line = f"{self.path}: kept {self.kept} rows, skipped {sum(self.skipped.values())} ({counts})"
        if self.first_rows:
            line += "; skipped rows: " + "; ".join(reason(k) for k in sorted(self.skipped) if k in self.first_rows)
        if self.duplicates:
            row, earlier = self.duplicates[0]
            line += (f"; {len(self.duplicates)} kept rows repeat an earlier one (question, answer and images), e.g. "
                     f"{row} repeats {earlier}")
        return line


# --------------------------------------------------------------------------------------------------
# reading rows


def expand_data_path(path: str | Path) -> list[Path]:
    """The files a data path names: itself, or with `*`, `?` or `[...]` in its last part the matching files in
    sorted order (a split stored in shards, `data/train-*.parquet`). Raises FileNotFoundError naming the path when
    nothing is there."""
    path = Path(path)
    if not any(c in path.name for c in "*?["):
        if not path.exists():
            raise FileNotFoundError(f"data file or folder {str(path)!r} does not exist")
        return [path]
    files = sorted(p for p in path.parent.glob(path.name) if p.is_file())
    if not files:
        raise FileNotFoundError(f"no file matches {str(path)!r}")
    return files


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The file's rows, and where each is in it: `path:LINE` (1-based, as editors and grep count) in a JSONL
    file, `path[INDEX]` (0-based) in a parquet file, a JSON list or a `datasets` folder, `path[pid=ID]` in a JSON
    dict keyed by id. A pattern (`train-*.parquet`) reads each matching file in turn."""
    files = expand_data_path(path)
    if len(files) > 1 or files[0] != path:
        rows, places = [], []
        for file in files:
            more, where = _read_rows(file)
            rows += more
            places += where
        return rows, places
    if path.is_dir():
        return _read_dataset_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return rows, [f"{path}[{i}]" for i in range(len(rows))]
    if suffix == ".jsonl":
        rows, places = [], []
        try:
            text = read_text(path)
        except ValueError as err:
            raise DataError(str(err)) from None
        for number, line in enumerate(text.split("\n"), start=1):  # lines as a file reads them
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from err
                places.append(f"{path}:{number}")
        return rows, places
    if suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except ValueError as err:
            if not isinstance(err, json.JSONDecodeError):
                raise DataError(str(err)) from None
            raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
        if isinstance(data, dict):
            return [{"pid": key, **value} for key, value in data.items()], [f"{path}[pid={key}]" for key in data]
        if isinstance(data, list):
            return data, [f"{path}[{i}]" for i in range(len(data))]
        raise DataError(f"{path}: expected a JSON list of rows or a dict keyed by id")
    raise DataError(f"{path}: unsupported file type {suffix!r} (use .parquet, .json or .jsonl)")


def _read_dataset_folder(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a data set written by `datasets`' save_to_disk (e.g. `atrl data export --format hf`, or a hub data
    set downloaded and saved), read from its Arrow table: images stay encoded ({bytes, path}) until used."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{path}: a data set with splits {splits}: give one split's folder, e.g. "
                        f"{path / (splits[0] if splits else 'train')}")
    if not (path / "dataset_info.json").is_file():
        shards = sorted(path.rglob("*.parquet"))
        if shards:  # a hub data set's files as downloaded: data/<split>-00000-of-00002.parquet, ...
            splits = sorted({re.sub(r"-\d+-of-\d+.*$", "", p.name) for p in shards})
            example = shards[0].parent / (re.sub(r"-\d+-of-\d+.*$", "", shards[0].name) + "-*.parquet")
            raise DataError(f"{path}: a folder of parquet files ({', '.join(splits)}): give one split's files, e.g. "
                            f"{example}")
        raise DataError(f"{path}: a folder, but not a data set saved by datasets (no dataset_info.json); give a "
                        ".parquet, .json or .jsonl file or such a folder")
    import datasets

    rows = datasets.load_from_disk(str(path)).with_format("arrow")[:].to_pylist()
    return rows, [f"{path}[{i}]" for i in range(len(rows))]


def _image_ref(value: Any, root: Path, where: str) -> ImageRef:
    if isinstance(value, (bytes, bytearray)):
        return ImageRef(data=bytes(value))
    if isinstance(value, dict):
        if value.get("bytes"):
            return ImageRef(path=value.get("path"), data=value["bytes"])
        value = value.get("path")
    if isinstance(value, str) and value:
        p = Path(value)
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise DataError(f"{where}: image file {str(p)!r} does not exist")
        return ImageRef(path=str(p))
    raise DataError(f"{where}: no usable image (got {type(value).__name__})")


def _video_ref(value: Any, root: Path, where: str) -> VideoRef:
    """A video item: a path (file or folder of frames), {"path"/"bytes"/"frames"}, bytes, or a list of frame paths."""
    def resolve(v: str) -> Path:
        p = Path(v)
        return p if p.is_absolute() else root / p

    if isinstance(value, (bytes, bytearray)):
        return VideoRef(data=bytes(value))
    if isinstance(value, dict):
        if value.get("bytes"):
            return VideoRef(path=value.get("path"), data=value["bytes"])
        images = value.get("images")  # a synthetic data set saved with its frames (`atrl data export --format hf`)
        if images and all(isinstance(i, dict) and i.get("bytes") for i in images):
            return VideoRef(frame_data=tuple(i["bytes"] for i in images), fps=value.get("fps"))
        if value.get("frame_bytes"):
            return VideoRef(frame_data=tuple(value["frame_bytes"]), fps=value.get("fps"))
        value = value.get("frames") or (images if images and all(isinstance(i, str) for i in images) else None) \
            or value.get("path")
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) and v for v in value):
            raise DataError(f"{where}: a video given as a list of frames needs one or more frame paths")
        frames = tuple(str(resolve(v)) for v in value)
        missing = next((f for f in frames if not Path(f).is_file()), None)
        if missing is not None:
            raise DataError(f"{where}: video frame {missing!r} does not exist")
        return VideoRef(frames=frames)
    if isinstance(value, str) and value:
        p = resolve(value)
        if not p.exists():
            raise DataError(f"{where}: video file {str(p)!r} does not exist")
        return VideoRef(path=str(p))
    raise DataError(f"{where}: no usable video (got {type(value).__name__})")


def _row_videos(row: dict, root: Path, where: str) -> list[VideoRef]:
    """A row's videos: its `videos` list, or its `video` (one video, or a list of them)."""
    raw = row.get("videos")
    if raw is None:
        raw = row.get("video")
        if raw is None:
            return []
        if isinstance(raw, (str, bytes, dict)):
            raw = [raw]
    raw = list(raw.tolist() if hasattr(raw, "tolist") else raw)
    return [_video_ref(v, root, where) for v in raw]


def _row_images(row: dict) -> list:
    """A row's images: its `images` list, or its `image`, which ViRL39K-style files also make a list of paths."""
    raw = row.get("images")
    if raw is None:
        raw = row.get("image")
        if raw is None:
            return []
        if not isinstance(raw, (list, tuple)) and not hasattr(raw, "tolist"):
            return [raw]
    return list(raw.tolist() if hasattr(raw, "tolist") else raw)


def _row_labels(row: dict) -> dict[str, Any]:
    """A row's top-level source / category / level (ViRL39K, Geometry3K): its category is what `atrl eval` scores
    by."""
    return {k: row[k] for k in ("source", "category", "level") if not _blank(row.get(k))}


def _row_metadata(row: dict) -> dict[str, Any]:
    """A row's `metadata`: a mapping, or JSON text of one (as `to_trl_dataset` writes it); anything else is kept
    under the key "metadata"."""
    meta = row.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            pass
    if meta is None:
        return {}
    return meta if isinstance(meta, dict) else {"metadata": meta}


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, float) and value != value)


def _mathvista_row(row: dict, root: Path, where: str) -> Sample:
    if row.get("decoded_image") is not None:
        images = [_image_ref(row["decoded_image"], root, where)]
    elif not _blank(row.get("image")):
        images = [_image_ref(row["image"], root, where)]
    else:
        raise DataError(f"{where}: no image (neither 'decoded_image' nor 'image')")
    qtype = row.get("question_type") or "free_form"
    kind = "choice" if qtype == "multi_choice" else (row.get("answer_type") or "text")
    precision = row.get("precision")
    meta = _row_metadata(row)
    return Sample(
        uid=str(row.get("pid", where)),
        question=str(row.get("query") or row.get("question") or ""),
        answer=row.get("answer"),
        answer_type=kind,
        images=images,
        choices=list(row["choices"]) if row.get("choices") is not None else None,
        precision=None if _blank(precision) else float(precision),
        unit=row.get("unit") or None,
        metadata={"question_type": qtype, "answer_type": row.get("answer_type"), **meta},
    )


_IMAGE_PLACEHOLDER = re.compile(r"\s*<image>\s*")
_VIDEO_PLACEHOLDER = re.compile(r"\s*<video>\s*")


def _question_text(text: Any, n_images: int, where: str, n_videos: int = 0) -> str:
    """The question without `<image>` / `<video>` placeholders (Geometry3K, ViRL39K, Video-R1 and EasyR1-style
    files mark where an image or video goes; the prompt puts the videos and images first and the model's own
    tokens stand for them). A count of placeholders other than the row's images (videos) means a broken row."""
    text = str(text)
    for pattern, kind, n in ((_IMAGE_PLACEHOLDER, "image", n_images), (_VIDEO_PLACEHOLDER, "video", n_videos)):
        placeholders = len(pattern.findall(text))
        if placeholders and placeholders != n:
            raise DataError(f"{where}: the question has {placeholders} <{kind}> placeholders but the row has "
                            f"{n} {kind}s")
        if placeholders:
            text = pattern.sub(" ", text).strip()
    return text


def _geometry_row(row: dict, root: Path, where: str) -> Sample:
    raw, videos = _row_images(row), _row_videos(row, root, where)
    if not raw and not videos:
        raise DataError(f"{where}: no images")
    question = _question_text(row.get("problem") or row.get("question") or "", len(raw), where, len(videos))
    return Sample(uid=str(row.get("id", where)), question=question,
                  answer=row.get("answer"), answer_type=row.get("answer_type") or "math",
                  images=[_image_ref(v, root, where) for v in raw], choices=row.get("choices"),
                  metadata=_row_labels(row), videos=videos)


def _jsonl_row(row: dict, root: Path, where: str) -> Sample:
    raw, videos = _row_images(row), _row_videos(row, root, where)
    question = row.get("question") or row.get("prompt") or row.get("problem")
    if _blank(question):
        raise DataError(f"{where}: no question (expected a 'question', 'prompt' or 'problem' field)")
    precision = row.get("precision")
    question = _question_text(question, len(raw), where, len(videos))
    return Sample(uid=str(row.get("id", row.get("uid", where))), question=question, answer=row.get("answer"),
                  answer_type=row.get("answer_type") or "text", images=[_image_ref(v, root, where) for v in raw],
                  choices=row.get("choices") or None, precision=None if _blank(precision) else float(precision),
                  metadata={**_row_labels(row), **_row_metadata(row)}, videos=videos)


_ROW_READERS = {"mathvista": _mathvista_row, "geometry3k": _geometry_row, "jsonl": _jsonl_row}


def _reason(err: DataError) -> str:
    msg = str(err)
    for key in ("no answer", "answer_type", "does not exist", "cannot be read", "no image", "no question",
                "placeholders", "max_image_pixels", "max_seconds", "no frames", "no video stream", "no usable video"):
        if key in msg:
            return key
    return "other"


MAX_IMAGE_PIXELS = 50_000_000  # an image over this is a bad row (decoding it costs seconds and ~150 MB per copy)


def load_samples(path: str | Path, format: str = "auto", *, image_root: str | Path | None = None,
                 on_error: str = "raise", verify_images: bool = True,
                 max_image_pixels: int | None = MAX_IMAGE_PIXELS,
                 video: VideoBounds | None = None) -> tuple[list[Sample], LoadReport]:
    """Read a data-set file into `Sample`s.

    Args:
        path: a .parquet, .json or .jsonl file, or a folder written by `datasets` (save_to_disk) of one split.
        format: one of FORMATS, or "auto" (MathVista when rows have `pid` and `question_type`, Geometry3K when
            they have `problem`, else generic JSONL).
        image_root: folder relative image paths are resolved against (default: the file's folder).
        on_error: "raise" (a DataError naming file and row) or "skip" (count the row in the report).
        verify_images: open every image once now, so corrupt files are found before training.
        max_image_pixels: an image with more pixels (read from its header, before decoding) is a bad row
            (None: no bound).
        video: the bounds videos are read within (default `VideoBounds()`); with `verify_images` each video's
            header is read now (a missing stream, no frames, longer than `max_seconds`: a bad row), its frames
            when a row is used.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}: use 'raise' or 'skip'")
    path = Path(path)
    rows, places = _read_rows(path)
    if format == "auto":
        first = rows[0] if rows else {}
        format = "mathvista" if "question_type" in first and "pid" in first else (
            "geometry3k" if "problem" in first else "jsonl")
    if format not in _ROW_READERS:
        raise ValueError(f"unknown data format {format!r}; choose from {FORMATS} or 'auto'")
    root = Path(image_root) if image_root is not None else path.parent
    report = LoadReport(str(path))
    read: list[Sample | DataError] = []
    for row, where in zip(rows, places):
        try:
            sample = _ROW_READERS[format](row, root, where)
            sample.source = where
            if _blank(sample.answer):
                raise DataError(f"{where}: no answer")
            sample.answer = str(sample.answer)
            if sample.answer_type not in ANSWER_TYPES:
                raise DataError(f"{where}: unknown answer_type {sample.answer_type!r}; choose from {ANSWER_TYPES}")
            read.append(sample)
        except DataError as err:
            if on_error == "raise":
                raise
            read.append(err)
    video = video if video is not None else VideoBounds()
    if verify_images:  # decoding runs outside the GIL: threads open the images side by side (ViRL39K: 39k rows)
        read = _in_threads(lambda item: _verified(item, max_image_pixels, video), read)
    samples = []
    for item in read:  # in file order: the first bad row is the one raised
        if isinstance(item, DataError):
            if on_error == "raise":
                raise item
            report.skip(_reason(item), str(item))
            continue
        samples.append(item)
    report.kept = len(samples)
    report.duplicates = _duplicates(samples)
    if report.duplicates:
        row, earlier = report.duplicates[0]
        logger.warning("%s: %d rows repeat an earlier one (question, answer and images), e.g. %s repeats %s; they "
                       "are kept (a data set's own duplicates weigh those questions more)", path,
                       len(report.duplicates), row, earlier)
    return samples, report


def _duplicates(samples: list[Sample]) -> list[tuple[str, str]]:
    """(row, the earlier row) for each sample whose question, answer and images repeat an earlier one's."""
    import hashlib

    first: dict[tuple, str] = {}
    out = []
    for s in samples:
        images = tuple(r.path if r.data is None else hashlib.sha1(r.data).hexdigest() for r in s.images)
        videos = tuple(r.frames or (r.path if r.data is None else hashlib.sha1(r.data).hexdigest()) for r in s.videos)
        key = (s.question, s.answer, images, videos)
        if key in first:
            out.append((s.source, first[key]))
        else:
            first[key] = s.source
    return out


def _verified(item: Sample | DataError, max_pixels: int | None = MAX_IMAGE_PIXELS,
              video: VideoBounds | None = None) -> Sample | DataError:
    if isinstance(item, DataError):
        return item
    try:
        for ref in item.videos:  # the header only: stream, frames, length
            try:
                ref.check(video or VideoBounds())
            except VideoError as err:
                raise DataError(str(err)) from err
        if max_pixels is not None:
            for ref in item.images:  # from the header, before a huge image is decoded
                w, h = ref.size()
                if w * h > max_pixels:
                    raise DataError(f"{item.source}: image {ref.path or '<embedded bytes>'} is {w} x {h} = "
                                    f"{w * h:,} pixels, over data.max_image_pixels={max_pixels:,} (raise it, or "
                                    "downscale the file: the processor resizes it to max_pixels anyway)")
        item.load_images()
    except DataError as err:
        return err if str(err).startswith(item.source) else DataError(f"{item.source}: {err}")
    return item


def _in_threads(func, items: list) -> list:
    """`[func(x) for x in items]`, in order, on up to 16 threads (PIL decodes and resizes outside the GIL)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    workers = min(16, os.cpu_count() or 1, max(1, len(items) // 64))
    if workers == 1:
        return [func(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="atrl-data") as pool:
        return list(pool.map(func, items, chunksize=64))


def build_prompt_messages(sample: Sample, instruction: str = RESPONSE_INSTRUCTION) -> list[dict[str, Any]]:
    """TRL conversational prompt: one user turn with the sample's images, then question (+ choices)."""
    text = sample.question
    if sample.choices and "Choices" not in text:
        text += "\nChoices: " + " ".join(f"({chr(65 + k)}) {c}" for k, c in enumerate(sample.choices))
    if instruction:
        text += " " + instruction
    content = ([{"type": "video", "text": None} for _ in sample.videos]
               + [{"type": "image", "text": None} for _ in sample.images] + [{"type": "text", "text": text}])
    return [{"role": "user", "content": content}]


def video_feature():
    """The `videos` column's feature: per row a list of {path, bytes, frames} (`VideoRef.as_feature`), decoded
    only when the row is used (`atrl.rl.trainer`)."""
    import datasets

    return [{"path": datasets.Value("string"), "bytes": datasets.Value("binary"),
             "frames": [datasets.Value("string")], "frame_bytes": [datasets.Value("binary")],
             "fps": datasets.Value("float64")}]


def to_trl_dataset(samples: Iterable[Sample], instruction: str = RESPONSE_INSTRUCTION):
    """A `datasets.Dataset` with prompt, images (lazy), answer, answer_type, choices, precision, uid, source; and
    `videos` (references, decoded when used) when any sample has a video."""
    import datasets

    samples = list(samples)
    with_videos = any(s.videos for s in samples)
    rows = [{"prompt": build_prompt_messages(s, instruction), "images": [r.as_feature() for r in s.images],
             "answer": s.answer, "answer_type": s.answer_type, "choices": s.choices or [],
             "precision": s.precision, "uid": s.uid, "source": s.source,
             "metadata": json.dumps(s.metadata, default=str),
             **({"videos": [r.as_feature() for r in s.videos]} if with_videos else {})} for s in samples]
    features = datasets.Features({
        "prompt": [{"role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image()),
        "answer": datasets.Value("string"),
        "answer_type": datasets.Value("string"),
        "choices": [datasets.Value("string")],
        "precision": datasets.Value("float64"),
        "uid": datasets.Value("string"),
        "source": datasets.Value("string"),
        "metadata": datasets.Value("string"),
        **({"videos": video_feature()} if with_videos else {}),
    })
    return datasets.Dataset.from_list(rows, features=features)


def _processed_length(processor, sample: Sample, text: str, video: VideoBounds | None = None) -> int:
    """The prompt's tokens as the processor makes them, images decoded and processed (any processor). A video is
    not decoded: blank frames of the size and number its header says stand for it (the token count depends on
    nothing else)."""
    images = sample.load_images()
    kwargs = {}
    if sample.videos:
        try:
            kwargs = video_inputs(processor, [ref.blank(video or VideoBounds()) for ref in sample.videos])
        except (DataError, VideoError) as err:
            raise DataError(f"{sample.source}: {err}") from err
    return processor(text=[text], images=[images] if images else None, return_tensors="pt",
                     **kwargs)["input_ids"].shape[1]


def video_inputs(processor, videos: list[Video]) -> dict[str, Any]:
    """The processor's keyword arguments for decoded videos: the frames, their metadata (the sampled frames'
    indices and the frame rate, from which Qwen3-VL writes each frame's time), and no sampling of its own (the
    frames are the ones `data.video` chose). A processor without a video slot is an error that says so."""
    if getattr(processor, "video_processor", None) is None:
        raise DataError(f"the processor ({type(processor).__name__}) takes no videos: a video row needs a "
                        "checkpoint whose processor has a video processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")
    return {"videos": [v.frames for v in videos], "video_metadata": [v.metadata for v in videos],
            "do_sample_frames": False}


def _header_only_counter(processor):
    """For Qwen2-VL / Qwen2.5-VL processors: the prompt's tokens from the text and each image's size alone (its
    header: no decoding, ~1000 times faster on large images), as the processor would expand each image
    placeholder: the image resized into the pixel range on the (patch x merge) grid, one token per merged patch.
    None for other processors (the exact count then processes the images). A row with a video is counted by
    `_processed_length` (blank frames of the header's size stand for the video's)."""
    from ..models.zoo import pixel_range

    image_processor = getattr(processor, "image_processor", None)
    pixels = pixel_range(processor)
    patch, merge = getattr(image_processor, "patch_size", None), getattr(image_processor, "merge_size", None)
    if (pixels is None or getattr(processor, "image_token", None) is None or not patch or not merge
            or not getattr(image_processor, "do_resize", True)):
        return None
    # the same function as the torchvision backend's, in the module that does not need torchvision
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    def count(processor, sample: Sample, text: str) -> int:
        n = len(processor.tokenizer(text)["input_ids"])
        for ref in sample.images:
            width, height = ref.size()
            h, w = smart_resize(height, width, factor=patch * merge, min_pixels=pixels[0], max_pixels=pixels[1])
            n += (h // patch) * (w // patch) // merge ** 2 - 1  # the placeholder becomes this many tokens
        return n

    return count


def check_prompt_lengths(samples: Iterable[Sample], processor, max_prompt_length: int, *, on_error: str = "raise",
                         report: LoadReport | None = None, limit_name: str | None = None,
                         video: VideoBounds | None = None) -> list[Sample]:
    """Keep samples whose processed prompt (text + image and video tokens) fits `max_prompt_length` tokens.

    A prompt over the limit would be truncated from the left by the trainer, cutting image tokens, so it is an
    error naming the row (or, with on_error="skip", counted in `report` under "prompt too long"). Videos are
    counted from their headers as `video` (default `VideoBounds()`) samples them, without decoding.
    """
    kept = []
    header_count = _header_only_counter(processor)
    for s in samples:
        text = processor.apply_chat_template(build_prompt_messages(s), add_generation_prompt=True)
        try:
            n = (header_count(processor, s, text) if header_count is not None and not s.videos
                 else _processed_length(processor, s, text, video))
        except DataError:
            raise
        except ValueError as err:  # the processor refuses an image (e.g. an aspect ratio over 200)
            n, refused = None, DataError(f"{s.source}: the processor refuses the row's images: {err}")
        if n is None:
            if on_error == "raise":
                raise refused
            if report is not None:
                report.skip("other", str(refused))
                report.kept -= 1
            continue
        if n > max_prompt_length:
            limit = limit_name or f"max_prompt_length={max_prompt_length}"
            what = "video" if s.videos else "image"
            msg = (f"{s.source}: prompt is {n} tokens with its {what} tokens, over {limit}; truncation would cut "
                   f"{what} tokens (raise the limit or shrink the {what}"
                   + (": data.video.max_frames, max_pixels, fps)" if s.videos else ")"))
            if on_error == "raise":
                raise DataError(msg)
            if report is not None:
                report.skip("prompt too long", msg)
                report.kept -= 1
            continue
        kept.append(s)
    return kept
