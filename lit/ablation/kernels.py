"""Which kernel configuration each autotuned Triton kernel ran, recorded and pinned, so that a cell trained again
in another process runs the same kernels and reaches the same numbers.

Triton's autotuner picks a kernel's block sizes and warp counts by timing the candidates the first time it meets
an input shape; timings taken while other cells load the same GPU can pick another configuration in another
run, and another configuration can round differently. :func:`chosen_configs` reads what every autotuned kernel of
fla (and of this project) chose in this process; :func:`pin_configs` installs such a record, so those kernels use
those configurations without timing anything. A study keeps one record for all its cells
(``kernel_configs.json``) and each cell's JSON keeps the configurations it trained with.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

logger = logging.getLogger("hybridvl.ablation")

PACKAGES = ("fla", "hybridvl")
"""Top-level packages whose autotuned kernels are recorded."""
KERNEL_CONFIGS = "kernel_configs.json"

Record = dict[str, list[list[Any]]]
"""Kernel name -> ``[[key..., config], ...]``: the autotuner's key (shape values and dtypes) and the chosen
configuration as Triton prints it."""


def _autotuners() -> Iterator[tuple[str, Any]]:
    """``(module.attribute, Autotuner)`` of every autotuned kernel loaded from :data:`PACKAGES`."""
    try:
        from triton.runtime.autotuner import Autotuner
    except ImportError:
        return
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name.split(".")[0] not in PACKAGES:
            continue
        for attribute, value in list(vars(module).items()):
            seen = 0
            while value is not None and seen < 8:  # heuristics and other wrappers keep the kernel in ``fn``
                if isinstance(value, Autotuner):
                    yield f"{module_name}.{attribute}", value
                    break
                value, seen = getattr(value, "fn", None), seen + 1


def chosen_configs() -> Record:
    """What every loaded autotuned kernel has chosen so far in this process."""
    record: Record = {}
    for name, tuner in _autotuners():
        entries = [[*_plain(key), str(config)] for key, config in tuner.cache.items()]
        if entries:
            record[name] = sorted(entries, key=repr)
    return record


def forget_configs() -> None:
    """Drop what every loaded autotuned kernel has chosen in this process, so that a cell trained after another in
    the same process tunes (or pins) its kernels as a fresh process would, and records only its own."""
    for _, tuner in _autotuners():
        tuner.cache.clear()


def _plain(key: Any) -> list[Any]:
    return [value if isinstance(value, int | float | str | bool) or value is None else str(value) for value in key]


def pin_configs(record: Record) -> int:
    """Make the loaded kernels of ``record`` use its configurations for its keys; returns how many entries were
    installed. An entry whose kernel is not loaded yet is skipped (pin again once the model has run), one whose
    configuration is not among the kernel's candidates is logged and skipped."""
    tuners = dict(_autotuners())
    pinned = 0
    for name, entries in record.items():
        tuner = tuners.get(name)
        if tuner is None:
            continue
        candidates = {str(config): config for config in tuner.configs}
        for *key, config in entries:
            if config not in candidates:
                logger.warning(
                    "%s: recorded configuration %s is not a candidate here; left to autotuning", name, config
                )
                continue
            tuner.cache[tuple(key)] = candidates[config]
            pinned += 1
    return pinned


def departures(pinned: Record, chosen: Record) -> list[str]:
    """``kernel [key]: pinned -> ran`` for every key of ``pinned`` that the kernels met but ran with another
    configuration (a pin that did not take, which the cell then reports instead of claiming a fixed kernel)."""
    ran = {(name, repr(entry[:-1])): entry[-1] for name, entries in chosen.items() for entry in entries}
    found = []
    for name, entries in pinned.items():
        for entry in entries:
            config = ran.get((name, repr(entry[:-1])))
            if config is not None and config != entry[-1]:
                found.append(f"{name} {entry[:-1]}: {entry[-1]} -> {config}")
    return found


def merge_into(path: Path, record: Record) -> Record:
    """Add ``record``'s entries to the study's record at ``path`` (entries already there win) and return the
    merged record; safe against other processes doing the same."""
    with FileLock(str(path) + ".lock"):
        merged: Record = json.loads(path.read_text()) if path.is_file() else {}
        changed = False
        for name, entries in record.items():
            known = {repr(entry[:-1]) for entry in merged.get(name, [])}
            new = [entry for entry in entries if repr(entry[:-1]) not in known]
            if new:
                merged[name] = sorted(merged.get(name, []) + new, key=repr)
                changed = True
        if changed:
            partial = path.with_suffix(".json.partial")
            partial.write_text(json.dumps(merged, indent=1) + "\n")
            partial.replace(path)
        return merged
