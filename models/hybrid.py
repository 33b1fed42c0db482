"""The hybrid model: a decoder whose layers mix tokens with the mixers a layout names, on the Qwen2.5-VL
vision front end.

Each decoder layer is ``x + mixer(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))`` (without the second step when
``intermediate_size`` is 0, as in Zoology's recall models). Parameter names follow
transformers' Qwen2.5-VL (``language_model.layers.N.self_attn.q_proj``, ``visual.blocks...``), so the
weights of attention layers, MLPs, norms, embeddings and the vision tower carry over by name.

.. code-block:: python

    model = HybridVLM(HybridConfig(layout="S,D,D,D x9", vision_config=...))
    out = model(input_ids, pixel_values=..., image_grid_thw=...)          # logits, state
    out = model(next_ids, state=out.state)                                  # continue
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import torch
import torch.nn.functional as F
from torch import nn

from hybridvl import mixers
from hybridvl.mixers.modules import FusedLinear, RMSNorm, keep_part_names
from hybridvl.mixers.ops.varlen import packed_positions, seqlens_to_cu_seqlens, sequence_bounds
from hybridvl.mixers.state import MixerState
from hybridvl.models.config import HybridConfig
from hybridvl.models.positions import sequence_positions
from hybridvl.vision.tower import build_vision_tower, vision_inputs


@dataclasses.dataclass
class ModelState:
    """Everything needed to continue ``N`` sequences: one state per layer and where positions resume."""

    layers: list[MixerState]
    next_position: torch.Tensor  # [N] int64

    @property
    def batch_size(self) -> int:
        return self.next_position.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(state.nbytes for state in self.layers) + self.next_position.numel() * 8

    def clone(self) -> Self:
        """A deep copy (fork): calls on the copy leave this state untouched."""
        return ModelState([state.clone() for state in self.layers], self.next_position.clone())

    def copy_(self, other: ModelState) -> Self:
        """Write ``other`` into this state's tensors in place (see :meth:`MixerState.copy_`)."""
        if len(self.layers) != len(other.layers) or self.batch_size != other.batch_size:
            raise ValueError(
                f"cannot copy a state of {len(other.layers)} layers and {other.batch_size} sequences into one of "
                f"{len(self.layers)} layers and {self.batch_size} sequences"
            )
        for mine, theirs in zip(self.layers, other.layers):
            mine.copy_(theirs)
        self.next_position.copy_(other.next_position)
        return self

    def zero_(self) -> Self:
        """Empty the state in place (as :meth:`HybridVLM.init_state` makes it)."""
        for state in self.layers:
            state.zero_()
        self.next_position.zero_()
        return self

    def detach(self) -> Self:
        return ModelState([state.detach() for state in self.layers], self.next_position.clone())


@dataclasses.dataclass
class DecoderPass:
    """What :meth:`HybridVLM.decode` computes before the LM head.

    Attributes:
        hidden: final-norm hidden states ``[B, T, hidden]`` (``[1, tokens, hidden]`` for packed or padded input).
        state: the state after the input.
        layer_inputs: with ``output_hidden_states``: each layer's input and the last layer's output.
        rope_position_ids: the positions the attention layers used.
        cu_seqlens: sequence boundaries of the packed row (``None`` for an unpadded batch).
        unpad_index: for padded input, where each packed token sits in the flattened ``[B * T]`` batch.
    """

    hidden: torch.Tensor
    state: ModelState
    layer_inputs: tuple[torch.Tensor, ...] | None
    rope_position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None
    unpad_index: torch.Tensor | None


@dataclasses.dataclass
class HybridOutput:
    """Result of a forward pass.

    Attributes:
        logits: ``[B, T, vocab]`` (zeros at padded positions), or only the last ``logits_to_keep``.
        state: the state after the input, to continue from.
        hidden_states: with ``output_hidden_states``: the input of every layer and the final output
            (before the last norm), each ``[B, T, hidden]``; ``len == num_layers + 1``.
        loss: mean next-token cross-entropy when ``labels`` are given (``-100`` ignored).
    """

    logits: torch.Tensor
    state: ModelState
    hidden_states: tuple[torch.Tensor, ...] | None = None
    loss: torch.Tensor | None = None


