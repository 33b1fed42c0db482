"""The Qwen2.5-VL vision front end: vision tower, image and video preprocessing, frame streaming."""
