"""Reading checkpoints in the public InfiniteVL format (``HybridVLM.from_pretrained`` loads them).

InfiniteVL (``model_type: infinite_vl``) saves a Qwen2.5-VL-style ``config.json`` whose text fields sit at the
top level (or under ``text_config``) with its linear-layer fields — ``layer_types``
(``linear_attention`` / ``sliding_attention`` / ``full_attention``), ``num_linear_heads``,
``num_linear_key_value_heads``, ``linear_head_dim``, ``expand_v``, ``conv_size``, ``use_gate``,
``use_short_conv``, ``norm_eps``, ``sliding_window`` — and weights named like Qwen2.5-VL's, Gated DeltaNet
layers under ``self_attn`` with ``q/k/v/a/b/g/o_proj``, ``q/k/v_conv1d``, ``A_log``, ``dt_bias``, ``o_norm``
(the names this project's ``D`` mixer uses).

Its stage-1 checkpoints were saved with every layer marked ``full_attention``; the layout is therefore read
from the weights (a layer with ``A_log`` is Gated DeltaNet), and each disagreement with ``layer_types`` is
logged.

InfiniteVL's modeling code (written for transformers 4.57) places videos by transformers 4.x's rule (seconds per
temporal patch truncated to an integer before scaling; text after a video continuing past its largest position),
so an imported checkpoint gets ``video_position_rule="transformers4"`` (see :mod:`hybridvl.models.positions`) and keeps
it through conversion and saving.
"""

from __future__ import annotations

import logging
from typing import Any

from hybridvl.models.config import HybridConfig
from hybridvl.models.positions import TRANSFORMERS4
from hybridvl.models.qwen import hybrid_config_from_qwen

logger = logging.getLogger("hybridvl.models")

LAYER_TYPES = {"linear_attention": "D", "sliding_attention": "S", "full_attention": "A"}


class InfiniteVLFormatError(ValueError):
    """An InfiniteVL checkpoint this project cannot represent."""


def infinitevl_config(config: dict[str, Any], tensor_names: set[str]) -> HybridConfig:
    """Translate an InfiniteVL ``config.json`` (and the layer kinds its weights reveal, ``tensor_names`` in this
    project's naming: :func:`hybridvl.models.qwen.canonical_name`) to a HybridConfig."""
    text = {**config, **config.get("text_config", {})}
    num_layers = text["num_hidden_layers"]
    declared = text.get("layer_types") or [
        "linear_attention" if i % 4 else "sliding_attention" for i in range(num_layers)
    ]
    if len(declared) != num_layers:
        raise InfiniteVLFormatError(f"layer_types has {len(declared)} entries for {num_layers} layers")
    kinds = []
    for i, layer_type in enumerate(declared):
        if layer_type not in LAYER_TYPES:
            raise InfiniteVLFormatError(f"layer {i} has unknown layer type {layer_type!r}")
        kind = LAYER_TYPES[layer_type]
        is_gdn = f"language_model.layers.{i}.self_attn.A_log" in tensor_names
        actual = "D" if is_gdn else (kind if kind != "D" else "S")
        if actual != kind:
            logger.warning(
                "layer %d is declared %r but its weights are %s; using the weights",
                i,
                layer_type,
                "Gated DeltaNet" if is_gdn else "attention",
            )
        kinds.append(actual)
    if "D" in kinds:
        if not text.get("use_gate", True) or not text.get("use_short_conv", True):
            raise InfiniteVLFormatError(
                "Gated DeltaNet layers without output gate or short convolutions are not supported"
            )
        heads, kv_heads = text.get("num_linear_heads", 16), text.get("num_linear_key_value_heads", 16)
        if heads != kv_heads:
            raise InfiniteVLFormatError(
                f"num_linear_heads {heads} != num_linear_key_value_heads {kv_heads}: grouped Gated DeltaNet heads "
                "are not supported"
            )
    window = text.get("sliding_window") if text.get("use_sliding_window", True) else None
    if "S" in kinds and not window:
        raise InfiniteVLFormatError("sliding-attention layers need sliding_window (and use_sliding_window true)")
    gdn = {
        "num_heads": text.get("num_linear_heads", 16),
        "head_dim": text.get("linear_head_dim", 128),
        "expand_v": float(text.get("expand_v", 2)),
        "conv_size": text.get("conv_size", 4),
        "norm_eps": text.get("norm_eps", 1e-5),
    }
    return hybrid_config_from_qwen(
        config, ",".join(kinds), sliding_window=window, mixer_options={"D": gdn}, video_position_rule=TRANSFORMERS4
    )
