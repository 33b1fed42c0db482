"""The state a hybrid model continues from, and the transformers ``Cache`` that carries it through
``model.generate``.

:class:`ModelState` is the model's own: one :class:`~hybridvl.mixers.state.MixerState` per layer (a recurrent
matrix, a ring buffer of keys and values, or a growing cache for ``A`` layers) and the M-RoPE position each
sequence resumes from. Its size is fixed unless the layout has ``A`` layers.

:class:`HybridCache` wraps one for transformers' generation loop. transformers' caches are lists of per-layer
key/value blocks that attention layers ``update``; the mixers here return new states instead, so the cache holds
the whole :class:`ModelState` and the model swaps it after every forward pass. It counts the tokens it has seen
(``get_seq_length``, padding included as transformers counts it) apart from the positions, which M-RoPE
compresses for images and videos. It cannot be cropped (recurrent states keep no history), so assisted and
prompt-lookup decoding, which roll a cache back, are refused with that reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Self

import torch
from transformers.cache_utils import Cache

from hybridvl.mixers.state import MixerState


@dataclasses.dataclass
class ModelState:
    """Everything needed to continue ``N`` sequences: one state per layer and where positions resume."""

    layers: list[MixerState]
    next_position: torch.Tensor  # [N] int64

    @property
    def batch_size(self) -> int:
        return self.next_position.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self.layers) + self.next_position.numel() * 8

    def clone(self) -> Self:
        """A deep copy (fork): calls on the copy leave this state untouched."""
        return ModelState([state.clone() for state in self.layers], self.next_position.clone())

    def copy_(self, other: ModelState) -> Self:
        """Write ``other`` into this state's tensors in place (see :meth:`MixerState.copy_`)."""
        if len(self.layers) != len(other.layers) or self.batch_size != other.batch_size:
            raise ValueError(
                f"cannot copy a state of {len(other.layers)} layers and {other.batch_size} sequences into one of "
                f"{len(self.layers)} layers and {self.batch_size} sequences"
            )
        for mine, theirs in zip(self.layers, other.layers):
            mine.copy_(theirs)
        self.next_position.copy_(other.next_position)
        return self

    def zero_(self) -> Self:
        """Empty the state in place (as :meth:`HybridVLM.init_state` makes it)."""
        for state in self.layers:
            state.zero_()
        self.next_position.zero_()
        return self

    def detach(self) -> Self:
        return ModelState([state.detach() for state in self.layers], self.next_position.clone())

    def map_sequences(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ModelState:
        """A state whose every tensor is ``fn`` of this one's along the sequence (first) dimension, e.g.
        ``lambda t: t.index_select(0, order)`` to reorder or pick sequences."""
        return ModelState([state._map(fn) for state in self.layers], fn(self.next_position))


class HybridCache(Cache):
    """A transformers ``Cache`` holding a :class:`ModelState` (``None`` until the first forward pass fills it).

    ``model.generate`` makes one on its prefill step; pass one as ``cache=`` to continue a conversation with new
    tokens only (``input_ids`` then hold just the new turn).
    """

    def __init__(self, state: ModelState | None = None, seen_tokens: int = 0) -> None:
        super().__init__(layers=[])
        self.state = state
        self.seen_tokens = seen_tokens

    def __repr__(self) -> str:
        held = "empty" if self.state is None else f"{self.state.batch_size} sequences, {self.state.nbytes} bytes"
        return f"{type(self).__name__}({held}, {self.seen_tokens} tokens seen)"

    def __len__(self) -> int:
        return 0 if self.state is None else len(self.state.layers)

    def advance(self, state: ModelState, tokens: int) -> None:
        """Hold ``state``, reached after ``tokens`` more input columns."""
        self.state = state
        self.seen_tokens += tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Input columns seen so far (transformers' count; positions are ``state.next_position``)."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a hybrid model's recurrent states keep no history and cannot be rolled back: decoding strategies that "
            "crop the cache (assisted or prompt-lookup decoding) do not apply; use greedy, sampling or beam search"
        )

    def reset(self) -> None:
        if self.state is not None:
            self.state.zero_()
        self.seen_tokens = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the sequences ``beam_idx`` names, in that order (beam search)."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state = self.state.map_sequences(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            self.state = self.state.map_sequences(lambda t: t.repeat_interleave(repeats, dim=0))
