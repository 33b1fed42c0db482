"""Helpers for packed variable-length batches.

A packed batch concatenates ``N`` sequences along time into one row: tensors have batch size 1 and
``cu_seqlens = [0, len_0, len_0 + len_1, ..., T]`` (int64, as in FlashAttention) marks the boundaries.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from itertools import pairwise

import torch


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch_size: int, seq_len: int) -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` describes a packed batch of ``seq_len`` tokens.

    Its values are checked when run eagerly. Inside a forward traced by torch.compile only its shape and dtype
    are: reading the values back would break the graph and specialise it to one packing, recompiling for the
    next. The model checks the values where they enter (:meth:`~hybridvl.models.hybrid.HybridVLM.decode`),
    outside its compiled blocks.
    """
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
    if torch.compiler.is_compiling():
        return
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
    grouping = _length_groups(tuple(sequence_bounds(cu_seqlens)), _device(tensors))
    outputs, states = [], []
    for members, pieces in grouping.split(tensors):
        out, final = fn(*pieces, initial_state=None if initial_state is None else initial_state[members])
        outputs.append(out)
        states.append(final)
    return grouping.merge(outputs), grouping.sequence_order(torch.cat(states))


def map_sequence_outputs(
    fn: Callable[..., torch.Tensor], cu_seqlens: torch.Tensor, tensors: Sequence[torch.Tensor]
) -> torch.Tensor:
    """:func:`map_sequences` for a stateless ``fn(*tensors) -> output [n, t, ...]``."""
    grouping = _length_groups(tuple(sequence_bounds(cu_seqlens)), _device(tensors))
    return grouping.merge([fn(*pieces) for _, pieces in grouping.split(tensors)])


def _device(tensors: Sequence[torch.Tensor | None]) -> torch.device:
    return next(t.device for t in tensors if t is not None)


@functools.lru_cache(maxsize=16)
def _length_groups(bounds: tuple[tuple[int, int], ...], device: torch.device) -> _LengthGroups:
    """:class:`_LengthGroups` of ``bounds``, kept for the next call with the same ones: layers of one batch share
    them, and a CUDA graph captures with the index tensors its warm-up made (copies to the GPU cannot be
    captured)."""
    return _LengthGroups(bounds, device)


class _LengthGroups:
    """The packed sequences grouped by length, and the moves between packing order and group order.

    In group order the tokens of each length's sequences lie together, sequence after sequence, so each group is
    one view ``[n, length, ...]``. Going there and back is one gather (``index_select``) each way, whatever the
    interleaving; when packing order already is group order (one length, or lengths in runs) both are views.
    """

    def __init__(self, bounds: tuple[tuple[int, int], ...], device: torch.device) -> None:
        by_length: dict[int, list[int]] = {}
        for n, (start, end) in enumerate(bounds):
            by_length.setdefault(end - start, []).append(n)
        self.groups = list(by_length.items())
        members = [n for _, group in self.groups for n in group]
        self.sizes = [length * len(group) for length, group in self.groups]
        if members == sorted(members):
            self.gather = self.scatter = self.sequence_gather = None
            return
        starts = torch.tensor([bounds[n][0] for n in members])
        lengths = torch.tensor([bounds[n][1] - bounds[n][0] for n in members])
        # token j of group order is packed token j + (its sequence's start - where the sequence begins here)
        shifts = torch.repeat_interleave(starts - (lengths.cumsum(0) - lengths), lengths)
        tokens = torch.arange(len(shifts)) + shifts
        self.gather = tokens.to(device)
        self.scatter = torch.empty_like(tokens).index_put_((tokens,), torch.arange(len(tokens))).to(device)
        self.sequence_gather = torch.tensor(members).argsort().to(device)

    def split(self, tensors: Sequence[torch.Tensor | None]) -> Iterator[tuple[list[int], list[torch.Tensor | None]]]:
        """Per length: the members' sequence indices and each tensor's ``[n, length, ...]`` rows of them."""
        grouped = [None if t is None else self._to_group_order(t).split(self.sizes, dim=1) for t in tensors]
        for number, (length, members) in enumerate(self.groups):
            pieces = [
                None if g is None else g[number].reshape(len(members), length, *g[number].shape[2:]) for g in grouped
            ]
            yield members, pieces

    def merge(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """Per-length outputs ``[n, length, ...]`` (in :meth:`split`'s order) as one packed ``[1, T, ...]`` row."""
        joined = torch.cat([out.flatten(0, 1) for out in outputs]).unsqueeze(0)
        return joined if self.scatter is None else joined.index_select(1, self.scatter)

    def sequence_order(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """Rows given per member in group order (dim 0), put back in sequence order."""
        return per_sequence if self.sequence_gather is None else per_sequence.index_select(0, self.sequence_gather)

    def _to_group_order(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.gather is None else t.index_select(1, self.gather)
