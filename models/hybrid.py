"""The hybrid model: a decoder whose layers mix tokens with the mixers a layout names, on the Qwen2.5-VL
vision front end.

Each decoder layer is ``x + mixer(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))`` (without the second step when
``intermediate_size`` is 0, as in Zoology's recall models). Each residual add runs inside the norm that follows it
(:func:`hybridvl.mixers.ops.norm.add_rms_norm`, one fused kernel on CUDA), the last one of a layer inside the next
layer's first norm or the final norm: a layer hands on its output as the stream and its last addition, not yet added.

Checkpoint (state-dict) names follow transformers' Qwen2.5-VL (``language_model.layers.N.self_attn.q_proj``,
``visual.blocks...``), so the weights of attention layers, MLPs, norms, embeddings and the vision tower carry over by
name; in the module, each layer's input projections are one fused matrix (``qkv_proj``, ``in_proj``,
``gate_up_proj``: see :func:`hybridvl.mixers.modules.keep_part_names`), saved and loaded under those separate names.

The model is a transformers ``PreTrainedModel`` with ``GenerationMixin`` (registered with the Auto classes by
``import hybridvl``): ``model.generate(**inputs)`` runs transformers' generation loop over the fixed-size state,
carried as a :class:`~hybridvl.models.cache.HybridCache`, and honours ``generation_config.json``.

.. code-block:: python

    model = HybridVLM(HybridConfig(layout="S,D,D,D x9", vision_config=...))
    out = model(input_ids, pixel_values=..., image_grid_thw=...)          # logits, state
    out = model(next_ids, state=out.state)                                  # continue
    tokens = model.generate(**processor_inputs, max_new_tokens=32)         # prompt + new tokens
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.initialization import no_init_weights
from transformers.utils import ModelOutput

from hybridvl import mixers
from hybridvl.mixers.modules import FusedLinear, RMSNorm, keep_part_names
from hybridvl.mixers.ops.activations import swiglu
from hybridvl.mixers.ops.varlen import check_cu_seqlens, packed_positions, seqlens_to_cu_seqlens, sequence_bounds
from hybridvl.mixers.state import MixerState
from hybridvl.models.cache import HybridCache, ModelState
from hybridvl.models.checkpoint import DEFAULT_MAX_SHARD_SIZE, load_weights_strict, save_weights
from hybridvl.models.config import HybridConfig
from hybridvl.models.files import write_text
from hybridvl.models.loading import read_checkpoint, resolve
from hybridvl.models.positions import sequence_positions
from hybridvl.vision.tower import build_vision_tower, vision_inputs

__all__ = ["HybridCache", "HybridConfig", "HybridOutput", "HybridVLM", "ModelState"]

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
GENERATION_CONFIG_NAME = "generation_config.json"
# arguments of generate itself that transformers passes on with the model inputs
_GENERATION_ONLY = ("tokenizer", "assistant_tokenizer")
_DECODE_DROPS = (*_GENERATION_ONLY, *VISION_KEYS)
# keyword arguments transformers' Auto classes pass to from_pretrained that a local load has no use for
_HUB_KWARGS = {"local_files_only", "force_download", "proxies", "token", "trust_remote_code", "code_revision"}


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
class HybridOutput(ModelOutput):
    """Result of a forward pass (a transformers ``ModelOutput``).

    Attributes:
        loss: mean next-token cross-entropy when ``labels`` are given (``-100`` ignored).
        logits: ``[B, T, vocab]`` (zeros at padded positions), or only the last ``logits_to_keep``.
        cache: the state after the input in a :class:`HybridCache` (the one passed in, updated), to continue
            from; ``None`` with ``use_cache=False``.
        hidden_states: with ``output_hidden_states``: the input of every layer and the final output
            (before the last norm), each ``[B, T, hidden]``; ``len == num_layers + 1``.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: HybridCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def state(self) -> ModelState | None:
        """The :class:`ModelState` after the input (the cache's), to pass as ``state=`` to continue."""
        return None if self.cache is None else self.cache.state


