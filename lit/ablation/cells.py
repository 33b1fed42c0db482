"""Cells: one training run of a study each (an arm at one size, on one task, at one width, seed and learning
rate), the grid that lists them, and the model each one trains.

With ``tuning`` in the study, a group's learning rates (an arm at one size on one task and width) are swept on
the tuning seeds first; once those cells are done, the rate with the best mean *validation* accuracy is trained
on every seed of the grid (:func:`expand` is called again as results come in), and on the ``bimodal_seeds`` too
once those seeds split (:func:`is_split`). Tables report test accuracy.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import shutil
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hybridvl import mixers
from hybridvl.lit.ablation.schema import Arm, Study, StudyError, Task
from hybridvl.lit.ablation.verdicts import SOLVED
from hybridvl.models.config import HybridConfig
from hybridvl.models.hybrid import HybridVLM

logger = logging.getLogger("hybridvl.ablation")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run of a study."""

    arm: str
    size: int
    task: Task
    d_model: int
    seed: int
    learning_rate: float

    @property
    def group(self) -> tuple[str, int, str, int]:
        """What the learning-rate choice is made over: (arm, size, task name, d_model)."""
        return self.arm, self.size, self.task.name, self.d_model

    def id(self, study: Study) -> str:
        """``Dx2-z1__mqar_T256_kv64__d128__s0__lr0.001``: the arm (with its size index when it has several), the
        task, width, seed and learning rate."""
        arm = study.arm(self.arm)
        name = re.sub(r"[^A-Za-z0-9]+", "", arm.name.replace("-", "_")) or "arm"
        size = f"-z{self.size}" if arm.sizes else ""
        return f"{name}{size}__{self.task.name}__d{self.d_model}__s{self.seed}__lr{self.learning_rate:g}"


def choose_learning_rate(results: list[Mapping[str, Any]]) -> float:
    """The learning rate whose cells have the best mean validation accuracy (ties: the lower mean validation
    loss, then the lower rate). ``results`` are one group's cells."""
    by_rate: dict[float, list[Mapping[str, Any]]] = {}
    for result in results:
        by_rate.setdefault(result["learning_rate"], []).append(result)

    def rank(item: tuple[float, list[Mapping[str, Any]]]) -> tuple[float, float, float]:
        rate, cells = item
        loss = statistics.fmean(cell.get("val_loss", 0.0) for cell in cells)
        return -statistics.fmean(cell["val_accuracy"] for cell in cells), loss, rate

    return min(by_rate.items(), key=rank)[0]


def expand(study: Study, finished: Mapping[str, Mapping[str, Any]] | None = None) -> list[Cell]:
    """Every cell the study defines so far, in a stable order (task by task, as the YAML lists them).

    ``finished`` maps cell ids to the results of finished cells; it decides the learning rate of the cells that
    follow a tuning sweep (see the module docstring). Cells whose rate is not yet known are not listed.
    """
    finished = finished or {}
    cells: list[Cell] = []
    for task in study.tasks:
        grid = study.grid(task)
        for arm_name, d_model in itertools.product(grid["arm"], grid["d_model"]):
            for size in range(study.arm(arm_name).size_count):
                group = list(_group(study, task, grid, arm_name, size, d_model, finished))
                cells += [cell for cell in group if cell not in cells]
    ids = [cell.id(study) for cell in cells]
    if len(set(ids)) != len(ids):
        twice = sorted({cell_id for cell_id in ids if ids.count(cell_id) > 1})
        raise StudyError(
            f"study {study.name}: cells share an id ({', '.join(twice[:3])}); give tasks or arms distinct names"
        )
    return cells


def _group(
    study: Study,
    task: Task,
    grid: dict[str, tuple],
    arm: str,
    size: int,
    d_model: int,
    finished: Mapping[str, Mapping[str, Any]],
) -> list[Cell]:
    rates, seeds = grid["learning_rate"], grid["seed"]
    if study.tuning_seeds is None or len(rates) == 1:
        return [Cell(arm, size, task, d_model, seed, rate) for seed, rate in itertools.product(seeds, rates)]
    tuning = [Cell(arm, size, task, d_model, seed, rate) for seed in study.tuning_seeds for rate in rates]
    results = [finished.get(cell.id(study)) for cell in tuning]
    if any(result is None for result in results):
        return tuning
    best = choose_learning_rate(results)
    chosen = [Cell(arm, size, task, d_model, seed, best) for seed in seeds]
    cells = tuning + [cell for cell in chosen if cell not in tuning]
    scores = [finished.get(cell.id(study), {}).get("val_accuracy") for cell in chosen]
    if study.bimodal_seeds and None not in scores and is_split(scores):
        cells += [Cell(arm, size, task, d_model, seed, best) for seed in study.bimodal_seeds]
    return cells


SPLIT_LOW = 0.5
"""A group's seeds *split* when one solves the task (validation accuracy >= ``verdicts.SOLVED``) and another stays
under this: outcomes are bimodal, and the study's ``bimodal_seeds`` are added to measure how often each happens."""


def is_split(scores: list[float]) -> bool:
    return max(scores) >= SOLVED and min(scores) < SPLIT_LOW


# --- models ---------------------------------------------------------------------------------------------


