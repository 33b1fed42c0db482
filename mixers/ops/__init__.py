"""The core recurrences, attention, the fused norms and SwiGLU as plain functions, fla's layout
``[batch, time, heads, dim]``.

Each takes ``backend="auto" | "torch" | <kernel backend>``; the PyTorch forms are the reference.
"""

from hybridvl.mixers.ops.activations import swiglu
from hybridvl.mixers.ops.attention import attention_over_positions, causal_attention, decode_attention
from hybridvl.mixers.ops.gated_delta_rule import gated_delta_rule
from hybridvl.mixers.ops.linear_attention import gated_linear_attention, linear_attention, simple_gated_linear_attention
from hybridvl.mixers.ops.norm import add_rms_norm, gated_rms_norm
from hybridvl.mixers.ops.rotary import apply_rotary, rotary_cos_sin
from hybridvl.mixers.ops.short_conv import short_conv
from hybridvl.mixers.ops.utils import l2norm

__all__ = [
    "add_rms_norm",
    "apply_rotary",
    "attention_over_positions",
    "causal_attention",
    "decode_attention",
    "gated_delta_rule",
    "gated_linear_attention",
    "gated_rms_norm",
    "l2norm",
    "linear_attention",
    "rotary_cos_sin",
    "short_conv",
    "simple_gated_linear_attention",
    "swiglu",
]