def checkpoint_selection(spec: bool | str, kinds: Sequence[str]) -> frozenset[str]:
    """What the decoder recomputes in the backward pass instead of storing, from a ``gradient_checkpointing``
    setting, for a layout of layer ``kinds``.

    ``False`` stores everything; ``True`` or ``"layers"`` recomputes every whole layer (``{"layers"}``); otherwise
    ``spec`` names parts, comma-separated: ``"mlp"`` (each layer's norm + MLP) and mixer letters (each layer of that
    kind's norm + mixer), e.g. ``"mlp"`` or ``"mlp,S"``: selective checkpointing that keeps the activations of the
    other parts (recomputing the MLPs frees their wide intermediate activations at the cost of one more MLP
    forward; a recurrent mixer's activations are worth keeping when its forward is the expensive part).
    """
    if spec is False:
        return frozenset()
    if spec is True:
        return frozenset({"layers"})
    parts = [part.strip() for part in str(spec).split(",")]
    layout = set(kinds)
    valid = "'layers', or parts: 'mlp' and mixer letters of the layout (" + ", ".join(sorted(layout)) + ")"
    for part in parts:
        if part == "layers" and len(parts) > 1:
            raise ValueError(f"gradient_checkpointing {spec!r}: 'layers' recomputes whole layers, name it alone")
        if part not in ("layers", "mlp") and part not in layout:
            raise ValueError(f"gradient_checkpointing {spec!r}: unknown part {part!r}; use true/false, {valid}")
    return frozenset(parts)


class SwiGLU(nn.Module):
    """Qwen2's MLP: ``down(silu(gate(x)) * up(x))``, with ``gate_proj`` and ``up_proj`` one
    :class:`~hybridvl.mixers.modules.FusedLinear` ``gate_up_proj`` (one matrix multiplication) that checkpoints
    keep as ``gate_proj`` and ``up_proj``; the activation is :func:`~hybridvl.mixers.ops.activations.swiglu` (one fused
    kernel on CUDA)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = FusedLinear(hidden_size, {"gate_proj": intermediate_size, "up_proj": intermediate_size})
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        keep_part_names(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(swiglu(gate, up))


class HybridDecoderLayer(nn.Module):
    """Pre-norm residual block around one mixer (``self_attn``, whatever its kind) and a SwiGLU MLP.

    With ``config.intermediate_size == 0`` the layer has no MLP and no ``post_attention_layernorm``: it is
    ``x + mixer(input_layernorm(x))`` (``mlp`` is ``None``).

    The residual stream comes in and goes out as a pair ``(x, update)`` whose sum is the stream, so that every add
    runs inside the norm after it (:meth:`RMSNorm.forward <hybridvl.mixers.modules.RMSNorm.forward>` with
    ``residual``): the previous layer's last addition inside ``input_layernorm``, the mixer's inside
    ``post_attention_layernorm``, and this layer's last (the MLP's, or the mixer's without an MLP) inside the next
    layer's or the decoder's final norm.
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
        recompute: frozenset[str] = frozenset(),
        update: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, MixerState]:
        """The layer over the residual stream ``x + update`` (``update=None``: ``x`` alone); ``recompute`` (from
        :func:`checkpoint_selection`) names parts whose activations the backward pass recomputes: ``"mlp"``, and
        this layer's mixer letter.

        Returns ``(x, update, state)``: the layer's output is ``x + update`` (:func:`residual_stream`), the last add
        left to the next norm.
        """
        if self.kind in recompute:
            x, update, state = checkpoint(self._mix, x, update, state, position_ids, cu_seqlens, use_reentrant=False)
        else:
            x, update, state = self._mix(x, update, state, position_ids, cu_seqlens)
        if self.mlp is None:
            return x, update, state
        if "mlp" in recompute:
            x, update = checkpoint(self._feed_forward, x, update, use_reentrant=False)
        else:
            x, update = self._feed_forward(x, update)
        return x, update, state

    def _mix(self, x, update, state, position_ids, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor, MixerState]:
        normed, x = _add_and_norm(self.input_layernorm, x, update)
        mixed, state = self.self_attn(normed, state, position_ids=position_ids, cu_seqlens=cu_seqlens)
        return x, mixed, state

    def _feed_forward(self, x: torch.Tensor, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed, x = self.post_attention_layernorm(mixed, residual=x)
        return x, self.mlp(normed)


def residual_stream(x: torch.Tensor, update: torch.Tensor | None) -> torch.Tensor:
    """The hidden state a decoder layer's ``(x, update)`` pair carries (:class:`HybridDecoderLayer`): ``x + update``,
    or ``x`` when ``update`` is ``None``. A layer's output, for whoever reads it outside the decoder's next norm."""
    return x if update is None else x + update


def _add_and_norm(norm: RMSNorm, x: torch.Tensor, update: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + update), x + update)``, the add inside the norm's fused kernel; ``update=None``: ``(norm(x), x)``."""
    if update is None:
        return norm(x), x
    return norm(update, residual=x)


