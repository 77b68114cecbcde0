"""Videos for a row's `videos` column: read lazily, sampled within bounds, each failure named.

An item of `videos` is one of
- a video file (any container and codec FFmpeg reads: mp4, mkv, webm, avi, ...), decoded with PyAV, or its bytes
  ({"bytes": ...}, as a parquet column holds them);
- a folder of frame images (.png, .jpg, .jpeg, .webp, .bmp), taken in name order;
- a list of frame image paths.
Paths are relative to the data file (as images are).

Sampling (`VideoBounds`): a video file is sampled at `fps` frames per second over its duration, at least
`min_frames` (where it has them) and at most `max_frames`, the chosen frames spread evenly (each the middle frame
of its stretch of the video). A folder or list of frames is taken as frames already sampled at `fps`; more than
`max_frames` of them are thinned evenly. Each frame is scaled down (aspect kept) to at most `max_pixels` pixels
before the processor sees it. A video file longer than `max_seconds` is a bad row, found from its header.

`VideoRef.info()` reads the container's header only (frame count, frame rate, frame size): enough to count a
prompt's video tokens without decoding (`atrl train --dry-run`). `VideoRef.load()` decodes the sampled frames
only, in one pass that stops after the last of them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class VideoError(ValueError):
    """A video cannot be used; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class VideoBounds:
    """How a video becomes frames (the recipe's `data.video`)."""

    fps: float = 2.0  # frames sampled per second of video
    max_frames: int = 32  # at most this many frames per video, spread evenly over it
    min_frames: int = 2  # at least this many (where the video has them): one temporal patch of the Qwen towers
    max_pixels: int = 768 * 28 * 28  # each frame scaled down to at most this many pixels (aspect kept)
    max_seconds: float | None = 600.0  # a longer video file is a bad row (None: no bound)

    def __post_init__(self):
        for name in ("fps", "max_frames", "min_frames", "max_pixels"):
            if not getattr(self, name) > 0:
                raise ValueError(f"data.video.{name}={getattr(self, name)!r}: must be > 0")
        if self.min_frames > self.max_frames:
            raise ValueError(f"data.video.min_frames={self.min_frames} is over max_frames={self.max_frames}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"data.video.max_seconds={self.max_seconds!r}: must be > 0 (or null: no bound)")


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says: `frames` in all, `fps` (None for frames given one by one: they are taken as
    sampled at the bounds' fps), each frame's `height` x `width`."""

    frames: int
    fps: float | None
    height: int
    width: int

    @property
    def seconds(self) -> float | None:
        return None if self.fps is None else self.frames / self.fps


@dataclass(frozen=True)
class Video:
    """Decoded frames (T, H, W, 3) uint8 and the metadata the processors read (the sampled frames' indices and the
    video's frame rate: Qwen3-VL writes each frame's time into the prompt from them)."""

    frames: np.ndarray
    metadata: dict[str, Any]


def sample_indices(info: VideoInfo, bounds: VideoBounds) -> list[int]:
    """The indices of the frames `bounds` keeps of a video described by `info` (see the module docstring)."""
    n = info.frames
    if info.fps is None:
        k = min(n, bounds.max_frames)
    else:
        k = int(info.frames / info.fps * bounds.fps)
        k = min(max(k, min(bounds.min_frames, n), 1), bounds.max_frames, n)
    if k == n:
        return list(range(n))
    return [int((i + 0.5) * n / k) for i in range(k)]


def _video(frames: np.ndarray, info: VideoInfo, fps: float, wanted: list[int], backend: str) -> Video:
    """Frames sampled from a video described by `info`, with the metadata the processors read."""
    return Video(frames, {"total_num_frames": info.frames, "fps": fps, "duration": info.frames / fps,
                          "frames_indices": wanted, "height": info.height, "width": info.width,
                          "video_backend": backend})


def fit_pixels(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) scaled down, aspect kept, to at most `max_pixels` pixels (unchanged when within it)."""
    if height * width <= max_pixels:
        return height, width
    scale = (max_pixels / (height * width)) ** 0.5
    return max(1, int(height * scale)), max(1, int(width * scale))


@dataclass(frozen=True)
class VideoRef:
    """A video to read later: a file `path` (or its bytes, `data`), a folder of frames (`path`), `frames`, a list
    of frame image paths, or `frame_data`, the frames' encoded images (a data set saved with its frames). Frames
    given one by one are taken at their rate `fps` (default: the bounds' fps)."""

    path: str | None = None
    data: bytes | None = None
    frames: tuple[str, ...] | None = None
    frame_data: tuple[bytes, ...] | None = None
    fps: float | None = None

    @property
    def name(self) -> str:
        if self.frames is not None:
            return f"frames {self.frames[0]!r}..." if self.frames else "an empty list of frames"
        if self.frame_data is not None:
            return f"<{len(self.frame_data)} embedded frames>"
        return repr(self.path) if self.path else "<embedded bytes>"

    def _frame_files(self) -> list:
        if self.frames is not None:
            return list(self.frames)
        if self.frame_data is not None:
            return [io.BytesIO(b) for b in self.frame_data]
        return sorted(str(p) for p in Path(self.path).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)

    def _frame_label(self, files: list, i: int) -> str:
        return repr(files[i]) if isinstance(files[i], str) else f"{i} of {self.name}"

    def _is_frames(self) -> bool:
        return (self.frames is not None or self.frame_data is not None
                or (self.data is None and Path(self.path).is_dir()))

    def _open(self):
        import av

        try:
            container = av.open(io.BytesIO(self.data) if self.data is not None else self.path, metadata_errors="ignore")
        except (av.FFmpegError, OSError, UnicodeDecodeError) as err:
            raise VideoError(f"video {self.name} cannot be read: {err}") from err
        if not container.streams.video:
            container.close()
            raise VideoError(f"video {self.name} has no video stream (streams: "
                             f"{', '.join(s.type for s in container.streams) or 'none'})")
        return container

    def info(self) -> VideoInfo:
        """The header's frame count, frame rate and frame size; no frame is decoded (a container that does not
        say how many frames it has gets its packets counted, still without decoding)."""
        if self._is_frames():
            files = self._frame_files()
            if not files:
                raise VideoError(f"video {self.name} has no frames (no {'/'.join(FRAME_SUFFIXES)} files)")
            try:
                with Image.open(files[0]) as first:
                    width, height = first.size
            except (OSError, ValueError) as err:
                raise VideoError(f"video frame {self._frame_label(files, 0)} cannot be read: {err}") from err
            return VideoInfo(len(files), None, height, width)
        import av

        container = self._open()
        try:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            width, height = stream.codec_context.width, stream.codec_context.height
            frames = stream.frames
            if not frames:  # mkv, webm and others may not say: count the packets (one frame each), no decoding
                frames = sum(1 for packet in container.demux(stream) if packet.size)
        except av.FFmpegError as err:
            raise VideoError(f"video {self.name} cannot be read: {err}") from err
        finally:
            container.close()
        if not frames:
            raise VideoError(f"video {self.name} has no frames")
        if not rate:
            raise VideoError(f"video {self.name} does not say its frame rate")
        if not width or not height:
            raise VideoError(f"video {self.name} does not say its frame size")
        return VideoInfo(int(frames), float(rate), int(height), int(width))

    def check(self, bounds: VideoBounds) -> VideoInfo:
        """`info()`, and a VideoError when the video is longer than the bounds allow."""
        info = self.info()
        if bounds.max_seconds is not None and info.seconds is not None and info.seconds > bounds.max_seconds:
            raise VideoError(f"video {self.name} is {info.seconds:.1f} s long, over data.video.max_seconds="
                             f"{bounds.max_seconds:g} (raise it, or cut the video)")
        return info

    def _rate(self, info: VideoInfo, bounds: VideoBounds) -> float:
        """The frame rate the processors are told: a file's own, else the frames' given rate or the bounds'."""
        return info.fps if info.fps is not None else (self.fps or bounds.fps)

    def blank(self, bounds: VideoBounds) -> Video:
        """Black frames in the number and size `load(bounds)` gives, with its metadata, from the header alone: what
        a prompt's token count needs (`atrl train --dry-run`), without decoding a frame."""
        info = self.check(bounds)
        wanted = sample_indices(info, bounds)
        h, w = fit_pixels(info.height, info.width, bounds.max_pixels)
        return _video(np.zeros((len(wanted), h, w, 3), np.uint8), info, self._rate(info, bounds), wanted, "pyav")

    def load(self, bounds: VideoBounds) -> Video:
        """The sampled frames, decoded and scaled to the bounds."""
        info = self.check(bounds)
        wanted = sample_indices(info, bounds)
        if self._is_frames():
            files = self._frame_files()
            frames = []
            for i in wanted:
                try:
                    with Image.open(files[i]) as img:
                        frames.append(_fit(img.convert("RGB"), bounds.max_pixels))
                except (OSError, ValueError) as err:
                    raise VideoError(f"video frame {self._frame_label(files, i)} cannot be read: {err}") from err
            sizes = {f.shape for f in frames}
            if len(sizes) > 1:
                raise VideoError(f"video {self.name}: its frames differ in size ({sorted(sizes)[:3]})")
        else:
            frames = self._decode(wanted, bounds.max_pixels)
        return _video(np.stack(frames), info, self._rate(info, bounds), wanted, "pyav")

    def _decode(self, wanted: list[int], max_pixels: int) -> list[np.ndarray]:
        import av

        keep, frames, decoded = set(wanted), [], 0
        container = self._open()
        try:
            for frame in container.decode(video=0):
                decoded += 1
                if decoded - 1 in keep:
                    frames.append(_fit(frame.to_image(), max_pixels))
                    if len(frames) == len(wanted):
                        break
        except av.FFmpegError as err:
            raise VideoError(f"video {self.name} cannot be decoded after {len(frames)} of its {len(wanted)} sampled "
                             f"frames: {err}") from err
        finally:
            container.close()
        if len(frames) < len(wanted):
            raise VideoError(f"video {self.name}: its header says {wanted[-1] + 1}+ frames, only {decoded} decode; "
                             "the file is cut short or damaged")
        return frames

    def as_feature(self) -> dict[str, Any]:
        """The value for the training set's `videos` column (decoded only when a row is used)."""
        return {"path": self.path, "bytes": self.data, "frames": list(self.frames) if self.frames else None,
                "frame_bytes": list(self.frame_data) if self.frame_data else None, "fps": self.fps}

    @classmethod
    def from_feature(cls, value: dict[str, Any]) -> VideoRef:
        frames, frame_data = value.get("frames"), value.get("frame_bytes")
        return cls(path=value.get("path"), data=value.get("bytes"), frames=tuple(frames) if frames else None,
                   frame_data=tuple(frame_data) if frame_data else None, fps=value.get("fps"))


def decode_video(value: Any, bounds: VideoBounds, where: str = "") -> Video:
    """One item of a `videos` column: {"images": frames, "fps"} (frames already sampled) or a `VideoRef`'s
    feature ({"path", "bytes", "frames"})."""
    if isinstance(value, dict) and value.get("images"):
        images = [f if isinstance(f, Image.Image) else Image.open(f) for f in value["images"]]
        info = VideoInfo(len(images), None, images[0].height, images[0].width)
        keep = sample_indices(info, bounds)  # frames given one by one: thinned to max_frames
        frames = np.stack([_fit(images[i], bounds.max_pixels) for i in keep])
        return _video(frames, info, float(value.get("fps") or bounds.fps), keep, "frames")
    if isinstance(value, dict):
        try:
            return VideoRef.from_feature(value).load(bounds)
        except VideoError as err:
            raise VideoError(f"{where}: {err}" if where else str(err)) from err
    raise VideoError(f"{where}: a video of type {type(value).__name__}; expected a mapping (path / bytes / frames, or "
                    "images and fps)")


def decode_row_videos(row: dict[str, Any], bounds: VideoBounds) -> list[Video]:
    """A data-set row's `videos`, decoded within `bounds`; a failure names the row (its source, else its uid)."""
    where = str(row.get("source") or row.get("uid") or "a row")
    return [decode_video(v, bounds, where) for v in row.get("videos") or []]


def _fit(img: Image.Image, max_pixels: int) -> np.ndarray:
    h, w = fit_pixels(img.height, img.width, max_pixels)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), Image.BICUBIC)
    return np.asarray(img.convert("RGB"))


def write_video(path: str | Path, frames: np.ndarray, fps: float, codec: str = "libx264", crf: int = 18) -> Path:
    """Encode (T, H, W, 3) uint8 frames as a video file at `fps` (H.264 in mp4 by default; even sides, as yuv420p
    needs). For the synthetic task's exports and the tests."""
    import av

    path = Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames of shape {frames.shape}: expected (T, H, W, 3) with even H and W")
    from fractions import Fraction

    # mp4 / mov: the index (moov) first, as for streaming, so a reader knows the frame count from the start
    options = {"movflags": "faststart"} if path.suffix.lower() in (".mp4", ".mov") else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
