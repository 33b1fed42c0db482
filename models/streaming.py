"""Streaming: feed a video frame by frame (or images, or text) into the model's fixed-size state, and ask
questions at any point without disturbing the stream.

Every frame goes through the vision tower as one image (the processor's patches, 2x2 merge) and through the
decoder into the state, the way InfiniteVL streams; the first input opens a user turn of the chat template.
A question forks the state (:meth:`ModelState.clone`), closes the user turn on the fork, generates the answer
and drops the fork: the stream's own state is untouched. With no full-attention (``A``) layer the state's size
never changes, however long the stream.

.. code-block:: python

    session = StreamingSession(model, processor)
    for timestamp, frame in iter_video_frames("match.mp4", fps=2):
        session.feed_frame(frame)
        if timestamp == 30.0:
            print(session.ask("Who scored?"))
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from PIL import Image

from models.hybrid import HybridVLM, ModelState


@dataclasses.dataclass
class Answer:
    """An answer and what it cost."""

    text: str
    tokens: int
    seconds: float


class StreamingSession:
    """A running stream over one sequence.

    Args:
        model: the hybrid model (evaluation mode is set).
        processor: its Qwen2.5-VL processor (tokenizer, chat template, image processor).
        system_prompt: the system turn that opens the stream.
    """

    def __init__(self, model: HybridVLM, processor: Any, system_prompt: str = "You are a helpful assistant.") -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = model.lm_head.weight.device
        self.state: ModelState | None = None
        self.frames = 0
        self.tokens = 0
        self._opening = f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n"

    @torch.no_grad()
    def _advance(self, text: str, images: list[Image.Image] | None = None) -> None:
        if self.state is None:
            text = self._opening + text
        inputs = self.processor(text=[text], images=images, return_tensors="pt")
        vision = {k: inputs[k].to(self.device) for k in ("pixel_values", "image_grid_thw") if k in inputs}
        out = self.model(inputs["input_ids"].to(self.device), state=self.state, logits_to_keep=1, **vision)
        self.state = out.state
        self.tokens += inputs["input_ids"].shape[1]

    def feed_frame(self, frame: torch.Tensor | Image.Image) -> None:
        """Add one video frame (uint8 ``[3, H, W]`` or a PIL image) to the stream."""
        if isinstance(frame, torch.Tensor):
            if frame.dtype != torch.uint8 or frame.dim() != 3 or frame.shape[0] != 3:
                raise ValueError(f"a frame must be a uint8 tensor [3, H, W], got {frame.dtype} {tuple(frame.shape)}")
            frame = Image.fromarray(frame.permute(1, 2, 0).cpu().numpy())
        self._advance("<|vision_start|><|image_pad|><|vision_end|>", [frame])
        self.frames += 1

    def feed_text(self, text: str) -> None:
        """Add text (a subtitle, a remark) to the stream."""
        self._advance(text)

    @torch.no_grad()
    def ask(self, question: str, max_new_tokens: int = 64) -> Answer:
        """Answer ``question`` about everything streamed so far; the stream itself is left as it was."""
        start = time.perf_counter()
        fork = None if self.state is None else self.state.clone()
        prompt = (self._opening if fork is None else "") + f"{question}<|im_end|>\n<|im_start|>assistant\n"
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.device)
        tokens = self.model.generate(ids, state=fork, max_new_tokens=max_new_tokens)
        text = self.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
        return Answer(text, tokens.shape[1], time.perf_counter() - start)

    @property
    def state_bytes(self) -> int:
        """Memory held by the stream's state."""
        return 0 if self.state is None else self.state.nbytes
