"""Small helpers shared by the ops and the mixers: numeric ones and the checks of their arguments."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch


def check_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) of at least ``minimum``.

    Raises:
        ValueError: naming ``owner`` and the option ``name`` otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {name}={value!r}")
    return int(value)


def check_positive(owner: str, name: str, value: Any) -> float:
    """``value`` if it is a positive finite real number (not a bool).

    Raises:
        ValueError: naming ``owner`` and the option ``name`` otherwise.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{owner}: {name} must be a positive finite number, got {name}={value!r}")
    return value


def check_floating(owner: str, **tensors: torch.Tensor) -> None:
    """Raise unless every tensor is a floating-point tensor, naming the one that is not."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{owner}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{owner}: {name} must be floating point, got {t.dtype}")


def check_qkv(owner: str, **tensors: torch.Tensor) -> None:
    """Raise unless every tensor is a 4-D ``[B, T, H, D]`` floating-point tensor of the first one's dtype and
    device, naming the one that is not."""
    check_floating(owner, **tensors)
    (first, reference), *_ = tensors.items()
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"{owner}: {name} must be [B, T, H, D] (4 dimensions), got {tuple(t.shape)}")
        if (t.dtype, t.device) != (reference.dtype, reference.device):
            raise TypeError(
                f"{owner}: {name} is {t.dtype} on {t.device} but {first} is {reference.dtype} on {reference.device}; "
                "give them one dtype and device"
            )


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the last dimension in float32 or float64 (as fla does), returning ``x``'s dtype."""
    check_floating("l2norm", x=x)
    x32 = x.to(compute_dtype(x))
    return (x32 * torch.rsqrt((x32 * x32).sum(-1, keepdim=True) + eps)).to(x.dtype)


def compute_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """The dtype the PyTorch forms compute in and recurrent states are kept in: float64 for float64
    input, else float32."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_sums(g: torch.Tensor) -> torch.Tensor:
    """Sums of log decays over every segment of the last dimension: ``out[..., i, j]`` is
    ``g[j+1] + ... + g[i]`` for ``j <= i`` (``0`` on the diagonal) and ``-inf`` above it.

    The segments are summed directly (a cumulative sum down each column of a ``[C, C]`` matrix that
    holds ``g[i]`` below the diagonal and zeros elsewhere, as Mamba2's ``segsum``), not as differences
    ``G[i] - G[j]`` of cumulative sums: those cancel catastrophically once ``|G|`` is large (strong decay,
    or a huge decay early in a chunk followed by weak ones). ``exp`` of the result is the decay from step
    ``j`` to step ``i``; above the diagonal it is exactly ``0`` and its gradient there is ``0`` (no
    ``inf - inf``).
    """
    C = g.shape[-1]
    ones = torch.ones(C, C, dtype=torch.bool, device=g.device)
    below = ones.tril(-1)
    sums = g[..., :, None].expand(*g.shape, C).masked_fill(~below, 0.0).cumsum(-2)
    # the diagonal is the constant 0, so the gradient of exp there (O(1)) never reaches g, where it
    # would swamp the true gradient of a strong decay in rounding
    return sums.masked_fill(~below, 0.0).masked_fill(~ones.tril(), float("-inf"))
