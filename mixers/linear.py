"""``L``: plain linear attention — the "pure linear" mixer of the InfiniteVL ablation.

The same projections, short convolutions and L2-normalised ``q``/``k`` as Gated DeltaNet (``D``), so an
ablation isolates the recurrence: ``S_t = S_{t-1} + k_t v_t^T`` with no decay, no delta rule and no gates,
then a per-head RMSNorm and ``o_proj``.
"""

from __future__ import annotations

import torch
from torch import nn

from mixers.base import ConvQKVMixer
from mixers.modules import RMSNorm
from mixers.ops.linear_attention import linear_attention
from mixers.ops.utils import l2norm
from mixers.registry import register_mixer
from mixers.state import RecurrentState


@register_mixer("L", "linear", aliases=("linear_attention",))
class LinearAttention(ConvQKVMixer):
    """Linear attention mixer.

    Args:
        hidden_size: model width.
        num_heads: heads (default ``hidden_size // head_dim``).
        head_dim: key dimension per head.
        expand_v: value dimension per head = ``head_dim * expand_v``.
        conv_size: short convolution kernel size.
        norm_eps: epsilon of the output RMSNorm.
        mode: ``"auto"``, ``"chunk"`` or ``"recurrent"``.
        backend: ``"auto"``, ``"fla"`` or ``"torch"``.
    """

    letter, name = "L", "linear"
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
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim, expand_v, conv_size, mode, backend)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        state: RecurrentState | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RecurrentState]:
        self._check_input(x, state, cu_seqlens)
        backend = self._resolve_backend(x.device)
        q, k, v, conv = self._conv_qkv(x, state, cu_seqlens, backend)
        o, recurrent = linear_attention(
            l2norm(q),
            l2norm(k),
            v,
            initial_state=None if state is None else state.recurrent,
            cu_seqlens=cu_seqlens,
            form=self._form(x.shape[1]),
            backend=backend,
        )
        return self.o_proj(self.o_norm(o).flatten(-2)), RecurrentState(recurrent, conv)