class SwiGLU(nn.Module):
    """Qwen2's MLP: ``down(silu(gate(x)) * up(x))``, with ``gate_proj`` and ``up_proj`` one
    :class:`~hybridvl.mixers.modules.FusedLinear` ``gate_up_proj`` (one matrix multiplication) that checkpoints
    keep as ``gate_proj`` and ``up_proj``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size})
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        keep_part_names(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class HybridDecoderLayer(nn.Module):
    """Pre-norm residual block around one mixer (``self_attn``, whatever its kind) and a SwiGLU MLP.

    With ``config.intermediate_size == 0`` the layer has no MLP and no ``post_attention_layernorm``: it is
    ``x + mixer(input_layernorm(x))`` (``mlp`` is ``None``).
    """

    def __init__(self, config: HybridConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = mixers.build_mixer(kind, config.hidden_size, **config.mixer_kwargs(kind))
        self.post_attention_layernorm: RMSNorm | None = None
        self.mlp: SwiGLU | None = None
        if config.intermediate_size:
            self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        state: MixerState | None,
        position_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
    ) -> tuple[torch.Tensor, MixerState]:
        mixed, state = self.self_attn(self.input_layernorm(x), state, position_ids=position_ids, cu_seqlens=cu_seqlens)
        x = x + mixed
        if self.mlp is None:
            return x, state
        return x + self.mlp(self.post_attention_layernorm(x)), state


class HybridDecoder(nn.Module):
    """Embeddings, the layout's layers and the final norm (the LM head lives in :class:`HybridVLM`)."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(HybridDecoderLayer(config, kind) for kind in config.kinds)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        states: list[MixerState] | None,
        position_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, list[MixerState], tuple[torch.Tensor, ...] | None]:
        hidden, new_states, all_hidden = inputs_embeds, [], []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(hidden)
            state = None if states is None else states[i]
            if self.gradient_checkpointing and self.training:
                hidden, state = torch.utils.checkpoint.checkpoint(
                    layer, hidden, state, position_ids, cu_seqlens, use_reentrant=False
                )
            else:
                hidden, state = layer(hidden, state, position_ids, cu_seqlens)
            new_states.append(state)
        if output_hidden_states:
            all_hidden.append(hidden)
        return self.norm(hidden), new_states, tuple(all_hidden) if output_hidden_states else None


