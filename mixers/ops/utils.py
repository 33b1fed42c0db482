"""Small numeric helpers shared by the ops."""

from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L2-normalise the last dimension in float32 or float64 (as fla does), returning ``x``'s dtype."""
    x32 = x.to(compute_dtype(x))
    return (x32 * torch.rsqrt((x32 * x32).sum(-1, keepdim=True) + eps)).to(x.dtype)


def compute_dtype(x: torch.Tensor | torch.dtype) -> torch.dtype:
    """The dtype the PyTorch forms compute in and recurrent states are kept in: float64 for float64
    input, else float32."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    return torch.float64 if dtype == torch.float64 else torch.float32
