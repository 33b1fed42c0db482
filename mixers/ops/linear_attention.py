"""Linear attention with optional decay: GLA, its scalar-decay ("simple gated") form, and plain linear
attention.

With the state ``S`` as ``[K, V]`` and a log decay ``g`` per token (per key dimension for GLA, one
scalar per head for the simple gated form, none for plain linear attention)::

    S_t = exp(g_t)[:, None] * S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t

Mamba2's SSD is the simple gated form with ``q = C``, ``k = B``, ``v = dt * x``, ``g = dt * A``, ``scale = 1``.
Layout ``[batch, time, heads, dim]``; state float32 (float64 for float64 input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridvl.mixers.backends import gated_backward_limitations, precision_auto_skips, select_backend
from hybridvl.mixers.ops.utils import check_int, check_qkv, compute_dtype, segment_sums
from hybridvl.mixers.ops.varlen import check_cu_seqlens, map_sequences

_PREFERENCE = ("fla", "torch")


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    form: str = "chunk",
    chunk_size: int = 16,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLA: decay per key dimension. ``gk`` is ``[B, T, H, K]`` log decay (``<= 0``).

    Other arguments and the return value are as in :func:`simple_gated_linear_attention`.
    """
    _check_shapes(q, k, v, gk, initial_state, cu_seqlens, decay_shape=q.shape)
    return _dispatch("gla", q, k, v, gk, scale, initial_state, cu_seqlens, form, chunk_size, backend)


def simple_gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    form: str = "chunk",
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear attention with one scalar log decay per head and token.

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, H, V]``.
        g: ``[B, T, H]`` log decay (``<= 0``).
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]``; zeros when ``None``.
        cu_seqlens: packed-batch boundaries (``B`` must be 1).
        form: ``"chunk"`` or ``"recurrent"``.
        chunk_size: chunk length of the chunked PyTorch form.
        backend: ``"auto"``, ``"torch"`` or ``"fla"``; ``"auto"`` runs float32 and float64 inputs in
            PyTorch (:func:`~hybridvl.mixers.backends.precision_auto_skips`).

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.
    """
    _check_shapes(q, k, v, g, initial_state, cu_seqlens, decay_shape=q.shape[:3])
    return _dispatch("simple_gla", q, k, v, g, scale, initial_state, cu_seqlens, form, chunk_size, backend)


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    form: str = "chunk",
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain causal linear attention: no decay, no normaliser. Arguments as in
    :func:`simple_gated_linear_attention` without ``g``."""
    _check_shapes(q, k, v, None, initial_state, cu_seqlens, decay_shape=None)
    return _dispatch("linear", q, k, v, None, scale, initial_state, cu_seqlens, form, chunk_size, backend)