class HybridVLM(nn.Module):
    """A hybrid decoder, optionally on the Qwen2.5-VL vision tower (``config.vision_config``).

    The vision tower is transformers' ``Qwen2_5_VisionTransformerPretrainedModel``; its merged patch
    features replace the image/video placeholder tokens, and attention layers get Qwen2.5-VL's 3-D
    M-RoPE positions. Padded batches (``attention_mask``) run packed, so no mixer sees padding.
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = None if config.vision_config is None else build_vision_tower(config.vision_config)
        self.language_model = HybridDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.language_model.embed_tokens.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Normal(0, ``initializer_range``) linear and embedding weights, zero biases, in the decoder and
        head; mixer-specific parameters (decays, convolutions, norms) and the vision tower keep their own."""
        std = self.config.initializer_range
        for module in [*self.language_model.modules(), self.lm_head]:
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def kinds(self) -> list[str]:
        return self.config.kinds

    # --- inputs -------------------------------------------------------------------------------------

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image/video features scattered into their placeholder tokens."""
        embeds = self.language_model.embed_tokens(input_ids)
        for kind, pixels, grid, token_id in (
            ("image", pixel_values, image_grid_thw, self.config.image_token_id),
            ("video", pixel_values_videos, video_grid_thw, self.config.video_token_id),
        ):
            if pixels is None:
                continue
            if self.visual is None:
                raise ValueError(f"this model has no vision tower (vision_config is None) but {kind}s were given")
            if grid is None:
                raise ValueError(f"{kind} pixels need their {kind}_grid_thw")
            tables = vision_inputs(self.visual, grid.cpu(), pixels.device)
            features = self.visual(pixels.to(self.visual.dtype), grid_thw=grid, **tables).pooler_output
            mask = input_ids == token_id
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(
                    f"the input has {int(mask.sum())} {kind} placeholder tokens but the {kind}s give "
                    f"{features.shape[0]} features; build inputs with the processor"
                )
            embeds = embeds.masked_scatter(mask[..., None], features.to(embeds.dtype))
        return embeds

    def positions(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        start: torch.Tensor,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE positions ``[3, 1, T]`` of a packed batch and the ``[N]`` positions to continue from."""
        vision = self.config.vision_config or {}
        images = iter(image_grid_thw.cpu() if image_grid_thw is not None else [])
        seconds = second_per_grid_ts.cpu() if second_per_grid_ts is not None else None
        videos: Iterator = iter(
            zip(video_grid_thw.cpu(), seconds if seconds is not None else [1.0] * len(video_grid_thw))
            if video_grid_thw is not None
            else []
        )
        pieces, next_positions = [], []
        ids, starts = input_ids[0].cpu(), start.tolist()  # one copy to the host each, not one per sequence
        for n, (s, e) in enumerate(sequence_bounds(cu_seqlens)):
            positions, next_position = sequence_positions(
                ids[s:e],
                image_token_id=self.config.image_token_id,
                video_token_id=self.config.video_token_id,
                merge_size=vision.get("spatial_merge_size", 2),
                tokens_per_second=vision.get("tokens_per_second", 2),
                image_grids=images,
                video_grids=videos,
                start=starts[n],
                video_position_rule=self.config.video_position_rule,
            )
            pieces.append(positions)
            next_positions.append(next_position)
        for name, leftover in (("image", images), ("video", videos)):
            if next(leftover, None) is not None:
                raise ValueError(f"more {name}s were given than the text has {name} placeholders for")
        device = input_ids.device
        return torch.cat(pieces, 1)[:, None].to(device), torch.tensor(next_positions, device=device)

    # --- forward ------------------------------------------------------------------------------------

    def decode(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        state: ModelState | None = None,
        output_hidden_states: bool = False,
    ) -> DecoderPass:
        """Everything :meth:`forward` does but the LM head: embeddings (with vision features), positions, the
        layers and the final norm. Padded input comes back packed (see :class:`DecoderPass`); training code
        computes its losses from ``hidden`` in chunks instead of materialising all logits."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and cu_seqlens is not None:
            raise ValueError("give attention_mask (padded batch) or cu_seqlens (packed batch), not both")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        batch, seq_len = inputs_embeds.shape[:2]

        # padded rows -> one packed row
        unpad_index = None
        if attention_mask is not None and not bool(attention_mask.all()):
            valid = attention_mask.bool()
            if bool((valid.sum(1) == 0).any()):
                raise ValueError("attention_mask has a row with no tokens")
            unpad_index = valid.flatten().nonzero().squeeze(1)
            cu_seqlens = seqlens_to_cu_seqlens(valid.sum(1), device=inputs_embeds.device)
            inputs_embeds = inputs_embeds.flatten(0, 1)[unpad_index][None]
            input_ids = None if input_ids is None else input_ids.flatten()[unpad_index][None]
            if position_ids is not None:
                position_ids = position_ids.flatten(1, 2)[:, unpad_index][:, None]
        num_sequences = batch if cu_seqlens is None else cu_seqlens.numel() - 1
        if state is not None and state.batch_size != num_sequences:
            raise ValueError(f"the state holds {state.batch_size} sequences but the input has {num_sequences}")

        start = state.next_position if state is not None else inputs_embeds.new_zeros(num_sequences, dtype=torch.long)
        if position_ids is None:
            packed_cu = cu_seqlens if cu_seqlens is not None else seqlens_to_cu_seqlens([seq_len] * batch)
            if input_ids is None or (image_grid_thw is None and video_grid_thw is None):
                # without vision inputs every token is text (generated placeholder ids included), as in transformers
                position_ids, next_position = _text_positions(
                    packed_cu.to(start.device), start, inputs_embeds.shape[:2].numel()
                )
            else:
                position_ids, next_position = self.positions(
                    input_ids.reshape(1, -1), packed_cu, start, image_grid_thw, video_grid_thw, second_per_grid_ts
                )
            if cu_seqlens is None:
                position_ids = position_ids.reshape(3, batch, seq_len)
        else:
            next_position = _next_positions(position_ids, cu_seqlens)
        rope_positions = position_ids if self.config.mrope_section is not None else position_ids[0]

        hidden, layer_states, layer_inputs = self.language_model(
            inputs_embeds,
            None if state is None else state.layers,
            rope_positions,
            cu_seqlens,
            output_hidden_states,
        )
        return DecoderPass(
            hidden, ModelState(layer_states, next_position), layer_inputs, rope_positions, cu_seqlens, unpad_index
        )

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_to_keep: int | None = None,
        **inputs: Any,
    ) -> HybridOutput:
        """Run the model over new tokens, from scratch or continuing ``state``.

        Args:
            input_ids: ``[B, T]`` tokens (or give ``inputs_embeds`` and ``position_ids``).
            attention_mask: ``[B, T]``, 0 at padding (either side); padded rows run packed.
            labels: ``[B, T]`` next-token targets aligned with ``input_ids`` (shifted inside), -100 ignored.
            logits_to_keep: compute logits only for the last this many positions; for padded or packed input
                only 1 is allowed and the logits are each sequence's last token, ``[N, 1, vocab]``.
            **inputs: as :meth:`decode`: ``inputs_embeds``, ``cu_seqlens`` (a packed batch, ``B == 1``),
                ``position_ids`` (M-RoPE ``[3, B, T]``, computed from the tokens when omitted), the vision inputs
                as Qwen2.5-VL's processor returns them (``pixel_values``, ``image_grid_thw``,
                ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``), ``state`` to continue, and
                ``output_hidden_states`` (every layer's input, plus the last layer's output).
        """
        run = self.decode(input_ids, attention_mask=attention_mask, **inputs)
        hidden = run.hidden
        if logits_to_keep is not None and run.cu_seqlens is not None:
            if logits_to_keep != 1:
                raise ValueError("with padding or packing, logits_to_keep can only be 1 (each sequence's last token)")
            logits = self.lm_head(hidden[0, run.cu_seqlens[1:] - 1])[:, None]  # [N, 1, vocab]
        else:
            logits = self.lm_head(hidden if logits_to_keep is None else hidden[:, -logits_to_keep:])
            if run.unpad_index is not None:
                logits = _pad(logits, run.unpad_index, *attention_mask.shape)
        layer_inputs = run.layer_inputs
        if run.unpad_index is not None and layer_inputs is not None:
            layer_inputs = tuple(_pad(h, run.unpad_index, *attention_mask.shape) for h in layer_inputs)
        loss = None if labels is None else next_token_loss(logits, labels)
        return HybridOutput(logits, run.state, layer_inputs, loss)

    # --- states -------------------------------------------------------------------------------------

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ModelState:
        """An empty, preallocated state for ``batch_size`` sequences."""
        device = device if device is not None else self.lm_head.weight.device
        layers = [layer.self_attn.init_state(batch_size, device, dtype) for layer in self.language_model.layers]
        return ModelState(layers, torch.zeros(batch_size, dtype=torch.long, device=device))

    # --- save / load --------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write ``config.json`` (with the layout) and ``model.safetensors``, each atomically; a folder that holds
        files is refused unless ``overwrite`` (see :func:`hybridvl.models.checkpoint.save_weights`), and so is a model
        with a mixer a loading process could not import (see :meth:`HybridConfig.check_mixer_modules`)."""
        from hybridvl.models.checkpoint import save_model

        self.config.check_mixer_modules()
        return save_model(self, directory, overwrite=overwrite)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        allow_nonfinite: bool = False,
    ) -> HybridVLM:
        """Load a directory written by :meth:`save_pretrained`; mismatching configs and tensors raise with their
        names (see :func:`hybridvl.models.checkpoint.load_model`)."""
        from hybridvl.models.checkpoint import load_model

        return load_model(directory, device=device, dtype=dtype, allow_nonfinite=allow_nonfinite)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Generate new tokens; see :func:`hybridvl.models.generation.generate`."""
        from hybridvl.models.generation import generate

        return generate(self, input_ids, **kwargs)


def _pad(packed: torch.Tensor, index: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """Scatter a packed ``[1, N, ...]`` back into zeros ``[B, T, ...]``."""
    out = packed.new_zeros(batch * seq_len, *packed.shape[2:])
    out[index] = packed[0]
    return out.reshape(batch, seq_len, *packed.shape[2:])


def _text_positions(cu_seqlens: torch.Tensor, start: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Text positions ``[3, 1, T]`` of a packed batch of ``tokens`` tokens counting on from ``start`` ``[N]``
    (computed on the device without reading anything back to the host)."""
    return packed_positions(start, cu_seqlens, tokens).expand(3, 1, -1), start + cu_seqlens[1:] - cu_seqlens[:-1]


def _next_positions(position_ids: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Largest explicit position per sequence plus one."""
    if cu_seqlens is None:
        return position_ids.amax(dim=(0, 2)) + 1
    return torch.stack([position_ids[:, 0, s:e].max() + 1 for s, e in sequence_bounds(cu_seqlens)])


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``labels[:, t + 1]`` from ``logits[:, t]`` (-100 ignored)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
