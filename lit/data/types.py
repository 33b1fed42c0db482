"""The data types every source and stage share.

A source yields :class:`Conversation` objects (messages with decoded media); :func:`hybridvl.lit.data.encoding.encode`
turns one into a :class:`Sample` (tokens, assistant-only labels, vision tensors) with the checkpoint's
processor; :func:`hybridvl.lit.data.packing.pack` concatenates samples into a :class:`PackedBatch` that the model
runs as one packed row (``cu_seqlens``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from PIL import Image


@dataclasses.dataclass
class Conversation:
    """One multi-turn conversation with its media decoded.

    Attributes:
        messages: ``[{"role": "system" | "user" | "assistant", "content": [item, ...]}, ...]`` with items
            ``{"type": "text", "text": str}``, ``{"type": "image", "image": PIL.Image}`` or
            ``{"type": "video", "video": uint8 tensor [T, 3, H, W], "fps": float}`` (frames already sampled).
        task: a name used to group metrics (``"ocr"``, ``"counting"``, ...).
        answer: the reference answer of the last assistant turn, for generation-based metrics.
        source: where it came from (``"data.json:17"``), quoted in errors.
        meta: facts about the sample to group metrics by, such as the lines of a synthetic ``document`` page that
            hold the answer or the frames between a ``video_memory`` cue and the question (see
            :mod:`hybridvl.lit.data.synthetic`); empty when the source records none.
    """

    messages: list[dict]
    task: str = "conversation"
    answer: str | None = None
    source: str = ""
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def images(self) -> list[Image.Image]:
        return [item["image"] for item in self._items("image")]

    @property
    def videos(self) -> list[tuple[torch.Tensor, float]]:
        return [(item["video"], float(item.get("fps", 2.0))) for item in self._items("video")]

    def _items(self, kind: str) -> list[dict]:
        return [item for message in self.messages for item in message["content"] if item["type"] == kind]


@dataclasses.dataclass
class Sample:
    """One tokenized conversation.

    Attributes:
        input_ids: ``[L]`` tokens with image/video placeholders expanded.
        labels: ``[L]``: the token itself on assistant turns (answers and their end token), ``-100`` elsewhere.
        prompt_length: tokens before the last assistant answer (``input_ids[:prompt_length]`` is the prompt to
            generate from).
        vision: ``pixel_values``, ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``,
            ``second_per_grid_ts`` as the processor returns them (only the present ones).
        task, answer, source: copied from the conversation.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    prompt_length: int
    vision: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    task: str = "conversation"
    answer: str | None = None
    source: str = ""

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclasses.dataclass
class PackedBatch:
    """Samples concatenated into one row.

    Attributes:
        input_ids, labels: ``[1, total]``; ``labels`` is ``-100`` on each sample's first token, so no sample
            learns to predict across a boundary.
        cu_seqlens: ``[N + 1]`` sample boundaries.
        vision: the samples' vision tensors concatenated in order.
        samples: the samples themselves (for generation-based validation).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    vision: dict[str, torch.Tensor]
    samples: list[Sample]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device: torch.device | str) -> PackedBatch:
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            labels=self.labels.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            vision={k: v.to(device) for k, v in self.vision.items()},
        )
