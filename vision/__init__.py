"""The Qwen2.5-VL vision front end: vision tower, image and video preprocessing, frame streaming.

Names are imported on first use, so that a model (``hybridvl.vision.tower``) does not load the preprocessing stack.
"""

import importlib
from typing import Any

_EXPORTS = {
    "VideoInfo": "hybridvl.vision.video",
    "VisionInputError": "hybridvl.vision.video",
    "VisionPreprocessor": "hybridvl.vision.processing",
    "build_vision_tower": "hybridvl.vision.tower",
    "iter_video_frames": "hybridvl.vision.video",
    "load_image": "hybridvl.vision.video",
    "probe_video": "hybridvl.vision.video",
    "read_video": "hybridvl.vision.video",
    "vision_inputs": "hybridvl.vision.tower",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vision' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
