"""``M``: Mamba2 (Dao & Gu, 2024) with its SSD recurrence — one scalar decay per head.

``in_proj`` gives ``z``, ``xBC`` and ``dt``; ``xBC`` passes a causal depthwise convolution with SiLU and
splits into ``x`` (heads of ``headdim``), ``B`` and ``C`` (``ngroups`` groups of ``d_state``);
``dt = softplus(dt + dt_bias)``, ``A = -exp(A_log)``, and per head::

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,     y_t = C_t^T h_t + D x_t

which is :func:`hybridvl.mixers.ops.simple_gated_linear_attention` with ``q = C``, ``k = B``, ``v = dt x``,
``g = dt A``, ``scale = 1``. The output passes an RMSNorm of ``y * silu(z)`` per group and ``out_proj``.
Parameter names follow mamba-ssm's ``Mamba2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridvl.mixers.backends import gated_backward_limitations
from hybridvl.mixers.base import AttentionWeights, RecurrentMixer, check_int, check_positive
from hybridvl.mixers.gated_deltanet import init_dt_bias, inverse_softplus
from hybridvl.mixers.modules import GatedRMSNorm, ShortConv
from hybridvl.mixers.ops.linear_attention import simple_gated_linear_attention
from hybridvl.mixers.ops.utils import compute_dtype
from hybridvl.mixers.registry import register_mixer
from hybridvl.mixers.state import RecurrentState


@register_mixer("M", "mamba2", aliases=("mamba",))
class Mamba2(RecurrentMixer):
    """Mamba2 mixer.

    Args:
        hidden_size: model width.
        d_state: state size per head (``N``, the key dimension of the SSD form).
        headdim: channels per head (``P``).
        expand: inner width = ``hidden_size * expand``; heads = inner width / ``headdim``.
        ngroups: groups sharing ``B`` and ``C``.
        conv_size: short convolution kernel size.
        chunk_size: chunk length of the chunked forms.
        norm_eps: epsilon of the gated RMSNorm.
        mode: ``"auto"``, ``"chunk"`` or ``"recurrent"``.
        backend: ``"auto"``, ``"fla"`` (``chunk_simple_gla``), ``"mamba_ssm"`` or ``"torch"``.
    """

    backends = ("fla", "mamba_ssm", "torch")

    def __init__(
        self,
        hidden_size: int,
        d_state: int = 128,
        headdim: int = 64,
        expand: int = 2,
        ngroups: int = 1,
        conv_size: int = 4,
        chunk_size: int = 64,
        norm_eps: float = 1e-6,
        mode: str = "auto",
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, mode, backend)
        owner = self._owner
        d_state, headdim = check_int(owner, "d_state", d_state), check_int(owner, "headdim", headdim)
        expand, ngroups = check_int(owner, "expand", expand), check_int(owner, "ngroups", ngroups)
        conv_size, chunk_size = check_int(owner, "conv_size", conv_size), check_int(owner, "chunk_size", chunk_size)
        check_positive(owner, "norm_eps", norm_eps)
        self.d_inner = expand * hidden_size
        if self.d_inner % headdim:
            raise ValueError(f"{self._owner}: inner width {self.d_inner} must be a multiple of headdim {headdim}")
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"{self._owner}: {self.nheads} heads must divide into ngroups={ngroups}")
        self.d_state, self.headdim, self.ngroups = d_state, headdim, ngroups
        self.conv_size, self.chunk_size = conv_size, chunk_size
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(hidden_size, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv1d = ShortConv(self.conv_dim, conv_size, bias=True)
        self.dt_bias = nn.Parameter(init_dt_bias(self.nheads))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, eps=norm_eps, norm_before_gate=False, group_size=self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        state: RecurrentState | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RecurrentState]:
        self._check_input(x, state, cu_seqlens)
        limitations = gated_backward_limitations(x.device, x, *self.parameters(), kernel="simple_gla") or {}
        if cu_seqlens is not None and torch.is_grad_enabled():
            limitations["mamba_ssm"] = "mamba-ssm has no backward pass for packed sequences' final states"
        backend = self._resolve_backend(x, limitations)
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        glue = self._glue_backend()
        xBC, conv = self.conv1d(xBC, None if state is None else state.conv["xBC"], cu_seqlens, glue)
        xs, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        xs = xs.unflatten(-1, (self.nheads, self.headdim))
        B, C = (t.unflatten(-1, (self.ngroups, self.d_state)) for t in (B, C))
        initial = None if state is None else state.recurrent
        if backend == "mamba_ssm":
            y, recurrent = self._mamba_ssm(xs, dt, B, C, initial, cu_seqlens)
        else:
            dtype = compute_dtype(x)
            dt = F.softplus(dt.to(dtype) + self.dt_bias.to(dtype))
            A = -self.A_log.to(dtype).exp()
            heads_per_group = self.nheads // self.ngroups
            B, C = (t.repeat_interleave(heads_per_group, dim=2) for t in (B, C))
            y, recurrent = simple_gated_linear_attention(
                C,
                B,
                (xs.to(dtype) * dt[..., None]).to(xs.dtype),
                dt * A,
                scale=1.0,
                initial_state=initial,
                cu_seqlens=cu_seqlens,
                form=self._form(x.shape[1]),
                chunk_size=self.chunk_size,
                backend=backend,
            )
            y = y + xs * self.D[:, None].to(xs.dtype)
        y = self.norm(y.flatten(-2), z, glue)
        return self.out_proj(y), RecurrentState(recurrent, {"xBC": conv})

    @torch.compiler.disable  # under torch.compile mamba-ssm runs as it is
    def _mamba_ssm(self, xs, dt, B, C, initial, cu_seqlens):
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        if cu_seqlens is not None and initial is not None:
            raise ValueError(
                f"{self._owner}: backend 'mamba_ssm' cannot continue packed sequences from a state; "
                "use backend='fla' or 'torch'"
            )
        kwargs = dict(chunk_size=256, D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        A = -self.A_log.float().exp()
        if cu_seqlens is None:
            h0 = None if initial is None else initial.transpose(-1, -2).contiguous()
            y, final = mamba_chunk_scan_combined(xs, dt, A, B, C, initial_states=h0, return_final_states=True, **kwargs)
        else:
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=xs.device), lengths)
            y, final = mamba_chunk_scan_combined(
                xs, dt, A, B, C, seq_idx=seq_idx[None].int(), cu_seqlens=cu_seqlens, return_varlen_states=True, **kwargs
            )
        return y, final.transpose(-1, -2).float()  # mamba-ssm keeps [N, H, P, N_state]

    @torch.no_grad()
    def mimic_init(self) -> None:
        """``A_log = 0``, ``dt = 1e-3`` and the convolution the identity."""
        self.A_log.zero_()
        self.dt_bias.copy_(inverse_softplus(torch.full_like(self.dt_bias, 1e-3)))
        self.conv1d.set_identity()

    @torch.no_grad()
    def transfer_init(self, attention: AttentionWeights) -> dict[str, list[str]]:
        """``Q -> C``, ``K -> B``, ``V -> x`` and the output projection (Mamba-in-the-Llama)."""
        heads, head_dim = attention.num_heads, attention.head_dim
        if not (
            self.ngroups == heads and self.d_state == head_dim and self.nheads == heads and self.headdim == head_dim
        ):
            raise ValueError(
                f"transfer init into Mamba2 maps Q->C, K->B, V->x and needs ngroups={heads}, d_state={head_dim}, "
                f"headdim={head_dim} and {heads} heads (expand = {heads * head_dim} / hidden size); got ngroups="
                f"{self.ngroups}, d_state={self.d_state}, headdim={self.headdim}, {self.nheads} heads"
            )
        d_inner, bc = self.d_inner, self.ngroups * self.d_state
        rows = self.in_proj.weight  # [z, x, B, C, dt]
        rows[d_inner : 2 * d_inner].copy_(attention.v)
        rows[2 * d_inner : 2 * d_inner + bc].copy_(attention.k)
        rows[2 * d_inner + bc : 2 * d_inner + 2 * bc].copy_(attention.q)
        self.out_proj.weight.copy_(attention.o)
        return {"in_proj.weight": ["v", "k", "q"], "out_proj.weight": ["o"]}

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> RecurrentState:
        device, dtype = self._device(device), self._dtype(dtype)
        return RecurrentState(
            torch.zeros(batch_size, self.nheads, self.d_state, self.headdim, device=device, dtype=compute_dtype(dtype)),
            {"xBC": torch.zeros(batch_size, self.conv_dim, self.conv_size, device=device, dtype=dtype)},
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, d_inner={self.d_inner}, nheads={self.nheads}, headdim={self.headdim}, "
            f"d_state={self.d_state}, ngroups={self.ngroups}, mode={self.mode!r}"
        )
