"""The states mixers carry between calls.

A state describes ``N`` sequences (the batch, or the packed sequences of a ``cu_seqlens`` batch).
States are plain dataclasses of tensors: ``clone()`` forks one (a stream and a question asked of it),
``nbytes`` reports its memory. Calling a mixer with a state may write into that state's buffers (the KV
ring buffer is updated in place outside autograd); clone first to keep the original.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Self

import torch


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, fn) for key, item in value.items()}
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


class MixerState:
    """Behaviour shared by every state dataclass."""

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Self:
        changes = {f.name: _map_tensors(getattr(self, f.name), fn) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **changes)

    def clone(self) -> Self:
        """A deep copy: calls on the copy leave this state untouched."""
        return self._map(torch.clone)

    def detach(self) -> Self:
        """The same state cut from the autograd graph (truncated backpropagation through time)."""
        return self._map(torch.Tensor.detach)

    def to(self, device: torch.device | str) -> Self:
        """The state on another device."""
        return self._map(lambda t: t.to(device))

    def copy_(self, other: MixerState) -> Self:
        """Write ``other``'s values into this state's tensors in place (their addresses stay, as a CUDA graph
        needs); tensors ``other`` shares with this state are left as they are. Shapes must match."""
        for f in dataclasses.fields(self):
            mine, theirs = _tensors(getattr(self, f.name)), _tensors(getattr(other, f.name))
            if len(mine) != len(theirs):
                raise ValueError(f"cannot copy a state with a different structure into this one (field {f.name!r})")
            for target, source in zip(mine, theirs):
                if target is not source:
                    target.copy_(source)
        return self

    def zero_(self) -> Self:
        """Empty the state in place (every tensor zero, as :meth:`init_state` makes it)."""
        for f in dataclasses.fields(self):
            for tensor in _tensors(getattr(self, f.name)):
                tensor.zero_()
        return self

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(
            t.numel() * t.element_size() for f in dataclasses.fields(self) for t in _tensors(getattr(self, f.name))
        )

    @property
    def device(self) -> torch.device:
        """The device of the state's tensors."""
        return next(t for f in dataclasses.fields(self) for t in _tensors(getattr(self, f.name))).device

    def structure(self) -> dict[str, Any]:
        """What a mixer checks before continuing from this state: ``"type"`` (the class name), the shape of each
        tensor with ``N`` for the sequence dimension (``"conv.q": "[N, 256, 4]"``) and every other field's value.
        States of the same mixer kind and options have the same structure, whatever their batch or dtype."""
        structure: dict[str, Any] = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            parts = value.items() if isinstance(value, dict) else [(None, value)]
            for key, item in parts:
                name = f.name if key is None else f"{f.name}.{key}"
                structure[name] = self._shape(f.name, item) if isinstance(item, torch.Tensor) else item
        return structure

    def _shape(self, field: str, tensor: torch.Tensor) -> str:
        """``tensor``'s shape as :meth:`structure` reports it."""
        return "[" + ", ".join(["N", *map(str, tensor.shape[1:])]) + "]"


@dataclasses.dataclass
class RecurrentState(MixerState):
    """Fixed-size state of a linear mixer (D, M, G, L).

    Attributes:
        recurrent: ``[N, H, K, V]`` float32 matrix memory.
        conv: the last ``kernel_size`` inputs of each short convolution, ``name -> [N, C, kernel_size]``.
    """

    recurrent: torch.Tensor
    conv: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.recurrent.shape[0]


@dataclasses.dataclass
class KVCache(MixerState):
    """Keys and values of an attention mixer (S, A), stored after RoPE.

    With a ``window`` the cache is a ring buffer of ``window`` slots: the token at position ``p`` lives in
    slot ``p % window``, so memory stays fixed. Without one (full attention, ``A``) token ``p`` lives in
    slot ``p`` and the buffers grow as needed.

    Attributes:
        key, value: ``[N, slots, Hkv, D]``.
        length: ``[N]`` int64, tokens seen so far by each sequence.
        window: ring size, or ``None`` for a growing cache.
    """

    key: torch.Tensor
    value: torch.Tensor
    length: torch.Tensor
    window: int | None = None

    @property
    def batch_size(self) -> int:
        return self.key.shape[0]

    def _shape(self, field: str, tensor: torch.Tensor) -> str:
        """As :meth:`MixerState._shape`; a growing cache's slot count is ``slots`` (it varies)."""
        if self.window is not None or field not in ("key", "value"):
            return super()._shape(field, tensor)
        return "[" + ", ".join(["N", "slots", *map(str, tensor.shape[2:])]) + "]"

    def copy_(self, other: KVCache) -> Self:
        """As :meth:`MixerState.copy_`; a growing cache may take a shorter one (its other slots are emptied),
        never a longer one (buffers at fixed addresses cannot grow)."""
        if self.window is not None or other.key.shape[1] == self.key.shape[1]:
            return super().copy_(other)
        slots = other.key.shape[1]
        if slots > self.key.shape[1]:
            raise ValueError(
                f"a full-attention cache of {slots} slots does not fit this one of {self.key.shape[1]}; reserve more"
            )
        for target, source in ((self.key, other.key), (self.value, other.value)):
            target[:, slots:].zero_()
            target[:, :slots].copy_(source)
        self.length.copy_(other.length)
        return self

    def reserve(self, slots: int) -> None:
        """Give a growing cache (``window is None``) room for ``slots`` tokens now, so that later writes up to
        that length never reallocate (a CUDA graph needs fixed buffers). Windowed caches are already fixed."""
        if self.window is not None or slots <= self.key.shape[1]:
            return
        grown = []
        for old in (self.key, self.value):
            new = old.new_zeros(old.shape[0], slots, *old.shape[2:])
            new[:, : old.shape[1]] = old
            grown.append(new)
        self.key, self.value = grown

    def slot_positions(self) -> torch.Tensor:
        """``[N, slots]`` position of the token held in each slot, ``-1`` where the slot is empty."""
        slots = torch.arange(self.key.shape[1], device=self.key.device)
        length = self.length[:, None]
        if self.window is None:
            return torch.where(slots < length, slots, -1)
        # newest token in slot (length - 1) % W; slot s holds the latest position p < length with p % W == s
        last = length - 1
        pos = last - (last - slots) % self.window
        return torch.where(pos >= 0, pos, -1)
