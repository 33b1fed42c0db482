"""``A``: full causal attention and ``S``: sliding-window attention, as in Qwen2.5-VL's decoder.

Grouped-query heads, optional q/k/v biases (Qwen2.5-VL has them, ``o_proj`` has none), RoPE or M-RoPE
(``mrope_section``) on queries and keys. ``S`` attends the last ``window`` tokens (itself included) and keeps
them in a ring buffer (:class:`hybridvl.mixers.state.KVCache`), so its state is fixed-size; ``A``'s cache grows.

``q_proj``, ``k_proj`` and ``v_proj`` (with their biases) are one :class:`~hybridvl.mixers.modules.FusedLinear`
``qkv_proj`` (one matrix multiplication); checkpoints keep the separate names, which follow transformers'
``Qwen2_5_VLAttention``, so a Qwen2.5-VL attention layer loads as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hybridvl.mixers.backends import float32_attention_limitations, log_once
from hybridvl.mixers.base import Mixer, check_int, check_positive
from hybridvl.mixers.modules import FusedLinear
from hybridvl.mixers.ops.attention import (
    FULL_PREFERENCE,
    WINDOW_PREFERENCE,
    attention_over_positions,
    causal_attention,
    decode_attention,
)
from hybridvl.mixers.ops.rotary import apply_rotary, rotary_cos_sin
from hybridvl.mixers.ops.varlen import packed_positions, sequence_bounds
from hybridvl.mixers.registry import register_mixer
from hybridvl.mixers.state import KVCache


class Attention(Mixer):
    """Full causal attention.

    Args:
        hidden_size: model width.
        num_heads: query heads (default ``hidden_size // 128``, at least 1).
        num_kv_heads: key/value heads (default ``num_heads``); must divide ``num_heads``.
        head_dim: per-head width (default ``hidden_size // num_heads``).
        qkv_bias: biases on the q/k/v projections.
        rope_theta: RoPE base.
        mrope_section: M-RoPE split of ``head_dim / 2`` into (time, height, width), e.g. ``[16, 24, 24]``;
            ``None`` for 1-D RoPE.
        backend: ``"auto"``, ``"flash_attn"``, ``"torch"`` (SDPA) or ``"fla"``; ``auto`` takes them in that
            order for full attention and prefers ``fla`` over SDPA for sliding windows. Calls that continue
            from a state attend over the cache with PyTorch SDPA, except single-token steps on CUDA, which write
            and attend the cache in one Triton kernel
            (:func:`~hybridvl.mixers.ops.decode_attention.decode_attention_step`) unless the backend is
            ``"torch"``.
    """

    backends = FULL_PREFERENCE
    fixed_size_state = False

    def __init__(
        self,
        hidden_size: int,
        num_heads: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        rope_theta: float = 1_000_000.0,
        mrope_section: Sequence[int] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, backend)
        owner = self._owner
        self.num_heads = max(1, hidden_size // 128) if num_heads is None else check_int(owner, "num_heads", num_heads)
        self.num_kv_heads = self.num_heads if num_kv_heads is None else check_int(owner, "num_kv_heads", num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{owner}: num_kv_heads {self.num_kv_heads} must divide num_heads {self.num_heads}")
        if head_dim is None and hidden_size % self.num_heads:
            raise ValueError(
                f"{owner}: hidden_size {hidden_size} is not divisible by num_heads {self.num_heads}; choose "
                "num_heads that divides it or pass head_dim"
            )
        self.head_dim = hidden_size // self.num_heads if head_dim is None else check_int(owner, "head_dim", head_dim)
        if self.head_dim % 2:
            raise ValueError(f"{owner}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not isinstance(qkv_bias, bool):
            raise ValueError(f"{owner}: qkv_bias must be True or False, got qkv_bias={qkv_bias!r}")
        self.rope_theta = check_positive(owner, "rope_theta", rope_theta)
        self.mrope_section = None if mrope_section is None else _mrope_section(owner, mrope_section, self.head_dim)
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = FusedLinear(hidden_size, {"q_proj": q_dim, "k_proj": kv_dim, "v_proj": kv_dim}, bias=qkv_bias)
        self._qkv_sizes = self.qkv_proj.sizes  # kept here too: a LoRA layer wrapping qkv_proj hides its attributes
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden_size, bias=False)

    @property
    def window(self) -> int | None:
        """Keys per query including itself; ``None``: all earlier tokens."""
        return None

    def forward(
        self,
        x: torch.Tensor,
        state: KVCache | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        n = self._check_input(x, state, cu_seqlens)
        q, k, v = self.qkv_proj(x).split(self._qkv_sizes, dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k, v = (t.unflatten(-1, (self.num_kv_heads, self.head_dim)) for t in (k, v))
        start = torch.zeros(n, dtype=torch.long, device=x.device) if state is None else state.length
        tokens = _token_positions(start, x.shape[0], x.shape[1], cu_seqlens)
        cos, sin = rotary_cos_sin(
            tokens if position_ids is None else position_ids,
            self.head_dim,
            self.rope_theta,
            self.mrope_section,
            q.dtype,
        )
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if state is not None and cu_seqlens is None and x.shape[1] == 1:
            # one new token per sequence: store it first (it evicts only a key outside its window), then read
            # the cache alone; no host synchronisation, so the step can be captured in a CUDA graph
            if self._decodes_in_kernel(q, k, v, state):
                from hybridvl.mixers.ops.decode_attention import decode_attention_step

                self._make_room(state, tokens)
                o = decode_attention_step(q, k, v, state.key, state.value, state.length)
            else:
                self._write(state, k, v, tokens, None)
                o = decode_attention(q, state.key.to(k.dtype), state.value.to(v.dtype), state.slot_positions() >= 0)
            return self.o_proj(o.flatten(-2)), state
        if state is None:
            backend = self._resolve_backend(x, float32_attention_limitations(x.device, q.dtype), q.dtype)
            o = causal_attention(q, k, v, window=self.window, cu_seqlens=cu_seqlens, backend=backend)
            state = self.init_state(n, x.device, k.dtype)
        else:
            o = self._attend_over_cache(q, k, v, tokens, state, cu_seqlens)
        self._write(state, k, v, tokens, cu_seqlens)
        return self.o_proj(o.flatten(-2)), state

    def _attend_over_cache(self, q, k, v, tokens, cache, cu_seqlens):
        if cache.key.device.type == "cuda" and self.backend != "torch":
            log_once(f"{self._owner}: continuing from a KV cache attends over it with PyTorch SDPA")
        cached = cache.slot_positions()
        key, value = cache.key.to(k.dtype), cache.value.to(v.dtype)
        if cu_seqlens is None:
            return attention_over_positions(
                q,
                torch.cat([key, k], 1),
                torch.cat([value, v], 1),
                tokens,
                torch.cat([cached, tokens], 1),
                window=self.window,
            )
        outputs = []
        for n, (s, e) in enumerate(sequence_bounds(cu_seqlens)):
            outputs.append(
                attention_over_positions(
                    q[:, s:e],
                    torch.cat([key[n : n + 1], k[:, s:e]], 1),
                    torch.cat([value[n : n + 1], v[:, s:e]], 1),
                    tokens[:, s:e],
                    torch.cat([cached[n : n + 1], tokens[:, s:e]], 1),
                    window=self.window,
                )
            )
        return torch.cat(outputs, dim=1)

    def _write(self, cache: KVCache, k, v, tokens, cu_seqlens) -> None:
        """Store new keys/values at their slots and advance ``cache.length``, for all sequences at once (no
        per-sequence loop and, for windowed caches, no host synchronisation)."""
        if cu_seqlens is None:  # B rows of T tokens: sequence n is row n
            batch, length = tokens.shape
            lengths = torch.full((batch,), length, dtype=torch.long, device=k.device)
            ends = torch.arange(1, batch + 1, device=k.device) * length
        else:
            lengths, ends = cu_seqlens[1:] - cu_seqlens[:-1], cu_seqlens[1:]
        k, v, tokens = k.flatten(0, 1), v.flatten(0, 1), tokens.flatten()
        if self.window is None:
            self._put_all(cache, lengths, tokens, k, v)
        else:
            self._put_window(cache, lengths, ends, tokens, k, v)
        cache.length.add_(lengths)

    def _decodes_in_kernel(self, q, k, v, cache: KVCache) -> bool:
        """Whether a single-token step runs :func:`~hybridvl.mixers.ops.decode_attention.decode_attention_step`
        (write and attention in one Triton kernel): on CUDA, unless the PyTorch backend was asked for or autograd
        needs the step's gradient (the kernel has no backward)."""
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, cache.key, cache.value))
        return cache.key.is_cuda and self.backend != "torch" and not needs_grad

    @staticmethod
    def _make_room(cache: KVCache, tokens: torch.Tensor) -> None:
        """Grow a growing cache to hold the positions ``tokens``; a ring buffer always has room."""
        # a CUDA graph cannot grow the cache (nor read positions on the host): its owner reserves the room
        if cache.window is None and not (cache.key.is_cuda and torch.cuda.is_current_stream_capturing()):
            needed = int(tokens.max()) + 1
            if needed > cache.key.shape[1]:
                cache.reserve(max(needed, 2 * cache.key.shape[1]))

    @classmethod
    def _put_all(cls, cache: KVCache, lengths, tokens, k, v) -> None:
        """A growing cache: token at position ``p`` of sequence ``n`` goes to slot ``(n, p)``."""
        cls._make_room(cache, tokens)
        rows = torch.repeat_interleave(torch.arange(len(lengths), device=k.device), lengths, output_size=len(tokens))
        index = (rows, tokens)
        k, v = k.to(cache.key.dtype), v.to(cache.value.dtype)
        if torch.is_grad_enabled() and (k.requires_grad or cache.key.requires_grad):
            cache.key, cache.value = cache.key.index_put(index, k), cache.value.index_put(index, v)
        else:
            cache.key.index_put_(index, k)
            cache.value.index_put_(index, v)

    def _put_window(self, cache: KVCache, lengths, ends, tokens, k, v) -> None:
        """A ring buffer: slot ``s`` of sequence ``n`` takes the sequence's newest token at a position ``p`` with
        ``p % window == s``, gathered from the new tokens; slots no new token reaches keep what they held."""
        slots = torch.arange(self.window, device=k.device)
        last = tokens[ends - 1]  # each sequence's newest position
        back = (last[:, None] - slots) % self.window  # [N, W] tokens between the sequence's newest and the slot's
        fresh = (back < lengths[:, None])[..., None, None]
        source = (ends[:, None] - 1 - back).clamp_min(0)  # where not fresh the gathered token is discarded
        key = torch.where(fresh, k[source].to(cache.key.dtype), cache.key)
        value = torch.where(fresh, v[source].to(cache.value.dtype), cache.value)
        if torch.is_grad_enabled() and (k.requires_grad or cache.key.requires_grad):
            cache.key, cache.value = key, value
        else:
            cache.key.copy_(key)
            cache.value.copy_(value)

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        device, dtype = self._device(device), self._dtype(dtype)
        slots = 0 if self.window is None else self.window
        shape = (batch_size, slots, self.num_kv_heads, self.head_dim)
        return KVCache(
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(batch_size, dtype=torch.long, device=device),
            self.window,
        )

    def state_bytes(self, batch_size: int = 1, seq_len: int = 0, dtype: torch.dtype | None = None) -> int:
        slots = seq_len if self.window is None else self.window
        element = torch.empty((), dtype=self._dtype(dtype)).element_size()
        return batch_size * (2 * slots * self.num_kv_heads * self.head_dim * element + 8)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, window={self.window}, mrope_section={self.mrope_section}"
        )


