"""SwiGLU, the gated activation of Qwen2's MLP: ``silu(gate) * up``.

The PyTorch form is Qwen2's expression in the inputs' dtype; fla's fused kernel (one kernel forward, one backward)
reads both halves of a fused gate/up projection in place, computes in float32 and rounds once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridvl.mixers.backends import elementwise_auto_skips, select_backend
from hybridvl.mixers.ops.utils import check_floating

_PREFERENCE = ("fla", "torch")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up``.

    Args:
        gate: the gate's pre-activation, ``[..., I]`` (may be a strided view, e.g. one half of a fused projection).
        up: the up projection, shaped as ``gate``.
        backend: ``"auto"``, ``"fla"`` or ``"torch"``; ``"auto"`` runs float64 inputs, and a forward traced by
            torch.compile, in PyTorch (:func:`~hybridvl.mixers.backends.elementwise_auto_skips`).

    Returns:
        The product in the inputs' (promoted) dtype.
    """
    check_floating("swiglu", gate=gate, up=up)
    if up.shape != gate.shape:
        raise ValueError(f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    dtype = torch.promote_types(gate.dtype, up.dtype)
    auto_skips = elementwise_auto_skips(dtype)
    if select_backend(backend, gate.device, _PREFERENCE, "swiglu", auto_skips=auto_skips) == "fla":
        return _fla(gate.to(dtype), up.to(dtype))
    return F.silu(gate) * up


@torch.compiler.disable  # under torch.compile the kernel library runs as it is (no tracing of its autotuners)
def _fla(gate, up):
    from fla.modules.activations import swiglu as fla_swiglu

    return fla_swiglu(gate, up)
