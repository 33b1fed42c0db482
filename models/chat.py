"""Building model inputs from a prompt and media with the checkpoint's own processor and chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def load_processor(directory: str | Path) -> Any:
    """The Qwen2.5-VL processor (tokenizer, chat template, image and video processors) saved in ``directory``."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.utils import logging as hf_logging

    # transformers reads the directory's config.json, which is hybridvl's own, and warns about its model type
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return Qwen2_5_VLProcessor.from_pretrained(directory, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)


def check_no_placeholders(processor: Any, text: str, what: str) -> None:
    """Raise ``ValueError`` if ``text`` holds the processor's image or video placeholder token: the processor puts
    one in for each image or video given, so one typed into the text stands for media that was never given."""
    for token in (processor.image_token, processor.video_token):
        if token in text:
            raise ValueError(
                f"{what} holds the placeholder {token}, which stands for an image or video the processor places "
                f"itself for each one given; remove it from {what}"
            )


def chat_inputs(
    processor: Any,
    prompt: str,
    images: list[Image.Image] = (),
    videos: list[tuple[torch.Tensor, float]] = (),
    add_generation_prompt: bool = True,
) -> dict[str, torch.Tensor]:
    """One user turn (images, then videos, then the prompt) through ``processor.apply_chat_template``.

    Args:
        processor: a transformers ``Qwen2_5_VLProcessor`` (``AutoProcessor.from_pretrained(model_dir)``).
        images: PIL images.
        videos: ``(frames uint8 [T, 3, H, W], fps)`` pairs, frames already sampled at ``fps``.

    Returns:
        ``input_ids``, ``attention_mask`` and the vision tensors the model takes.
    """
    from transformers.video_utils import VideoMetadata

    check_no_placeholders(processor, prompt, "the prompt")
    content = [{"type": "image", "image": image} for image in images]
    content += [{"type": "video", "video": frames} for frames, _ in videos]
    content.append({"type": "text", "text": prompt})
    metadata = [VideoMetadata(total_num_frames=len(frames), fps=fps) for frames, fps in videos]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=add_generation_prompt,
        processor_kwargs={"video_metadata": metadata, "do_sample_frames": False} if videos else {},
    )


def vision_kwargs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tensors of a processor output, as :class:`hybridvl.models.hybrid.HybridVLM` takes them."""
    return {key: inputs[key] for key in VISION_KEYS if key in inputs}