def default_mixer_options(d_model: int) -> dict[str, dict[str, Any]]:
    """Mixer options every cell starts from (an arm's own replace them): heads of 64 channels (or one head of
    ``d_model``), values as wide as keys for D and L, Mamba2 states of ``min(64, d_model)``."""
    heads = max(1, d_model // 64)
    head_dim = d_model // heads
    return {
        "D": {"num_heads": heads, "head_dim": head_dim, "expand_v": 1.0},
        "L": {"num_heads": heads, "head_dim": head_dim, "expand_v": 1.0},
        "G": {"num_heads": heads},
        "M": {"d_state": min(64, d_model), "headdim": min(64, d_model)},
    }


def model_config(
    study: Study,
    cell: Cell,
    vocab_size: int,
    vision: dict | None = None,
    intermediate_size: int | None = None,
    token_ids: dict[str, int] | None = None,
) -> HybridConfig:
    """The cell's model: ``d_model`` wide, one layer per layout letter, attention heads of 64 channels (or one of
    ``d_model``), the arm's mixer options at the cell's size over :func:`default_mixer_options`, the study's
    backends pinned, and an MLP ``mlp_ratio`` times as wide (none at 0) unless ``intermediate_size`` is given.
    ``token_ids``: the vision placeholder ids of the tokenizer (with ``vision``)."""
    arm, train = study.arm(cell.arm), study.train_for(cell.task)
    d = cell.d_model
    heads = max(1, d // 64)
    options = default_mixer_options(d)
    for kind, values in arm.options(cell.size).items():
        options.setdefault(mixers.resolve_kind(kind), {}).update(values)
    for kind, backend in train.backends.items():
        options.setdefault(mixers.resolve_kind(kind), {})["backend"] = backend
    kinds = mixers.parse_layout(arm.layout)
    options = {kind: values for kind, values in options.items() if kind in kinds}
    ratio = train.mlp_ratio if arm.mlp_ratio is None else arm.mlp_ratio
    return HybridConfig(
        layout=arm.layout,
        vocab_size=vocab_size,
        hidden_size=d,
        intermediate_size=round(ratio * d) if intermediate_size is None else intermediate_size,
        num_hidden_layers=len(kinds),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        mrope_section=None if vision is None else _mrope(d // heads),
        sliding_window=train.window,
        mixer_options=options,
        vision_config=vision,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        **(token_ids or {}),
    )


def _mrope(head_dim: int) -> list[int]:
    half = head_dim // 2
    return [half - 2 * (half // 3), half // 3, half // 3]


def count_parameters(config: HybridConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in HybridVLM(config).parameters())


_REFERENCE = "match_parameters"
"""The name of the arm built from ``match_parameters`` to size the others against."""


def matched_intermediate_size(
    study: Study, cell: Cell, vocab_size: int, vision: dict | None = None, token_ids: dict[str, int] | None = None
) -> int | None:
    """The MLP width that gives the cell's model the parameter count of the study's ``match_parameters`` layout
    (at the same width, with default options); ``None`` without ``match_parameters``."""
    if not study.match_parameters:
        return None
    reference = dataclasses.replace(study, arms=(Arm(_REFERENCE, study.match_parameters),))
    reference_cell = dataclasses.replace(cell, arm=_REFERENCE, size=0)
    target = count_parameters(model_config(reference, reference_cell, vocab_size, vision, token_ids=token_ids))
    base_config = model_config(study, cell, vocab_size, vision, intermediate_size=8, token_ids=token_ids)
    per_unit = 3 * cell.d_model * base_config.num_hidden_layers  # gate, up, down per MLP channel
    width = round((target - count_parameters(base_config)) / per_unit) + 8
    return max(8, width)


def cell_settings(study: Study, cell: Cell) -> dict[str, Any]:
    """Everything a cell's result depends on besides its id, as JSON: the model (layout, mixer options at its
    size, MLP ratio), the task and the training settings. A cell recorded with other settings is trained again."""
    arm = study.arm(cell.arm)
    settings = {
        "layout": arm.layout,
        "mixer_options": arm.options(cell.size),
        "mlp_ratio": arm.mlp_ratio,
        "match_parameters": study.match_parameters,
        "task": cell.task.record(),
        "train": dataclasses.asdict(study.train_for(cell.task)),
    }
    return json.loads(json.dumps(settings, sort_keys=True))


def prepare_run_dir(study: Study, cell: Cell, run_dir: Path) -> None:
    """Keep ``run_dir`` (and the checkpoint in it, to resume from) when an earlier run of this cell had the same
    settings; otherwise empty it, so that a run with other settings leaves nothing behind, and record them."""
    settings, recorded = cell_settings(study, cell), run_dir / "settings.json"
    if recorded.is_file() and json.loads(recorded.read_text()) == settings:
        return
    if run_dir.exists():
        logger.info("%s: starting afresh (no run with these settings in %s)", cell.id(study), run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    recorded.write_text(json.dumps(settings))


def check_models(study: Study) -> None:
    """Build every model the study names (on the meta device, so nothing is allocated) once per arm, size and
    width, so that a bad mixer option fails when the study is read, naming the arm, rather than in a cell."""
    seen = set()
    for task in study.tasks:
        grid = study.grid(task)
        vocab = task.get("vocab_size", 8192) if task.type == "mqar" else 1024
        for name, d_model in itertools.product(grid["arm"], grid["d_model"]):
            for size in range(study.arm(name).size_count):
                if (name, size, d_model) in seen:
                    continue
                seen.add((name, size, d_model))
                cell = Cell(name, size, task, d_model, 0, 0.0)
                try:
                    with torch.device("meta"):
                        HybridVLM(model_config(study, cell, vocab))
                except (ValueError, TypeError, KeyError, mixers.LayoutError) as error:
                    where = f"arm {name!r}" + (f", size {size}" if study.arm(name).sizes else "")
                    raise StudyError(f"{where} at d_model {d_model}: {error}") from None
