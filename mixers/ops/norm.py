"""RMSNorms fused with what comes before them: a SiLU output gate (the output norm of Gated DeltaNet and GLA: norm,
then gate; of Mamba2: gate, then norm, in groups) and the residual add of a pre-norm block (Qwen2's decoder layer).

The PyTorch forms compute the norm in float32 (float64 for float64 input); fla's fused kernels (one kernel forward,
one backward) load their inputs into float32 registers and compute the same expression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridvl.mixers.backends import elementwise_auto_skips, select_backend
from hybridvl.mixers.ops.utils import check_floating, compute_dtype

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
        backend: ``"auto"``, ``"fla"`` or ``"torch"``; ``"auto"`` runs float64 inputs, and a forward traced by
            torch.compile, in PyTorch (:func:`~hybridvl.mixers.backends.elementwise_auto_skips`).

    Returns:
        The output in ``x``'s dtype.
    """
    check_floating("gated_rms_norm", x=x, gate=gate, weight=weight)
    D = x.shape[-1]
    group_size = D if group_size is None else group_size
    if gate.shape != x.shape:
        raise ValueError(f"gate must have x's shape {tuple(x.shape)}, got {tuple(gate.shape)}")
    if weight.shape != (D,):
        raise ValueError(f"weight must be [D] = [{D}], got {tuple(weight.shape)}")
    if group_size < 1 or D % group_size:
        raise ValueError(f"group_size must divide D = {D}, got {group_size}")
    auto_skips = elementwise_auto_skips(torch.promote_types(x.dtype, gate.dtype))
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


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float = 1e-6,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add a block's output to the residual stream and normalise the sum, as a pre-norm decoder does between blocks:
    ``h = residual + x``, then Qwen2's RMSNorm ``weight * rmsnorm(h)``.

    The PyTorch form is those two expressions (the norm computed in float32, rounded to ``h``'s dtype, then scaled);
    fla's kernel (``rms_norm`` with ``residual``, ``prenorm=True``: one kernel forward, one backward) adds in float32,
    stores ``h``, and normalises and scales the float32 sum before rounding once. Both return PyTorch's dtypes.

    Args:
        x: the block's output, ``[..., D]``.
        residual: the residual stream, shaped as ``x``.
        weight: ``[D]`` scale.
        eps: added to the mean square.
        backend: ``"auto"``, ``"fla"`` or ``"torch"``; ``"auto"`` runs float64 inputs, and a forward traced by
            torch.compile, in PyTorch (:func:`~hybridvl.mixers.backends.elementwise_auto_skips`).

    Returns:
        ``(y, h)``: the normalised sum, in the dtype of ``weight * h``, and the new stream ``h = residual + x`` in
        the dtype of that sum (bf16 + float32 gives float32).
    """
    D = x.shape[-1]
    check_floating("add_rms_norm", x=x, residual=residual, weight=weight)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if weight.shape != (D,):
        raise ValueError(f"weight must be [D] = [{D}], got {tuple(weight.shape)}")
    dtype = torch.promote_types(x.dtype, residual.dtype)
    auto_skips = elementwise_auto_skips(dtype)
    if select_backend(backend, x.device, _PREFERENCE, "add_rms_norm", auto_skips=auto_skips) == "fla":
        return _fla_add_rms_norm(x, residual, weight, eps)
    h = residual + x
    return weight * F.rms_norm(h, (D,), eps=eps), h


@torch.compiler.disable  # under torch.compile the kernel library runs as it is (no tracing of its autotuners)
def _fla_add_rms_norm(x, residual, weight, eps):
    from fla.modules.norm.layernorm import rms_norm

    # fla writes the sum in the residual's dtype and the output in x's: give them PyTorch's (casting up is exact)
    stream = torch.promote_types(x.dtype, residual.dtype)
    out = torch.promote_types(stream, weight.dtype)
    return rms_norm(x.to(out), weight, None, residual=residual.to(stream), eps=eps, prenorm=True)
