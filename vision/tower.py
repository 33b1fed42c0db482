"""The Qwen2.5-VL vision tower (transformers' ``Qwen2_5_VisionTransformerPretrainedModel``) over packed batches.

A batch holds many images and videos. transformers' vision tower, left to itself, prepares each of them in a
Python loop (rotary positions, window order) and calls attention once per image, frame or window; a batch of the
synthetic suite's small images and videos then costs about a thousand SDPA calls a layer and a few thousand tiny
operations, each a kernel launch on a GPU. Two changes, both through transformers' own interfaces:

* :func:`vision_inputs` prepares those tables on the CPU, once per batch, and the tower takes them as keyword
  arguments (``position_ids``, ``window_index``, ``cu_seqlens``, ``cu_window_seqlens``);
* :func:`packed_vision_attention`, registered with transformers' ``AttentionInterface``, stacks the chunks of
  each length and runs one SDPA call per length. transformers hands the chunk boundaries only to attention
  functions whose name contains "flash", hence its registered name, :data:`PACKED_VISION_ATTENTION`.

The results equal the plain tower's (``tests/test_vision.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hybridvl.mixers.ops.varlen import map_sequence_outputs

PACKED_VISION_ATTENTION = "packed_sdpa_flash_interface"
"""The name :func:`packed_vision_attention` is registered under (it holds "flash" for the reason above)."""


def build_vision_tower(vision_config: dict[str, Any]) -> nn.Module:
    """transformers' Qwen2.5-VL vision transformer from a config dict, with :func:`packed_vision_attention`."""
    from transformers import AttentionInterface
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    AttentionInterface.register(PACKED_VISION_ATTENTION, packed_vision_attention)
    config = Qwen2_5_VLVisionConfig(**vision_config)
    config._attn_implementation = "sdpa"
    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(config)
    # chosen after building: at build time transformers would look for a flash-attention package by this name
    tower.config._attn_implementation = PACKED_VISION_ATTENTION
    return tower


def vision_inputs(visual: nn.Module, grid_thw: torch.Tensor, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The vision tower's size-dependent inputs for images or videos of ``grid_thw`` (a CPU tensor), made with
    transformers' ``vision_utils`` on the CPU: rotary positions and window order moved to ``device``, attention
    boundaries left on the CPU (the attention splits by them on the host). Pass them to the tower as keyword
    arguments: ``visual(pixels, grid_thw=grid_thw, **vision_inputs(visual, grid_thw, device))``."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    if grid_thw.device.type != "cpu":
        raise ValueError(f"vision_inputs needs grid_thw on the CPU, got a tensor on {grid_thw.device}")
    config = visual.config
    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw, config.spatial_merge_size, config.window_size, config.patch_size
    )
    return {
        "position_ids": get_vision_position_ids(grid_thw, config.spatial_merge_size).to(device, non_blocking=True),
        "cu_seqlens": get_vision_cu_seqlens(grid_thw),
        "window_index": window_index.to(device, non_blocking=True),
        "cu_window_seqlens": cu_window_seqlens,
    }


def packed_vision_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    cu_seq_lens_q: torch.Tensor,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Bidirectional attention within each packed chunk of ``query``, ``key``, ``value`` ``[1, heads, T, dim]``
    (chunk ``n`` spans ``cu_seq_lens_q[n]:cu_seq_lens_q[n + 1]``); returns ``([1, T, heads, dim], None)`` as
    transformers' attention functions do. ``kwargs`` (transformers' maximum lengths) are not needed."""
    if attention_mask is not None or is_causal or dropout:
        raise ValueError(
            "packed vision attention is bidirectional within each chunk, without a mask or dropout; got "
            f"attention_mask={'a tensor' if attention_mask is not None else None}, is_causal={is_causal}, "
            f"dropout={dropout}"
        )
    if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k, cu_seq_lens_q):
        raise ValueError("packed vision attention needs the same chunks for queries and keys")

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # [n, t, heads, dim]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scaling)
        return out.transpose(1, 2)

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return map_sequence_outputs(attend, cu_seq_lens_q, (q, k, v)), None
