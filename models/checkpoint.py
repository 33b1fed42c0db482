"""The checkpoint format of hybrid models: ``config.json`` (with the layout) + safetensors weights, one file or
shards with an index.

Saving writes each file atomically (a temporary file beside it, renamed into place) and refuses a folder that
holds files unless asked to overwrite it, then removes the stale shards and index an older checkpoint left there.
Weights above ``max_shard_size`` are split into ``model-NNNNN-of-NNNNN.safetensors`` shards named by
``model.safetensors.index.json`` (transformers' layout); every file records the layout in its metadata.

Loading checks what it loads and stops naming the problem; nothing is silently left at random initialisation
or read as something else:

* the config lists every field (:meth:`HybridConfig.from_dict`);
* the layout recorded in the weights' metadata equals the config's;
* every tensor name and shape matches the model the config describes;
* no tensor changes kind on loading (integers where the model holds floating-point weights, or the reverse);
  floating-point precisions convert (bf16 weights into an fp32 model);
* every floating-point value is finite (unless ``allow_nonfinite``);
* a folder holding both ``model.safetensors`` and a shard index (one of them left over) is refused.

This module reads and checks tensors; :meth:`hybridvl.models.hybrid.HybridVLM.from_pretrained` (through
:mod:`hybridvl.models.loading`) turns them into a model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from hybridvl import mixers
from hybridvl.models.config import CONFIG_NAME, HybridConfig
from hybridvl.models.files import (
    INDEX_NAME,
    WEIGHTS_NAME,
    atomic_write,
    check_output,
    remove_stale_weights,
    write_json,
)

logger = logging.getLogger("hybridvl.models")


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the model the config describes."""


