"""The Qwen2.5-VL vision front end: vision tower, image and video preprocessing, frame streaming."""

from vision.processing import VisionPreprocessor
from vision.video import VideoInfo, VisionInputError, iter_video_frames, load_image, probe_video, read_video

__all__ = [
    "VideoInfo",
    "VisionInputError",
    "VisionPreprocessor",
    "iter_video_frames",
    "load_image",
    "probe_video",
    "read_video",
]
