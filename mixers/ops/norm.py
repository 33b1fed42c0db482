"""RMSNorm with a SiLU output gate: the output norm of Gated DeltaNet and GLA (norm, then gate) and of Mamba2
(gate, then norm, in groups).

The PyTorch form computes in float32 (float64 for float64 input); fla's fused kernels (one kernel forward, one
backward) load both inputs into float32 registers and compute the same expression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridvl.mixers.backends import select_backend
from hybridvl.mixers.ops.utils import compute_dtype

_PREFERENCE = ("fla", "torch")


def gated_rms_norm(
    x: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float = 1e-6,
    norm_before_gate: bool = True,
    group_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Normalise ``x`` ``[..., D]`` by its root mean square over groups of ``group_size`` features and gate it.

    ``norm_before_gate=True``: ``rmsnorm(x) * weight * silu(gate)`` (fla's ``FusedRMSNormGated``).
    ``norm_before_gate=False``: ``rmsnorm(x * silu(gate)) * weight`` (Mamba2's ``RMSNormGated``).

    Args:
        x: the input, ``[..., D]``.
        gate: the gate's pre-activation, shaped as ``x``.
        weight: ``[D]`` scale.
        eps: added to the mean square.
        norm_before_gate: normalise first (``True``) or gate first.
        group_size: features per normalised group (dividing ``D``); default ``D``, one group.
        backend: ``"auto"``, ``"fla"`` or ``"torch"``; ``"auto"`` runs float64 inputs in PyTorch (fla's kernels
            compute in float32).

    Returns:
        The output in ``x``'s dtype.
    """
    D = x.shape[-1]
    group_size = D if group_size is None else group_size
    if gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    if weight.shape != (D,):
        raise ValueError(f"weight must be [D] = [{D}], got {tuple(weight.shape)}")
    if group_size < 1 or D % group_size:
        raise ValueError(f"group_size must divide D = {D}, got {group_size}")
    auto_skips = None
    if x.dtype == torch.float64:
        auto_skips = {"fla": "its fused norm computes float64 inputs in float32; pass backend='fla' to accept that"}
    if select_backend(backend, x.device, _PREFERENCE, "gated_rms_norm", auto_skips=auto_skips) == "fla":
        return _fla(x, gate, weight, eps, norm_before_gate, group_size)
    dtype = compute_dtype(x)
    xc, gate = x.to(dtype), F.silu(gate.to(dtype))
    if not norm_before_gate:
        xc = xc * gate
    y = F.rms_norm(xc.unflatten(-1, (-1, group_size)), (group_size,), eps=eps).flatten(-2) * weight.to(dtype)
    if norm_before_gate:
        y = y * gate
    return y.to(x.dtype)


@torch.compiler.disable  # under torch.compile the kernel library runs as it is (no tracing of its autotuners)
def _fla(x, gate, weight, eps, norm_before_gate, group_size):
    if norm_before_gate and group_size == x.shape[-1]:
        from fla.modules.norm.fused_norm_gate import rms_norm_gated

        return rms_norm_gated(x, gate, weight, None, activation="silu", eps=eps)
    from fla.modules.norm.layernorm_gated import rmsnorm_fn

    return rmsnorm_fn(x, weight, None, z=gate, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)
