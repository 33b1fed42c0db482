"""Saving and loading hybrid models: ``config.json`` (with the layout) + safetensors weights.

Loading checks every tensor name and shape against the config and stops with the missing, unexpected and
mismatched names; nothing is silently left at random initialisation.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.initialization import no_init_weights

from models.config import HybridConfig, read_config_json
from models.hybrid import HybridVLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the model the config describes."""


def save_model(model: HybridVLM, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (tied head stored once) into ``directory``."""
    return save_weights(model.config, model.state_dict(), directory)


def save_weights(config: HybridConfig, state_dict: dict[str, torch.Tensor], directory: str | Path) -> Path:
    """:func:`save_model` from a config and a state dict, for weights gathered without a model object (e.g.
    from FSDP shards); check them first with :func:`check_weights`."""
    directory = Path(directory)
    config.save(directory)
    state = {name: tensor.detach().contiguous() for name, tensor in state_dict.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt", "layout": config.layout})
    return directory


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint directory (single file or sharded with an index)."""
    directory = Path(directory)
    if (directory / INDEX_NAME).is_file():
        files = sorted(set(json.loads((directory / INDEX_NAME).read_text())["weight_map"].values()))
    elif (directory / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(directory / name, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                tensors[key] = handle.get_tensor(key)
    return tensors


def model_to_load(config: HybridConfig) -> HybridVLM:
    """A model whose weights are left uninitialised (allocated, not randomised), to be filled by
    :func:`load_weights_strict`: a 3B model builds in well under a second instead of half a minute on CPU."""
    with no_init_weights():
        return HybridVLM(config)


def load_weights_strict(model: HybridVLM, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``; raise :class:`CheckpointMismatchError` unless names and shapes match."""
    model.load_state_dict(check_weights(model, tensors, source), strict=False)


def check_weights(model: HybridVLM, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Raise :class:`CheckpointMismatchError` unless ``tensors`` has exactly ``model``'s names and shapes (a
    model on the meta device will do); return them without a tied LM head."""
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{name}: checkpoint {tuple(tensors[name].shape)}, model {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(tensors))
        if tensors[name].shape != expected[name].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            f"the weights in {source} do not match the model its config describes (layout "
            f"{model.config.layout!r}):"
            + _listing("missing", missing)
            + _listing("unexpected", unexpected)
            + _listing("shape mismatch", mismatched)
        )
    return tensors


def _listing(title: str, names: list[str], limit: int = 12) -> str:
    if not names:
        return ""
    shown = "\n    ".join(names[:limit])
    more = f"\n    ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"\n  {title} ({len(names)}):\n    {shown}{more}"


def load_model(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> HybridVLM:
    """Load a hybridvl directory, or an InfiniteVL checkpoint (``model_type: infinite_vl``)."""
    config = read_config_json(directory)
    if config.get("model_type") == "infinite_vl":
        from models.infinitevl import load_infinitevl

        model = load_infinitevl(directory)
    else:
        model = model_to_load(HybridConfig.from_dict(config))
        load_weights_strict(model, read_weights(directory), str(directory))
    return model.to(device=device, dtype=dtype)
