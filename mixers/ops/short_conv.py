"""Causal depthwise short convolution with a carried state (the "short conv" of DeltaNet and Mamba).

The state holds the last ``kernel_size`` inputs of each channel, ``[N, C, kernel_size]``, oldest first
(fla's layout); the output at step ``t`` is ``act(sum_i w[:, i] * x[t - kernel_size + 1 + i] + bias)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridvl.mixers.backends import elementwise_auto_skips, select_backend
from hybridvl.mixers.ops.varlen import check_cu_seqlens, map_sequences

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

    def run(x, initial_state):
        return _conv_torch(x, weight, bias, activation, initial_state)

    if cu_seqlens is not None:
        return map_sequences(run, cu_seqlens, (x,), initial_state)
    return run(x, initial_state)


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


def _conv_torch(x, weight, bias, activation, initial_state):
    B, _, C = x.shape
    W = weight.shape[1]
    past = x.new_zeros(B, C, W) if initial_state is None else initial_state.to(x.dtype)
    xx = torch.cat([past, x.transpose(1, 2)], dim=-1)  # [B, C, W + T]
    y = F.conv1d(xx[..., 1:], weight[:, None].to(x.dtype), None if bias is None else bias.to(x.dtype), groups=C)
    if activation == "silu":
        y = F.silu(y)
    return y.transpose(1, 2), xx[..., -W:].contiguous()