def _check_shapes(q, k, v, g, initial_state, cu_seqlens, decay_shape) -> None:
    check_qkv("linear attention", q=q, k=k, v=v)
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if g is not None and g.shape != decay_shape:
        raise ValueError(f"the log decay must have shape {tuple(decay_shape)}, got {tuple(g.shape)}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (n, H, K, v.shape[-1]):
        raise ValueError(
            f"initial_state must be [N, H, K, V] = [{n}, {H}, {K}, {v.shape[-1]}], got {tuple(initial_state.shape)}"
        )


def _dispatch(variant, q, k, v, g, scale, initial_state, cu_seqlens, form, chunk_size, backend):
    if form not in ("chunk", "recurrent"):
        raise ValueError(f"form must be 'chunk' or 'recurrent', got {form!r}")
    owner = {"gla": "gated_linear_attention", "simple_gla": "simple_gated_linear_attention"}.get(
        variant, "linear_attention"
    )
    check_int(owner, "chunk_size", chunk_size)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    limitations = (
        gated_backward_limitations(q.device, q, k, v, g, initial_state, kernel="simple_gla")
        if variant == "simple_gla"
        else None
    )
    auto_skips = precision_auto_skips(q.device, q.dtype, _PREFERENCE)
    if select_backend(backend, q.device, _PREFERENCE, owner, limitations, auto_skips) == "fla":
        return _fla(variant, q, k, v, g, scale, initial_state, cu_seqlens, form)
    fn = _chunk_torch if form == "chunk" else _recurrent_torch

    def run(q, k, v, g, initial_state):
        return fn(q, k, v, g, scale=scale, initial_state=initial_state, chunk_size=chunk_size)

    if cu_seqlens is not None:
        return map_sequences(run, cu_seqlens, (q, k, v, g), initial_state)
    return run(q, k, v, g, initial_state)


def _decay_per_key(g: torch.Tensor, K: int) -> torch.Tensor:
    """``[B, T, H]`` or ``[B, T, H, K]`` log decay as ``[B, T, H, K]``."""
    return g[..., None].expand(*g.shape, K) if g.dim() == 3 else g


def _recurrent_torch(q, k, v, g, *, scale, initial_state=None, chunk_size=None):
    out_dtype, dtype = v.dtype, compute_dtype(v)
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v = (t.to(dtype) for t in (q, k, v))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    decay = None if g is None else _decay_per_key(g.to(dtype), K).exp()
    out = []
    for t in range(T):
        if decay is not None:
            S = S * decay[:, t, :, :, None]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    return torch.stack(out, dim=1).to(out_dtype), S


def _chunk_torch(q, k, v, g, *, scale, initial_state=None, chunk_size=64):
    """Chunked form. With ``G`` the in-chunk cumulative log decay, the intra-chunk scores are
    ``A_ij = sum_d q_id k_jd exp(G_id - G_jd)`` for ``j <= i`` (every exponent ``<= 0``), the output
    ``O = (Q * exp(G)) S0 + A V`` and the end state ``exp(G_C) * S0 + (K * exp(G_C - G))^T V``.
    Each ``G_i - G_j`` is formed as the segment sum ``g_{j+1} + ... + g_i`` summed directly
    (:func:`~hybridvl.mixers.ops.utils.segment_sums`), not as a difference, which cancels catastrophically once
    ``|G|`` is large. A per-key decay makes ``A`` a ``[C, C, K]`` contraction, so GLA uses short chunks."""
    out_dtype, dtype = v.dtype, compute_dtype(v)
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    n_chunks = (T + pad) // C
    q, k, v = (
        F.pad(t.to(dtype), (0, 0, 0, 0, 0, pad)).transpose(1, 2).reshape(B, H, n_chunks, C, -1) for t in (q, k, v)
    )
    q = q * scale
    if g is None:
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        scores = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)
        q_decayed, k_to_end, decay_end = q, k, None
    else:
        g = F.pad(g.to(dtype), (0, 0) * (g.dim() - 2) + (0, pad)).transpose(1, 2)
        g = g.reshape(B, H, n_chunks, C, *g.shape[3:])
        if g.dim() == 4:  # scalar decay: [B, H, N, C]
            ratio = segment_sums(g).exp()  # [B, H, N, C, C]: exp(G_i - G_j), 0 above the diagonal
            scores = (q @ k.transpose(-1, -2)) * ratio
            to_end = ratio[..., -1, :, None]  # exp(G_C - G_j): the last row
            g = g[..., None]
        else:  # per-key decay: [B, H, N, C, K]
            ratio = segment_sums(g.transpose(-1, -2)).permute(0, 1, 2, 4, 5, 3).exp()  # [B, H, N, C, C, K]
            scores = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", q, k, ratio)
            to_end = ratio[..., -1, :, :]
        G = g.cumsum(3)  # sums from the chunk's start: no cancellation
        q_decayed = q * G.exp()
        k_to_end = k * to_end
        decay_end = G[..., -1, :].exp()  # [B, H, N, K or 1]
    intra = scores @ v

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for n in range(n_chunks):
        outputs.append(q_decayed[:, :, n] @ S + intra[:, :, n])
        if decay_end is not None:
            S = decay_end[:, :, n, :, None] * S
        S = S + k_to_end[:, :, n].transpose(-1, -2) @ v[:, :, n]
    o = torch.stack(outputs, dim=2).reshape(B, H, n_chunks * C, V)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), S


@torch.compiler.disable  # under torch.compile the kernel library runs as it is (no tracing of its autotuners)
def _fla(variant, q, k, v, g, scale, initial_state, cu_seqlens, form, chunk_size=None):
    K, V = q.shape[-1], v.shape[-1]
    pad_k, pad_v = K % 2, V % 2
    if pad_k or pad_v:
        # fla's chunked backward asserts even K and V for 16-bit inputs (fla 0.6: Triton miscompiles the masked
        # tail of an odd width into out-of-bounds shared-memory reads); zero columns add nothing to q.k or to
        # the state, so odd widths run padded by one (e.g. L's value columns plus its normaliser column)
        q, k, v = F.pad(q, (0, pad_k)), F.pad(k, (0, pad_k)), F.pad(v, (0, pad_v))
        g = F.pad(g, (0, pad_k)) if variant == "gla" else g
        initial_state = None if initial_state is None else F.pad(initial_state, (0, pad_v, 0, pad_k))
        o, state = _fla(variant, q, k, v, g, scale, initial_state, cu_seqlens, form, chunk_size)
        return o[..., :V], state[..., :K, :V].contiguous()
    h0 = None if initial_state is None else initial_state.float()
    common = dict(scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=cu_seqlens)
    if variant == "gla":
        from fla.ops.gla import chunk_gla, fused_recurrent_gla

        if form == "chunk":
            o, state = chunk_gla(q, k, v, g=g, **common)
        else:
            o, state = fused_recurrent_gla(q, k, v, gk=g, **common)
    else:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

        fn = chunk_simple_gla if form == "chunk" else fused_recurrent_simple_gla
        o, state = fn(q, k, v, g=g, **common)
    return o, state.float()
