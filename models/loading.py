"""What :meth:`hybridvl.models.hybrid.HybridVLM.from_pretrained` reads: a name resolved to a local path, then
that checkpoint's config and tensors, each read once and translated into this project's config and names.

A name is a directory, a training stage's Lightning checkpoint (``*.ckpt``) or a Hugging Face hub id found in
the local cache (nothing is downloaded). A directory's ``config.json`` is read once and dispatched by its
``model_type``:

* ``hybridvl``: this project's checkpoints (:mod:`hybridvl.models.checkpoint`): every config field present, the
  layout in the weights' metadata equal to the config's;
* ``qwen2_5_vl``: a transformers Qwen2.5-VL checkpoint, as an all-``A`` hybrid that computes what
  ``Qwen2_5_VLForConditionalGeneration`` computes (a conversion's teacher);
* ``infinite_vl``: InfiniteVL's public format (:mod:`hybridvl.models.infinitevl`).

The tensors are then checked against the model the config describes (names, shapes, kinds of dtype, finite
values) by :func:`hybridvl.models.checkpoint.check_weights`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hybridvl.models.checkpoint import check_layout, load_torch_checkpoint, read_weights
from hybridvl.models.config import CONFIG_NAME, HybridConfig, read_config_json
from hybridvl.models.infinitevl import infinitevl_config
from hybridvl.models.qwen import ConversionError, canonical_name, hybrid_config_from_qwen

# a training stage's Lightning checkpoint (hybridvl.lit.modules) keeps the student's config under this key and its
# weights under this prefix of the state dict
STAGE_CONFIG_KEY = "hybrid_config"
STAGE_PREFIX = "student."
LORA_KEY = "lora"
"""The entry that marks a LongSFT checkpoint, whose weights are LoRA adapters over a model."""
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class UnsupportedModelError(ConversionError):
    """A checkpoint of a model type that cannot be read as a hybrid model."""


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint as read: its config in this project's terms and its tensors in this project's names.

    Attributes:
        config: the model to build.
        tensors: the weights, named as :class:`~hybridvl.models.hybrid.HybridVLM`'s state dict.
        source: how error messages name the checkpoint.
        directory: the folder it was read from (``None`` for a stage checkpoint), where ``generation_config.json``
            may lie.
    """

    config: HybridConfig
    tensors: dict[str, torch.Tensor]
    source: str
    directory: Path | None


def resolve(name_or_path: str | Path, cache_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """The local path of a model: ``name_or_path`` itself when it exists, else the snapshot of the hub id in the
    local Hugging Face cache (``cache_dir``, default ``HF_HUB_CACHE``); nothing is downloaded.

    Raises:
        FileNotFoundError: neither a path nor a cached model; the message says how to get one.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if _HUB_ID.fullmatch(name):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        try:
            return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
            pass
        from huggingface_hub.constants import HF_HUB_CACHE

        raise FileNotFoundError(
            f"model directory {name} does not exist, and no model {name!r} is in the local Hugging Face cache "
            f"({cache_dir or HF_HUB_CACHE}); loading never downloads: pass a model directory, or fetch the model "
            f"first (`hf download {name}`)"
        )
    raise FileNotFoundError(f"model directory {name} does not exist")


def read_checkpoint(path: Path, config: HybridConfig | None = None) -> Checkpoint:
    """Read the checkpoint at ``path`` (see the module docstring). ``config``: the directory's config, already read
    (by ``AutoConfig``), so ``config.json`` is not read again.

    Raises:
        hybridvl.models.config.ConfigError: the config is incomplete or not this project's.
        UnsupportedModelError: the directory's model type is none of those listed above.
        hybridvl.models.checkpoint.CheckpointMismatchError: the layout in the weights' metadata is another.
        hybridvl.models.checkpoint.CheckpointReadError: a weights file is damaged, or two are ambiguous.
    """
    if path.is_file():
        return _stage_checkpoint(path)
    if config is not None:
        data = None
    else:
        data = read_config_json(path)
        model_type = data.get("model_type")
        if model_type not in READERS:
            raise UnsupportedModelError(
                f"{path / CONFIG_NAME} has model_type {model_type!r}; HybridVLM loads "
                + ", ".join(f"{name!r} ({what})" for name, (what, _) in READERS.items())
            )
        if model_type != "hybridvl":
            return READERS[model_type][1](path, data)
    config = config if config is not None else HybridConfig.from_dict(data, str(path / CONFIG_NAME))
    check_layout(path, config)
    return Checkpoint(config, read_weights(path), str(path), path)


def _qwen2_5_vl(path: Path, data: dict[str, Any]) -> Checkpoint:
    text = {**data, **data.get("text_config", {})}
    config = hybrid_config_from_qwen(data, f"A x{text['num_hidden_layers']}")
    tensors = {canonical_name(name): tensor for name, tensor in read_weights(path).items()}
    return Checkpoint(config, tensors, f"{path} (Qwen2.5-VL)", path)


def _infinite_vl(path: Path, data: dict[str, Any]) -> Checkpoint:
    tensors = {canonical_name(name): tensor for name, tensor in read_weights(path).items()}
    return Checkpoint(infinitevl_config(data, set(tensors)), tensors, f"{path} (InfiniteVL format)", path)


# model_type -> (what it is, its reader); hybridvl's own is read by read_checkpoint itself
READERS: dict[str, tuple[str, Callable[[Path, dict[str, Any]], Checkpoint] | None]] = {
    "hybridvl": ("this project's checkpoints", None),
    "qwen2_5_vl": ("Qwen2.5-VL, as an all-attention model, e.g. a conversion's teacher", _qwen2_5_vl),
    "infinite_vl": ("InfiniteVL's public format", _infinite_vl),
}


def _stage_checkpoint(path: Path) -> Checkpoint:
    """A training stage's ``.ckpt``: the student's config and weights."""
    data = load_torch_checkpoint(path, map_location="cpu", weights_only=False)
    if not isinstance(data, dict) or STAGE_CONFIG_KEY not in data:
        raise ValueError(f"{path} is not a hybridvl stage checkpoint (no {STAGE_CONFIG_KEY} in it)")
    if data.get(LORA_KEY):
        raise ValueError(
            f"{path} is a checkpoint of LoRA adapters (LongSFT), whose weights are not a model's: load the stage's "
            "export instead (its export_dir), where the adapters are merged; resume that stage with --ckpt_path"
        )
    config = HybridConfig.from_dict(data[STAGE_CONFIG_KEY], f"the {STAGE_CONFIG_KEY} of {path}")
    prefix = len(STAGE_PREFIX)
    tensors = {k[prefix:]: v for k, v in data["state_dict"].items() if k.startswith(STAGE_PREFIX)}
    return Checkpoint(config, tensors, str(path), None)