class SlidingWindowAttention(Attention):
    """Sliding-window causal attention: each query sees the last ``window`` tokens, itself included.

    Args:
        hidden_size: model width.
        window: keys per query (8192 in InfiniteVL).
        **options: as :class:`Attention`.
    """

    backends = WINDOW_PREFERENCE
    fixed_size_state = True

    def __init__(self, hidden_size: int, window: int = 8192, **options) -> None:
        super().__init__(hidden_size, **options)
        self._window = check_int(self._owner, "window", window)

    @property
    def window(self) -> int:
        return self._window


register_mixer("S", "swa", aliases=("sliding_window_attention",))(SlidingWindowAttention)
register_mixer("A", "attn", aliases=("attention", "full_attention"))(Attention)


def _mrope_section(owner: str, section: Any, head_dim: int) -> list[int]:
    """``section`` as a list if it is three non-negative sizes summing to ``head_dim / 2``."""
    sizes = list(section) if isinstance(section, Sequence) and not isinstance(section, str) else None
    if (
        sizes is None
        or len(sizes) != 3
        or not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in sizes)
        or sum(sizes) * 2 != head_dim
    ):
        raise ValueError(
            f"{owner}: mrope_section must be three sizes summing to head_dim / 2 = {head_dim / 2:g}, got {section!r}"
        )
    return sizes


def _token_positions(start: torch.Tensor, batch: int, seq_len: int, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Absolute token index ``[B, T]`` of every new token, counting on from ``start`` ``[N]``."""
    if cu_seqlens is None:
        return start[:, None] + torch.arange(seq_len, device=start.device)
    return packed_positions(start, cu_seqlens, seq_len)
