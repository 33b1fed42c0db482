"""The call contract every mixer follows.

.. code-block:: python

    y, state = mixer(x, state=None, position_ids=None, cu_seqlens=None)

* ``x`` is ``[B, T, hidden_size]``; ``y`` has the same shape.
* The call is parallel over ``T``. Feeding the returned ``state`` back continues the sequence exactly,
  whether the rest comes as one chunk, many chunks or one token at a time.
* ``cu_seqlens`` packs ``N`` sequences into one row (``B == 1``): outputs and states equal running each
  sequence alone; the state then describes the ``N`` sequences.
* ``position_ids`` (``[B, T]``, or ``[3, B, T]`` for M-RoPE) feed rotary embeddings of attention mixers;
  linear mixers take no positions and ignore them. Defaults count tokens from the state's start.
* ``init_state(batch_size, device, dtype)`` preallocates an empty state; ``state_bytes(batch_size)``
  reports its size. Only full attention (``A``) has a state that grows with the sequence.
* Bad calls raise naming the mixer and the problem: options at construction, and at each call the input's
  shape, malformed ``cu_seqlens``, and a state of another kind, other options (window, heads, ...), sequence
  count or device.

A new mixer subclasses :class:`Mixer` in one file, implements ``forward`` and ``init_state`` (``state_bytes``
has a default), and registers with :func:`hybridvl.mixers.register_mixer`, which sets its ``letter`` and ``name`` and
checks those methods. The built-in mixers compute all their input projections in one matrix multiplication
(a :class:`~hybridvl.mixers.modules.FusedLinear` child, e.g. ``in_proj`` or ``qkv_proj``) and still save and load
each projection under its own name (``q_proj.weight``, ...); a new mixer may do the same or keep one
``nn.Linear`` per projection. Two optional hooks let ``hybridvl convert`` initialise it from a teacher's layer:
:meth:`Mixer.mimic_init` and :meth:`Mixer.transfer_init`. :func:`hybridvl.mixers.testing.check_mixer` checks the
contract above on any registered kind.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import nn

from hybridvl.mixers.backends import precision_auto_skips, select_backend
from hybridvl.mixers.modules import FusedLinear, ShortConv, keep_part_names
from hybridvl.mixers.ops.utils import check_int, check_positive, compute_dtype
from hybridvl.mixers.ops.varlen import check_cu_seqlens
from hybridvl.mixers.state import MixerState, RecurrentState


def kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a mixer's kernels see for input ``x``: autocast's where autocast is on for ``x``'s device (the
    projections hand the kernels that dtype), else ``x``'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@dataclasses.dataclass(frozen=True)
class AttentionWeights:
    """The projections of the attention layer a mixer replaces, handed to :meth:`Mixer.transfer_init`.

    KV heads come expanded to ``num_heads``: query head ``h`` reads KV head ``h // (num_heads / kv_heads)``, as
    grouped-query attention does.

    Attributes:
        q, k, v: ``[num_heads * head_dim, hidden_size]`` projection weights (biases are not carried over).
        o: ``[hidden_size, num_heads * head_dim]`` output projection.
        num_heads: attention heads.
        head_dim: dimension per head.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    num_heads: int
    head_dim: int


