"""The Qwen2.5-VL vision front end: vision tower, image and video preprocessing, frame streaming.

Names are imported on first use, so that a model (``vision.tower``) does not load the preprocessing stack.
"""

import importlib
from typing import Any

_EXPORTS = {
    "VideoInfo": "vision.video",
    "VisionInputError": "vision.video",
    "VisionPreprocessor": "vision.processing",
    "build_vision_tower": "vision.tower",
    "iter_video_frames": "vision.video",
    "load_image": "vision.video",
    "probe_video": "vision.video",
    "read_video": "vision.video",
    "vision_inputs": "vision.tower",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vision' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
