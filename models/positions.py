"""Qwen2.5-VL's 3-D M-RoPE position ids, computed as transformers' ``Qwen2_5_VLModel.get_rope_index`` does.

Text tokens advance all three components together. An image or video of ``(t, h, w)`` patches becomes
``t * h * w / merge**2`` placeholder tokens whose positions are ``start + (time, row, column)`` on the merged
grid, time scaled by ``tokens_per_second * seconds_per_grid`` for videos. Decoding continues at the largest
position used so far plus one.

Two versions of that code place videos differently (``HybridConfig.video_position_rule``), and a model must run
with the rule it was trained under:

* ``transformers5`` (transformers 5.x, hybridvl's default): temporal step ``i`` sits at
  ``int(i * tokens_per_second * seconds_per_grid)`` (at 0.5 s per step, 4 fps: 0, 1, 2, ...), and the text
  after an image or video continues at ``start + max(h, w) / merge``.
* ``transformers4`` (transformers 4.x, and InfiniteVL's modeling code, written for 4.57): ``seconds_per_grid``
  is cast to an integer before scaling, ``i * int(seconds_per_grid) * tokens_per_second`` (at 4 fps every step
  sits at 0), and the text after an image or video continues at the largest position in it plus one.

At 1.0 s per temporal step (2 fps, the processors' default) both place the frames at ``0, 2, 4, ...``; the text
after a video still differs once its last temporal position passes ``max(h, w) / merge - 1``. For images both
rules agree.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

TRANSFORMERS5 = "transformers5"
TRANSFORMERS4 = "transformers4"
VIDEO_POSITION_RULES = (TRANSFORMERS5, TRANSFORMERS4)


class VisionTokenError(ValueError):
    """Placeholder tokens and vision grids do not match."""


def check_video_position_rule(rule: str) -> None:
    """Raise ``ValueError`` unless ``rule`` is one of :data:`VIDEO_POSITION_RULES`."""
    if rule not in VIDEO_POSITION_RULES:
        raise ValueError(f"video_position_rule must be one of {', '.join(VIDEO_POSITION_RULES)}, got {rule!r}")


def video_time_interval(seconds: torch.Tensor | float, tokens_per_second: float, rule: str) -> torch.Tensor:
    """The temporal position step between a video's consecutive temporal patches under ``rule`` (see the module
    docstring); positions are ``int(i * step)``."""
    check_video_position_rule(rule)
    seconds = torch.as_tensor(seconds, dtype=torch.float32)
    return tokens_per_second * (seconds.trunc() if rule == TRANSFORMERS4 else seconds)


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
    video_position_rule: str = TRANSFORMERS5,
) -> tuple[torch.Tensor, int]:
    """Positions ``[3, L]`` of one unpadded sequence and the position decoding continues from.

    Args:
        input_ids: ``[L]`` token ids.
        image_grids: ``(t, h, w)`` of the images, consumed in order of appearance.
        video_grids: ``((t, h, w), seconds_per_grid)`` of the videos, consumed in order.
        start: the first position (where an earlier part of the sequence stopped).
        video_position_rule: how video time becomes positions (see the module docstring).
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
        interval = video_time_interval(seconds, tokens_per_second, video_position_rule) if is_video else 1
        block = vision_positions(current, grid, merge_size, interval)
        pieces.append(block)
        if video_position_rule == TRANSFORMERS4:
            current = int(block.max()) + 1
        else:
            current += max(int(grid[1]), int(grid[2])) // merge_size
        i += count
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    next_position = int(positions.max()) + 1 if positions.numel() else start
    return positions, next_position