class HybridDecoder(nn.Module):
    """Embeddings, the layout's layers and the final norm (the LM head lives in :class:`HybridVLM`)."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(HybridDecoderLayer(config, kind) for kind in config.kinds)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing: bool | str = False
        """What training recomputes in the backward pass (:func:`checkpoint_selection`): ``True`` whole layers,
        or parts such as ``"mlp,S"``."""

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        states: list[MixerState] | None,
        position_ids: torch.Tensor | None,
        cu_seqlens: torch.Tensor | None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, list[MixerState], tuple[torch.Tensor, ...] | None]:
        hidden, update, new_states, all_hidden = inputs_embeds, None, [], []
        recompute = frozenset()
        if self.training and torch.is_grad_enabled():
            recompute = checkpoint_selection(self.gradient_checkpointing, [layer.kind for layer in self.layers])
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden.append(residual_stream(hidden, update))
            state = None if states is None else states[i]
            if "layers" in recompute:
                hidden, update, state = checkpoint(
                    layer, hidden, state, position_ids, cu_seqlens, update=update, use_reentrant=False
                )
            else:
                hidden, update, state = layer(hidden, state, position_ids, cu_seqlens, recompute, update)
            new_states.append(state)
        normed, hidden = _add_and_norm(self.norm, hidden, update)
        if output_hidden_states:
            all_hidden.append(hidden)
        return normed, new_states, tuple(all_hidden) if output_hidden_states else None


class HybridVLM(PreTrainedModel, GenerationMixin):
    """A hybrid decoder, optionally on the Qwen2.5-VL vision tower (``config.vision_config``).

    The vision tower is transformers' ``Qwen2_5_VisionTransformerPretrainedModel``; its merged patch
    features replace the image/video placeholder tokens, and attention layers get Qwen2.5-VL's 3-D
    M-RoPE positions. Padded batches (``attention_mask``) run packed, so no mixer sees padding.

    As a transformers model: :meth:`from_pretrained` is the one way to load (this project's checkpoints,
    Qwen2.5-VL, InfiniteVL, a training stage's ``.ckpt``, hub ids from the local cache), :meth:`save_pretrained`
    writes atomically and shards large models, and ``generate`` is transformers' (greedy, sampling, beam search,
    repetition penalty, stop strings, streamers, ``generation_config.json``). For decoding by CUDA-graph replay
    use :func:`hybridvl.models.generation.generate`.
    """

    config_class = HybridConfig
    base_model_prefix = "language_model"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["HybridDecoderLayer", "Qwen2_5_VLVisionBlock"]
    # tied when config.tie_word_embeddings
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "language_model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        self.visual = None if config.vision_config is None else build_vision_tower(config.vision_config)
        self.language_model = HybridDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Normal(0, ``initializer_range``) linear and embedding weights, zero biases; transformers calls it once per
        module of the decoder and head, children first (so in the order the modules were built).

        Nothing else is touched: mixer-specific parameters (decays, convolutions, norms) keep what their
        constructors set, and the vision tower, a transformers model of its own, was initialised (and marked so)
        when it was built. Loading (:meth:`from_pretrained`) skips initialisation altogether.
        """
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.language_model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @property
    def kinds(self) -> list[str]:
        return self.config.kinds

    def mixer_backends(self) -> list[str | None]:
        """The backend each layer's mixer chose in its latest call (``None``: not called yet, or a mixer that
        records none)."""
        return [getattr(layer.self_attn, "last_backend", None) for layer in self.language_model.layers]

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
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, *(input_ids if inputs_embeds is None else inputs_embeds).shape[:2])
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
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | None = None,
        *,
        state: ModelState | None = None,
        cu_seqlens: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: HybridCache | None = None,
        mm_token_type_ids: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> HybridOutput | tuple:
        """Run the model over new tokens, from scratch or continuing a state.

        Args:
            input_ids: ``[B, T]`` tokens (or give ``inputs_embeds`` and ``position_ids``).
            attention_mask: ``[B, T]``, 0 at padding (either side); padded rows run packed. When continuing, a
                longer mask (transformers' generation loop passes the whole sequence's) is cut to its last ``T``
                columns, those of the new tokens.
            position_ids: M-RoPE positions ``[3, B, T]``; computed from the tokens and the vision grids when omitted.
            cache, past_key_values (the same, transformers' former name): a :class:`HybridCache` to continue from;
                it is updated in place and returned.
            inputs_embeds: ``[B, T, hidden]`` instead of ``input_ids``.
            labels: ``[B, T]`` next-token targets aligned with ``input_ids`` (shifted inside), -100 ignored.
            use_cache: ``False``: return no cache.
            pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts: the vision
                inputs as Qwen2.5-VL's processor returns them (only with the tokens holding their placeholders).
            logits_to_keep: compute logits only for the last this many positions (0: all); for padded or packed
                input only 1 is allowed and the logits are each sequence's last token, ``[N, 1, vocab]``.
            state: a :class:`ModelState` to continue from (instead of ``cache``); it is left unchanged.
            cu_seqlens: sequence boundaries of a packed batch (``B == 1``).
            output_hidden_states: return every layer's input, plus the last layer's output.
            mm_token_type_ids, cache_position: accepted from processors and transformers and not needed: vision
                tokens are known by their ids, and positions resume from the state.
            return_dict: ``False``: a tuple instead of :class:`HybridOutput`.
        """
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("give cache or past_key_values (its former name), not both")
            cache = past_key_values
        if cache is not None and not isinstance(cache, HybridCache):
            raise TypeError(
                f"HybridVLM continues from a HybridCache (its fixed-size state), got {type(cache).__name__}; pass "
                "none (generate makes one) or the cache a previous call returned"
            )
        if cache is not None and state is not None:
            raise ValueError("give cache or state to continue from, not both")
        start = cache.state if cache is not None else state
        tokens = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if attention_mask is not None and attention_mask.shape[-1] != tokens:
            if start is None or attention_mask.shape[-1] < tokens:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} tokens but the input has {tokens}; a longer "
                    "mask is only taken when continuing a cache (its last columns are the new tokens')"
                )
            attention_mask = attention_mask[:, -tokens:]
        run = self.decode(
            input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            state=start,
            output_hidden_states=bool(output_hidden_states),
        )
        hidden = run.hidden
        if logits_to_keep and run.cu_seqlens is not None:
            if logits_to_keep != 1:
                raise ValueError("with padding or packing, logits_to_keep can only be 1 (each sequence's last token)")
            logits = self.lm_head(hidden[0, run.cu_seqlens[1:] - 1])[:, None]  # [N, 1, vocab]
        else:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
            if run.unpad_index is not None:
                logits = _pad(logits, run.unpad_index, *attention_mask.shape)
        layer_inputs = run.layer_inputs
        if run.unpad_index is not None and layer_inputs is not None:
            layer_inputs = tuple(_pad(h, run.unpad_index, *attention_mask.shape) for h in layer_inputs)
        loss = None if labels is None else next_token_loss(logits, labels)
        if use_cache is False:
            cache = None
        else:
            cache = cache if cache is not None else HybridCache()
            cache.advance(run.state, tokens)
        out = HybridOutput(loss=loss, logits=logits, cache=cache, hidden_states=layer_inputs)
        return out if return_dict is not False else out.to_tuple()

    # --- states -------------------------------------------------------------------------------------

    def init_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ModelState:
        """An empty, preallocated state for ``batch_size`` sequences."""
        device = device if device is not None else self.lm_head.weight.device
        layers = [layer.self_attn.init_state(batch_size, device, dtype) for layer in self.language_model.layers]
        return ModelState(layers, torch.zeros(batch_size, dtype=torch.long, device=device))

    # --- save / load --------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: str | Path,
        overwrite: bool = False,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        **kwargs: Any,
    ) -> Path:
        """Write ``config.json`` (every field, the layout included), the weights (the layout also in their
        metadata; shards and an index above ``max_shard_size``, e.g. ``"5GB"``) and ``generation_config.json``,
        each atomically.

        A folder that holds files is refused unless ``overwrite`` (then its stale weight files go), and so is a
        model with a mixer a loading process could not import (see :meth:`HybridConfig.check_mixer_modules`);
        see :func:`hybridvl.models.checkpoint.save_weights`. transformers' other options (``push_to_hub``,
        ``safe_serialization``, ...) do not apply and are refused.
        """
        if kwargs:
            raise TypeError(
                f"save_pretrained takes save_directory, overwrite and max_shard_size; {', '.join(sorted(kwargs))} "
                "do not apply to hybridvl checkpoints"
            )
        directory = save_weights(self.config, self.state_dict(), save_directory, overwrite, max_shard_size)
        if self.generation_config is not None:
            write_text(directory / GENERATION_CONFIG_NAME, self.generation_config.to_json_string())
        return directory

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *model_args: Any,
        config: HybridConfig | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: str | torch.device | dict[str, Any] | None = None,
        allow_nonfinite: bool = False,
        cache_dir: str | Path | None = None,
        revision: str | None = None,
        **kwargs: Any,
    ) -> HybridVLM:
        """The one way to load a model, in eval mode.

        Args:
            pretrained_model_name_or_path: a model directory, a training stage's ``.ckpt``, or a hub id found in the
                local Hugging Face cache (nothing is downloaded). A directory's ``config.json`` is read once and
                dispatched by ``model_type``: this project's checkpoints, Qwen2.5-VL (as an all-``A`` model, e.g. a
                teacher) or InfiniteVL's format (see :mod:`hybridvl.models.loading`).
            config: the directory's config, already read (``AutoModel`` passes it).
            dtype, torch_dtype (the same, transformers' former name): the parameters' dtype; ``"auto"``: the saved
                weights'; unset: float32.
            device_map: the device to load onto (``"cpu"``, ``"cuda:0"``, ``{"": "cuda:0"}``; ``"auto"``: the GPU if
                there is one). The model runs on one device, as its state does.
            allow_nonfinite: load weights holding NaN or inf (refused by default, naming the tensor).
            cache_dir, revision: where and which snapshot of a hub id to find in the local cache.

        The names, shapes and kinds of dtype of the tensors are checked against the model the config describes,
        and every mismatch is named (see :mod:`hybridvl.models.checkpoint`). ``generation_config.json`` beside the
        weights becomes ``model.generation_config``, which ``generate`` follows.
        """
        if model_args:
            raise TypeError("from_pretrained takes the model's name or path and keyword arguments only")
        if "_adapter_model_path" in (kwargs.pop("adapter_kwargs", None) or {}):
            raise ValueError(f"{pretrained_model_name_or_path} holds a PEFT adapter; load its base model instead")
        unknown = sorted(set(kwargs) - _HUB_KWARGS - {k for k in kwargs if k.startswith("_")})
        if unknown:
            raise TypeError(f"from_pretrained got unexpected keyword argument(s): {', '.join(unknown)}")
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError("give dtype or torch_dtype (its former name), not both")
        dtype = dtype if dtype is not None else torch_dtype
        device = _single_device(device_map)
        path = resolve(pretrained_model_name_or_path, cache_dir=cache_dir, revision=revision)
        checkpoint = read_checkpoint(path, config)
        with no_init_weights():
            model = cls(checkpoint.config)
        model.tie_weights()  # no_init_weights skips the tying that building does
        load_weights_strict(model, checkpoint.tensors, checkpoint.source, allow_nonfinite)
        if dtype == "auto":
            dtype = next((t.dtype for t in checkpoint.tensors.values() if t.is_floating_point()), None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if checkpoint.directory is not None and (checkpoint.directory / GENERATION_CONFIG_NAME).is_file():
            model.generation_config = GenerationConfig.from_pretrained(checkpoint.directory)
        model.name_or_path = str(pretrained_model_name_or_path)
        return model.to(device=device, dtype=dtype).eval()

    # --- transformers generation --------------------------------------------------------------------

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No ``DynamicCache``: the forward pass makes its :class:`HybridCache` on the prefill step."""
        return False

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> None:
        """No positions from the generation loop: the model computes M-RoPE positions from the tokens and vision
        grids on the prefill step and resumes them from the state (``next_position``) on each decode step."""
        return None

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        next_sequence_length: int | None = None,
        cache: HybridCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """transformers' inputs, with every vision input (grids included, which transformers keeps) given only on
        the prefill step: decode steps feed generated tokens, which hold no placeholders. The tokenizers that
        ``generate`` takes for stop strings reach here among the model inputs too, and are dropped."""
        inputs = super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        dropped = _GENERATION_ONLY if is_first_iteration or not kwargs.get("use_cache", True) else _DECODE_DROPS
        for key in dropped:
            inputs.pop(key, None)
        return inputs


def _single_device(device_map: str | torch.device | dict[str, Any] | None) -> torch.device | None:
    """The one device a ``device_map`` names (``None``: stay on the CPU)."""
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if set(device_map) != {""} or len(devices) != 1:
            raise ValueError(
                f"device_map {device_map} splits the model across devices; a hybrid model and its state run on one "
                'device: pass a device ("cuda:0") or {"": device}'
            )
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return None if device_map is None else torch.device(device_map)


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
