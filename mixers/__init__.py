"""Interchangeable sequence mixers with one call contract, and layout strings that compose them.

Built-in kinds: ``D`` Gated DeltaNet, ``S`` sliding-window attention, ``A`` full attention, ``M`` Mamba2,
``G`` GLA, ``L`` plain linear attention. See :mod:`hybridvl.mixers.base` for the contract and
:mod:`hybridvl.mixers.layout` for the layout grammar.

>>> from hybridvl import mixers
>>> mixer = mixers.build_mixer("D", 256)
>>> mixers.parse_layout("S,D,D,D x2")
['S', 'D', 'D', 'D', 'S', 'D', 'D', 'D']
"""

from hybridvl.mixers import gated_deltanet, attention, mamba2, gla, linear  # noqa: F401, I001  (registers D S A M G L in order)
from hybridvl.mixers.attention import Attention, SlidingWindowAttention
from hybridvl.mixers.backends import BACKENDS, BackendUnavailableError
from hybridvl.mixers.base import AttentionWeights, ConvQKVMixer, Mixer, RecurrentMixer
from hybridvl.mixers.gated_deltanet import GatedDeltaNet
from hybridvl.mixers.gla import GatedLinearAttention
from hybridvl.mixers.layout import MAX_LAYERS, LayoutError, count_kinds, format_layout, parse_layout, spread_layout
from hybridvl.mixers.linear import LinearAttention
from hybridvl.mixers.mamba2 import Mamba2
from hybridvl.mixers.registry import (
    MixerSpec,
    UnknownMixerError,
    available,
    build_mixer,
    get_spec,
    register_mixer,
    registered,
    resolve_kind,
)
from hybridvl.mixers.state import KVCache, MixerState, RecurrentState

__all__ = [
    "BACKENDS",
    "MAX_LAYERS",
    "Attention",
    "AttentionWeights",
    "BackendUnavailableError",
    "ConvQKVMixer",
    "GatedDeltaNet",
    "GatedLinearAttention",
    "KVCache",
    "LayoutError",
    "LinearAttention",
    "Mamba2",
    "Mixer",
    "MixerSpec",
    "MixerState",
    "RecurrentMixer",
    "RecurrentState",
    "SlidingWindowAttention",
    "UnknownMixerError",
    "available",
    "build_mixer",
    "count_kinds",
    "format_layout",
    "get_spec",
    "parse_layout",
    "register_mixer",
    "registered",
    "resolve_kind",
    "spread_layout",
]
