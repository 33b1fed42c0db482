"""Turning a :class:`Conversation` into a :class:`Sample` with the checkpoint's processor and chat template.

The conversation is rendered by the processor's chat template (Qwen2.5-VL's: a default system prompt when the
conversation has none, each turn as ``<|im_start|>{role}\\n...<|im_end|>\\n``) and run through the processor, which
expands each image and video pad into one token per merged vision patch and returns the vision tensors.

Labels are assistant-only. They are found on the token ids: every ``<|im_start|>`` followed by the tokens of
``assistant\\n`` opens a reply, and the reply's tokens up to and including the next ``<|im_end|>`` are labelled;
everything else (system and user turns, the ``<|im_start|>assistant\\n`` headers, the newline after each
``<|im_end|>``, vision pads) is ``-100``. The number of replies found must equal the number of assistant turns,
so a reply whose text merges with the header when tokenized (one starting with a newline) or text that contains
chat-template tokens is reported instead of silently mislabelled.
"""

from __future__ import annotations

from typing import Any

import torch

from hybridvl.lit.data.conversations import DataError
from hybridvl.lit.data.types import Conversation, Sample
from hybridvl.models.chat import VISION_KEYS

__all__ = ["IGNORE_INDEX", "count_tokens", "encode"]

IGNORE_INDEX = -100
"""The label of tokens that are not trained on."""


def _render(conversation: Conversation, processor: Any) -> str:
    return processor.apply_chat_template(conversation.messages, tokenize=False)


def _run_processor(conversation: Conversation, processor: Any) -> dict[str, torch.Tensor]:
    """The processor's output for the rendered conversation; processor errors become :class:`DataError`."""
    from transformers.video_utils import VideoMetadata

    images, videos = conversation.images, conversation.videos
    kwargs: dict[str, Any] = {}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = [frames for frames, _ in videos]
        kwargs["video_metadata"] = [VideoMetadata(total_num_frames=len(frames), fps=fps) for frames, fps in videos]
        kwargs["do_sample_frames"] = False
    try:
        return processor(text=[_render(conversation, processor)], return_tensors="pt", **kwargs)
    except ValueError as error:
        raise DataError(f"{conversation.source}: the processor rejected the conversation: {error}") from error


def _assistant_spans(input_ids: torch.Tensor, processor: Any) -> list[tuple[int, int]]:
    """``(start, end)`` of each assistant reply: ``start`` is its first token, ``end`` one past its ``<|im_end|>``."""
    tokenizer = processor.tokenizer
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    header = torch.tensor(tokenizer.encode("assistant\n", add_special_tokens=False), dtype=input_ids.dtype)
    ends = (input_ids == im_end).nonzero().flatten().tolist()
    spans = []
    for position in (input_ids == im_start).nonzero().flatten().tolist():
        start = position + 1 + len(header)
        if not torch.equal(input_ids[position + 1 : start], header):
            continue
        end = next((end for end in ends if end >= start), None)
        spans.append((start, len(input_ids) if end is None else end + 1))
    return spans


