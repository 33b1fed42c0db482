"""Small synthetic images and videos for tests: rendered with PIL, encoded with PyAV, nothing downloaded.

``make_test_video`` writes frames that carry their own index twice: as a bar code of ``INDEX_BITS`` black or
white cells across the top quarter (read back with ``frame_index``, robust to lossy compression) and as text
next to a square that moves one step per frame (for people looking at the frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

INDEX_BITS = 8
"""Bits of the frame index drawn into each test frame: videos of up to 256 frames can be told apart."""


def render_text_image(text: str, size: tuple[int, int] = (448, 448)) -> Image.Image:
    """An RGB image of ``size`` (width, height): ``text`` in PIL's default font over a few coloured shapes."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 16, height // 16, width // 2, height // 3), fill=(200, 30, 30))
    draw.ellipse((width // 2, height // 2, width - width // 16, height - height // 16), fill=(30, 90, 200))
    draw.line((0, height - 1, width - 1, 0), fill=(20, 150, 60), width=max(1, width // 64))
    font = ImageFont.load_default(size=max(8, height // 10))
    draw.text((width // 16, height // 2), text, fill="black", font=font)
    return image


def _frame_arrays(frames: torch.Tensor | Sequence[Image.Image]) -> list[np.ndarray]:
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected a uint8 tensor [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        return list(frames.numpy())
    return [np.asarray(image.convert("RGB")) for image in frames]


def _codec_name() -> str:
    import av

    return "h264" if "h264" in av.codecs_available else "mpeg4"


def write_video(path: str | Path, frames: torch.Tensor | Sequence[Image.Image], fps: float) -> Path:
    """Encode ``frames`` (uint8 ``[T, H, W, 3]`` or PIL images, even sides) as an mp4 at ``fps``; returns the path.

    The codec is H.264 where PyAV has it, MPEG-4 part 2 otherwise; frame ``i`` is shown at ``i / fps`` seconds.
    """
    arrays = _frame_arrays(frames)
    if not arrays:
        raise ValueError("write_video needs at least one frame")
    height, width = arrays[0].shape[:2]
    path = Path(path)
    import av  # here, so that test modules using only the images import where PyAV is not installed

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(_codec_name(), rate=Fraction(fps).limit_denominator(100_000))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for array in arrays:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return path


def _index_frame(index: int, size: tuple[int, int], num_frames: int) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    cell = width / INDEX_BITS
    for bit in range(INDEX_BITS):
        colour = "white" if index >> bit & 1 else "black"
        draw.rectangle((round(bit * cell), 0, round((bit + 1) * cell) - 1, height // 4 - 1), fill=colour)
    side = max(4, height // 8)
    x = round((width - side) * index / max(1, num_frames - 1))
    draw.rectangle((x, height // 2, x + side - 1, height // 2 + side - 1), fill=(220, 40, 40))
    draw.text((2, height // 4 + 2), str(index), fill="black", font=ImageFont.load_default(size=max(8, height // 6)))
    return image


def make_test_video(path: str | Path, num_frames: int, size: tuple[int, int] = (64, 48), fps: float = 10.0) -> Path:
    """Write ``num_frames`` frames of ``size`` (width, height) at ``fps`` whose pixels encode their index."""
    if not 0 < num_frames <= 2**INDEX_BITS:
        raise ValueError(f"num_frames must be in [1, {2**INDEX_BITS}], got {num_frames}")
    return write_video(path, [_index_frame(index, size, num_frames) for index in range(num_frames)], fps)


def frame_index(frame: torch.Tensor) -> int:
    """The index ``make_test_video`` drew into ``frame`` (uint8 ``[3, H, W]``), read from its bar code."""
    _, height, width = frame.shape
    luma = frame.float().mean(dim=0)
    centres = [round((bit + 0.5) * width / INDEX_BITS) for bit in range(INDEX_BITS)]
    return sum(1 << bit for bit, x in enumerate(centres) if luma[height // 8, x] > 128)
