"""Small layers the mixers share: a short causal convolution, (gated) RMS norms, and fused input projections.

:class:`FusedLinear` computes several projections of one input in one matrix multiplication; its owner keeps the
parts' own names in checkpoints (:func:`keep_part_names`), so a model with fused projections saves and loads the
same tensors, under the same names, as one with a separate ``nn.Linear`` per projection.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridvl.mixers.ops.norm import add_rms_norm, gated_rms_norm
from hybridvl.mixers.ops.short_conv import short_conv


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
    """RMSNorm over the last dimension, computed in float32 (float64 for float64 input): Qwen2's
    ``weight * rmsnorm(x)``. Given the residual stream, it adds ``x`` to it first, in one fused kernel on CUDA
    (:func:`~hybridvl.mixers.ops.norm.add_rms_norm`)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``weight * rmsnorm(x)``; with ``residual``, ``(weight * rmsnorm(residual + x), residual + x)``."""
        if residual is not None:
            return add_rms_norm(x, residual, self.weight, eps=self.eps)
        # F.rms_norm computes in float32 for half inputs and returns x's dtype: Qwen2's norm, in one op
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """RMSNorm with a SiLU output gate, over the last ``dim`` features (per head when given ``[.., H, dim]``).

    ``norm_before_gate=True``: ``rmsnorm(x) * w * silu(g)`` (fla's ``FusedRMSNormGated``, Gated DeltaNet).
    ``norm_before_gate=False``: ``rmsnorm(x * silu(g)) * w`` (Mamba2), normalised in groups of ``group_size``.
    :func:`~hybridvl.mixers.ops.norm.gated_rms_norm` computes it, with fla's fused kernel for ``backend="fla"``.
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

    def forward(self, x: torch.Tensor, gate: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """``x`` and ``gate`` ``[..., dim]`` -> the gated norm in ``x``'s dtype."""
        return gated_rms_norm(
            x,
            gate,
            self.weight,
            eps=self.eps,
            norm_before_gate=self.norm_before_gate,
            group_size=self.group_size,
            backend=backend,
        )

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, norm_before_gate={self.norm_before_gate}"


# the child name FSDP (torch.distributed.fsdp.FullyShardedDataParallel) gives the module it wraps
FSDP_WRAPPED = "_fsdp_wrapped_module."
_KINDS = ("weight", "bias")


class FusedLinear(nn.Linear):
    """Several linear projections of the same input as one ``nn.Linear``: the parts' weight rows (and biases)
    stacked in the order of ``parts``, so one matrix multiplication computes them all.

    ``forward`` returns the concatenated outputs ``[..., sum(parts.values())]``; split them with
    ``y.split(fused.sizes, dim=-1)`` (views, no copies). Checkpoints name the parts, not the fused module: the
    module owning a ``FusedLinear`` calls :func:`keep_part_names` (every :class:`~hybridvl.mixers.base.Mixer` does),
    and its state dict holds ``<part>.weight`` (and ``<part>.bias``) for each part, as separate ``nn.Linear`` s
    named after the parts would.

    Args:
        in_features: width of the input.
        parts: each part's name (its module name in checkpoints, e.g. ``"q_proj"``) -> its output width, in order.
        bias: one bias per output row (every part has a bias).
    """

    def __init__(self, in_features: int, parts: Mapping[str, int], bias: bool = False) -> None:
        if not parts or any(isinstance(size, bool) or not isinstance(size, int) or size < 1 for size in parts.values()):
            raise ValueError(f"FusedLinear needs parts named with positive output widths, got {dict(parts)!r}")
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = dict(parts)

    @property
    def sizes(self) -> list[int]:
        """The parts' output widths, in order (the split sizes of :meth:`forward`'s output)."""
        return list(self.parts.values())

    def _rows(self, name: str) -> slice:
        if name not in self.parts:
            raise KeyError(f"FusedLinear has no part {name!r}; its parts are {', '.join(self.parts)}")
        names = list(self.parts)
        start = sum(self.sizes[: names.index(name)])
        return slice(start, start + self.parts[name])

    def weight_part(self, name: str) -> torch.Tensor:
        """The rows of ``weight`` that compute part ``name`` (a view: writing it writes the weight)."""
        return self.weight[self._rows(name)]

    def bias_part(self, name: str) -> torch.Tensor | None:
        """The entries of ``bias`` of part ``name`` (a view), or ``None`` without biases."""
        return None if self.bias is None else self.bias[self._rows(name)]

    def extra_repr(self) -> str:
        parts = ", ".join(f"{name}={size}" for name, size in self.parts.items())
        return f"{super().extra_repr()}, parts=({parts})"


def keep_part_names(owner: nn.Module) -> None:
    """Make ``owner``'s state dict name the parts of each :class:`FusedLinear` among its direct children.

    Saving (``state_dict``) writes ``<part>.weight`` / ``<part>.bias`` (views of the fused tensors) in place of
    ``<fused>.weight`` / ``<fused>.bias``; loading (``load_state_dict``) concatenates the parts back. A part
    missing from the loaded dict, or shaped differently, is reported by its own name (missing keys, size mismatch)
    and keeps its current value; a fused name in the loaded dict is unexpected. Children found when the hooks run
    count, so ``owner`` may call this before creating them; a child wrapped by another module (a LoRA layer) is
    left alone. Inside an FSDP unit the fused names stay, for FSDP to gather them: :func:`with_part_names`
    renames the gathered state dict.
    """
    owner.register_state_dict_post_hook(_save_parts)
    owner.register_load_state_dict_pre_hook(_load_parts)


def _fused_children(owner: nn.Module) -> list[tuple[str, FusedLinear]]:
    return [(name, child) for name, child in owner.named_children() if isinstance(child, FusedLinear)]


def _split_fused(state_dict: dict[str, Any], prefix: str, name: str, fused: FusedLinear) -> None:
    """Replace ``<prefix><name>.weight`` (and ``.bias``) in ``state_dict`` by the parts' tensors (views); a
    weight flattened to 1-D (as FSDP holds parameters) splits into its parts' flat rows."""
    for kind in _KINDS:
        tensor = state_dict.pop(f"{prefix}{name}.{kind}", None)
        if tensor is not None:
            per_row = tensor.numel() // fused.out_features if tensor.ndim == 1 else 1
            pieces = tensor.split([size * per_row for size in fused.sizes])
            for part, piece in zip(fused.parts, pieces):
                state_dict[f"{prefix}{part}.{kind}"] = piece


def _save_parts(owner: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]) -> None:
    if FSDP_WRAPPED in prefix:  # FSDP's own hook, which runs later, looks the fused parameters up by their names
        return
    for name, fused in _fused_children(owner):
        _split_fused(state_dict, prefix, name, fused)


def _load_parts(
    owner: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    for name, fused in _fused_children(owner):
        for kind in _KINDS:
            target = getattr(fused, kind)
            if target is None:
                continue
            key = f"{prefix}{name}.{kind}"
            if state_dict.pop(key, None) is not None:
                unexpected_keys.append(key)
            pieces, loaded = [], []
            for part, current in zip(fused.parts, target.detach().split(fused.sizes)):
                part_key = f"{prefix}{part}.{kind}"
                value = state_dict.pop(part_key, None)
                if value is None:
                    missing_keys.append(part_key)
                elif value.shape != current.shape:
                    error_msgs.append(
                        f"size mismatch for {part_key}: copying a param with shape {tuple(value.shape)} from "
                        f"checkpoint, the shape in current model is {tuple(current.shape)}."
                    )
                else:
                    loaded.append(value)
                    current = value
                pieces.append(current)
            like = loaded[0] if loaded else target
            state_dict[key] = torch.cat([piece.to(device=like.device, dtype=like.dtype) for piece in pieces])


def with_part_names(module: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``state_dict`` (of ``module``, e.g. gathered by FSDP) with every :class:`FusedLinear` under ``module`` named
    by its parts, as ``module.state_dict()`` names them outside FSDP; names already split stay as they are."""
    renamed = dict(state_dict)
    for owner_name, owner in module.named_modules():
        prefix = f"{owner_name.replace(FSDP_WRAPPED, '')}." if owner_name else ""
        for name, fused in _fused_children(owner):
            _split_fused(renamed, prefix, name, fused)
    return renamed


def fused_part_names(module: nn.Module) -> dict[str, str]:
    """The checkpoint name of each part of every :class:`FusedLinear` under ``module`` -> the parameter that holds
    it, e.g. ``"layers.0.self_attn.q_proj.weight" -> "layers.0.self_attn.qkv_proj.weight"``."""
    names = {}
    for owner_name, owner in module.named_modules():
        prefix = f"{owner_name}." if owner_name else ""
        for name, fused in _fused_children(owner):
            for kind in _KINDS:
                if getattr(fused, kind) is not None:
                    names.update({f"{prefix}{part}.{kind}": f"{prefix}{name}.{kind}" for part in fused.parts})
    return names