def encode(conversation: Conversation, processor: Any, max_length: int | None = None, truncate: bool = False) -> Sample:
    """Tokenize ``conversation`` with ``processor`` into a :class:`Sample` with assistant-only labels.

    Args:
        conversation: messages as :class:`Conversation` describes, ending with an assistant turn.
        processor: the checkpoint's ``Qwen2_5_VLProcessor`` (:func:`hybridvl.models.chat.load_processor`).
        max_length: the most tokens a sample may have; no limit when ``None``.
        truncate: what to do with a longer sample: ``False`` raises :class:`DataError`; ``True`` cuts it to
            ``max_length`` tokens, which is allowed only when the cut falls inside the last assistant reply (the
            prompt, with all vision tokens, is kept whole and at least one reply token is left). The cut reply
            loses its ``<|im_end|>``; ``answer`` stays the whole reference reply.

    Returns:
        The sample: ``input_ids`` and ``labels`` (int64 ``[L]``), ``prompt_length`` (where the last reply's
        content starts, so ``input_ids[:prompt_length]`` is the generation prompt the chat template gives for the
        messages before it), the vision tensors the processor returned, and the conversation's task, answer and
        source.

    Raises:
        DataError: the conversation has no assistant turn, its replies cannot be located on the tokens, the
            processor rejects it, or it is longer than ``max_length`` (and cannot be truncated); the message
            starts with the conversation's source.
    """
    source = conversation.source or "conversation"
    turns = sum(message["role"] == "assistant" for message in conversation.messages)
    if not turns or conversation.messages[-1]["role"] != "assistant":
        raise DataError(f"{source}: the conversation must end with an assistant turn")
    outputs = _run_processor(conversation, processor)
    input_ids = outputs["input_ids"][0].long()
    spans = _assistant_spans(input_ids, processor)
    if len(spans) != turns:
        raise DataError(
            f"{source}: found {len(spans)} assistant replies in the tokens but the conversation has {turns} "
            "(does a reply start with a newline or contain chat-template tokens?)"
        )
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for start, end in spans:
        labels[start:end] = input_ids[start:end]
    tokenizer = processor.tokenizer
    for pad in tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"]):
        labels[input_ids == pad] = IGNORE_INDEX
    prompt_length = spans[-1][0]
    if max_length is not None and len(input_ids) > max_length:
        if not truncate:
            raise DataError(f"{source}: {len(input_ids)} tokens, more than max_length {max_length}")
        if max_length <= prompt_length:
            raise DataError(
                f"{source}: {len(input_ids)} tokens, more than max_length {max_length}, and cannot be truncated: "
                f"the prompt before the last reply alone is {prompt_length} tokens"
            )
        input_ids, labels = input_ids[:max_length].clone(), labels[:max_length].clone()
    return Sample(
        input_ids=input_ids,
        labels=labels,
        prompt_length=prompt_length,
        vision={key: outputs[key] for key in VISION_KEYS if key in outputs},
        task=conversation.task,
        answer=conversation.answer,
        source=conversation.source,
    )


def _video_tokens(processor: Any, frames: int, height: int, width: int) -> int:
    """Tokens of a video of ``frames`` sampled frames, as the video processor resizes and patches it."""
    video_processor = processor.video_processor
    size = video_processor.size
    max_pixels = size["longest_edge"]
    if getattr(video_processor, "cap_pixels_per_frame", None):
        # Qwen2VLVideoProcessor.resize bounds each frame by an even share of max_video_tokens;
        # get_num_of_video_patches does not, so the bound is applied here
        factor = video_processor.patch_size * video_processor.merge_size
        total_pixels = int(video_processor.max_video_tokens * factor * factor * 0.9)
        share = total_pixels * video_processor.temporal_patch_size // frames
        max_pixels = max(min(max_pixels, share), int(size["shortest_edge"] * 1.05))
    bounds = {"size": {"shortest_edge": size["shortest_edge"], "longest_edge": max_pixels}}
    patches = video_processor.get_num_of_video_patches(frames, height, width, bounds)
    return patches // video_processor.merge_size**2


def count_tokens(conversation: Conversation, processor: Any) -> int:
    """``len(encode(conversation, processor))`` without processing pixels (before any truncation).

    The text is rendered and tokenized; each image and video adds the tokens the processor would expand its pad
    into, computed from its size. Media items may be decoded (as :meth:`ConversationDataset.__getitem__`
    gives them) or outlines (``{"type": "image", "image_size": (height, width)}``, ``{"type": "video",
    "video_shape": (frames, height, width)}``, as :meth:`ConversationDataset.outline` gives them), so lengths
    for a whole dataset cost one header read per media file.
    """
    tokens = len(processor.tokenizer(_render(conversation, processor))["input_ids"])
    merge = processor.image_processor.merge_size
    for message in conversation.messages:
        for item in message["content"]:
            if item["type"] == "image":
                height, width = item["image_size"] if "image_size" in item else item["image"].size[::-1]
                tokens += processor.image_processor.get_number_of_image_patches(height, width, {}) // merge**2 - 1
            elif item["type"] == "video":
                if "video_shape" in item:
                    frames, height, width = item["video_shape"]
                else:
                    frames, _, height, width = item["video"].shape
                tokens += _video_tokens(processor, frames, height, width) - 1
    return tokens
