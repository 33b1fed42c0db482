"""This project's own decoding loop over the hybrid model's fixed-size state (only ``A`` layers' caches grow).

``model.generate`` is transformers' (all its strategies, ``generation_config.json``, streamers); this function is
the lean path that also decodes by CUDA-graph replay (``decoder=``) and continues a :class:`ModelState` (a stream,
a fork of one), used by streaming, training-time evaluation and the benchmarks. It returns only the new tokens.

The prompt is prefilled in one pass (or in chunks of ``prefill_chunk_size`` tokens, which gives the same
state), then each new token is one step from the state. Greedy decoding gives the tokens transformers' greedy
``model.generate`` gives.
"""

from __future__ import annotations

import torch

from hybridvl.mixers.ops.varlen import seqlens_to_cu_seqlens
from hybridvl.models.cache import ModelState
from hybridvl.models.cuda_graphs import GraphedDecoder
from hybridvl.models.hybrid import HybridVLM
from hybridvl.models.sampling import check_generation_options, sample_next_token

__all__ = ["check_generation_options", "generate", "prefill", "sample_next_token"]


def prefill(
    model: HybridVLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prefill_chunk_size: int | None = None,
    state: ModelState | None = None,
    **vision: torch.Tensor | None,
) -> tuple[torch.Tensor, ModelState]:
    """Run the prompt (after ``state``, if given); return the last token's logits ``[B, vocab]`` and the state."""
    if prefill_chunk_size is None:
        out = model(input_ids, attention_mask=attention_mask, state=state, logits_to_keep=1, **vision)
        return out.logits[:, -1], out.state
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("chunked prefill needs unpadded prompts of equal length; prefill padded batches in one pass")
    if prefill_chunk_size < 1:
        raise ValueError(f"prefill_chunk_size must be positive, got {prefill_chunk_size}")
    batch, seq_len = input_ids.shape
    embeds = model.embed(
        input_ids,
        vision.get("pixel_values"),
        vision.get("image_grid_thw"),
        vision.get("pixel_values_videos"),
        vision.get("video_grid_thw"),
    )
    start = torch.zeros(batch, dtype=torch.long) if state is None else state.next_position.cpu()
    positions, next_position = model.positions(
        input_ids.reshape(1, -1),
        seqlens_to_cu_seqlens([seq_len] * batch),
        start,
        vision.get("image_grid_thw"),
        vision.get("video_grid_thw"),
        vision.get("second_per_grid_ts"),
    )
    positions = positions.reshape(3, batch, seq_len)
    for first in range(0, seq_len, prefill_chunk_size):
        chunk = slice(first, first + prefill_chunk_size)
        out = model(inputs_embeds=embeds[:, chunk], position_ids=positions[:, :, chunk], state=state, logits_to_keep=1)
        state = out.state
    state.next_position = next_position.to(state.next_position.device)
    return out.logits[:, -1], state


@torch.no_grad()
def generate(
    model: HybridVLM,
    input_ids: torch.Tensor,
    *,
    state: ModelState | None = None,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    prefill_chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    decoder: GraphedDecoder | None = None,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after each prompt row.

    Args:
        input_ids: ``[B, T]`` prompts (pad either side and pass ``attention_mask``).
        state: continue these sequences (a stream, a fork of one): the prompt comes after them.
        max_new_tokens: the most tokens to generate.
        do_sample, temperature, top_k, top_p, generator: sampling; greedy when ``do_sample`` is False.
        eos_token_id: stop token(s), default the config's; a row stops after emitting one.
        pad_token_id: fills rows that stopped, default the config's (or the first stop token).
        prefill_chunk_size: prefill the prompt this many tokens at a time (same result, less memory).
        decoder: decode by replaying this CUDA graph (built for the same model and batch size) instead of
            running the model eagerly; the prompt is still prefilled eagerly. A decoder built with
            ``next_token=True`` picks each token inside its graph: the sampling options must be the ones it was
            built with, and ``generator`` none or its own.

    Returns:
        ``[B, n]`` new tokens, ``n <= max_new_tokens`` (stopped rows padded).
    """
    check_generation_options(max_new_tokens, temperature, top_k, top_p)
    config = model.config
    if eos_token_id is None:
        stops = config.eos_token_ids
    else:
        stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = next(p for p in (pad_token_id, config.pad_token_id, *stops, 0) if p is not None)
    vision = dict(
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts,
    )
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
    if decoder is not None:
        if decoder.model is not model:
            raise ValueError("the CUDA-graph decoder was built for another model")
        if decoder.next_token:
            if sampling != decoder.sampling or generator not in (None, decoder.generator):
                raise ValueError(
                    f"the CUDA-graph decoder picks tokens with {decoder.sampling} and its own generator; generate "
                    f"was asked for {sampling}{' and another generator' if generator is not None else ''}"
                )
            generator = decoder.generator
    logits, state = prefill(model, input_ids, attention_mask, prefill_chunk_size, state, **vision)
    if decoder is not None:
        decoder.load(state)
    stop_ids = torch.tensor(stops, device=input_ids.device, dtype=torch.long)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    token = sample_next_token(logits, **sampling, generator=generator)
    for step in range(max_new_tokens):
        token = torch.where(finished, torch.full_like(token, pad), token)  # a new tensor: the graph's buffer is reused
        tokens.append(token)
        finished |= torch.isin(token, stop_ids)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if decoder is None:
            out = model(token[:, None], state=state, logits_to_keep=1)
            state = out.state
            token = sample_next_token(out.logits[:, -1], **sampling, generator=generator)
        elif decoder.next_token:
            token = decoder.step(token)
        else:
            token = sample_next_token(decoder.step(token), **sampling, generator=generator)
    return torch.stack(tokens, dim=1)
