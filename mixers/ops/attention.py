"""Causal softmax attention, full or sliding-window, with grouped KV heads.

``window`` counts the keys a query sees including itself (query ``i`` attends keys ``i - window + 1 .. i``),
the convention of transformers' ``sliding_window`` and fla's ``window_size``. Layout ``[B, T, heads, dim]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridvl.mixers.backends import float32_attention_limitations, precision_auto_skips, select_backend
from hybridvl.mixers.ops.utils import check_qkv, compute_dtype
from hybridvl.mixers.ops.varlen import check_cu_seqlens, map_sequence_outputs

# Measured on H100 (benchmarks/results/mixers.md): for full causal attention PyTorch SDPA (flash kernel)
# beats fla's parallel_attn; with a window shorter than the sequence fla skips the masked blocks and wins.
FULL_PREFERENCE = ("flash_attn", "torch", "fla")
# cache slots per block of decode attention's split weighted sum (caches whose size it divides are split)
DECODE_BLOCK = 1024
WINDOW_PREFERENCE = ("flash_attn", "fla", "torch")


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal attention of ``q`` ``[B, T, Hq, D]`` over ``k``, ``v`` ``[B, T, Hkv, D]`` (``Hq % Hkv == 0``).

    Args:
        window: keys per query including itself; ``None`` for full causal attention.
        scale: score scale, default ``D ** -0.5``.
        cu_seqlens: packed-batch boundaries (``B`` must be 1); sequences do not see each other.
        backend: ``"auto"``, ``"torch"`` (SDPA), ``"fla"`` (``parallel_attn``) or ``"flash_attn"``;
            ``"auto"`` runs float32 and float64 inputs with SDPA (:func:`select_attention_backend`).

    Returns:
        ``[B, T, Hq, D]`` in ``q``'s dtype.
    """
    check_qkv("causal_attention", q=q, k=k, v=v)
    B, T, Hq, D = q.shape
    if k.shape != v.shape or k.shape[:2] != (B, T) or k.shape[-1] != D or Hq % k.shape[2]:
        raise ValueError(
            f"k and v must be [B, T, Hkv, D] with Hq divisible by Hkv; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if window is not None and window < 1:
        raise ValueError(f"window must be a positive number of keys, got {window}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    scale = D**-0.5 if scale is None else scale
    chosen = select_attention_backend(backend, q.device, q.dtype, window)
    if chosen == "fla":
        return _fla(q, k, v, window, scale, cu_seqlens)
    if chosen == "flash_attn":
        return _flash_attn(q, k, v, window, scale, cu_seqlens)
    if cu_seqlens is None:
        return _sdpa_causal(q, k, v, window, scale)
    return map_sequence_outputs(lambda *qkv: _sdpa_causal(*qkv, window, scale), cu_seqlens, (q, k, v))


def select_attention_backend(requested: str, device: torch.device, dtype: torch.dtype, window: int | None) -> str:
    """The backend :func:`causal_attention` runs for ``requested`` on inputs of ``dtype`` on ``device``.

    ``"auto"`` gives float32 and float64 inputs to PyTorch's SDPA, which meets their bounds, and passes over the
    kernels that do not (:func:`~hybridvl.mixers.backends.precision_auto_skips`: fla's float32 attention computes in
    TF32, 1.1e-3 relative error where float32's bound is 1e-4; flash-attn takes only 16-bit inputs); a kernel asked for
    by name still runs unless it cannot take the dtype here at all
    (:func:`~hybridvl.mixers.backends.fla_float32_attention_issue`).
    """
    preference = FULL_PREFERENCE if window is None else WINDOW_PREFERENCE
    limitations = float32_attention_limitations(device, dtype)
    auto_skips = precision_auto_skips(device, dtype, preference)
    return select_backend(requested, device, preference, "causal_attention", limitations, auto_skips)


def attention_over_positions(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    window: int | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention where visibility follows absolute token positions (PyTorch SDPA).

    Query ``i`` sees key ``j`` when ``k_pos[j] <= q_pos[i]`` and, with a window,
    ``k_pos[j] > q_pos[i] - window``; keys at negative positions are empty cache slots. Used to attend
    over a cache (a prefix of earlier tokens, or a ring buffer in any slot order) plus new tokens.

    Args:
        q: ``[B, Tq, Hq, D]``; k, v: ``[B, Tk, Hkv, D]``.
        q_positions: ``[B, Tq]``; k_positions: ``[B, Tk]`` (negative = empty).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qp, kp = q_positions[:, :, None], k_positions[:, None, :]
    visible = (kp >= 0) & (kp <= qp)
    if window is not None:
        visible &= kp > qp - window
    return _sdpa(q, k, v, visible[:, None], scale)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """One query per sequence over a cache: ``q`` ``[B, 1, Hq, D]``, ``k``, ``v`` ``[B, S, Hkv, D]``,
    ``visible`` ``[B, S]`` bool (slots the query sees). Grouped heads read each key once (no repeat);
    softmax in float32 (float64 for float64 input). Returns ``[B, 1, Hq, D]``."""
    B, _, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    qg = q.reshape(B, Hkv, Hq // Hkv, D)
    scores = torch.einsum("bhgd,bshd->bhgs", qg, k).to(compute_dtype(q)) * scale
    probs = scores.masked_fill(~visible[:, None, None], float("-inf")).softmax(-1).to(v.dtype)
    # the weighted sum reduces over all S slots: split them into blocks summed separately (split-K), or a few
    # thread blocks would read a long cache alone
    blocks = S // DECODE_BLOCK if S % DECODE_BLOCK == 0 else 1
    probs = probs.unflatten(-1, (blocks, S // blocks))
    out = torch.einsum("bhgcs,bcshd->bchgd", probs, v.unflatten(1, (blocks, S // blocks))).sum(1)
    return out.reshape(B, 1, Hq, D)


def _sdpa_causal(q, k, v, window, scale):
    T = q.shape[1]
    if window is None or window >= T:
        return _sdpa(q, k, v, None, scale)
    # query blocks of `window` tokens see keys from `window - 1` before the block: O(T * window) memory
    pos = torch.arange(T, device=q.device)
    outputs = []
    for start in range(0, T, window):
        end, first_key = min(start + window, T), max(0, start - window + 1)
        qp, kp = pos[start:end, None], pos[None, first_key:end]
        visible = (kp <= qp) & (kp > qp - window)
        outputs.append(_sdpa(q[:, start:end], k[:, first_key:end], v[:, first_key:end], visible, scale))
    return torch.cat(outputs, dim=1)


def _sdpa(q, k, v, mask, scale):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@torch.compiler.disable  # under torch.compile the kernel library runs as it is (no tracing of its autotuners)
def _fla(q, k, v, window, scale, cu_seqlens):
    from fla.ops.attn import parallel_attn

    return parallel_attn(q, k, v, scale=scale, window_size=window, cu_seqlens=cu_seqlens)


@torch.compiler.disable  # under torch.compile the kernel library runs as it is (no tracing of its autotuners)
def _flash_attn(q, k, v, window, scale, cu_seqlens):
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    window_size = (-1, -1) if window is None else (window - 1, 0)
    if cu_seqlens is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True, window_size=window_size)
    cu32 = cu_seqlens.to(torch.int32)
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = flash_attn_varlen_func(
        q[0], k[0], v[0], cu32, cu32, max_len, max_len, softmax_scale=scale, causal=True, window_size=window_size
    )
    return out[None]