class Mixer(nn.Module):
    """Base class of every mixer: the contract of the module docstring.

    Subclasses implement ``forward`` and ``init_state``, may override ``state_bytes`` (needed where the state
    grows) and set ``backends`` (supported backends, fastest first, ``"torch"`` last) and ``fixed_size_state``.
    :func:`hybridvl.mixers.register_mixer` sets ``letter`` and ``name``.

    Checkpoints name the parts of each :class:`~hybridvl.mixers.modules.FusedLinear` child, not the fused module
    (:func:`~hybridvl.mixers.modules.keep_part_names`).

    Conversion hooks, used by :func:`hybridvl.models.convert.convert_model` on the layers a conversion gives a new
    mixer:
    :meth:`mimic_init` (default: keep the constructor's initialisation) and :meth:`transfer_init` (default:
    refuse, so ``init="transfer"`` fails naming the mixer).

    Attributes:
        last_backend: the backend the latest call chose for its computation (``"fla"``, ``"torch"``, ...), so a
            training script can record which one each layer really ran (e.g. fla or the PyTorch fallback);
            ``None`` before the first call. Attention mixers continuing from a KV cache attend over it without
            choosing a backend (PyTorch operations, or one Triton kernel for single tokens on CUDA) and leave it
            as it was.
    """

    letter: ClassVar[str] = ""
    name: ClassVar[str] = ""
    backends: ClassVar[tuple[str, ...]] = ("torch",)
    fixed_size_state: ClassVar[bool] = True

    def __init__(self, hidden_size: int, backend: str = "auto") -> None:
        super().__init__()
        hidden_size = check_int(self._owner, "hidden_size", hidden_size)
        if backend != "auto" and backend not in self.backends:
            raise ValueError(
                f"{self._owner} supports backends {', '.join(self.backends)} or 'auto', got backend={backend!r}"
            )
        self.hidden_size = hidden_size
        self.backend = backend
        self.last_backend: str | None = None
        keep_part_names(self)

    @property
    def _owner(self) -> str:
        return f"mixer {self.letter} ({self.name})"

    def forward(
        self,
        x: torch.Tensor,
        state: MixerState | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MixerState]:
        raise NotImplementedError

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> MixerState:
        """An empty state for ``batch_size`` sequences (activations in ``dtype``, default the weights')."""
        raise NotImplementedError

    def state_bytes(self, batch_size: int = 1, seq_len: int = 0, dtype: torch.dtype | None = None) -> int:
        """Bytes of the state of ``batch_size`` sequences; ``seq_len`` matters only where the state grows."""
        return self.init_state(batch_size, device="meta", dtype=dtype).nbytes

    def mimic_init(self) -> None:
        """Initialise in place for the ``mimic`` conversion: near-identity memory with slow decay (see
        :mod:`hybridvl.models.convert`). The default keeps the constructor's initialisation."""

    def transfer_init(self, attention: AttentionWeights) -> dict[str, list[str]]:
        """Copy the replaced attention layer's projections into this mixer in place (after :meth:`mimic_init`),
        for the ``transfer`` conversion.

        Returns:
            Each parameter written (its name in this mixer) -> the attention projections it came from, among
            ``"q"``, ``"k"``, ``"v"``, ``"o"``.

        Raises:
            ValueError: the mixer's options do not fit the attention's shapes (say which to set).
            NotImplementedError: the mixer has no transfer (the default).
        """
        raise NotImplementedError(
            f"transfer init does not know how to map attention into {type(self).__name__} ({self._owner}); use "
            "init='mimic' or implement its transfer_init (see hybridvl.mixers.base.Mixer.transfer_init)"
        )

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, backend={self.backend!r}"

    # helpers for subclasses

    def _resolve_backend(
        self, x: torch.Tensor, limitations: dict[str, str] | None = None, dtype: torch.dtype | None = None
    ) -> str:
        """The backend to run input ``x`` on, also kept in :attr:`last_backend`. ``auto`` passes over kernels
        short of the precision of the dtype the kernels see (``dtype``; default :func:`kernel_dtype` of ``x``)."""
        dtype = dtype or kernel_dtype(x)
        skips = precision_auto_skips(x.device, dtype, self.backends)
        self.last_backend = select_backend(self.backend, x.device, self.backends, self._owner, limitations, skips)
        return self.last_backend

    def _glue_backend(self) -> str:
        """The backend of the short convolutions and the gated output norm: PyTorch when the mixer is asked for
        PyTorch, else ``"auto"``, so they keep fla's kernels where the recurrence alone falls back to PyTorch (a
        broken backward, a float32 input, or a study that runs one mixer's recurrence in PyTorch); ``"auto"`` then
        follows the glue's rule (:func:`~hybridvl.mixers.backends.elementwise_auto_skips`)."""
        return "torch" if self.backend == "torch" else "auto"

    def _dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        return dtype if dtype is not None else next(self.parameters()).dtype

    def _device(self, device: torch.device | str | None) -> torch.device:
        return torch.device(device) if device is not None else next(self.parameters()).device

    def _check_input(self, x: torch.Tensor, state: MixerState | None, cu_seqlens: torch.Tensor | None) -> int:
        """Validate the input, the packing and the state; return the number of sequences ``N``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._owner}: x must be a tensor [B, T, {self.hidden_size}], got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"{self._owner}: x must be [B, T, {self.hidden_size}], got {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError(f"{self._owner}: x has no tokens (T = 0)")
        if not x.is_floating_point():
            raise TypeError(f"{self._owner}: x must be floating point (hidden states), got {x.dtype}")
        weights = next((parameter.dtype for parameter in self.parameters()), x.dtype)
        if x.dtype != weights and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"{self._owner}: x is {x.dtype} but the mixer's weights are {weights}; pass x in {weights}, "
                f"convert the mixer (mixer.to({x.dtype})) or run under torch.autocast"
            )
        n = x.shape[0]
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor):
                raise TypeError(f"{self._owner}: cu_seqlens must be a tensor, got {type(cu_seqlens).__name__}")
            try:
                check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
            except ValueError as error:
                raise ValueError(f"{self._owner}: {error}") from None
            n = cu_seqlens.numel() - 1
        if state is not None and not torch.compiler.is_compiling():
            # checked when run eagerly; a compiled forward (a graph's warm-up) runs on a state its owner built
            self._check_state(state, n, x.device)
        return n

    @cached_property
    def _state_structure(self) -> dict[str, Any]:
        """The :meth:`MixerState.structure` of this mixer's states (computed once, on the meta device)."""
        return self.init_state(1, device="meta").structure()

    def _check_state(self, state: MixerState, n: int, device: torch.device) -> None:
        """Raise unless ``state`` is a state of this mixer (same kind and options) for ``n`` sequences on ``device``."""
        expected = self._state_structure
        if not isinstance(state, MixerState) or type(state).__name__ != expected["type"]:
            raise TypeError(
                f"{self._owner}: expects a {expected['type']} (from its init_state or an earlier call), got a "
                f"{type(state).__name__}; every mixer needs a state of its own kind"
            )
        if state.batch_size != n:
            raise ValueError(f"{self._owner}: the state holds {state.batch_size} sequences but the input has {n}")
        structure = state.structure()
        differences = [
            f"{part} {structure.get(part, 'absent')} (this mixer: {expected.get(part, 'absent')})"
            for part in [*expected, *(part for part in structure if part not in expected)]
            if structure.get(part, "absent") != expected.get(part, "absent")
        ]
        if differences:
            raise ValueError(
                f"{self._owner}: the state comes from a mixer with other options: {', '.join(differences)}; pass a "
                "state this mixer made (init_state or an earlier call)"
            )
        if state.device != device:
            raise ValueError(
                f"{self._owner}: the state is on {state.device} but the input on {device}; move it with state.to()"
            )


