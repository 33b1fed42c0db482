"""Rotary position embedding, 1-D or multimodal (M-RoPE, as in Qwen2-VL / Qwen2.5-VL).

M-RoPE gives every token three positions (time, height, width). The ``head_dim / 2`` rotary
frequencies are split into ``mrope_section = [t, h, w]`` consecutive groups; group ``i`` rotates by
position component ``i``. For text all three components are equal and M-RoPE equals 1-D RoPE.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rotary_cos_sin(
    position_ids: torch.Tensor,
    head_dim: int,
    theta: float,
    mrope_section: Sequence[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines ``[B, T, head_dim]`` for ``position_ids`` ``[B, T]`` or ``[3, B, T]``.

    Frequencies are computed in float32 and cast to ``dtype`` (as transformers does).
    """
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    if mrope_section is None:
        if position_ids.dim() != 2:
            raise ValueError(
                f"position_ids must be [B, T] for 1-D RoPE, got shape {tuple(position_ids.shape)}; "
                "set mrope_section to use 3-D (M-RoPE) positions"
            )
        position_ids = position_ids[None]
    else:
        if sum(mrope_section) != head_dim // 2 or len(mrope_section) != 3:
            raise ValueError(
                f"mrope_section must be three sizes summing to head_dim / 2 = {head_dim // 2}, "
                f"got {list(mrope_section)}"
            )
        if position_ids.dim() == 2:
            position_ids = position_ids[None].expand(3, -1, -1)
        elif position_ids.dim() != 3 or position_ids.shape[0] != 3:
            raise ValueError(
                f"position_ids must be [B, T] or [3, B, T] for M-RoPE, got shape {tuple(position_ids.shape)}"
            )
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [P, B, T, head_dim / 2]
    if mrope_section is None:
        freqs = freqs[0]
    else:
        parts = freqs.split(list(mrope_section), dim=-1)
        freqs = torch.cat([part[i] for i, part in enumerate(parts)], dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` by ``cos``/``sin`` ``[B, T, D]`` (rotate-half convention)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
