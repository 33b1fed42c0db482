"""Small layers the mixers share: a short causal convolution and (gated) RMS norms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridvl.mixers.ops.short_conv import short_conv
from hybridvl.mixers.ops.utils import compute_dtype


class ShortConv(nn.Conv1d):
    """Depthwise causal convolution with SiLU, weights ``[C, 1, kernel_size]`` (as ``nn.Conv1d``/fla)."""

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = False) -> None:
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be at least 1, got {kernel_size}")
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        state: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        backend: str = "torch",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, T, C]`` -> ``(y [B, T, C], last inputs [N, C, kernel_size])``."""
        return short_conv(x, self.weight[:, 0], self.bias, initial_state=state, cu_seqlens=cu_seqlens, backend=backend)

    def set_identity(self) -> None:
        """Make the convolution pass its input through (last tap 1, others 0) before the SiLU."""
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, 0, -1] = 1.0
            if self.bias is not None:
                self.bias.zero_()


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in float32 (float64 for float64 input)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm computes in float32 for half inputs and returns x's dtype: Qwen2's norm, in one op
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """RMSNorm with a SiLU output gate, over the last ``dim`` features (per head when given ``[.., H, dim]``).

    ``norm_before_gate=True``: ``rmsnorm(x) * w * silu(g)`` (fla's ``FusedRMSNormGated``, Gated DeltaNet).
    ``norm_before_gate=False``: ``rmsnorm(x * silu(g)) * w`` (Mamba2), normalised in groups of ``group_size``.
    """

    def __init__(
        self, dim: int, eps: float = 1e-6, norm_before_gate: bool = True, group_size: int | None = None
    ) -> None:
        super().__init__()
        group_size = dim if group_size is None else group_size
        if dim % group_size:
            raise ValueError(f"group_size {group_size} must divide dim {dim}")
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        xc, gate = x.to(dtype), F.silu(gate.to(dtype))
        if not self.norm_before_gate:
            xc = xc * gate
        groups = F.rms_norm(xc.unflatten(-1, (-1, self.group_size)), (self.group_size,), eps=self.eps)
        y = groups.flatten(-2) * self.weight.to(dtype)
        if self.norm_before_gate:
            y = y * gate
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, norm_before_gate={self.norm_before_gate}"
