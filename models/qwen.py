"""Reading transformers Qwen2.5-VL checkpoints: configs (flat or nested) and tensor names."""

from __future__ import annotations

from typing import Any

from hybridvl import mixers
from hybridvl.models.config import HybridConfig
from hybridvl.models.positions import TRANSFORMERS5


class ConversionError(ValueError):
    """A checkpoint cannot be read or converted as asked."""


def hybrid_config_from_qwen(
    qwen: dict[str, Any],
    layout: str,
    sliding_window: int | None = None,
    mixer_options: dict[str, dict[str, Any]] | None = None,
    video_position_rule: str = TRANSFORMERS5,
) -> HybridConfig:
    """A :class:`HybridConfig` with the dimensions of a Qwen2.5-VL ``config.json`` (flat or nested
    ``text_config``) and ``layout``."""
    text = {**qwen, **qwen.get("text_config", {})}
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    num_layers = text["num_hidden_layers"]
    default_options = {"D": {"num_heads": text["num_attention_heads"], "head_dim": _head_dim(text), "expand_v": 2.0}}
    try:
        return HybridConfig(
            layout=layout,
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            intermediate_size=text["intermediate_size"],
            num_hidden_layers=num_layers,
            rms_norm_eps=text.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=qwen.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
            num_attention_heads=text["num_attention_heads"],
            num_key_value_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
            head_dim=_head_dim(text),
            rope_theta=rope.get("rope_theta", text.get("rope_theta", 1_000_000.0)),
            mrope_section=rope.get("mrope_section"),
            sliding_window=sliding_window or text.get("sliding_window") or 8192,
            mixer_options=mixer_options if mixer_options is not None else default_options,
            vision_config=vision_config_fields(qwen.get("vision_config")),
            image_token_id=qwen.get("image_token_id", 151655),
            video_token_id=qwen.get("video_token_id", 151656),
            vision_start_token_id=qwen.get("vision_start_token_id", 151652),
            vision_end_token_id=qwen.get("vision_end_token_id", 151653),
            bos_token_id=text.get("bos_token_id"),
            eos_token_id=text.get("eos_token_id"),
            pad_token_id=text.get("pad_token_id"),
            initializer_range=text.get("initializer_range", 0.02),
            video_position_rule=video_position_rule,
        )
    except mixers.LayoutError as error:
        raise ConversionError(f"the layout does not fit the teacher's {num_layers} layers:\n{error}") from error


def _head_dim(text: dict[str, Any]) -> int:
    return text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]


def vision_config_fields(vision: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``Qwen2_5_VLVisionConfig`` fields of a saved vision config (bookkeeping keys dropped)."""
    if vision is None:
        return None
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    fields = Qwen2_5_VLVisionConfig().to_dict()
    return {k: v for k, v in vision.items() if k in fields and k not in ("model_type", "transformers_version", "dtype")}


def canonical_name(name: str) -> str:
    """A transformers Qwen2.5-VL tensor name (legacy ``model.layers``/``visual`` or 5.x
    ``model.language_model``/``model.visual``) in this project's naming."""
    for old, new in (
        ("model.language_model.", "language_model."),
        ("model.visual.", "visual."),
        ("visual.", "visual."),
        ("language_model.", "language_model."),
        ("model.", "language_model."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return name
