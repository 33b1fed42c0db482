"""``G``: Gated Linear Attention (Yang et al., 2023) — linear attention with a data-dependent decay per
key dimension.

``gk = logsigmoid(gk_proj(x)) / gate_logit_normalizer`` (``gk_proj`` low-rank), the recurrence of
:func:`hybridvl.mixers.ops.gated_linear_attention`, a per-head RMSNorm gated by ``silu(g_proj(x))``, ``o_proj``.
Optionally (``conv_size > 0``, fla's ``use_short_conv``) ``q``, ``k``, ``v`` first pass causal depthwise short
convolutions with SiLU, as in ``D``. Parameter names follow fla's ``GatedLinearAttention``.

``q_proj``, ``k_proj``, ``v_proj`` and ``g_proj`` are one :class:`~hybridvl.mixers.modules.FusedLinear` ``in_proj``
(one matrix multiplication); checkpoints keep the separate names. The low-rank ``gk_proj`` stays a module of its
own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridvl.mixers.base import RecurrentMixer, ShortConvQKV, check_int, check_positive
from hybridvl.mixers.modules import GatedRMSNorm
from hybridvl.mixers.ops.linear_attention import gated_linear_attention
from hybridvl.mixers.ops.utils import compute_dtype
from hybridvl.mixers.registry import register_mixer
from hybridvl.mixers.state import RecurrentState


def _width(owner: str, option: str, hidden_size: int, expand: float) -> int:
    """``hidden_size * expand`` if ``expand`` is positive and the product a whole number."""
    width = hidden_size * check_positive(owner, option, expand)
    if width != int(width) or width < 1:
        raise ValueError(
            f"{owner}: hidden_size * {option} must be a positive whole number, got {hidden_size} * {expand} = {width:g}"
        )
    return int(width)


@register_mixer("G", "gla")
class GatedLinearAttention(ShortConvQKV, RecurrentMixer):
    """GLA mixer.

    Args:
        hidden_size: model width.
        num_heads: heads (default ``hidden_size // 128``, at least 1).
        expand_k: total key dimension = ``hidden_size * expand_k``.
        expand_v: total value dimension = ``hidden_size * expand_v``.
        gate_low_rank_dim: rank of the decay projection.
        gate_logit_normalizer: divides the log decay (slower forgetting).
        norm_eps: epsilon of the gated output RMSNorm.
        conv_size: kernel size of short convolutions with SiLU on ``q``, ``k``, ``v`` (fla's
            ``use_short_conv=True, conv_size=4``); ``0`` (default): none.
        mode: ``"auto"``, ``"chunk"`` or ``"recurrent"``.
        backend: ``"auto"``, ``"fla"`` or ``"torch"``.
    """

    backends = ("fla", "torch")

    def __init__(
        self,
        hidden_size: int,
        num_heads: int | None = None,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        norm_eps: float = 1e-6,
        conv_size: int = 0,
        mode: str = "auto",
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, mode, backend)
        owner = self._owner
        self.num_heads = max(1, hidden_size // 128) if num_heads is None else check_int(owner, "num_heads", num_heads)
        self.key_dim = _width(owner, "expand_k", hidden_size, expand_k)
        self.value_dim = _width(owner, "expand_v", hidden_size, expand_v)
        if self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError(
                f"{owner}: key dim {self.key_dim} and value dim {self.value_dim} must divide into "
                f"{self.num_heads} heads"
            )
        self.head_k_dim, self.head_v_dim = self.key_dim // self.num_heads, self.value_dim // self.num_heads
        check_int(owner, "gate_low_rank_dim", gate_low_rank_dim)
        self.gate_logit_normalizer = check_positive(owner, "gate_logit_normalizer", gate_logit_normalizer)
        check_positive(owner, "norm_eps", norm_eps)
        self._init_inputs(conv_size, {"g_proj": self.value_dim})
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden_size, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, self.key_dim, bias=True)
        )
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        self.o_norm = GatedRMSNorm(self.head_v_dim, eps=norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        state: RecurrentState | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RecurrentState]:
        self._check_input(x, state, cu_seqlens)
        backend = self._resolve_backend(x)
        q, k, v, gate = self._project(x)
        q, k, v, conv = self._short_convs(q, k, v, state, cu_seqlens, self._glue_backend())
        q, k = (t.unflatten(-1, (self.num_heads, self.head_k_dim)) for t in (q, k))
        v = v.unflatten(-1, (self.num_heads, self.head_v_dim))
        gk = F.logsigmoid(self.gk_proj(x).to(compute_dtype(x))) / self.gate_logit_normalizer
        o, recurrent = gated_linear_attention(
            q,
            k,
            v,
            gk.unflatten(-1, (self.num_heads, self.head_k_dim)),
            initial_state=None if state is None else state.recurrent,
            cu_seqlens=cu_seqlens,
            form=self._form(x.shape[1]),
            backend=backend,
        )
        gate = gate.unflatten(-1, (self.num_heads, self.head_v_dim))
        return self.o_proj(self.o_norm(o, gate, self._glue_backend()).flatten(-2)), RecurrentState(recurrent, conv)

    @torch.no_grad()
    def mimic_init(self) -> None:
        """The decay projection at ``log alpha ~ -1e-3`` and the short convolutions (if any) the identity."""
        full = self.gk_proj[1]
        full.weight.zero_()
        # logsigmoid(b) / normalizer = log(0.999)  ->  b = logit(0.999 ** normalizer)
        full.bias.fill_(torch.logit(torch.tensor(0.999**self.gate_logit_normalizer)).item())
        super().mimic_init()

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> RecurrentState:
        device, dtype = self._device(device), self._dtype(dtype)
        return RecurrentState(
            torch.zeros(
                batch_size, self.num_heads, self.head_k_dim, self.head_v_dim, device=device, dtype=compute_dtype(dtype)
            ),
            self._empty_conv_tails(batch_size, device, dtype),
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_heads={self.num_heads}, head_k_dim={self.head_k_dim}, "
            f"head_v_dim={self.head_v_dim}, conv_size={self.conv_size}, mode={self.mode!r}"
        )
