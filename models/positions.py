"""Qwen2.5-VL's 3-D M-RoPE position ids, computed as transformers' ``Qwen2_5_VLModel.get_rope_index`` does.

Text tokens advance all three components together. An image or video of ``(t, h, w)`` patches becomes
``t * h * w / merge**2`` placeholder tokens whose positions are ``start + (time, row, column)`` on the merged
grid, time scaled by ``tokens_per_second * seconds_per_grid`` for videos; the text after it continues at
``start + max(h, w) / merge``. Decoding continues at the largest position used so far plus one.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class VisionTokenError(ValueError):
    """Placeholder tokens and vision grids do not match."""


def vision_positions(
    start: int, grid_thw: torch.Tensor, merge_size: int, time_interval: torch.Tensor | float
) -> torch.Tensor:
    """``[3, t * h * w / merge**2]`` positions of one image or video placed at ``start``."""
    t, h, w = (int(x) for x in grid_thw)
    h, w = h // merge_size, w // merge_size
    temporal = (torch.arange(t) * time_interval).long()
    grid_t, grid_h, grid_w = torch.meshgrid(temporal, torch.arange(h) + start, torch.arange(w) + start, indexing="ij")
    positions = torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1)
    positions[0] += start
    return positions


def sequence_positions(
    input_ids: torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    merge_size: int,
    tokens_per_second: float,
    image_grids: Iterator[torch.Tensor],
    video_grids: Iterator[tuple[torch.Tensor, torch.Tensor]],
    start: int = 0,
) -> tuple[torch.Tensor, int]:
    """Positions ``[3, L]`` of one unpadded sequence and the position decoding continues from.

    Args:
        input_ids: ``[L]`` token ids.
        image_grids: ``(t, h, w)`` of the images, consumed in order of appearance.
        video_grids: ``((t, h, w), seconds_per_grid)`` of the videos, consumed in order.
        start: the first position (where an earlier part of the sequence stopped).
    """
    ids = input_ids.tolist()
    pieces, current, i = [], start, 0
    while i < len(ids):
        token = ids[i]
        if token not in (image_token_id, video_token_id):
            j = i
            while j < len(ids) and ids[j] not in (image_token_id, video_token_id):
                j += 1
            pieces.append(torch.arange(j - i).expand(3, -1) + current)
            current += j - i
            i = j
            continue
        is_video = token == video_token_id
        kind = "video" if is_video else "image"
        try:
            grid, seconds = next(video_grids) if is_video else (next(image_grids), None)
        except StopIteration:
            raise VisionTokenError(f"the text has more {kind} placeholders than {kind}s were given") from None
        count = int(grid.prod()) // merge_size**2
        if ids[i : i + count] != [token] * count:
            raise VisionTokenError(
                f"an {kind} of grid {tuple(int(x) for x in grid)} needs {count} consecutive placeholder tokens at "
                f"position {i}; build inputs with the processor so text and {kind}s match"
            )
        interval = tokens_per_second * torch.as_tensor(seconds, dtype=torch.float32) if is_video else 1
        pieces.append(vision_positions(current, grid, merge_size, interval))
        current += max(int(grid[1]), int(grid[2])) // merge_size
        i += count
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    next_position = int(positions.max()) + 1 if positions.numel() else start
    return positions, next_position
