"""Saving and loading hybrid models: ``config.json`` (with the layout) + safetensors weights.

Saving writes each file atomically (a temporary file beside it, renamed into place) and refuses a folder that
holds files unless asked to overwrite it, then removes the stale shards and index an older checkpoint left there.

Loading checks what it loads and stops naming the problem; nothing is silently left at random initialisation
or read as something else:

* the config lists every field (:meth:`HybridConfig.from_dict`);
* the layout recorded in the weights' metadata equals the config's;
* every tensor name and shape matches the model the config describes;
* no tensor changes kind on loading (integers where the model holds floating-point weights, or the reverse);
  floating-point precisions convert (bf16 weights into an fp32 model);
* every floating-point value is finite (unless ``allow_nonfinite``).
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.initialization import no_init_weights

from hybridvl import mixers
from hybridvl.models.config import CONFIG_NAME, HybridConfig, read_config_json
from hybridvl.models.files import INDEX_NAME, WEIGHTS_NAME, atomic_write, check_output, remove_stale_weights
from hybridvl.models.hybrid import HybridVLM

logger = logging.getLogger("hybridvl.models")


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the model the config describes."""


class NonFiniteWeightsError(CheckpointMismatchError):
    """Weights holding NaN or infinite values."""


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read: truncated (a write that was cut off), damaged or not a checkpoint."""


def save_model(model: HybridVLM, directory: str | Path, overwrite: bool = False) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (tied head stored once) into ``directory``."""
    return save_weights(model.config, model.state_dict(), directory, overwrite=overwrite)


def save_weights(
    config: HybridConfig, state_dict: dict[str, torch.Tensor], directory: str | Path, overwrite: bool = False
) -> Path:
    """:func:`save_model` from a config and a state dict, for weights gathered without a model object (e.g.
    from FSDP shards); check them first with :func:`check_weights`.

    ``directory`` must be new or empty unless ``overwrite``; then its stale weight files (a shard index and its
    shards) are removed. The weights are written before ``config.json``, each file atomically.

    Raises:
        hybridvl.models.files.OutputExistsError: ``directory`` holds files and ``overwrite`` is false.
        hybridvl.models.files.WriteError: a file could not be written (the message names it).
    """
    directory = Path(directory)
    check_output(directory, overwrite=overwrite)
    state = {name: tensor.detach().contiguous() for name, tensor in state_dict.items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    remove_stale_weights(directory)
    metadata = {"format": "pt", "layout": config.layout}
    atomic_write(directory / WEIGHTS_NAME, lambda temporary: _save_safetensors(state, temporary, metadata))
    config.save(directory)
    return directory


def _save_safetensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, its I/O failures raised as :class:`OSError` (it raises its own type)."""
    try:
        save_file(state, path, metadata=metadata)
    except SafetensorError as error:
        raise OSError(f"safetensors could not write the file: {error}") from error


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index names, or ``model.safetensors``."""
    if (directory / INDEX_NAME).is_file():
        names = sorted(set(json.loads((directory / INDEX_NAME).read_text())["weight_map"].values()))
        return [directory / name for name in names]
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint directory (single file or sharded with an index)."""
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(directory)):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                tensors[key] = handle.get_tensor(key)
    return tensors


def weights_layout(directory: str | Path) -> str | None:
    """The layout recorded in the metadata of a directory's weights (``None`` when none is recorded)."""
    for path in _weight_files(Path(directory)):
        with safe_open(path, framework="pt") as handle:
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


def model_to_load(config: HybridConfig) -> HybridVLM:
    """A model whose weights are left uninitialised (allocated, not randomised), to be filled by
    :func:`load_weights_strict`: a 3B model builds in well under a second instead of half a minute on CPU."""
    with no_init_weights():
        return HybridVLM(config)


def load_weights_strict(
    model: HybridVLM, tensors: dict[str, torch.Tensor], source: str, allow_nonfinite: bool = False
) -> None:
    """Copy ``tensors`` into ``model`` after :func:`check_weights`."""
    model.load_state_dict(check_weights(model, tensors, source, allow_nonfinite), strict=False)


def check_weights(
    model: HybridVLM, tensors: dict[str, torch.Tensor], source: str, allow_nonfinite: bool = False
) -> dict[str, torch.Tensor]:
    """Return ``tensors`` without a tied LM head if they fit ``model`` (a model on the meta device will do).

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


def load_model(
    directory: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> HybridVLM:
    """Load a hybridvl directory, or an InfiniteVL checkpoint (``model_type: infinite_vl``), checking the config,
    the layout and the weights as the module docstring lists."""
    config = read_config_json(directory)
    if config.get("model_type") == "infinite_vl":
        from hybridvl.models.infinitevl import load_infinitevl

        model = load_infinitevl(directory, allow_nonfinite=allow_nonfinite)
    else:
        hybrid = HybridConfig.from_dict(config, str(Path(directory) / CONFIG_NAME))
        check_layout(directory, hybrid)
        model = model_to_load(hybrid)
        load_weights_strict(model, read_weights(directory), str(directory), allow_nonfinite)
    return model.to(device=device, dtype=dtype)


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
