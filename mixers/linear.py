"""``L``: plain linear attention — the "pure linear" mixer of the InfiniteVL ablation.

By default the same projections, short convolutions and L2-normalised ``q``/``k`` as Gated DeltaNet (``D``), so
an ablation isolates the recurrence: ``S_t = S_{t-1} + k_t v_t^T`` with no decay, no delta rule and no gates,
then a per-head RMSNorm and ``o_proj``.

Options turn it into textbook linear attention (Katharopoulos et al., 2020) piece by piece: no short
convolution, the feature map ``phi(x) = elu(x) + 1`` on ``q`` and ``k``, no L2 norm, outputs divided by
``phi(q_t) . sum_{s<=t} phi(k_s)``, no output norm. :attr:`LinearAttention.TEXTBOOK` names all of them at once.

``q_proj``, ``k_proj`` and ``v_proj`` are one :class:`~hybridvl.mixers.modules.FusedLinear` ``in_proj`` (one matrix
multiplication); checkpoints keep the separate names.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from hybridvl.mixers.base import ConvQKVMixer, check_positive
from hybridvl.mixers.modules import RMSNorm
from hybridvl.mixers.ops.linear_attention import linear_attention
from hybridvl.mixers.ops.utils import compute_dtype, l2norm
from hybridvl.mixers.registry import register_mixer
from hybridvl.mixers.state import RecurrentState

FEATURE_MAPS = ("identity", "elu1")
QK_NORMS = ("l2", "none")
# the normaliser phi(q_t) . sum_s phi(k_s) is positive with elu1 features (elu(x) + 1 > 0) but can round or
# underflow to 0 (e.g. very negative q entries in low precision); dividing by at least this keeps it finite
DENOMINATOR_EPS = 1e-6


def _check_choice(owner: str, option: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if isinstance(value, bool) != isinstance(allowed[0], bool) or value not in allowed:
        raise ValueError(f"{owner}: {option} must be one of {', '.join(map(repr, allowed))}, got {option}={value!r}")


@register_mixer("L", "linear", aliases=("linear_attention",))
class LinearAttention(ConvQKVMixer):
    """Linear attention mixer.

    Per head: ``q``, ``k``, ``v`` projections, each through a short causal convolution with SiLU (unless
    ``conv_size=0``); ``q`` and ``k`` L2-normalised (``qk_norm``), then the feature map (``feature_map``); the
    recurrence ``S_t = S_{t-1} + k_t v_t^T``, ``o_t = K^-0.5 S_t^T q_t``; with ``normalize``, ``o_t`` divided by
    ``K^-0.5 q_t . sum_{s<=t} k_s`` (the scale cancels); an RMSNorm per head (``output_norm``); ``o_proj``.

    The norm comes before the feature map: with ``qk_norm="none"`` the feature map sees the raw projections (the
    textbook ``phi(q)``), and with ``qk_norm="l2"`` the L2 step stays where it is today and ``elu1`` maps the unit
    vectors into bounded positive features (``phi(l2norm(q))``, entries in ``[1/e, 2]``).

    ``normalize`` needs positive features (``feature_map="elu1"``): it appends a column of ones to ``v``, so the
    same linear-attention op (chunked, recurrent or fla) also accumulates ``sum_s k_s`` as the state's last
    column; the state then has ``head_v_dim + 1`` columns per head.

    ``TEXTBOOK`` holds the options of the textbook variant, e.g.
    ``hybridvl.mixers.build_mixer("L", 128, **LinearAttention.TEXTBOOK)``: no short convolution, ``elu(x) + 1``
    features, no q/k norm, Katharopoulos's normaliser, no output norm. It is the baseline the literature finds
    weakest (no short convolution, a simple feature map, no normalisation tricks); the defaults are the
    InfiniteVL ablation's mixer.

    Args:
        hidden_size: model width.
        num_heads: heads (default ``hidden_size // head_dim``).
        head_dim: key dimension per head.
        expand_v: value dimension per head = ``head_dim * expand_v``.
        conv_size: short convolution kernel size; ``0``: none.
        norm_eps: epsilon of the output RMSNorm.
        feature_map: ``"identity"`` or ``"elu1"`` (``elu(x) + 1``), applied to ``q`` and ``k`` after ``qk_norm``.
        qk_norm: ``"l2"`` or ``"none"``.
        normalize: divide each output by ``phi(q_t) . sum_{s<=t} phi(k_s)``.
        output_norm: the per-head RMSNorm before ``o_proj``.
        mode: ``"auto"``, ``"chunk"`` or ``"recurrent"``.
        backend: ``"auto"``, ``"fla"`` or ``"torch"``.
    """

    backends = ("fla", "torch")
    TEXTBOOK: ClassVar[dict[str, Any]] = {
        "conv_size": 0,
        "feature_map": "elu1",
        "qk_norm": "none",
        "normalize": True,
        "output_norm": False,
    }

    def __init__(
        self,
        hidden_size: int,
        num_heads: int | None = None,
        head_dim: int = 128,
        expand_v: float = 2.0,
        conv_size: int = 4,
        norm_eps: float = 1e-6,
        feature_map: str = "identity",
        qk_norm: str = "l2",
        normalize: bool = False,
        output_norm: bool = True,
        mode: str = "auto",
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, num_heads, head_dim, expand_v, conv_size, mode, backend)
        check_positive(self._owner, "norm_eps", norm_eps)
        _check_choice(self._owner, "feature_map", feature_map, FEATURE_MAPS)
        _check_choice(self._owner, "qk_norm", qk_norm, QK_NORMS)
        _check_choice(self._owner, "normalize", normalize, (False, True))
        _check_choice(self._owner, "output_norm", output_norm, (True, False))
        if normalize and feature_map != "elu1":
            raise ValueError(
                f"{self._owner}: normalize=True needs positive features, feature_map='elu1'; with "
                f"feature_map={feature_map!r} the denominator q . sum(k) can be zero or negative"
            )
        self.feature_map, self.qk_norm = feature_map, qk_norm
        self.normalize, self.output_norm = normalize, output_norm
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)
        if output_norm:
            self.o_norm = RMSNorm(self.head_v_dim, eps=norm_eps)

    @property
    def state_v_dim(self) -> int:
        """``head_v_dim``, plus one column (the running key sum) with ``normalize``."""
        return self.head_v_dim + int(self.normalize)

    def _features(self, t: torch.Tensor) -> torch.Tensor:
        if self.qk_norm == "l2":
            t = l2norm(t)
        return F.elu(t) + 1 if self.feature_map == "elu1" else t

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
        q, k, v, conv = self._conv_qkv(*self._project(x), state, cu_seqlens, self._glue_backend())
        if self.normalize:  # v' = [v, 1]: the op's last output column is the denominator
            v = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)
        o, recurrent = linear_attention(
            self._features(q),
            self._features(k),
            v,
            initial_state=None if state is None else state.recurrent,
            cu_seqlens=cu_seqlens,
            form=self._form(x.shape[1]),
            backend=backend,
        )
        if self.normalize:
            # both columns carry the op's K^-0.5 query scale, which cancels in the ratio
            dtype = compute_dtype(o)
            numerator, denominator = o.to(dtype).split([self.head_v_dim, 1], dim=-1)
            o = (numerator / denominator.clamp_min(DENOMINATOR_EPS)).to(o.dtype)
        if self.output_norm:
            o = self.o_norm(o)
        return self.o_proj(o.flatten(-2)), RecurrentState(recurrent, conv)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, feature_map={self.feature_map!r}, qk_norm={self.qk_norm!r}, "
            f"normalize={self.normalize}, output_norm={self.output_norm}"
        )