class RecurrentMixer(Mixer):
    """Base of the linear mixers (fixed-size :class:`RecurrentState`), which compute either chunk-parallel
    or as a token loop.

    Args:
        hidden_size: model width.
        mode: ``"auto"`` (token loop for single tokens, chunked otherwise), ``"chunk"`` or ``"recurrent"``.
        backend: ``"auto"`` or one of the subclass's ``backends``.
    """

    def __init__(self, hidden_size: int, mode: str = "auto", backend: str = "auto") -> None:
        super().__init__(hidden_size, backend)
        if mode not in ("auto", "chunk", "recurrent"):
            raise ValueError(f"{self._owner}: mode must be 'auto', 'chunk' or 'recurrent', got {mode!r}")
        self.mode = mode

    def _form(self, seq_len: int) -> str:
        if self.mode == "auto":
            return "recurrent" if seq_len == 1 else "chunk"
        return self.mode


class ShortConvQKV:
    """The input projections and optional causal depthwise short convolutions with SiLU on ``q``, ``k``, ``v``,
    shared by the mixers that have them (``D``, ``L`` and ``G``).

    One :class:`~hybridvl.mixers.modules.FusedLinear` ``in_proj`` computes ``q_proj``, ``k_proj``, ``v_proj`` and
    the mixer's gate projections (e.g. ``a_proj``, ``b_proj``, ``g_proj`` for ``D``) in one matrix multiplication;
    checkpoints keep those names. Convolution modules ``q_conv1d``, ``k_conv1d``, ``v_conv1d`` (fla's names) and
    the state's conv tails under ``"q"``, ``"k"``, ``"v"``; ``conv_size == 0``: no convolution (no modules, nothing
    in the state, no SiLU either), the projections pass through unchanged. Also the conversion hooks of such
    mixers: ``mimic`` makes the convolutions the identity, ``transfer`` copies the attention's projections into
    ``q_proj``, ``k_proj``, ``v_proj`` (rows of ``in_proj``) and ``o_proj``.

    A mixin for :class:`Mixer` subclasses that set ``hidden_size``, ``key_dim``, ``value_dim`` (flat widths of
    ``q``/``k`` and ``v``), ``num_heads`` and ``head_v_dim`` before calling :meth:`_init_inputs`.
    """

    hidden_size: int
    conv_size: int
    key_dim: int
    value_dim: int
    num_heads: int
    head_v_dim: int

    @torch.no_grad()
    def mimic_init(self) -> None:
        """Short convolutions the identity (see :meth:`Mixer.mimic_init`)."""
        if self.conv_size:
            for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
                conv.set_identity()
        super().mimic_init()

    @torch.no_grad()
    def transfer_init(self, attention: AttentionWeights) -> dict[str, list[str]]:
        """Queries, keys, values and the output projection from the attention (see :meth:`Mixer.transfer_init`);
        each value head tiled ``head_v_dim / head_dim`` times and the output split evenly, so ``o(v)`` is kept."""
        heads, head_dim, key_dim = attention.num_heads, attention.head_dim, self.key_dim // self.num_heads
        if self.num_heads != heads or key_dim != head_dim or self.head_v_dim % head_dim:
            raise ValueError(
                f"transfer init into {type(self).__name__} needs {heads} heads with key dim {head_dim} and a "
                f"value dim that is a multiple of {head_dim}; got {self.num_heads} heads, key dim {key_dim}, value "
                f"dim {self.head_v_dim} (set the mixer's options to match the attention)"
            )
        repeat = self.head_v_dim // head_dim
        self.in_proj.weight_part("q_proj").copy_(attention.q)
        self.in_proj.weight_part("k_proj").copy_(attention.k)
        self.in_proj.weight_part("v_proj").copy_(
            attention.v.unflatten(0, (heads, head_dim)).repeat(1, repeat, 1).flatten(0, 1)
        )
        self.o_proj.weight.copy_(
            attention.o.unflatten(1, (heads, head_dim)).repeat(1, 1, repeat).flatten(1, 2) / repeat
        )
        return {"q_proj.weight": ["q"], "k_proj.weight": ["k"], "v_proj.weight": ["v"], "o_proj.weight": ["o"]}

    def _init_inputs(self, conv_size: int, gates: dict[str, int]) -> None:
        """Create ``in_proj`` (``q_proj``, ``k_proj``, ``v_proj``, then ``gates``: part name -> width) and the
        short convolutions of ``conv_size``."""
        parts = {"q_proj": self.key_dim, "k_proj": self.key_dim, "v_proj": self.value_dim, **gates}
        self.in_proj = FusedLinear(self.hidden_size, parts)
        self._in_sizes = self.in_proj.sizes  # kept here too: a LoRA layer wrapping in_proj hides its attributes
        if isinstance(conv_size, bool) or not isinstance(conv_size, int) or conv_size < 0:
            raise ValueError(
                f"{self._owner}: conv_size must be a non-negative integer (0: no short convolution), got "
                f"conv_size={conv_size!r}"
            )
        self.conv_size = conv_size
        if conv_size:
            self.q_conv1d = ShortConv(self.key_dim, conv_size)
            self.k_conv1d = ShortConv(self.key_dim, conv_size)
            self.v_conv1d = ShortConv(self.value_dim, conv_size)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``q``, ``k``, ``v`` and the gates' projections of ``x`` ``[B, T, C]`` (views of one product)."""
        return self.in_proj(x).split(self._in_sizes, dim=-1)

    def _short_convs(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: RecurrentState | None,
        cu_seqlens: torch.Tensor | None,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Convolve the flat projections ``[B, T, C]``; return them and the new conv tails (``{}`` without)."""
        if not self.conv_size:
            return q, k, v, {}
        conv = {} if state is None else state.conv
        q, conv_q = self.q_conv1d(q, conv.get("q"), cu_seqlens, backend)
        k, conv_k = self.k_conv1d(k, conv.get("k"), cu_seqlens, backend)
        v, conv_v = self.v_conv1d(v, conv.get("v"), cu_seqlens, backend)
        return q, k, v, {"q": conv_q, "k": conv_k, "v": conv_v}

    def _empty_conv_tails(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Zero conv tails ``name -> [N, C, conv_size]`` for :meth:`init_state` (``{}`` without convolutions)."""
        if not self.conv_size:
            return {}
        return {
            name: torch.zeros(batch_size, channels, self.conv_size, device=device, dtype=dtype)
            for name, channels in (("q", self.key_dim), ("k", self.key_dim), ("v", self.value_dim))
        }


class ConvQKVMixer(ShortConvQKV, RecurrentMixer):
    """Base of the linear mixers whose ``q``, ``k``, ``v`` are projections passed through short causal
    convolutions (``D`` and ``L``): heads, dimensions, projections, convolutions and the state layout.

    Args:
        hidden_size: model width.
        num_heads: heads (default ``hidden_size // head_dim``, at least 1).
        head_dim: key (and query) dimension per head.
        expand_v: value dimension per head = ``head_dim * expand_v``.
        conv_size: short convolution kernel size; ``0``: no short convolution (see :class:`ShortConvQKV`).
        mode: ``"auto"`` (token loop for single tokens, chunked otherwise), ``"chunk"`` or ``"recurrent"``.
        backend: ``"auto"`` or one of the subclass's ``backends``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int | None,
        head_dim: int,
        expand_v: float,
        conv_size: int,
        mode: str,
        backend: str,
    ) -> None:
        super().__init__(hidden_size, mode, backend)
        head_dim = check_int(self._owner, "head_dim", head_dim)
        expand_v = check_positive(self._owner, "expand_v", expand_v)
        self.num_heads = (
            max(1, hidden_size // head_dim) if num_heads is None else check_int(self._owner, "num_heads", num_heads)
        )
        self.head_dim = head_dim
        self.head_v_dim = int(head_dim * expand_v)
        if self.head_v_dim != head_dim * expand_v or self.head_v_dim < 1:
            raise ValueError(
                f"{self._owner}: head_dim * expand_v must be a positive integer, got {head_dim} * {expand_v}"
            )
        self.expand_v = expand_v
        self.key_dim, self.value_dim = self.num_heads * head_dim, self.num_heads * self.head_v_dim
        self._init_inputs(conv_size, self._gates())

    def _gates(self) -> dict[str, int]:
        """The gate projections ``in_proj`` computes after ``q``, ``k``, ``v``: part name -> width (none here)."""
        return {}

    @property
    def state_v_dim(self) -> int:
        """Columns per head of the recurrent state (``head_v_dim``; a subclass may carry more)."""
        return self.head_v_dim

    def _conv_qkv(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: RecurrentState | None,
        cu_seqlens: torch.Tensor | None,
        backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The flat projections (:meth:`_project`) convolved, as ``q``, ``k`` ``[B, T, H, head_dim]``, ``v``
        ``[B, T, H, head_v_dim]``, and the new conv states."""
        q, k, v, conv = self._short_convs(q, k, v, state, cu_seqlens, backend)
        q, k = (t.unflatten(-1, (self.num_heads, self.head_dim)) for t in (q, k))
        v = v.unflatten(-1, (self.num_heads, self.head_v_dim))
        return q, k, v, conv

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> RecurrentState:
        device, dtype = self._device(device), self._dtype(dtype)
        return RecurrentState(
            torch.zeros(
                batch_size, self.num_heads, self.head_dim, self.state_v_dim, device=device, dtype=compute_dtype(dtype)
            ),
            self._empty_conv_tails(batch_size, device, dtype),
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_heads={self.num_heads}, head_dim={self.head_dim}, "
            f"head_v_dim={self.head_v_dim}, conv_size={self.conv_size}, mode={self.mode!r}"
        )
