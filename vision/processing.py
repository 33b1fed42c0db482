"""Qwen2.5-VL image and video preprocessing, done by transformers' own Qwen2-VL processors.

Qwen2.5-VL uses the Qwen2-VL processors unchanged: each image (or video, per frame) is resized by
``smart_resize`` so both sides are multiples of ``patch_size * merge_size`` and its area lies in
``[min_pixels, max_pixels]``, normalised with the CLIP mean and std, and cut into ``patch_size`` squares that
span ``temporal_patch_size`` frames (an image is repeated to fill them; a video with a frame count that is not a
multiple is padded by repeating its last frame). Every ``merge_size x merge_size`` block of patches becomes one
language-model token. ``VisionPreprocessor`` holds those settings and calls ``Qwen2VLImageProcessor`` and
``Qwen2VLVideoProcessor`` with them, so its tensors are the ones transformers produces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any

import torch
from PIL import Image
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

__all__ = ["VisionPreprocessor"]


@dataclass(frozen=True)
class VisionPreprocessor:
    """Qwen2.5-VL preprocessing settings, and the image and video preprocessing they define.

    Attributes:
        min_pixels: smallest image area after resizing (transformers' default, 56 * 56).
        max_pixels: largest image area after resizing; 1344 * 1344 lets images keep up to 1344 x 1344 pixels.
        video_min_pixels: smallest frame area after resizing (transformers' video default, 128 * 28 * 28).
        video_max_pixels: largest frame area after resizing (transformers' video default, 768 * 28 * 28).
        patch_size: side of a vision-transformer patch, in pixels.
        merge_size: side of the block of patches merged into one language-model token.
        temporal_patch_size: frames per patch.
        cap_video_pixels: also bound a whole video's pixels as the reference implementation (qwen-vl-utils)
            does (transformers' ``cap_pixels_per_frame``): long videos get smaller frames.
    """

    min_pixels: int = Qwen2VLImageProcessor.size["shortest_edge"]
    max_pixels: int = 1344 * 1344
    video_min_pixels: int = Qwen2VLVideoProcessor.size["shortest_edge"]
    video_max_pixels: int = Qwen2VLVideoProcessor.size["longest_edge"]
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    cap_video_pixels: bool = True

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            # Annotations are strings here (postponed evaluation).
            if field.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{field.name} must be a positive integer, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        if self.video_min_pixels > self.video_max_pixels:
            raise ValueError(
                f"video_min_pixels ({self.video_min_pixels}) exceeds video_max_pixels ({self.video_max_pixels})"
            )

    def _patch_settings(self) -> dict[str, int]:
        return {
            "patch_size": self.patch_size,
            "merge_size": self.merge_size,
            "temporal_patch_size": self.temporal_patch_size,
        }

    def build_image_processor(self) -> Qwen2VLImageProcessor:
        """A new transformers image processor with these settings."""
        size = {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}
        return Qwen2VLImageProcessor(size=size, **self._patch_settings())

    def build_video_processor(self) -> Qwen2VLVideoProcessor:
        """A new transformers video processor with these settings; it expects frames already sampled."""
        size = {"shortest_edge": self.video_min_pixels, "longest_edge": self.video_max_pixels}
        return Qwen2VLVideoProcessor(
            size=size, cap_pixels_per_frame=self.cap_video_pixels, do_sample_frames=False, **self._patch_settings()
        )

    def build_processor(self, tokenizer: Any, chat_template: str | None = None) -> Qwen2_5_VLProcessor:
        """A Qwen2.5-VL processor pairing ``tokenizer`` with new image and video processors with these settings."""
        return Qwen2_5_VLProcessor(
            image_processor=self.build_image_processor(),
            tokenizer=tokenizer,
            video_processor=self.build_video_processor(),
            chat_template=chat_template,
        )

    @cached_property
    def _image_processor(self) -> Qwen2VLImageProcessor:
        return self.build_image_processor()

    @cached_property
    def _video_processor(self) -> Qwen2VLVideoProcessor:
        return self.build_video_processor()

    def images(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Preprocess images (any mode; converted to RGB) for the vision tower.

        Returns:
            ``pixel_values``: float32 ``[num_patches, 3 * temporal_patch_size * patch_size**2]``, the images'
            patches one after another; ``image_grid_thw``: int64 ``[num_images, 3]``, each image's
            ``(1, height, width)`` in patches.
        """
        if not images:
            raise ValueError("images() needs at least one image")
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{index}] is a {type(image).__name__}, expected a PIL.Image.Image")
        return dict(self._image_processor(list(images), return_tensors="pt"))

    def video(self, frames: torch.Tensor, fps: float) -> dict[str, torch.Tensor]:
        """Preprocess one video's frames, sampled ``fps`` times per second, for the vision tower.

        Args:
            frames: uint8 ``[T, 3, H, W]`` RGB frames; ``T`` need not be a multiple of ``temporal_patch_size``
                (the last frame is repeated, as transformers does).
            fps: the rate the frames were sampled at.

        Returns:
            ``pixel_values_videos``: float32 ``[num_patches, 3 * temporal_patch_size * patch_size**2]``;
            ``video_grid_thw``: int64 ``[1, 3]``, ``(time, height, width)`` in patches;
            ``second_per_grid_ts``: float32 ``[1]``, seconds per temporal patch, ``temporal_patch_size / fps``
            as ``Qwen2_5_VLProcessor`` computes it.
        """
        _check_frames(frames)
        if not 0 < fps < math.inf:
            raise ValueError(f"fps must be a positive finite number, got {fps}")
        batch = self._video_processor([frames], input_data_format="channels_first", return_tensors="pt")
        second_per_grid_ts = torch.tensor([self.temporal_patch_size / fps], dtype=torch.float32)
        return {**batch, "second_per_grid_ts": second_per_grid_ts}

    def num_tokens(self, grid_thw: torch.Tensor | Sequence[int] | Sequence[Sequence[int]]) -> int:
        """Language-model tokens for a ``(t, h, w)`` patch grid: ``t * h * w / merge_size**2``.

        ``grid_thw`` is one grid (three numbers) or a ``[N, 3]`` tensor such as ``image_grid_thw``, whose tokens
        are summed.
        """
        grid = torch.as_tensor(grid_thw, dtype=torch.long)
        if grid.ndim not in (1, 2) or grid.shape[-1] != 3:
            raise ValueError(f"grid_thw must have shape [3] or [N, 3], got {list(grid.shape)}")
        patches = grid.reshape(-1, 3).prod(dim=-1)
        if (patches % self.merge_size**2).any():
            raise ValueError(
                f"grid_thw {grid.tolist()} is not made of whole {self.merge_size}x{self.merge_size} blocks"
            )
        return int(patches.sum()) // self.merge_size**2


def _check_frames(frames: torch.Tensor) -> None:
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
        raise ValueError(
            f"frames must be a non-empty uint8 tensor [T, 3, H, W], got {frames.dtype} {list(frames.shape)}"
        )
