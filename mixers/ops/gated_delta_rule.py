"""The gated delta rule (Gated DeltaNet's recurrence).

With the state ``S`` stored as ``[K, V]`` (fla's layout), per token::

    S_t = exp(g_t) * S_{t-1}
    S_t = S_t + beta_t * k_t (v_t - S_t^T k_t)^T       # delta-rule write
    o_t = scale * S_t^T q_t

which is ``S_t = S_{t-1} a_t (I - b_t k_t k_t^T) + b_t v_t k_t^T`` written with ``S`` as ``[V, K]``.

Two PyTorch forms are given (``"chunk"``: the WY/UT form, parallel inside chunks, a loop over chunks;
``"recurrent"``: a loop over tokens) beside fla's Triton kernels. All take fla's layout
``[batch, time, heads, dim]``, keep the state in float32 (float64 for float64 input) and return
``(output, final_state)``. Given ``A_log``, ``dt_bias`` and ``use_beta_sigmoid``, they take Gated DeltaNet's raw gate
projections; fla then computes the gates inside its kernels (decoding: gates, L2 norms and recurrence in one kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridvl.mixers.backends import gated_backward_limitations, precision_auto_skips, select_backend
from hybridvl.mixers.ops.utils import check_qkv, compute_dtype, l2norm, segment_sums
from hybridvl.mixers.ops.varlen import check_cu_seqlens, map_sequences

_PREFERENCE = ("fla", "torch")


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = False,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    use_beta_sigmoid: bool = False,
    form: str = "chunk",
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the gated delta rule over a sequence.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys.
        v: ``[B, T, H, V]`` values.
        g: ``[B, T, H]`` log decay (``<= 0``; the state is multiplied by ``exp(g)`` each step); with ``A_log``,
            the decay's pre-activation instead.
        beta: ``[B, T, H]`` write strength in ``[0, 1]``; with ``use_beta_sigmoid``, its logits instead.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` state to continue from (``N = B``, or the number of packed
            sequences); zeros when ``None``.
        cu_seqlens: packed-batch boundaries (``B`` must be 1); each sequence starts from its own state.
        use_qk_l2norm: L2-normalise ``q`` and ``k`` over ``K`` first (in float32, eps 1e-6).
        A_log: ``[H]``; when given, the log decay is Gated DeltaNet's ``-exp(A_log) * softplus(g + dt_bias)``,
            computed in float32 (fla: inside its kernels, with the gradients of ``g``, ``A_log`` and ``dt_bias``).
        dt_bias: ``[H]`` bias of the decay's pre-activation (only with ``A_log``).
        use_beta_sigmoid: ``beta`` holds logits: the write strength is ``sigmoid(beta)``, computed in float32.
        form: ``"chunk"`` or ``"recurrent"`` (the token loop; fla's fused recurrent kernel on CUDA).
        chunk_size: chunk length of the chunked PyTorch form.
        backend: ``"auto"``, ``"torch"`` or ``"fla"``; ``"auto"`` runs float32 and float64 inputs in
            PyTorch (:func:`~hybridvl.mixers.backends.precision_auto_skips`).

    Returns:
        ``(o [B, T, H, V] in v's dtype, final_state [N, H, K, V] float32)``.
    """
    _check_shapes(q, k, v, g, beta, initial_state, cu_seqlens)
    _check_gate_parameters(q.shape[2], A_log, dt_bias)
    if form not in ("chunk", "recurrent"):
        raise ValueError(f"form must be 'chunk' or 'recurrent', got {form!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    limitations = gated_backward_limitations(q.device, q, k, v, g, beta, initial_state, A_log, dt_bias)
    auto_skips = precision_auto_skips(q.device, q.dtype, _PREFERENCE)
    chosen = select_backend(backend, q.device, _PREFERENCE, "gated_delta_rule", limitations, auto_skips)
    if chosen == "fla":
        gates = dict(A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid=use_beta_sigmoid)
        return _fla(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, form, **gates)
    dtype = compute_dtype(q)
    if A_log is not None:
        g = gdn_decay(g, A_log, dt_bias, dtype)
    if use_beta_sigmoid:
        beta = beta.to(dtype).sigmoid()
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    fn = _chunk_torch if form == "chunk" else _recurrent_torch

    def run(q, k, v, g, beta, initial_state):
        return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state, chunk_size=chunk_size)

    if cu_seqlens is not None:
        return map_sequences(run, cu_seqlens, (q, k, v, g, beta), initial_state)
    return run(q, k, v, g, beta, initial_state)


def _check_shapes(q, k, v, g, beta, initial_state, cu_seqlens) -> None:
    check_qkv("gated_delta_rule", q=q, k=k, v=v)
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}], got {tuple(t.shape)}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, T)
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (n, H, K, v.shape[-1]):
        raise ValueError(
            f"initial_state must be [N, H, K, V] = [{n}, {H}, {K}, {v.shape[-1]}], got {tuple(initial_state.shape)}"
        )


