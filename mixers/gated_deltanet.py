"""``D``: Gated DeltaNet (Yang et al., 2024), the linear mixer of InfiniteVL.

Per head: ``q``, ``k``, ``v`` each pass a causal depthwise short convolution with SiLU; ``q`` and ``k`` are
L2-normalised; the decay ``alpha_t = exp(-exp(A_log) * softplus(a_proj(x) + dt_bias))`` and the write
strength ``beta_t = sigmoid(b_proj(x))`` drive the gated delta rule
(:func:`hybridvl.mixers.ops.gated_delta_rule`; the token loop on fla, as in decoding, is
:func:`~hybridvl.mixers.ops.gated_delta_rule_step`, which computes the gates, the L2 norms and the recurrence in
one kernel); the output passes an RMSNorm gated by ``silu(g_proj(x))`` per head, then ``o_proj``.
No positional encoding, no biases.

The input projections ``q_proj``, ``k_proj``, ``v_proj``, ``a_proj``, ``b_proj`` and ``g_proj`` are one
:class:`~hybridvl.mixers.modules.FusedLinear` ``in_proj`` (one matrix multiplication); checkpoints keep the
separate names, which follow fla and InfiniteVL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hybridvl.mixers.backends import gated_backward_limitations
from hybridvl.mixers.base import ConvQKVMixer, check_int, check_positive
from hybridvl.mixers.modules import GatedRMSNorm
from hybridvl.mixers.ops.gated_delta_rule import gated_delta_rule, gated_delta_rule_step
from hybridvl.mixers.ops.utils import compute_dtype
from hybridvl.mixers.registry import register_mixer
from hybridvl.mixers.state import RecurrentState


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """``y`` with ``softplus(y) == x``."""
    return x + torch.log(-torch.expm1(-x))


def init_dt_bias(num_heads: int, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4) -> torch.Tensor:
    """``dt_bias`` such that ``softplus(dt_bias)`` is log-uniform in ``[dt_min, dt_max]`` (Mamba's init)."""
    dt = torch.exp(torch.rand(num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    return inverse_softplus(dt.clamp(min=dt_floor))


@register_mixer("D", "gdn", aliases=("gated_deltanet",))
class GatedDeltaNet(ConvQKVMixer):
    """Gated DeltaNet mixer.

    Args:
        hidden_size: model width.
        num_heads: heads (default ``hidden_size // head_dim``).
        head_dim: key (and query) dimension per head.
        expand_v: value dimension per head = ``head_dim * expand_v``.
        conv_size: short convolution kernel size.
        norm_eps: epsilon of the gated output RMSNorm.
        mode: ``"auto"`` (token loop for single tokens, chunked otherwise), ``"chunk"`` or ``"recurrent"``.
        chunk_size: chunk length of the PyTorch chunked form.
        backend: ``"auto"``, ``"fla"`` or ``"torch"``.
    """

    backends = ("fla", "torch")

    def __init__(
        self,
        hidden_size: int,
        num_heads: int | None = None,
        head_dim: int = 128,
        expand_v: float = 2.0,
        conv_size: int = 4,
        norm_eps: float = 1e-6,
        mode: str = "auto",
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim, expand_v, conv_size, mode, backend)
        self.chunk_size = check_int(self._owner, "chunk_size", chunk_size)
        check_positive(self._owner, "norm_eps", norm_eps)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(self.num_heads).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(init_dt_bias(self.num_heads))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps)

    def _gates(self) -> dict[str, int]:
        """``a_proj`` (decay) and ``b_proj`` (write strength) per head, ``g_proj`` (output gate) per value channel."""
        return {"a_proj": self.num_heads, "b_proj": self.num_heads, "g_proj": self.value_dim}

    @torch.no_grad()
    def mimic_init(self) -> None:
        """``A_log = 0``, ``a_proj`` and ``b_proj`` zero (``beta = 0.5``), ``dt = 1e-3`` (``alpha ~ 0.999``) and
        the short convolutions the identity."""
        self.A_log.zero_()
        self.in_proj.weight_part("a_proj").zero_()
        self.in_proj.weight_part("b_proj").zero_()
        self.dt_bias.copy_(inverse_softplus(torch.full_like(self.dt_bias, 1e-3)))
        super().mimic_init()

    def forward(
        self,
        x: torch.Tensor,
        state: RecurrentState | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RecurrentState]:
        self._check_input(x, state, cu_seqlens)
        backend = self._resolve_backend(x, gated_backward_limitations(x.device, x, *self.parameters()))
        q, k, v, a, b, gate = self._project(x)
        q, k, v, conv = self._conv_qkv(q, k, v, state, cu_seqlens, self._conv_backend())
        initial_state = None if state is None else state.recurrent
        form = self._form(x.shape[1])
        if backend == "fla" and form == "recurrent":
            # decoding: the gates, the L2 norms and the recurrence in one kernel
            o, recurrent = gated_delta_rule_step(
                q,
                k,
                v,
                a,
                b,
                self.A_log,
                self.dt_bias,
                initial_state=initial_state,
                cu_seqlens=cu_seqlens,
                use_qk_l2norm=True,
                backend=backend,
            )
        else:
            dtype = compute_dtype(x)
            beta = b.to(dtype).sigmoid()
            g = -self.A_log.to(dtype).exp() * F.softplus(a.to(dtype) + self.dt_bias.to(dtype))
            o, recurrent = gated_delta_rule(
                q,
                k,
                v,
                g,
                beta,
                initial_state=initial_state,
                cu_seqlens=cu_seqlens,
                use_qk_l2norm=True,
                form=form,
                chunk_size=self.chunk_size,
                backend=backend,
            )
        gate = gate.unflatten(-1, (self.num_heads, self.head_v_dim))
        return self.o_proj(self.o_norm(o, gate).flatten(-2)), RecurrentState(recurrent, conv)
