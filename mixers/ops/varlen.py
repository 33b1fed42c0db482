"""Helpers for packed variable-length batches.

A packed batch concatenates ``N`` sequences along time into one row: tensors have batch size 1 and
``cu_seqlens = [0, len_0, len_0 + len_1, ..., T]`` (int64, as in FlashAttention) marks the boundaries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch_size: int, seq_len: int) -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` describes a packed batch of ``seq_len`` tokens."""
    if batch_size != 1:
        raise ValueError(
            f"packed input (cu_seqlens given) must have batch size 1, got {batch_size}; "
            "concatenate the sequences along time first"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D tensor [0, ..., T] of length N + 1, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != seq_len or any(end <= start for start, end in pairwise(bounds)):
        raise ValueError(
            f"cu_seqlens must rise strictly from 0 to the sequence length {seq_len} "
            f"(every packed sequence at least one token), got {bounds}"
        )


def sequence_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each packed sequence."""
    bounds = cu_seqlens.tolist()
    return list(pairwise(bounds))


def seqlens_to_cu_seqlens(lengths: Sequence[int] | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Turn sequence lengths into ``cu_seqlens`` (int64)."""
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0))


def packed_positions(start: torch.Tensor, cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """The position ``[1, T]`` of every token of a packed row of ``tokens`` tokens, sequence ``n`` counting on
    from ``start[n]``. The row's length is given, so CUDA reads nothing back to the host."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    offsets = torch.repeat_interleave(start - cu_seqlens[:-1], lengths, output_size=tokens)
    return (torch.arange(tokens, device=start.device) + offsets)[None]


def map_sequences(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    cu_seqlens: torch.Tensor,
    tensors: Sequence[torch.Tensor | None],
    initial_state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``fn(*tensors, initial_state=states)`` over the packed sequences, one call per sequence length.

    ``tensors`` have batch size 1 and time on dim 1 (``None`` entries pass through). Sequences of equal length
    are stacked along the batch dimension and run together, so ``fn`` must treat batch rows independently;
    it returns ``(output [n, t, ...], final_state [n, ...])``. Outputs come back concatenated along time in
    packing order, states along dim 0 in sequence order.
    """
    outputs, states = {}, {}
    for members, pieces in _equal_length_batches(sequence_bounds(cu_seqlens), tensors):
        out, final = fn(*pieces, initial_state=None if initial_state is None else initial_state[members])
        for first, rows in _blocks(members):
            outputs[first] = out[rows].flatten(0, 1).unsqueeze(0)
            states[first] = final[rows]
    return torch.cat([outputs[n] for n in sorted(outputs)], dim=1), torch.cat([states[n] for n in sorted(states)])


def map_sequence_outputs(
    fn: Callable[..., torch.Tensor], cu_seqlens: torch.Tensor, tensors: Sequence[torch.Tensor]
) -> torch.Tensor:
    """:func:`map_sequences` for a stateless ``fn(*tensors) -> output [n, t, ...]``."""
    outputs = {}
    for members, pieces in _equal_length_batches(sequence_bounds(cu_seqlens), tensors):
        out = fn(*pieces)
        for first, rows in _blocks(members):
            outputs[first] = out[rows].flatten(0, 1).unsqueeze(0)
    return torch.cat([outputs[n] for n in sorted(outputs)], dim=1)


def _equal_length_batches(
    bounds: list[tuple[int, int]], tensors: Sequence[torch.Tensor | None]
) -> Iterator[tuple[list[int], list[torch.Tensor | None]]]:
    """For each sequence length: the indices of the sequences that long and ``tensors`` cut to them, stacked.
    Neighbouring sequences of one length are one view (a reshape), not a copy per sequence."""
    groups: dict[int, list[int]] = {}
    for n, (start, end) in enumerate(bounds):
        groups.setdefault(end - start, []).append(n)
    for length, members in groups.items():
        spans = [
            (bounds[first][0], bounds[first][0] + length * (rows.stop - rows.start)) for first, rows in _blocks(members)
        ]
        yield members, [None if t is None else _stack(t, spans, len(members), length) for t in tensors]


def _stack(t: torch.Tensor, spans: list[tuple[int, int]], count: int, length: int) -> torch.Tensor:
    """``t[:, start:end]`` of every span, joined and split into ``count`` rows of ``length`` steps."""
    joined = t[:, spans[0][0] : spans[0][1]] if len(spans) == 1 else torch.cat([t[:, a:b] for a, b in spans], dim=1)
    return joined.reshape(count, length, *t.shape[2:])


def _blocks(members: list[int]) -> list[tuple[int, slice]]:
    """Split ascending sequence indices into runs of neighbours: ``(first index, slice of rows in members)``."""
    blocks, start = [], 0
    for row in range(1, len(members) + 1):
        if row == len(members) or members[row] != members[row - 1] + 1:
            blocks.append((members[start], slice(start, row)))
            start = row
    return blocks