class NonFiniteWeightsError(CheckpointMismatchError):
    """Weights holding NaN or infinite values."""


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read: truncated (a write that was cut off), damaged or not a checkpoint."""


DEFAULT_MAX_SHARD_SIZE = "5GB"
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def shard_size_bytes(size: int | str) -> int:
    """``max_shard_size`` in bytes: an integer, or a string such as ``"5GB"``, ``"500MB"`` or ``"2GiB"``.

    Raises:
        ValueError: not a positive size.
    """
    if isinstance(size, str):
        text = size.strip().upper().replace(" ", "")
        unit = next((u for u in sorted(_SIZE_UNITS, key=len, reverse=True) if text.endswith(u)), None)
        try:
            value = float(text[: -len(unit)]) * _SIZE_UNITS[unit] if unit else float(text)
        except ValueError:
            value = -1
        size = int(value)
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes or a size like '5GB', got {size!r}")
    return size


def save_weights(
    config: HybridConfig,
    state_dict: dict[str, torch.Tensor],
    directory: str | Path,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Write ``config.json`` and the weights (tied head stored once) into ``directory``; weights gathered without a
    model object (e.g. from FSDP shards) are checked first with :func:`check_weights`.

    ``directory`` must be new or empty unless ``overwrite``; then its stale weight files (a shard index and its
    shards, or a single file) are removed, the index first. Weights larger than ``max_shard_size`` go into shards
    and an index; the weights are written before ``config.json``, each file atomically.

    Raises:
        hybridvl.models.files.OutputExistsError: ``directory`` holds files and ``overwrite`` is false.
        hybridvl.models.files.WriteError: a file could not be written (the message names it).
        hybridvl.models.config.ConfigError: a mixer of the layout could not be imported by a loading process.
    """
    directory = Path(directory)
    limit = shard_size_bytes(max_shard_size)
    config.check_mixer_modules()
    check_output(directory, overwrite=overwrite)
    state = {name: tensor.detach().contiguous() for name, tensor in state_dict.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards = _split(state, limit)
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    remove_stale_weights(directory, keep=names)
    metadata = {"format": "pt", "layout": config.layout}
    for name, shard in zip(names, shards):
        atomic_write(directory / name, lambda temporary, shard=shard: _save_safetensors(shard, temporary, metadata))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        write_json(directory / INDEX_NAME, {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map})
    config.save(directory)
    return directory


def _split(state: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, a new shard whenever the next would pass ``limit`` bytes (a larger tensor alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, its I/O failures raised as :class:`OSError` (it raises its own type)."""
    try:
        save_file(state, path, metadata=metadata)
    except SafetensorError as error:
        raise OSError(f"safetensors could not write the file: {error}") from error


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index names, or ``model.safetensors``.

    Raises:
        CheckpointReadError: both an index and ``model.safetensors`` are there (one is stale), or the index is
            not a shard index.
        FileNotFoundError: neither is there, or a shard the index names is missing.
    """
    if (directory / INDEX_NAME).is_file():
        if (directory / WEIGHTS_NAME).is_file():
            raise CheckpointReadError(
                f"{directory} holds both {WEIGHTS_NAME} and the shard index {INDEX_NAME}: one of them is left over "
                "from an earlier save, and loading either could read stale weights; remove the stale one (saving "
                "into the folder with overwrite=True does)"
            )
        try:
            names = sorted(set(json.loads((directory / INDEX_NAME).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointReadError(
                f"{directory / INDEX_NAME} is not a shard index ({type(error).__name__}: {error})"
            ) from error
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{directory / INDEX_NAME} names shards that are missing: {', '.join(missing)}")
        return [directory / name for name in names]
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint directory (single file or sharded with an index).

    Raises:
        CheckpointReadError: a file is truncated or damaged (named), or the files are ambiguous (see
            :func:`_weight_files`).
    """
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(directory)):
        with _open_weights(path) as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                tensors[key] = handle.get_tensor(key)
    return tensors


@contextlib.contextmanager
def _open_weights(path: Path) -> Iterator[Any]:
    """``safe_open(path)``, a file safetensors cannot read reported by name as :class:`CheckpointReadError`."""
    try:
        with safe_open(path, framework="pt") as handle:
            yield handle
    except SafetensorError as error:
        raise CheckpointReadError(
            f"cannot read the weights in {path} ({error}): the safetensors file is truncated or damaged; save or "
            "convert the model again"
        ) from error


def weights_layout(directory: str | Path) -> str | None:
    """The layout recorded in the metadata of a directory's weights (``None`` when none is recorded)."""
    for path in _weight_files(Path(directory)):
        with _open_weights(path) as handle:
            layout = (handle.metadata() or {}).get("layout")
        if layout is not None:
            return layout
    return None


def check_layout(directory: str | Path, config: HybridConfig) -> None:
    """Raise :class:`CheckpointMismatchError` unless the layout in the weights' metadata is ``config``'s (the
    same layers, however written). Weights that record none (saved by another tool) are logged and let through."""
    recorded = weights_layout(directory)
    if recorded is None:
        logger.info(
            "the weights in %s record no layout in their metadata; the config's layout %r is not cross-checked",
            directory,
            config.layout,
        )
        return
    if mixers.parse_layout(recorded) != config.kinds:
        raise CheckpointMismatchError(
            f"{Path(directory) / CONFIG_NAME} gives the layout {config.layout!r}, but the weights in {directory} were "
            f"saved with the layout {recorded!r}: the config does not belong to these weights; restore the "
            f"config.json written with them (layout {recorded!r})"
        )


def load_weights_strict(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str, allow_nonfinite: bool = False
) -> None:
    """Copy ``tensors`` into ``model`` after :func:`check_weights`."""
    model.load_state_dict(check_weights(model, tensors, source, allow_nonfinite), strict=False)


def check_weights(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str, allow_nonfinite: bool = False
) -> dict[str, torch.Tensor]:
    """Return ``tensors`` without a tied LM head if they fit ``model`` (a :class:`~hybridvl.models.hybrid.HybridVLM`;
    one on the meta device will do).

    Raises:
        CheckpointMismatchError: names, shapes or kinds of dtype (integer vs floating point) differ.
        NonFiniteWeightsError: a floating-point tensor holds NaN or infinite values (unless ``allow_nonfinite``).
    """
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shared = sorted(set(expected) & set(tensors))
    mismatched = [
        f"{name}: checkpoint {tuple(tensors[name].shape)}, model {tuple(expected[name].shape)}"
        for name in shared
        if tensors[name].shape != expected[name].shape
    ]
    wrong_kind = [
        f"{name}: checkpoint {tensors[name].dtype}, model {expected[name].dtype}"
        for name in shared
        if _dtype_kind(tensors[name]) != _dtype_kind(expected[name])
    ]
    if missing or unexpected or mismatched or wrong_kind:
        raise CheckpointMismatchError(
            f"the weights in {source} do not match the model its config describes (layout "
            f"{model.config.layout!r}):"
            + _listing("missing", missing)
            + _listing("unexpected", unexpected)
            + _listing("shape mismatch", mismatched)
            + _listing("dtype mismatch (loading would change the values)", wrong_kind)
        )
    if not allow_nonfinite:
        nonfinite = [
            f"{name}: {count} of {tensors[name].numel()} values"
            for name in shared
            if tensors[name].is_floating_point() and (count := _nonfinite_count(tensors[name]))
        ]
        if nonfinite:
            raise NonFiniteWeightsError(
                f"the weights in {source} hold NaN or infinite values (a run that diverged, or a damaged file); "
                "load an earlier checkpoint, or pass allow_nonfinite=True (hybridvl generate: --allow-nonfinite) "
                "to load them anyway:" + _listing("non-finite", nonfinite)
            )
    return tensors


def _dtype_kind(tensor: torch.Tensor) -> str:
    """``floating`` for any floating-point dtype (precisions convert on loading), else the dtype itself."""
    return "floating" if tensor.is_floating_point() else str(tensor.dtype)


def _nonfinite_count(tensor: torch.Tensor) -> int:
    return 0 if bool(torch.isfinite(tensor).all()) else int((~torch.isfinite(tensor)).sum())


def _listing(title: str, names: list[str], limit: int = 12) -> str:
    if not names:
        return ""
    shown = "\n    ".join(names[:limit])
    more = f"\n    ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"\n  {title} ({len(names)}):\n    {shown}{more}"


def load_torch_checkpoint(path: str | Path, **kwargs: Any) -> Any:
    """``torch.load(path, **kwargs)`` with a missing or unreadable file reported by name.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointReadError: the file is truncated, damaged or not a checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, **kwargs)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointReadError(
            f"cannot read the checkpoint {path} ({type(error).__name__}: {error}): it is truncated (a write that "
            f"was cut off), damaged or not a checkpoint; resume from another checkpoint in {path.parent}"
        ) from error
