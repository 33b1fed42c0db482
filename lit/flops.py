"""Model FLOPs of a training batch, which Lightning's throughput monitor turns into FLOP/s and MFU.

The count follows the usual MFU convention (PaLM, appendix B): two FLOPs per multiply-add of every weight matrix
a token passes (projections, MLPs, short convolutions, the LM head, the vision tower's patches), plus the
attention score and value products of ``A`` and ``S`` layers over each packed sequence's causal keys (at most the
window for ``S``); a backward pass costs twice its forward. The recurrences' state arithmetic, norms and other
elementwise work are not counted, so MFU is a lower bound of the arithmetic done, as it is for Transformers.

A model's sizes are read once, as a :class:`ModelShape`, before a distributed strategy shards its parameters;
counting a batch then reads only the samples' lengths and vision grids, on the host.
"""

from __future__ import annotations

import dataclasses

import torch

from hybridvl.lit.data.types import PackedBatch
from hybridvl.models.hybrid import HybridVLM

ATTENTION_KINDS = ("A", "S")


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """What a decoder layer's FLOPs depend on.

    Attributes:
        kind: the layer's mixer letter.
        matrix_parameters: weights a token is multiplied with (projections, MLP, convolution kernels).
        attention: ``(heads, head_dim, window)`` of an ``A``/``S`` layer (``window`` ``None`` for ``A``), else
            ``None``.
        trains: whether any of its parameters trains.
    """

    kind: str
    matrix_parameters: int
    attention: tuple[int, int, int | None] | None
    trains: bool


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A model's sizes for counting FLOPs (see :func:`model_shape`)."""

    layers: tuple[LayerShape, ...]
    head_parameters: int
    vision_parameters: int
    vision_trains: bool


@dataclasses.dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs of one batch through a model: per decoder layer, the LM head, the vision tower."""

    layers: tuple[float, ...]
    head: float
    vision: float

    @property
    def decoder(self) -> float:
        return sum(self.layers)


def _matrix_parameters(module: torch.nn.Module) -> int:
    """Parameters a token is multiplied with: weight matrices and convolution kernels (not norms, biases, decays)."""
    return sum(p.numel() for name, p in module.named_parameters() if p.ndim >= 2 or "conv" in name)


def model_shape(model: HybridVLM) -> ModelShape:
    """Read ``model``'s sizes and which layers train; call it before a strategy shards the parameters."""
    layers = []
    for layer in model.language_model.layers:
        mixer = layer.self_attn
        attention = (mixer.num_heads, mixer.head_dim, mixer.window) if layer.kind in ATTENTION_KINDS else None
        trains = any(p.requires_grad for p in layer.parameters())
        layers.append(LayerShape(layer.kind, _matrix_parameters(layer), attention, trains))
    visual = model.visual
    return ModelShape(
        layers=tuple(layers),
        head_parameters=model.lm_head.weight.numel(),
        vision_parameters=0 if visual is None else _matrix_parameters(visual),
        vision_trains=visual is not None and any(p.requires_grad for p in visual.parameters()),
    )


def sequence_lengths(batch: PackedBatch) -> list[int]:
    """Each packed sequence's length, read from the samples on the host (no device synchronisation)."""
    return [len(sample) for sample in batch.samples]


def vision_patches(batch: PackedBatch) -> int:
    """Image and video patches of ``batch`` (before the 2x2 merge), from its samples' grids on the host."""
    patches = 0
    for sample in batch.samples:
        for key in ("image_grid_thw", "video_grid_thw"):
            grid = sample.vision.get(key)
            if grid is not None:
                patches += int(grid.prod(dim=-1).sum())
    return patches


def causal_keys(lengths: list[int], window: int | None) -> int:
    """Query-key pairs of causal attention over sequences of ``lengths``, each query seeing at most ``window``
    keys (itself included)."""
    pairs = 0
    for n in lengths:
        w = n if window is None else min(window, n)
        pairs += w * (w + 1) // 2 + (n - w) * w
    return pairs


def forward_flops(shape: ModelShape, lengths: list[int], patches: int = 0) -> ForwardFlops:
    """FLOPs of one forward pass over packed sequences of ``lengths`` with ``patches`` vision patches."""
    tokens = sum(lengths)
    layers = []
    for layer in shape.layers:
        flops = 2.0 * layer.matrix_parameters * tokens
        if layer.attention is not None:
            heads, head_dim, window = layer.attention
            flops += 4.0 * causal_keys(lengths, window) * heads * head_dim  # q.k scores and p.v sums
        layers.append(flops)
    return ForwardFlops(tuple(layers), 2.0 * shape.head_parameters * tokens, 2.0 * shape.vision_parameters * patches)


def fine_tuning_flops(student: ModelShape, batch: PackedBatch) -> float:
    """Forward and backward through the decoder and head; the vision tower forward only, unless it trains."""
    flops = forward_flops(student, sequence_lengths(batch), vision_patches(batch))
    return 3.0 * (flops.decoder + flops.head) + (3.0 if student.vision_trains else 1.0) * flops.vision


def layerwise_distillation_flops(student: ModelShape, teacher: ModelShape, batch: PackedBatch) -> float:
    """The teacher's forward without its head, and forward and backward of the student layers that train (each
    gets the teacher's input to it)."""
    lengths, patches = sequence_lengths(batch), vision_patches(batch)
    taught = forward_flops(teacher, lengths, patches)
    learner = forward_flops(student, lengths)
    trained = sum(flops for flops, layer in zip(learner.layers, student.layers) if layer.trains)
    return taught.decoder + taught.vision + 3.0 * trained


def end_to_end_distillation_flops(student: ModelShape, teacher: ModelShape, batch: PackedBatch) -> float:
    """The teacher's forward pass, and the student's forward and backward (its vision tower as it trains)."""
    taught = forward_flops(teacher, sequence_lengths(batch), vision_patches(batch))
    return taught.decoder + taught.head + taught.vision + fine_tuning_flops(student, batch)