def gdn_decay(
    g: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Gated DeltaNet's log decay ``-exp(A_log) * softplus(g + dt_bias)`` (``g`` ``[..., H]``, ``A_log`` and
    ``dt_bias`` ``[H]``) in ``dtype``."""
    pre = g.to(dtype) if dt_bias is None else g.to(dtype) + dt_bias.to(dtype)
    return -A_log.to(dtype).exp() * F.softplus(pre)


def _check_gate_parameters(H, A_log, dt_bias) -> None:
    if dt_bias is not None and A_log is None:
        raise ValueError("dt_bias is the bias of the decay computed from A_log: pass A_log with it")
    for name, t in (("A_log", A_log), ("dt_bias", dt_bias)):
        if t is not None and t.shape != (H,):
            raise ValueError(f"{name} must be [H] = [{H}], got {tuple(t.shape)}")


def _recurrent_torch(q, k, v, g, beta, *, scale, initial_state=None, chunk_size=None):
    out_dtype = v.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k, v, g, beta = (t.to(compute_dtype(v)) for t in (q, k, v, g, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(q.dtype)
    out = []
    for t in range(T):
        S = S * g[:, t, :, None, None].exp()
        retrieved = torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        delta = beta[:, t, :, None] * (v[:, t] - retrieved)
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))
    return torch.stack(out, dim=1).to(out_dtype), S


def _chunk_torch(q, k, v, g, beta, *, scale, initial_state=None, chunk_size=64):
    """Chunked form. Inside a chunk with entering state ``S0`` and decays ``gamma_i = exp(G_i)``
    (``G`` the in-chunk cumulative sum of ``g``), the written values ``U`` solve the unit
    lower-triangular system ``(I + M) U = beta*V - (beta*gamma*K) S0`` with
    ``M_ij = beta_i (gamma_i / gamma_j) k_i.k_j`` for ``j < i``; then
    ``O = (gamma*Q) S0 + ((Q K^T) * L) U`` with ``L_ij = gamma_i / gamma_j`` for ``j <= i``, and
    ``S_end = gamma_C S0 + (K * gamma_C / gamma)^T U``. Every exponent is ``<= 0``, and every ratio
    ``gamma_i / gamma_j`` is ``exp`` of the segment sum ``g_{j+1} + ... + g_i`` summed directly
    (:func:`~hybridvl.mixers.ops.utils.segment_sums`), never ``exp(G_i - G_j)``: that difference loses the small
    in-chunk decays to cancellation once ``|G|`` is large (strong decay).
    """
    out_dtype = v.dtype
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    pad = (-T) % C
    dtype = compute_dtype(v)
    # [B, H, N, C, ...]; padded steps have g = 0, beta = 0, k = 0: they change nothing.
    q, k, v = (F.pad(t.to(dtype), (0, 0, 0, 0, 0, pad)).transpose(1, 2) for t in (q, k, v))
    g, beta = (F.pad(t.to(dtype), (0, 0, 0, pad)).transpose(1, 2) for t in (g, beta))
    n_chunks = (T + pad) // C
    q, k, v = (t.reshape(B, H, n_chunks, C, -1) for t in (q, k, v))
    g, beta = (t.reshape(B, H, n_chunks, C) for t in (g, beta))
    q = q * scale

    log_ratio = segment_sums(g)  # log(gamma_i / gamma_j), -inf above the diagonal
    ratio = log_ratio.exp()
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    kk = k @ k.transpose(-1, -2)
    M = (beta[..., :, None] * ratio * kk).masked_fill(~strict, 0.0)
    eye = torch.eye(C, device=q.device, dtype=dtype)
    A = eye + M
    gamma = g.cumsum(-1).exp()  # a sum from the chunk's start: no cancellation
    U_values = torch.linalg.solve_triangular(A, beta[..., None] * v, upper=False, unitriangular=True)
    W_keys = torch.linalg.solve_triangular(A, (beta * gamma)[..., None] * k, upper=False, unitriangular=True)
    qk = (q @ k.transpose(-1, -2)) * ratio
    q_decayed = q * gamma[..., None]
    k_to_end = k * ratio[..., -1, :, None]  # gamma_C / gamma_j: the last row
    gamma_end = gamma[..., -1]

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(dtype)
    outputs = []
    for n in range(n_chunks):
        U = U_values[:, :, n] - W_keys[:, :, n] @ S
        outputs.append(q_decayed[:, :, n] @ S + qk[:, :, n] @ U)
        S = gamma_end[:, :, n, None, None] * S + k_to_end[:, :, n].transpose(-1, -2) @ U
    o = torch.stack(outputs, dim=2).reshape(B, H, n_chunks * C, V)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), S


@torch.compiler.disable  # under torch.compile the kernel library runs as it is (no tracing of its autotuners)
def _fla(q, k, v, g, beta, scale, initial_state, cu_seqlens, use_qk_l2norm, form, A_log, dt_bias, use_beta_sigmoid):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    fn = chunk_gated_delta_rule if form == "chunk" else fused_recurrent_gated_delta_rule
    o, state = fn(
        q,
        k,
        v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=True,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm_in_kernel=use_qk_l2norm,
        use_gate_in_kernel=A_log is not None,
        A_log=A_log,
        dt_bias=dt_bias,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid,
    )
    return o, state.float()
