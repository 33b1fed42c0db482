"""One decoding step of attention over a KV cache, written into the cache and attended in one Triton kernel.

The cache is ``[N, slots, Hkv, D]`` keys and values (:class:`~hybridvl.mixers.state.KVCache`) and ``length`` ``[N]``
the tokens each sequence holds so far. The new token, at position ``p = length``, goes to slot ``p % slots``: a
sliding window's ring buffer (``slots == window``; it evicts the token that leaves the window) or a growing cache
reserved past ``p`` (slot ``p``). The query then attends the tokens the cache holds, the new one included, and
``length`` advances by one.

:func:`decode_attention_step` runs that as two kernels, split-K flash decoding: every program takes one KV head
of one sequence (its ``Hq / Hkv`` query heads together, so each key is read once) and one stretch of the cache,
and keeps a running softmax over it; the program of the first stretch also stores the new key and value and
attends them from registers (no program reads that slot from memory, so the write races with nothing). A second
kernel merges the stretches' partial results and advances ``length``. The stretches divide the tokens held, not
the slots, so a cache reserved far beyond its contents costs what its contents cost. Nothing reads back to the
host: the step can be captured in a CUDA graph.

:func:`decode_attention_step_reference` is the same step in PyTorch operations.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from hybridvl.mixers.ops.attention import decode_attention

BLOCK_N = 64  # cache slots per loop iteration of a program
MIN_SLOTS_PER_SPLIT = 256  # a cache this many times the split count uses fewer splits
SPLIT_BLOCK = 16  # partial results the merge kernel reads per iteration


@triton.jit
def _decode_attention_step_kernel(
    q,
    k,
    v,
    key_cache,
    value_cache,
    length,
    o_partial,
    m_partial,
    l_partial,
    scale,
    slots,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BG: tl.constexpr,
    BD: tl.constexpr,
    BN: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    i_split, i_nh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    i_n, i_h = i_nh // HKV, i_nh % HKV
    G: tl.constexpr = HQ // HKV

    position = tl.load(length + i_n)
    write = position % slots
    held = tl.minimum(position, slots)  # slots holding earlier tokens (one of them is `write` once the ring is full)

    o_g = tl.arange(0, BG)
    o_d = tl.arange(0, BD)
    mask_g, mask_d = o_g < G, o_d < D
    heads = i_n * HQ + i_h * G + o_g  # the query heads that read this KV head
    b_q = tl.load(q + heads[:, None] * D + o_d[None, :], mask=mask_g[:, None] & mask_d[None, :], other=0.0)

    b_m = tl.full([BG], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BG], dtype=tl.float32)
    b_acc = tl.zeros([BG, BD], dtype=tl.float32)
    if i_split == 0:
        # the new token: stored in its slot, attended from registers
        b_k = tl.load(k + i_nh * D + o_d, mask=mask_d, other=0.0).to(key_cache.dtype.element_ty)
        b_v = tl.load(v + i_nh * D + o_d, mask=mask_d, other=0.0).to(value_cache.dtype.element_ty)
        p_slot = ((i_n * slots + write) * HKV + i_h) * D + o_d
        tl.store(key_cache + p_slot, b_k, mask=mask_d)
        tl.store(value_cache + p_slot, b_v, mask=mask_d)
        b_m = tl.sum(b_q.to(tl.float32) * b_k.to(tl.float32)[None, :], 1) * scale
        b_l = tl.full([BG], 1.0, dtype=tl.float32)
        b_acc = tl.zeros([BG, BD], dtype=tl.float32) + b_v.to(tl.float32)[None, :]

    # this program's stretch of the held slots, in whole blocks
    per_split = tl.cdiv(tl.cdiv(held, NUM_SPLITS), BN) * BN
    start = i_split * per_split
    end = tl.minimum(start + per_split, held)
    for first in range(start, end, BN):
        o_s = first + tl.arange(0, BN)
        valid = (o_s < end) & (o_s != write)
        p_s = ((i_n * slots + o_s[:, None]) * HKV + i_h) * D + o_d[None, :]
        mask_s = valid[:, None] & mask_d[None, :]
        b_kc = tl.load(key_cache + p_s, mask=mask_s, other=0.0).to(b_q.dtype)
        b_s = tl.dot(b_q, tl.trans(b_kc), input_precision=INPUT_PRECISION) * scale
        b_s = tl.where(valid[None, :], b_s, float("-inf"))
        m_new = tl.maximum(b_m, tl.max(b_s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of masked slots only
        alpha = tl.exp(b_m - m_safe)
        b_p = tl.exp(b_s - m_safe[:, None])
        b_vc = tl.load(value_cache + p_s, mask=mask_s, other=0.0).to(b_q.dtype)
        b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_vc.dtype), b_vc, input_precision=INPUT_PRECISION)
        b_l = b_l * alpha + tl.sum(b_p, 1)
        b_m = m_new

    p_partial = heads * NUM_SPLITS + i_split
    tl.store(m_partial + p_partial, b_m, mask=mask_g)
    tl.store(l_partial + p_partial, b_l, mask=mask_g)
    tl.store(o_partial + p_partial[:, None] * D + o_d[None, :], b_acc, mask=mask_g[:, None] & mask_d[None, :])


@triton.jit
def _merge_splits_kernel(
    o,
    o_partial,
    m_partial,
    l_partial,
    length,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,
):
    i_nh = tl.program_id(0).to(tl.int64)
    o_s = tl.arange(0, BS)
    o_d = tl.arange(0, BD)
    mask_d = o_d < D
    b_m = tl.load(m_partial + i_nh * NUM_SPLITS + o_s, mask=o_s < NUM_SPLITS, other=float("-inf"))
    b_l = tl.load(l_partial + i_nh * NUM_SPLITS + o_s, mask=o_s < NUM_SPLITS, other=0.0)
    m_max = tl.max(b_m, 0)  # finite: the first split holds the new token
    denominator = tl.sum(tl.exp(b_m - m_max) * b_l, 0)
    b_acc = tl.zeros([BD], dtype=tl.float32)
    for first in range(0, NUM_SPLITS, SPLIT_BLOCK):
        o_c = first + tl.arange(0, SPLIT_BLOCK)
        mask_c = o_c < NUM_SPLITS
        b_w = tl.exp(tl.load(m_partial + i_nh * NUM_SPLITS + o_c, mask=mask_c, other=float("-inf")) - m_max)
        p_o = o_partial + (i_nh * NUM_SPLITS + o_c[:, None]) * D + o_d[None, :]
        b_o = tl.load(p_o, mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        b_acc += tl.sum(b_w[:, None] * b_o, 0)
    tl.store(o + i_nh * D + o_d, (b_acc / denominator).to(o.dtype.element_ty), mask=mask_d)
    if i_nh % HQ == 0:  # every split has read the length: advance it
        i_n = i_nh // HQ
        tl.store(length + i_n, tl.load(length + i_n) + 1)


@torch.compiler.disable  # under torch.compile the Triton kernels run as they are
def decode_attention_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    length: torch.Tensor,
    *,
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Write one new token per sequence into a KV cache and attend over the cache (Triton; see the module).

    Args:
        q: ``[N, 1, Hq, D]`` queries of the new tokens.
        k, v: ``[N, 1, Hkv, D]`` their keys and values (``Hq % Hkv == 0``).
        key_cache, value_cache: ``[N, slots, Hkv, D]`` contiguous caches, written in place: slot ``length % slots``
            takes the new token. A cache that is not a ring buffer needs ``slots > length`` (the caller reserves).
        length: ``[N]`` int64 tokens held before this step, the new token's position; advanced by one in place.
        scale: score scale, default ``D ** -0.5``.
        num_splits: stretches each sequence's cache is divided into (default: enough programs for the GPU).

    Returns:
        ``[N, 1, Hq, D]`` in ``q``'s dtype.
    """
    N, _, Hq, D = q.shape
    slots, Hkv = key_cache.shape[1], key_cache.shape[2]
    _check_shapes(q, k, v, key_cache, value_cache, length)
    scale = D**-0.5 if scale is None else scale
    if num_splits is None:
        num_splits = _default_splits(q.device, N * Hkv, slots)
    q, k, v = (t.contiguous() for t in (q, k, v))
    o = torch.empty_like(q)
    m_partial = q.new_empty(N, Hq, num_splits, dtype=torch.float32)
    l_partial = torch.empty_like(m_partial)
    o_partial = q.new_empty(N, Hq, num_splits, D, dtype=torch.float32)
    BD = max(16, triton.next_power_of_2(D))
    _decode_attention_step_kernel[(num_splits, N * Hkv)](
        q,
        k,
        v,
        key_cache,
        value_cache,
        length,
        o_partial,
        m_partial,
        l_partial,
        scale,
        slots,
        HQ=Hq,
        HKV=Hkv,
        D=D,
        BG=max(16, triton.next_power_of_2(Hq // Hkv)),
        BD=BD,
        BN=BLOCK_N,
        NUM_SPLITS=num_splits,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # float32 at float32 accuracy, not TF32
        num_warps=4,
    )
    _merge_splits_kernel[(N * Hq,)](
        o,
        o_partial,
        m_partial,
        l_partial,
        length,
        HQ=Hq,
        D=D,
        BD=BD,
        BS=triton.next_power_of_2(num_splits),
        NUM_SPLITS=num_splits,
        SPLIT_BLOCK=SPLIT_BLOCK,
        num_warps=4,
    )
    return o


def decode_attention_step_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    length: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`decode_attention_step` in PyTorch operations (the reference): the same arguments, writes and result."""
    _check_shapes(q, k, v, key_cache, value_cache, length)
    N, slots = key_cache.shape[:2]
    rows, slot = torch.arange(N, device=q.device), length % slots
    key_cache[rows, slot] = k[:, 0].to(key_cache.dtype)
    value_cache[rows, slot] = v[:, 0].to(value_cache.dtype)
    length.add_(1)
    visible = torch.arange(slots, device=q.device) < length.clamp(max=slots)[:, None]
    return decode_attention(q, key_cache.to(q.dtype), value_cache.to(q.dtype), visible, scale=scale)


def _check_shapes(q, k, v, key_cache, value_cache, length) -> None:
    N, T, Hq, D = q.shape
    if T != 1:
        raise ValueError(f"a decode step takes one token per sequence: q must be [N, 1, Hq, D], got {tuple(q.shape)}")
    if key_cache.dim() != 4 or key_cache.shape[0] != N or key_cache.shape[3] != D or Hq % key_cache.shape[2]:
        raise ValueError(
            f"key_cache must be [N, slots, Hkv, D] = [{N}, slots, Hkv, {D}] with Hkv dividing {Hq}, got "
            f"{tuple(key_cache.shape)}"
        )
    Hkv = key_cache.shape[2]
    if value_cache.shape != key_cache.shape or not key_cache.is_contiguous() or not value_cache.is_contiguous():
        raise ValueError("key_cache and value_cache must be contiguous and of the same shape")
    for name, t in (("k", k), ("v", v)):
        if t.shape != (N, 1, Hkv, D):
            raise ValueError(f"{name} must be [N, 1, Hkv, D] = [{N}, 1, {Hkv}, {D}], got {tuple(t.shape)}")
    if length.shape != (N,) or length.dtype != torch.long:
        raise ValueError(f"length must be [N] = [{N}] int64, got {tuple(length.shape)} {length.dtype}")


def _default_splits(device: torch.device, programs: int, slots: int) -> int:
    """Splits per sequence and KV head: two programs per multiprocessor over all of them, no more than one per
    :data:`MIN_SLOTS_PER_SPLIT` slots."""
    most = max(1, slots // MIN_SLOTS_PER_SPLIT)
    return max(1, min(most, -(-2 * _multiprocessors(device) // programs)))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter on the CPU: a few splits, to exercise the merge
    return torch.cuda.get_device_properties(device).multi_processor_count
