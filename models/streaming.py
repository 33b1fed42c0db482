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

from hybridvl.models.cache import ModelState
from hybridvl.models.chat import check_no_placeholders
from hybridvl.models.cuda_graphs import GraphedDecoder, GraphedFramePrefill
from hybridvl.models.generation import check_generation_options, generate
from hybridvl.models.hybrid import HybridVLM


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
        cuda_graphs: feed frames by replaying a CUDA graph per frame size (vision tower and decoder) and
            decode answers with one (:mod:`hybridvl.models.cuda_graphs`); needs a CUDA model with a fixed-size state.
        compile: the graphs capture the forward compiled by ``torch.compile`` (fewer, fused kernels per frame and
            per token; the first frame of each size and the first answer take longer); needs ``cuda_graphs``.
    """

    def __init__(
        self,
        model: HybridVLM,
        processor: Any,
        system_prompt: str = "You are a helpful assistant.",
        cuda_graphs: bool = False,
        compile: bool = False,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = model.lm_head.weight.device
        self.state: ModelState | None = None
        self.frames = 0
        self.tokens = 0
        self._opening = f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n"
        self.cuda_graphs = cuda_graphs
        if compile and not cuda_graphs:
            raise ValueError("compile=True compiles the forward the CUDA graphs capture: it needs cuda_graphs=True")
        self.compile = compile
        if cuda_graphs:
            if self.device.type != "cuda":
                raise ValueError(f"cuda_graphs=True needs the model on a CUDA device; it is on {self.device}")
            if "A" in model.kinds:
                raise ValueError(
                    "streaming with CUDA graphs needs a fixed-size state; the layout has full-attention (A) layers"
                )
            self._static = model.init_state(1, self.device)  # the stream's state while graphs run
        self._frame_graphs: dict[tuple[int, int, int], GraphedFramePrefill] = {}
        self._decoder: GraphedDecoder | None = None

    @torch.no_grad()
    def _advance(self, text: str, images: list[Image.Image] | None = None) -> None:
        if self.state is None:
            text = self._opening + text
        inputs = self.processor(text=[text], images=images, return_tensors="pt")
        self.tokens += inputs["input_ids"].shape[1]
        graph = self._frame_graph(inputs) if self.cuda_graphs and images else None
        if graph is not None:
            graph.feed(inputs["pixel_values"].to(self.device, graph.pixel_values.dtype))
            return
        vision = {k: inputs[k].to(self.device) for k in ("pixel_values", "image_grid_thw") if k in inputs}
        out = self.model(inputs["input_ids"].to(self.device), state=self.state, logits_to_keep=1, **vision)
        self.state = out.state
        if self.cuda_graphs:  # keep the stream in the graphs' static state
            self._static_load(out.state)

    def _static_load(self, state: ModelState) -> None:
        if state is not self._static:
            self._static.copy_(state)
        self.state = self._static

    def _frame_graph(self, inputs: Any) -> GraphedFramePrefill | None:
        """The graph for this frame's size; ``None`` for the stream's first input (it carries the opening text)."""
        if self.state is None:
            return None
        grid = tuple(int(n) for n in inputs["image_grid_thw"][0])
        if grid not in self._frame_graphs:
            self._frame_graphs[grid] = GraphedFramePrefill(self.model, grid, state=self._static, compile=self.compile)
        return self._frame_graphs[grid]

    def feed_frame(self, frame: torch.Tensor | Image.Image) -> None:
        """Add one video frame (uint8 ``[3, H, W]`` or a PIL image) to the stream."""
        if isinstance(frame, torch.Tensor):
            if frame.dtype != torch.uint8 or frame.dim() != 3 or frame.shape[0] != 3:
                raise ValueError(f"a frame must be a uint8 tensor [3, H, W], got {frame.dtype} {tuple(frame.shape)}")
            frame = Image.fromarray(frame.permute(1, 2, 0).cpu().numpy())
        elif not isinstance(frame, Image.Image):
            raise TypeError(f"a frame must be a uint8 tensor [3, H, W] or a PIL image, got {type(frame).__name__}")
        self._advance("<|vision_start|><|image_pad|><|vision_end|>", [frame])
        self.frames += 1

    def feed_text(self, text: str) -> None:
        """Add text (a subtitle, a remark) to the stream."""
        if not isinstance(text, str) or not text:
            raise ValueError(f"feed_text needs a non-empty string, got {text!r}")
        check_no_placeholders(self.processor, text, "the text")
        self._advance(text)

    @torch.no_grad()
    def ask(self, question: str, max_new_tokens: int = 64) -> Answer:
        """Answer ``question`` about everything streamed so far; the stream itself is left as it was."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"ask needs a non-empty question, got {question!r}")
        check_no_placeholders(self.processor, question, "the question")
        check_generation_options(max_new_tokens)
        start = time.perf_counter()
        fork = None if self.state is None else self.state.clone()
        prompt = (self._opening if fork is None else "") + f"{question}<|im_end|>\n<|im_start|>assistant\n"
        ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.device)
        if self.cuda_graphs and self._decoder is None:
            self._decoder = GraphedDecoder(self.model, batch_size=1, compile=self.compile)
        tokens = generate(self.model, ids, state=fork, max_new_tokens=max_new_tokens, decoder=self._decoder)
        text = self.tokenizer.decode(tokens[0], skip_special_tokens=True).strip()
        return Answer(text, tokens.shape[1], time.perf_counter() - start)

    @property
    def state_bytes(self) -> int:
        """Memory held by the stream's state."""
        return 0 if self.state is None else self.state.nbytes
