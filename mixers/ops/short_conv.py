"""Causal depthwise short convolution with a carried state (the "short conv" of DeltaNet and Mamba).

The state holds the last ``kernel_size`` inputs of each channel, ``[N, C, kernel_size]``, oldest first
(fla's layout); the output at step ``t`` is ``act(sum_i w[:, i] * x[t - kernel_size + 1 + i] + bias)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridvl.mixers.backends import elementwise_auto_skips, select_backend
from hybridvl.mixers.ops.utils import check_floating
from hybridvl.mixers.ops.varlen import check_cu_seqlens

_PREFERENCE = ("fla", "torch")


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = "silu",
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the convolution to ``x`` ``[B, T, C]`` with ``weight`` ``[C, kernel_size]``.

    ``backend``: ``"auto"``, ``"fla"`` or ``"torch"``; ``"auto"`` runs float64 inputs, and a forward traced by
    torch.compile, in PyTorch (:func:`~hybridvl.mixers.backends.elementwise_auto_skips`: fla's kernel sums each
    channel's taps in float32, with no dot products).

    Returns ``(y [B, T, C], final_state [N, C, kernel_size])`` (state in ``x``'s dtype).
    """
    check_floating("short_conv", x=x, weight=weight)
    B, T, C = x.shape
    if weight.dim() != 2 or weight.shape[0] != C:
        raise ValueError(f"weight must be [C, kernel_size] with C = {C}, got {tuple(weight.shape)}")
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (n, C, weight.shape[1]):
        raise ValueError(
            f"conv state must be [N, C, kernel_size] = [{n}, {C}, {weight.shape[1]}], got {tuple(initial_state.shape)}"
        )
    auto_skips = elementwise_auto_skips(x.dtype)
    if select_backend(backend, x.device, _PREFERENCE, "short_conv", auto_skips=auto_skips) == "fla":
        return _fla(x, weight, bias, activation, initial_state, cu_seqlens)

    return _conv_torch(x, weight, bias, activation, initial_state, cu_seqlens)


@torch.compiler.disable  # under torch.compile the kernel library runs as it is (no tracing of its autotuners)
def _fla(x, weight, bias, activation, initial_state, cu_seqlens):
    from fla.modules.causal_conv1d import causal_conv1d

    return causal_conv1d(
        x,
        weight=weight,
        bias=bias,
        initial_state=initial_state,
        output_final_state=True,
        activation=activation,
        cu_seqlens=cu_seqlens,
    )


def _conv_torch(x, weight, bias, activation, initial_state, cu_seqlens):
    """The convolution in one pass over a row in which each sequence follows its state (``[state | tokens]`` per
    sequence, zeros for no state): each output reads back at most ``kernel_size - 1`` inputs, so never past its own
    state. Packed or not, it is index arithmetic only: nothing is read back to the host, and a compiled forward
    meets no data-dependent branch."""
    B, T, C = x.shape
    W = weight.shape[1]
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, B * T + 1, T, device=x.device)
        x = x.reshape(1, B * T, C)
    n = cu_seqlens.numel() - 1
    tokens = x.shape[1]
    positions = torch.arange(tokens, device=x.device, dtype=cu_seqlens.dtype)
    sequence = torch.searchsorted(cu_seqlens[1:], positions, right=True)
    token_at = positions + (sequence + 1) * W  # where each token lies in the row
    slots = torch.arange(W, device=x.device)
    state_at = (cu_seqlens[:-1] + torch.arange(n, device=x.device) * W)[:, None] + slots  # [n, W]
    row = x.new_zeros(tokens + n * W, C).index_copy(0, token_at, x[0])
    if initial_state is not None:
        row = row.index_copy(0, state_at.flatten(), initial_state.to(x.dtype).transpose(1, 2).reshape(n * W, C))
    y = F.conv1d(row.T[None], weight[:, None].to(x.dtype), None if bias is None else bias.to(x.dtype), groups=C)[0].T
    y = y.index_select(0, token_at - (W - 1))
    if activation == "silu":
        y = F.silu(y)
    final_at = (cu_seqlens[1:] + torch.arange(1, n + 1, device=x.device) * W)[:, None] - W + slots  # [n, W]
    final_state = row.index_select(0, final_at.flatten()).reshape(n, W, C).transpose(1, 2).contiguous()
    return y.reshape(B, T, C), final_state
