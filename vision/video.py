"""Reading images and videos from files: PIL for images, PyAV (FFmpeg) for videos.

Videos are sampled at a chosen rate by the nearest-frame rule: with ``t0`` the time of the first decoded frame,
the sample times are ``t0 + k / fps`` for ``k = 0, 1, ...`` before the end of the video (the last frame's time
plus one frame interval of the video's own rate), and each sample time takes the decoded frame whose
presentation time is nearest to it, the earlier frame on a tie. Sampling faster than the video's own frame rate
therefore repeats frames, so the samples stay ``1 / fps`` apart as Qwen2.5-VL's temporal positions assume (a log
line says so, once per file).
Frames are decoded in order and converted to tensors only when sampled; ``iter_video_frames`` holds one decoded
frame at a time. Rotation metadata is not applied: frames come out as stored.

Every file problem (missing, not a regular file, empty, not decodable, no video stream, no frames, fewer frames
decoded than the container promises) raises ``VisionInputError``, whose message starts with the file's path. A
truncated file often decodes without an FFmpeg error, only shorter: so after decoding, the frames are checked
against the stream's frame count (MP4, MOV, AVI store one) or, where the container stores none (Matroska), against
its duration, less one frame interval.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Generator, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:  # PyAV is imported where videos are read, so image-only users never load FFmpeg
    from av.container import InputContainer
    from av.video.frame import VideoFrame
    from av.video.stream import VideoStream

__all__ = ["VideoInfo", "VisionInputError", "iter_video_frames", "load_image", "probe_video", "read_video"]

PathLike = str | os.PathLike[str]
logger = logging.getLogger("hybridvl.vision")
_OVERSAMPLED: set[Path] = set()
"""Videos sampled above their own frame rate, already logged."""


class VisionInputError(ValueError):
    """An image or video file that is missing, empty or cannot be decoded.

    Attributes:
        path: the file.
        problem: what is wrong with it; the message is ``"{path}: {problem}"``.
    """

    def __init__(self, path: PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class VideoInfo:
    """What a video file's headers say about its first video stream.

    Attributes:
        fps: average frame rate, frames per second.
        duration: length in seconds.
        num_frames: number of frames (counted from the packets when the container does not store it).
        width: frame width in pixels.
        height: frame height in pixels.
    """

    fps: float
    duration: float
    num_frames: int
    width: int
    height: int


def _existing_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise VisionInputError(path, "no such file")
    if not path.is_file():
        raise VisionInputError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VisionInputError(path, "file is empty (0 bytes)")
    return path


def _sample_step(fps: float) -> Fraction:
    """Seconds between samples, exactly (so that ties in the nearest-frame rule are real ties)."""
    if not 0 < fps < math.inf:
        raise ValueError(f"fps must be a positive finite number, got {fps}")
    return 1 / Fraction(fps)


@contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """Turn FFmpeg and OS errors raised while reading ``path`` into ``VisionInputError``."""
    import av

    try:
        yield
    except (av.error.FFmpegError, OSError) as error:
        raise VisionInputError(path, f"not a readable video: {error.strerror or error}") from error


@contextmanager
def _open_video(path: Path) -> Iterator[tuple[InputContainer, VideoStream]]:
    """Open ``path`` and its first video stream; errors while the block runs become ``VisionInputError``."""
    import av

    with _decoding(path), av.open(str(path)) as container:
        if not container.streams.video:
            raise VisionInputError(path, "has no video stream")
        yield container, container.streams.video[0]


def _frame_rate(stream: VideoStream, path: Path) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        raise VisionInputError(path, "video stream has no known frame rate")
    return Fraction(rate)


def _count_frames(container: InputContainer, stream: VideoStream) -> int:
    return stream.frames or sum(1 for packet in container.demux(stream) if packet.size)


def _duration(container: InputContainer, stream: VideoStream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        from av import time_base

        return container.duration / time_base
    return None


def probe_video(path: PathLike) -> VideoInfo:
    """Read the frame rate, duration, frame count and size of the first video stream in ``path``.

    Raises:
        VisionInputError: the file is missing, empty, not a video, or its video stream has no frames.
    """
    path = _existing_file(path)
    with _open_video(path) as (container, stream):
        fps = _frame_rate(stream, path)
        width, height = stream.codec_context.width, stream.codec_context.height
        num_frames = _count_frames(container, stream)
        duration = _duration(container, stream)
    if num_frames == 0:
        raise VisionInputError(path, "contains no video frames")
    return VideoInfo(
        fps=float(fps),
        duration=duration if duration is not None else num_frames / float(fps),
        num_frames=num_frames,
        width=width,
        height=height,
    )


def _frame_tensor(frame: VideoFrame) -> torch.Tensor:
    return torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).contiguous()


@dataclass
class _Decoded:
    """How far decoding got: frames decoded and the presentation times of the first and the latest."""

    frames: int = 0
    first: Fraction | None = None
    last: Fraction | None = None


def _timed_frames(
    frames: Iterable[VideoFrame], interval: Fraction, decoded: _Decoded
) -> Iterator[tuple[Fraction, VideoFrame]]:
    """Pair each frame with its presentation time (frames without one are placed ``interval`` apart), counting
    them in ``decoded``."""
    for index, frame in enumerate(frames):
        known = frame.pts is not None and frame.time_base is not None
        time = frame.pts * frame.time_base if known else index * interval
        decoded.frames += 1
        decoded.first = time if decoded.first is None else min(decoded.first, time)
        decoded.last = time if decoded.last is None else max(decoded.last, time)
        yield time, frame


def _check_complete(
    path: Path, container: InputContainer, stream: VideoStream, decoded: _Decoded, interval: Fraction
) -> None:
    """Raise unless decoding gave every frame the container promises (see the module docstring)."""
    if stream.frames:
        if decoded.frames < stream.frames:
            raise VisionInputError(
                path,
                f"truncated or corrupt: decoded {decoded.frames} of the {stream.frames} frames its header lists",
            )
        return
    duration = _duration(container, stream) if stream.duration or len(container.streams) == 1 else None
    if duration is not None and decoded.last + interval - decoded.first < duration - interval:
        raise VisionInputError(
            path,
            f"truncated or corrupt: decoded {float(decoded.last + interval - decoded.first):.2f} s of the "
            f"{duration:.2f} s its header promises",
        )


def _nearest_frames(
    frames: Iterable[tuple[Fraction, VideoFrame]], step: Fraction, interval: Fraction
) -> Iterator[tuple[Fraction, VideoFrame]]:
    """Apply the nearest-frame rule to time-ordered ``frames``; the last one is shown for ``interval``."""
    frames = iter(frames)
    previous = next(frames, None)
    if previous is None:
        return
    sample = previous[0]
    for time, frame in frames:
        while sample <= (previous[0] + time) / 2:
            yield previous
            sample += step
        previous = time, frame
    while sample < previous[0] + interval:
        yield previous
        sample += step


def _sampled_frames(path: Path, step: Fraction) -> Generator[tuple[float, torch.Tensor], None, None]:
    with _open_video(path) as (container, stream):
        stream.thread_type = "AUTO"
        interval = 1 / _frame_rate(stream, path)
        decoded = _Decoded()
        for time, frame in _nearest_frames(_timed_frames(container.decode(stream), interval, decoded), step, interval):
            yield float(time), _frame_tensor(frame)
        if not decoded.frames:
            raise VisionInputError(path, "contains no decodable video frames")
        _check_complete(path, container, stream, decoded, interval)


def iter_video_frames(path: PathLike, fps: float = 2.0) -> Generator[tuple[float, torch.Tensor], None, None]:
    """Decode ``path`` lazily, yielding ``(time in seconds, uint8 frame [3, H, W])`` sampled at ``fps``.

    Frames are chosen by the nearest-frame rule in the module docstring; the time is the chosen frame's
    presentation time. Only the frame being decoded and the last one are held, so arbitrarily long videos stream
    in constant memory. Close the generator (or exhaust it) to release the file.

    Raises:
        ValueError: ``fps`` is not a positive finite number.
        VisionInputError: at the call, the file is missing, empty or not a video; while iterating, its data is
            corrupt, it contains no frames or (after the last frame) fewer than its container promises.
    """
    step = _sample_step(fps)
    path = _existing_file(path)
    with _open_video(path) as (_, stream):
        rate = _frame_rate(stream, path)
    if fps > rate and path not in _OVERSAMPLED:  # once per file: a data set reads each video every epoch
        _OVERSAMPLED.add(path)
        logger.info(
            "%s: sampling at %g fps, above the video's own %g fps, repeats each frame about %.1f times; "
            "give at most fps=%g for distinct frames",
            path,
            fps,
            float(rate),
            fps / float(rate),
            float(rate),
        )
    return _sampled_frames(path, step)


def read_video(path: PathLike, fps: float = 2.0, max_frames: int | None = None) -> tuple[torch.Tensor, list[float]]:
    """Decode ``path`` sampled at ``fps`` (see the module docstring for the rule).

    Args:
        path: the video file.
        fps: samples per second.
        max_frames: keep at most this many samples, the earliest; all of them when ``None``.

    Returns:
        The frames as a uint8 tensor ``[T, 3, H, W]`` and each frame's presentation time in seconds.

    Raises:
        ValueError: ``fps`` is not a positive finite number or ``max_frames`` is less than 1.
        VisionInputError: the file is missing, empty, corrupt, truncated, not a video or has no frames.
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be at least 1 or None, got {max_frames}")
    with closing(iter_video_frames(path, fps)) as samples:
        # never empty: a video without frames raises VisionInputError instead
        times, frames = zip(*islice(samples, max_frames))
    return torch.stack(frames), list(times)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white as transformers' ``convert_to_rgb`` does."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image.convert("RGB")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


def load_image(path: PathLike) -> Image.Image:
    """Load the image at ``path`` fully into memory as RGB (transparency composited onto white).

    The first frame of animated formats is used; EXIF orientation is not applied, as in qwen-vl-utils.

    Raises:
        VisionInputError: the file is missing, empty, truncated or not an image PIL can read.
    """
    path = _existing_file(path)
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise VisionInputError(path, f"not a readable image: {error}") from error
