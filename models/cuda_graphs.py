"""CUDA graphs for decoding and streaming.

Eager decoding of a 3B hybrid launches a few thousand small kernels per token, so the GPU mostly waits for
the CPU. A CUDA graph records one step's kernels once and replays them with a single launch. That needs fixed
buffers: each graph here owns a *static* :class:`~hybridvl.models.hybrid.ModelState` that every replay updates in place
(the sliding-window ring buffers are indexed by device tensors, full-attention caches are reserved up front),
and static input buffers that callers fill before each replay.

* :class:`GraphedDecoder` — one new token per sequence (text generation); with ``next_token=True`` the graph also
  picks the next token (greedy or sampled from a device generator), so no logits leave it.
* :class:`GraphedFramePrefill` — one image or video frame of a fixed size through the vision tower and the
  decoder into the state (streaming), one graph per frame-size bucket.

Both replay exactly the kernels the eager model runs for the same step, so results equal the eager path's.

.. code-block:: python

    decoder = GraphedDecoder(model, batch_size=1)
    decoder.load(state)                       # a state from a prefill
    logits = decoder.step(next_token)         # [B, vocab], then the state holds the new token

    sampler = GraphedDecoder(model, next_token=True, do_sample=True, top_p=0.9, generator=generator)
    sampler.load(state)
    token = sampler.step(token)               # [B] token ids picked inside the graph
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hybridvl.mixers.ops.attention import DECODE_BLOCK
from hybridvl.mixers.state import KVCache
from hybridvl.models.cache import ModelState
from hybridvl.models.hybrid import HybridVLM
from hybridvl.models.sampling import check_generation_options, sample_next_token
from hybridvl.vision.tower import vision_inputs


def _check_cuda(model: HybridVLM) -> torch.device:
    device = model.lm_head.weight.device
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {device}")
    return device


class _StaticGraph:
    """A captured callable over a static state: warm-up on a side stream, capture, replay."""

    def __init__(
        self,
        model: HybridVLM,
        state: ModelState,
        max_context: int | None,
        warmup: int,
        keep_state: bool,
        compile: bool,
    ) -> None:
        self.model = model.eval()
        self.device = _check_cuda(model)
        # compiled, the model's forward fuses its elementwise work (norms, residuals, rotary, gates) into fewer
        # kernels before capture; kernel libraries (fla, flash-attn) run as they are between the compiled parts
        self.forward = torch.compile(model, dynamic=False) if compile else model
        self.compiled = compile
        self.state = state
        self.keep_state = keep_state
        self.max_context = max_context
        self._has_growing_cache = any(isinstance(s, KVCache) and s.window is None for s in state.layers)
        if self._has_growing_cache:
            if max_context is None:
                raise ValueError(
                    "the layout has full-attention (A) layers, whose cache grows: give max_context, the most tokens "
                    "a sequence will hold, so the graph can reserve it"
                )
            for layer in state.layers:
                if isinstance(layer, KVCache):  # whole blocks, which decode attention sums in parallel
                    layer.reserve(-(-max_context // DECODE_BLOCK) * DECODE_BLOCK)
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self._tokens_held = 0  # most tokens in a full-attention cache, tracked on the host (no device sync)

    def _capture(self, body: Callable[[], torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """Warm up ``body`` (compiles kernels, runs autotuning) and capture it, drawing random numbers from
        ``generator`` at each replay if given (else from the device's default generator); afterwards the state is
        what it was (``keep_state``: a caller's state) or empty. Returns the graph's static output."""
        snapshot = self.state.clone() if self.keep_state else None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(self.warmup):
                body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        if generator is not None:
            self.graph.register_generator_state(generator)
        with torch.no_grad(), torch.cuda.graph(self.graph):
            output = body()
        if snapshot is not None:
            self.state.copy_(snapshot)
        else:
            self.state.zero_()
        return output

    def load(self, state: ModelState) -> None:
        """Make the static state equal ``state`` (a prefill's result, a fork of a stream)."""
        self.state.copy_(state)
        growing = [layer.length for layer in self.state.layers if isinstance(layer, KVCache) and layer.window is None]
        self._tokens_held = int(torch.stack(growing).max()) if growing else 0

    def _check_room(self, tokens: int) -> None:
        if self._has_growing_cache:
            if self._tokens_held + tokens > self.max_context:
                raise ValueError(
                    f"the next step would hold {self._tokens_held + tokens} tokens but the graph reserved "
                    f"max_context={self.max_context}"
                )
            self._tokens_held += tokens


class GraphedDecoder(_StaticGraph):
    """Greedy or sampled decoding, one token per sequence per replay.

    Args:
        model: the hybrid model on a CUDA device.
        batch_size: sequences decoded together.
        max_context: for layouts with full-attention (``A``) layers, the most tokens a sequence may hold.
        warmup: eager runs before capture (kernel compilation and autotuning happen there).
        compile: run the model's forward through ``torch.compile`` (before the warm-up, so the graph captures the
            compiled kernels); the token choice stays outside the compiled part.
        next_token: end the graph with the choice of the next token
            (:func:`~hybridvl.models.sampling.sample_next_token` with the options below): :meth:`step` returns
            token ids instead of logits, and no logits leave the graph.
        do_sample, temperature, top_k, top_p: with ``next_token``, greedy (``do_sample=False``) or sampled after
            these filters, fixed for the graph.
        generator: with ``next_token`` and ``do_sample``, the CUDA generator the graph draws from at each replay
            (its state advances as in eager sampling; re-seed it to repeat a run); the device's default when
            ``None``.

    Attributes:
        state: the static state, empty after construction; :meth:`load` a state into it before stepping, read it
            (or ``clone()`` it) after.
        sampling: with ``next_token``, the options the graph picks tokens with (``do_sample``, ``temperature``,
            ``top_k``, ``top_p``); ``None`` otherwise.
    """

    def __init__(
        self,
        model: HybridVLM,
        batch_size: int = 1,
        max_context: int | None = None,
        warmup: int = 3,
        *,
        compile: bool = False,
        next_token: bool = False,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        device = _check_cuda(model)
        self.sampling = None
        if next_token:
            check_generation_options(temperature=temperature, top_k=top_k, top_p=top_p)
            self.sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        if generator is not None and (self.sampling is None or not do_sample or generator.device.type != "cuda"):
            raise ValueError("a generator goes with next_token=True and do_sample=True, and must be a CUDA generator")
        self.generator = generator
        state = model.init_state(batch_size, device)
        super().__init__(model, state, max_context, warmup, keep_state=False, compile=compile)
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.output = self._capture(self._body, generator)

    @property
    def next_token(self) -> bool:
        """Whether :meth:`step` returns the next tokens (picked inside the graph) rather than logits."""
        return self.sampling is not None

    def _body(self) -> torch.Tensor:
        batch = self.input_ids.shape[0]
        positions = self.state.next_position.view(1, batch, 1).expand(3, batch, 1)
        out = self.forward(self.input_ids, position_ids=positions, state=self.state, logits_to_keep=1)
        self.state.copy_(out.state)
        if self.sampling is None:
            return out.logits[:, -1]
        return sample_next_token(out.logits[:, -1], **self.sampling, generator=self.generator)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Feed ``input_ids`` ``[B]`` (or ``[B, 1]``); return the next-token logits ``[B, vocab]``, or with
        ``next_token`` the next tokens ``[B]`` (a static buffer the next step overwrites: clone to keep)."""
        self._check_room(1)
        self.input_ids.copy_(input_ids.reshape(self.input_ids.shape))
        self.graph.replay()
        return self.output


class GraphedFramePrefill(_StaticGraph):
    """One frame of a fixed size through the vision tower and the decoder into the static state.

    The frame's tokens are ``<|vision_start|>`` + its merged-patch placeholders + ``<|vision_end|>``, with
    Qwen2.5-VL's M-RoPE positions counted on from the state; the vision tower's size-dependent tables (rotary
    positions, window order, attention boundaries) are computed once for the bucket.

    Args:
        model: the hybrid model (with its vision tower) on a CUDA device.
        grid_thw: the frame's patch grid ``(t, h, w)`` as the processor returns it (``image_grid_thw``).
        state: the static state to advance, left as it is by the capture (share one between the graphs of
            several frame sizes); a fresh, empty one when ``None``.
        max_context: as :class:`GraphedDecoder`.
        warmup: eager runs before capture.
        compile: run the vision tower's and the decoder's forward through ``torch.compile`` before capture.
    """

    def __init__(
        self,
        model: HybridVLM,
        grid_thw: tuple[int, int, int],
        state: ModelState | None = None,
        max_context: int | None = None,
        warmup: int = 3,
        compile: bool = False,
    ) -> None:
        if model.visual is None:
            raise ValueError("frame prefill needs a model with a vision tower (vision_config)")
        device = _check_cuda(model)
        keep_state = state is not None
        state = model.init_state(1, device) if state is None else state
        if state.batch_size != 1:
            raise ValueError(f"a frame stream holds one sequence; the state holds {state.batch_size}")
        super().__init__(model, state, max_context, warmup, keep_state, compile)
        self.visual = torch.compile(model.visual, dynamic=False) if compile else model.visual
        config, vision = model.config, model.visual.config
        self.grid_thw = tuple(int(n) for n in grid_thw)
        t, h, w = self.grid_thw
        merge = vision.spatial_merge_size
        if h % merge or w % merge:
            raise ValueError(f"the patch grid {self.grid_thw} must be divisible by the merge size {merge}")
        self.num_features = t * h * w // merge**2
        ids = [config.vision_start_token_id, *[config.image_token_id] * self.num_features, config.vision_end_token_id]
        self.input_ids = torch.tensor([ids], device=device)
        grid = torch.tensor([self.grid_thw])
        offsets, _ = model.positions(
            self.input_ids, torch.tensor([0, len(ids)]), torch.zeros(1, dtype=torch.long), image_grid_thw=grid
        )
        self.position_offsets = offsets
        self.grid = grid
        self.vision_inputs = vision_inputs(model.visual, grid, device)
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        self.pixel_values = torch.zeros(t * h * w, patch_dim, device=device, dtype=model.visual.dtype)
        self.logits = self._capture(self._body)

    def _body(self) -> torch.Tensor:
        features = self.visual(self.pixel_values, grid_thw=self.grid, **self.vision_inputs)
        embeds = self.model.language_model.embed_tokens(self.input_ids)
        embeds = torch.cat([embeds[:, :1], features.pooler_output[None].to(embeds.dtype), embeds[:, -1:]], 1)
        positions = self.position_offsets + self.state.next_position.view(1, 1, 1)
        out = self.forward(inputs_embeds=embeds, position_ids=positions, state=self.state, logits_to_keep=1)
        self.state.copy_(out.state)
        return out.logits[:, -1]

    def feed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Advance the state by one frame given its processed patches ``[t*h*w, C*T*P*P]``; return the logits
        after the frame (a static buffer)."""
        if pixel_values.shape != self.pixel_values.shape:
            raise ValueError(
                f"this graph takes frames with patches {tuple(self.pixel_values.shape)} (grid {self.grid_thw}); "
                f"got {tuple(pixel_values.shape)}"
            )
        self._check_room(self.input_ids.shape[1])
        self.pixel_values.copy_(pixel_values)
        self.graph.replay()
        return self.logits
