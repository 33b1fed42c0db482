"""Choosing the next token from logits: greedy, or sampled after temperature, top-k and top-p filtering.

Everything runs on the logits' device without reading back to the host, so
:class:`~hybridvl.models.cuda_graphs.GraphedDecoder` captures it in its graph (no logits leave the graph), and eager
decoding picks the same tokens from the same generator state.
"""

from __future__ import annotations

import math
import types

import torch


def check_generation_options(
    max_new_tokens: int = 1, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> None:
    """Raise ``ValueError`` naming the option unless ``max_new_tokens`` and ``top_k`` are integers >= 1 (``top_k``
    or ``None``), ``temperature`` is a positive finite number and ``top_p`` lies in (0, 1] (or is ``None``)."""
    if not _is_number(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if top_k is not None and (not _is_number(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 when given, got {top_k!r}")
    if not _is_number(temperature, int | float) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if top_p is not None and (not _is_number(top_p, int | float) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] when given, got {top_p!r}")


def _is_number(value: object, kind: type | types.UnionType) -> bool:
    """Whether ``value`` is an instance of ``kind`` and not a bool."""
    return isinstance(value, kind) and not isinstance(value, bool)


def sample_next_token(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from ``logits`` ``[B, vocab]``: argmax, or a sample after temperature, top-k and
    top-p (nucleus) filtering (options checked by :func:`check_generation_options`). Device operations only, drawn
    from ``generator`` (the device's default when ``None``): a CUDA graph can capture it."""
    if not do_sample:
        return logits.argmax(-1)
    check_generation_options(temperature=temperature, top_k=top_k, top_p=top_p)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    # a draw from the softmax without a host synchronisation: argmax of p_i / E_i with E_i ~ Exp(1) picks token i
    # with probability p_i (PyTorch's CUDA exponential never returns 0)
    probs = logits.softmax(-1)
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)
