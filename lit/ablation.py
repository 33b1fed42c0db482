"""Ablation studies: a grid of layouts x tasks x model sizes x seeds x learning rates, each cell trained from
scratch through the normal Lightning stage (:class:`lit.modules.SFT`) and written as one JSON; cells already
written are skipped and a cell stopped part-way resumes from its last checkpoint, so an interrupted study
resumes where it stopped.

A study is a YAML file:

.. code-block:: yaml

    name: mixer_type
    grid:                                  # the cross product of these lists is the set of cells
      layout: ["S,D", "S,M", "D,D", "A,A"]
      d_model: [64, 128, 256]
      seed: [0, 1, 2]
      learning_rate: [3.0e-4, 1.0e-3, 3.0e-3]
    tasks:                                 # each cell runs one task
      - {type: mqar, seq_len: 64, num_kv_pairs: 4}
      - {type: synthetic, tasks: [ocr, counting], image_size: 56,
         grid: {d_model: [128], learning_rate: [1.0e-3]},          # this task's own grid entries
         train: {max_steps: 600}}                                  # and its own training settings
    match_parameters: "A,A"                # scale MLP widths so every layout has this layout's parameter count
    train: {max_steps: 2000, max_tokens: 8192, window: 32, backends: {G: torch}}   # backends: per mixer letter
    smoke: {grid: {d_model: [32], seed: [0]}, train: {max_steps: 3}}   # merged in with --smoke (CPU)

The summary reports, per (layout, task, d_model), the best learning rate's accuracy averaged over seeds
(mean and standard deviation), as Zoology reports MQAR.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from filelock import FileLock
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

import mixers
from lit.callbacks import StepTimer
from lit.data.mqar import MQARDataset
from lit.data.packing import LengthGroupedBatchSampler, pack
from lit.datamodule import HybridDataModule, ResumableDataLoader, batches_trained
from lit.modules import SFT
from models.config import HybridConfig
from models.hybrid import HybridVLM

logger = logging.getLogger("hybridvl.ablation")

SYNTHETIC_ENCODE_WORKERS = 4
"""Processes that encode a synthetic split into the study's data cache (MQAR sets are drawn up front)."""
STEP_TIMER_WARMUP = 10
"""Steps of a cell left out of its ``seconds_per_step`` (kernel compilation and autotuning happen in them)."""
INVOCATIONS = "invocations.json"
"""Each run of a study that trained cells appends its start, wall seconds and device here (:func:`run_study`)."""
CHECKPOINT_EVERY = 200
"""Steps between a cell's checkpoints: a cell stopped part-way (a command's time limit, a lost machine) resumes
from its last checkpoint when the study runs again. A cell also logs its progress at each checkpoint."""
GRID_KEYS = ("layout", "d_model", "seed", "learning_rate")
STUDY_KEYS = {"name", "description", "grid", "tasks", "train", "match_parameters", "smoke"}
TRAIN_DEFAULTS = {
    "max_steps": 1000,
    "max_tokens": 8192,
    "window": 32,
    "warmup_ratio": 0.1,
    "precision": "32-true",
    "train_examples": 20000,
    "test_examples": 1000,
    "val_size": 50,
    "mlp_ratio": 2,
    "pipeline_scale": 1.0,
    "backends": {},  # mixer letter -> backend for every cell (default: each mixer's "auto")
}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One training run of a study."""

    layout: str
    task: tuple[tuple[str, Any], ...]  # the task dict, frozen
    d_model: int
    seed: int
    learning_rate: float

    @property
    def task_dict(self) -> dict[str, Any]:
        return {key: value for key, value in self.task}

    @property
    def task_name(self) -> str:
        task = self.task_dict
        if task["type"] == "mqar":
            return f"mqar_T{task.get('seq_len', 64)}_kv{task.get('num_kv_pairs', 4)}"
        if task["type"] == "distill":
            return f"distill_{task['init']}"
        extra = "".join(f"_{k}{v}" for k, v in sorted(task.items()) if k in ("video_frames", "min_distance"))
        return "synthetic_" + "-".join(task.get("tasks", ["all"])) + extra

    @property
    def id(self) -> str:
        layout = re.sub(r"[^A-Za-z0-9]+", "", mixers.format_layout(mixers.parse_layout(self.layout)))
        return f"{layout}__{self.task_name}__d{self.d_model}__s{self.seed}__lr{self.learning_rate:g}"


class _CellProgress(L.Callback):
    """Log a cell's step and its seconds per step since the last line: after the warm-up steps, every ``every``
    steps and at the end (cells trained in parallel have no progress bar)."""

    def __init__(self, cell_id: str, max_steps: int, every: int) -> None:
        self.cell_id, self.max_steps, self.every = cell_id, max_steps, every
        self._since: tuple[int, float] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = (trainer.global_step, time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every and step not in (STEP_TIMER_WARMUP, self.max_steps):
            return
        start_step, start = self._since
        pace = (time.perf_counter() - start) / max(1, step - start_step)
        logger.info("%s: step %d/%d, %.3f s/step since step %d", self.cell_id, step, self.max_steps, pace, start_step)
        self._since = (step, time.perf_counter())


def _merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def load_study(path: str | Path, smoke: bool = False) -> dict[str, Any]:
    """Read and check a study YAML; with ``smoke`` its ``smoke`` section is merged in."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study config {path} does not exist")
    try:
        study = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    unknown = set(study) - STUDY_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown study keys {sorted(unknown)}; known: {sorted(STUDY_KEYS)}")
    if smoke:
        study = _merge(study, study.get("smoke", {}))
    missing = [key for key in GRID_KEYS if not study.get("grid", {}).get(key)]
    if missing or not study.get("tasks"):
        raise ValueError(f"{path}: the grid needs non-empty {', '.join(missing) or 'tasks'}")
    for layout in study["grid"]["layout"]:
        mixers.parse_layout(layout)  # a LayoutError points at the problem
    for task in study["tasks"]:
        if task.get("type") not in ("mqar", "synthetic", "distill"):
            raise ValueError(f"{path}: task type must be 'mqar', 'synthetic' or 'distill', got {task}")
        if task["type"] == "distill" and task.get("init") not in ("mimic", "transfer"):
            raise ValueError(f"{path}: a distill task needs init: mimic or transfer, got {task}")
        distances = task.get("eval_distances")
        if distances is not None and (
            task["type"] != "synthetic"
            or "video_memory" not in task.get("tasks", [])
            or not isinstance(distances, list)
            or not distances
            or not all(isinstance(d, int) and d >= 0 and d % 2 == 0 for d in distances)
        ):
            raise ValueError(
                f"{path}: eval_distances belongs to a synthetic task with video_memory and is a non-empty list of "
                f"even frame counts >= 0 (a cue takes two frames), got {task}"
            )
        task_grid = task.get("grid", {})
        if not isinstance(task_grid, dict) or set(task_grid) - set(GRID_KEYS) or not all(task_grid.values()):
            raise ValueError(
                f"{path}: a task's grid must map some of {', '.join(GRID_KEYS)} to non-empty lists, got {task_grid}"
            )
        for layout in task_grid.get("layout", []):
            mixers.parse_layout(layout)
        task_train = task.get("train", {})
        if not isinstance(task_train, dict) or set(task_train) - set(TRAIN_DEFAULTS):
            raise ValueError(
                f"{path}: a task's train must map some of {', '.join(TRAIN_DEFAULTS)} to values, got {task_train}"
            )
    unknown = set(study.get("train", {})) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ValueError(f"{path}: unknown train keys {sorted(unknown)}; known: {', '.join(TRAIN_DEFAULTS)}")
    study["train"] = {**TRAIN_DEFAULTS, **study.get("train", {})}
    return study


def cell_train(cell: Cell, study: dict[str, Any]) -> dict[str, Any]:
    """The cell's training settings: the study's ``train`` with its task's own ``train`` entries in their place
    (e.g. fewer, larger steps for the expensive multimodal task)."""
    return {**study["train"], **cell.task_dict.get("train", {})}


def expand(study: dict[str, Any]) -> list[Cell]:
    """Every cell of the study's grid, in a stable order (task by task). A task's own ``grid`` entries
    replace the study's for that task (e.g. one model size for the expensive multimodal task); its own
    ``train`` entries stay in the cell's task (see :func:`cell_train`)."""
    cells = []
    for task in study["tasks"]:
        grid = {**study["grid"], **task.get("grid", {})}
        frozen = tuple(sorted((key, value) for key, value in task.items() if key != "grid"))
        cells += [
            Cell(layout, frozen, d_model, seed, float(lr))
            for layout, d_model, seed, lr in itertools.product(
                grid["layout"], grid["d_model"], grid["seed"], grid["learning_rate"]
            )
        ]
    return cells


# --- models ---------------------------------------------------------------------------------------------


def model_config(
    cell: Cell,
    study: dict[str, Any],
    vocab_size: int,
    vision: dict | None,
    intermediate_size: int | None = None,
    token_ids: dict[str, int] | None = None,
) -> HybridConfig:
    """The cell's model: ``d_model`` wide, one layer per layout letter, heads of 64 (or ``d_model``) channels;
    ``token_ids``: the vision placeholder ids of the tokenizer (with ``vision``)."""
    d, train = cell.d_model, cell_train(cell, study)
    heads = max(1, d // 64)
    head_dim = d // heads
    kinds = mixers.parse_layout(cell.layout)
    mixer_options = {
        "D": {"num_heads": heads, "head_dim": head_dim, "expand_v": 1.0},
        "L": {"num_heads": heads, "head_dim": head_dim, "expand_v": 1.0},
        "G": {"num_heads": heads},
        "M": {"d_state": min(64, d), "headdim": min(64, d)},
    }
    for kind, backend in train["backends"].items():
        mixer_options.setdefault(kind, {})["backend"] = backend
    return HybridConfig(
        layout=cell.layout,
        vocab_size=vocab_size,
        hidden_size=d,
        intermediate_size=intermediate_size or train["mlp_ratio"] * d,
        num_hidden_layers=len(kinds),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        mrope_section=None if vision is None else _mrope(head_dim),
        sliding_window=train["window"],
        mixer_options=mixer_options,
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


def matched_intermediate_size(
    cell: Cell, study: dict, vocab_size: int, vision: dict | None, token_ids: dict[str, int] | None = None
) -> int | None:
    """The MLP width that gives the cell's layout the parameter count of ``match_parameters``' layout."""
    reference = study.get("match_parameters")
    if not reference:
        return None
    reference_cell = dataclasses.replace(cell, layout=reference)
    target = count_parameters(model_config(reference_cell, study, vocab_size, vision, token_ids=token_ids))
    base_config = model_config(cell, study, vocab_size, vision, intermediate_size=8, token_ids=token_ids)
    per_unit = 3 * cell.d_model * base_config.num_hidden_layers  # gate, up, down per MLP channel
    width = round((target - count_parameters(base_config)) / per_unit) + 8
    return max(8, width)


# --- data -----------------------------------------------------------------------------------------------


class SampleBatches(L.LightningDataModule):
    """Packed batches of ``max_tokens`` of ready :class:`Sample` datasets of one length (MQAR). The training
    order is shuffled each epoch by ``seed`` and its position is saved with checkpoints, so an interrupted cell
    resumes with the batches it had left."""

    def __init__(self, train: Dataset, val: Dataset, max_tokens: int, seq_len: int, seed: int) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.max_tokens, self.seq_len, self.seed = max_tokens, seq_len, seed
        self.batch_size = max(1, max_tokens // seq_len)

    def train_dataloader(self) -> DataLoader:
        sampler = LengthGroupedBatchSampler(
            [self.seq_len] * len(self.train), self.max_tokens, seed=self.seed, mega_batch_factor=0
        )
        return ResumableDataLoader(
            self.train, consumed=lambda: batches_trained(self.trainer), batch_sampler=sampler, collate_fn=pack
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=pack)


VISION_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


def _data(
    cell: Cell, study: dict, processor_dir: Path
) -> tuple[L.LightningDataModule, int, dict | None, dict[str, int] | None]:
    """The cell's data module, vocabulary size, vision config and vision placeholder token ids."""
    task, train = cell.task_dict, cell_train(cell, study)
    if task["type"] == "mqar":
        options = {k: v for k, v in task.items() if k in ("vocab_size", "seq_len", "num_kv_pairs", "power_a")}
        train_set = MQARDataset(num_examples=train["train_examples"], seed=cell.seed, **options)
        val_set = MQARDataset(num_examples=train["test_examples"], seed=10_000 + cell.seed, **options)
        batches = SampleBatches(train_set, val_set, train["max_tokens"], train_set.seq_len, cell.seed)
        return batches, train_set.vocab_size, None, None
    options = {k: v for k, v in task.items() if k not in ("type", "eval_distances", "train")}
    data = HybridDataModule(
        processor=str(processor_dir),
        train=[{"type": "synthetic", "split": "train", "seed": cell.seed, **options}],
        val=[{**options, "type": "synthetic", "split": "val", "size_per_task": train["val_size"]}],
        max_tokens=train["max_tokens"],
        length_grouping=0,
        seed=cell.seed,
        # rendering and processing a batch of about 200 synthetic samples takes ~0.35 s of CPU, an order of
        # magnitude more than a small model's step: every (task, seed) is encoded once for all the study's cells
        # (out/data, memory-mapped), by several processes; the cells collate batches of it in milliseconds
        cache_dir=str(processor_dir.parent / "data"),
        num_workers=SYNTHETIC_ENCODE_WORKERS,
    )
    tokenizer = _processor(processor_dir).tokenizer
    token_ids = {field: tokenizer.convert_tokens_to_ids(token) for field, token in VISION_TOKENS.items()}
    return data, len(tokenizer), vision_tower_config(cell.d_model), token_ids


def vision_tower_config(d_model: int) -> dict[str, Any]:
    """The vision tower of synthetic cells: 2 blocks of width 64 on the tiny processor's patches, its merged
    features ``d_model`` wide."""
    from models.tiny_qwen import TinyQwenDims

    dims = TinyQwenDims()
    return dict(
        depth=2,
        hidden_size=64,
        num_heads=2,
        intermediate_size=128,
        out_hidden_size=d_model,
        patch_size=dims.patch_size,
        spatial_merge_size=dims.spatial_merge_size,
        temporal_patch_size=dims.temporal_patch_size,
        window_size=112,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )


@functools.cache
def _processor(directory: Path):
    """The study's tiny Qwen2.5-VL processor (loaded once)."""
    from models.chat import load_processor

    return load_processor(directory)


# --- running --------------------------------------------------------------------------------------------


def run_distillation_cell(cell: Cell, study: dict, out: Path) -> dict[str, Any]:
    """The distillation track: a tiny Transformer teacher (one per seed, shared by the cells), converted to the
    cell's layout with the task's initialisation, distilled and fine-tuned by :mod:`lit.pipeline`, on the device
    every cell trains on (the GPU when there is one; the stage configs alone would train on the CPU)."""
    from lit.evaluate import evaluate
    from lit.pipeline import distill_student, train_teacher

    train, init = cell_train(cell, study), cell.task_dict["init"]
    teacher_root = out / "teachers" / f"seed{cell.seed}"
    teacher = teacher_root / "teacher"
    start = time.perf_counter()
    teacher_root.mkdir(parents=True, exist_ok=True)
    with FileLock(teacher_root / "teacher.lock"):  # the cells of a seed share its teacher: one trains it
        if not (teacher / "config.json").is_file():
            L.seed_everything(cell.seed, verbose=False)
            train_teacher(teacher_root, train["pipeline_scale"], cell.seed, accelerator="auto")
    L.seed_everything(cell.seed, verbose=False)
    student, report = distill_student(
        teacher, out / "runs" / cell.id, cell.layout, init, train["window"], train["pipeline_scale"], "auto"
    )
    val = [{"type": "synthetic", "split": "val", "size_per_task": train["val_size"], "image_size": 84}]
    per_task, teacher_per_task = evaluate(student, val), evaluate(teacher, val)
    return {
        "layout": mixers.format_layout(mixers.parse_layout(cell.layout)),
        "init": init,
        "accuracy": statistics.fmean(per_task.values()),
        "per_task": per_task,
        "teacher_accuracy": statistics.fmean(teacher_per_task.values()),
        "teacher_per_task": teacher_per_task,
        "transferred_tensors": len(report.transferred),
        "train_seconds": time.perf_counter() - start,
        "device": _device(),
        "versions": _versions(),
    }


def run_cell(cell: Cell, study: dict, out: Path, processor_dir: Path, concurrent_cells: int = 1) -> dict[str, Any]:
    """Train one cell (from its last checkpoint, if an earlier run left one) and return its result (also written
    to ``cells/<id>.json``).

    ``concurrent_cells`` (how many cells share the device, recorded with the step time of the run that trained)
    does not change training.
    """
    if cell.task_dict["type"] == "distill":
        identity = {
            "cell": cell.id,
            "task": cell.task_name,
            "task_config": cell.task_dict,
            "d_model": cell.d_model,
            "seed": cell.seed,
            "learning_rate": cell.learning_rate,
        }
        return _write_cell(out, cell, study, {**identity, **run_distillation_cell(cell, study, out)})
    L.seed_everything(cell.seed, verbose=False)
    data, vocab, vision, token_ids = _data(cell, study, processor_dir)
    width = matched_intermediate_size(cell, study, vocab, vision, token_ids)
    config = model_config(cell, study, vocab, vision, width, token_ids)
    cell_dir = out / "runs" / cell.id
    checkpoint = _resume_point(cell, study, cell_dir)
    if checkpoint is None:
        model = HybridVLM(config)
        if vision is not None:
            from models.tiny_qwen import init_tiny_vision_tower

            init_tiny_vision_tower(model.visual)
        model.save_pretrained(cell_dir / "init")
        if vision is not None:
            _processor(processor_dir).save_pretrained(cell_dir / "init")
    resumed_from = 0 if checkpoint is None else torch.load(checkpoint, mmap=True, weights_only=False)["global_step"]
    train = cell_train(cell, study)
    stage = SFT(
        model=str(cell_dir / "init"),
        trainable=["*"],
        learning_rate=cell.learning_rate,
        warmup_ratio=train["warmup_ratio"],
        min_lr_ratio=0.1,
        generation_max_new_tokens=0 if vision is None else 4,
        export_dir=str(cell_dir / "model"),
    )
    # steady-state step time (after compilation and autotuning) is what sizes a study's grid to a time budget
    steps_left = train["max_steps"] - resumed_from
    timer = StepTimer(str(cell_dir / "steps.json"), warmup=max(0, min(STEP_TIMER_WARMUP, steps_left - 1)))
    sharing = cell_dir / "concurrent_cells.json"  # the cells that shared the device while the timed steps ran
    if steps_left > 0:
        sharing.write_text(json.dumps(concurrent_cells))
    checkpoints = ModelCheckpoint(
        dirpath=cell_dir / "checkpoints", every_n_train_steps=CHECKPOINT_EVERY, save_top_k=0, save_last=True
    )
    trainer = L.Trainer(
        max_steps=train["max_steps"],
        precision=train["precision"],
        accelerator="auto",
        devices=1,
        default_root_dir=cell_dir,
        log_every_n_steps=max(1, min(50, train["max_steps"] // 10)),
        val_check_interval=train["max_steps"],
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, checkpoints, _CellProgress(cell.id, train["max_steps"], CHECKPOINT_EVERY)],
    )
    start = time.perf_counter()
    trainer.fit(stage, data, ckpt_path=checkpoint)
    timing = json.loads(timer.path.read_text())
    key = "val/token_accuracy" if vision is None else "val/accuracy"
    if key not in trainer.callback_metrics:  # resumed from a checkpoint of the last step: validate it here
        trainer.validate(stage, data, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    student = stage.student
    result = {
        "cell": cell.id,
        "layout": mixers.format_layout(config.kinds),
        "task": cell.task_name,
        "task_config": cell.task_dict,
        "d_model": cell.d_model,
        "seed": cell.seed,
        "learning_rate": cell.learning_rate,
        "accuracy": metrics.get(key, math.nan),
        "per_task": {k.split("/")[1]: v for k, v in metrics.items() if k.endswith("/exact_match")},
        "val_loss": metrics.get("val/loss", math.nan),
        "parameters": sum(p.numel() for p in student.parameters()),
        "intermediate_size": config.intermediate_size,
        "state_bytes_per_sequence": sum(
            layer.self_attn.state_bytes(1, seq_len=4096) for layer in student.language_model.layers
        ),
        "train_seconds": time.perf_counter() - start,
        "steps": train["max_steps"],
        "resumed_from_step": resumed_from,
        "seconds_per_step": timing["seconds_per_step"],
        "concurrent_cells": json.loads(sharing.read_text()) if sharing.is_file() else concurrent_cells,
        "first_steps_seconds": sum(step["seconds"] for step in timing["steps"][: timing["warmup_steps"]]),
        **_distance_accuracy(cell, study, cell_dir / "model", processor_dir),
        "device": _device(),
        "versions": _versions(),
    }
    result = _write_cell(out, cell, study, result)
    shutil.rmtree(checkpoints.dirpath)  # the cell is done: its JSON and exported model are what stay
    return result


def _resume_point(cell: Cell, study: dict, cell_dir: Path) -> Path | None:
    """The last checkpoint of an earlier run of this cell with the same settings, to resume from; otherwise
    ``None``, with the cell's run folder emptied (an earlier run with other settings leaves nothing behind)."""
    settings = _settings(cell_train(cell, study), cell.task_dict) | {"match_parameters": study.get("match_parameters")}
    settings = json.loads(json.dumps(settings, sort_keys=True))  # as read back from settings.json
    recorded, last = cell_dir / "settings.json", cell_dir / "checkpoints" / "last.ckpt"
    if last.is_file() and recorded.is_file() and json.loads(recorded.read_text()) == settings:
        logger.info("%s: resuming from %s", cell.id, last)
        return last
    if cell_dir.exists():
        logger.info("%s: starting afresh (no checkpoint of a run with these settings in %s)", cell.id, cell_dir)
        shutil.rmtree(cell_dir)
    cell_dir.mkdir(parents=True)
    recorded.write_text(json.dumps(settings))
    return None


def _distance_accuracy(cell: Cell, study: dict, model_dir: Path, processor_dir: Path) -> dict[str, Any]:
    """Video-memory accuracy of the trained model at each of the task's ``eval_distances``: held-out videos of
    ``d + 2`` frames whose cue opens the video, so exactly ``d`` frames lie between the cue and the question.
    ``window_frames`` is the sliding window in frames, to read the distances against."""
    task = cell.task_dict
    if not task.get("eval_distances"):
        return {}
    from lit.evaluate import evaluate

    size, train = task.get("video_size", 56), cell_train(cell, study)
    accuracy = {}
    for distance in task["eval_distances"]:
        source = {"type": "synthetic", "split": "val", "size_per_task": train["val_size"]}
        source |= {
            "tasks": ["video_memory"],
            "video_frames": distance + 2,
            "min_distance": distance,
            "video_size": size,
        }
        accuracy[str(distance)] = evaluate(model_dir, [source])["video_memory"]
    return {
        "distance_accuracy": accuracy,
        "window_frames": train["window"] / _video_tokens_per_frame(processor_dir, size),
    }


def _video_tokens_per_frame(processor_dir: Path, size: int, frames: int = 8) -> float:
    """Language-model tokens per video frame of ``size`` x ``size`` pixels, from the processor's own grid."""
    video_processor = _processor(processor_dir).video_processor
    video = torch.zeros(frames, 3, size, size, dtype=torch.uint8)
    grid = video_processor(videos=[video], return_tensors="pt")["video_grid_thw"][0]
    return int(grid.prod()) / video_processor.merge_size**2 / frames


def _device() -> str:
    """The device cells train on here, as recorded in their JSON and in ``invocations.json``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for package in ("torch", "triton", "flash-linear-attention", "transformers", "lightning"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def _write_cell(out: Path, cell: Cell, study: dict, result: dict[str, Any]) -> dict[str, Any]:
    """Write the cell's JSON, with its training settings (:func:`cell_train`), atomically: a study killed
    mid-write leaves no truncated cell behind."""
    result = {**result, "train": cell_train(cell, study)}
    (out / "cells").mkdir(parents=True, exist_ok=True)
    path = out / "cells" / f"{cell.id}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(path)
    return result


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (layout, task, d_model): best learning rate by mean accuracy over seeds; mean and std at it, and the
    mean steady-state step time of those cells (with how many cells shared the device at most)."""
    groups: dict[tuple, dict[float, list[dict]]] = {}
    for result in results:
        key = (result["layout"], result["task"], result["d_model"])
        groups.setdefault(key, {}).setdefault(result["learning_rate"], []).append(result)
    rows = []
    for (layout, task, d_model), by_lr in sorted(groups.items()):
        lr, cells = max(by_lr.items(), key=lambda item: statistics.fmean(c["accuracy"] for c in item[1]))
        accuracies = [c["accuracy"] for c in cells]
        step_times = [c["seconds_per_step"] for c in cells if c.get("seconds_per_step")]
        rows.append(
            {
                "layout": layout,
                "task": task,
                "d_model": d_model,
                "best_learning_rate": lr,
                "mean": statistics.fmean(accuracies),
                "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                "seeds": len(accuracies),
                "seconds_per_step": statistics.fmean(step_times) if step_times else None,
                "concurrent_cells": max(
                    (c["concurrent_cells"] for c in cells if "concurrent_cells" in c), default=None
                ),
            }
        )
    return rows


def run_study(
    config: str | Path,
    smoke: bool = False,
    out: str | Path | None = None,
    workers: int = 1,
    time_budget: float | None = None,
) -> dict[str, Any]:
    """Run (or resume) the cells of a study; write ``summary.json`` and ``summary.md`` and return the summary.

    ``workers`` > 1 trains that many cells at once in separate processes (small models leave a GPU mostly idle).
    With ``time_budget`` (seconds) no cell starts once the budget is spent; cells already running finish, and the
    summary covers the cells done so far (``complete`` is false until every cell is): run again to go on.
    """
    study = load_study(config, smoke)
    out = Path(out) if out else Path(config).parent / "results" / (study["name"] + ("_smoke" if smoke else ""))
    cells = expand(study)
    processor_dir = out / "processor"
    if any(cell.task_dict["type"] == "synthetic" for cell in cells) and not processor_dir.is_dir():
        from models.tiny_qwen import make_tiny_qwen2_5_vl

        make_tiny_qwen2_5_vl(processor_dir)
    pending = [cell for cell in cells if not _finished(out, cell, study)]
    logger.info(
        "%s: %d cells, %d done before (skipped), %d to run",
        study["name"],
        len(cells),
        len(cells) - len(pending),
        len(pending),
    )
    deadline = math.inf if time_budget is None else time.monotonic() + time_budget
    failed: dict[str, str] = {}
    trains = pending and (time_budget is None or time_budget > 0)  # a run that trains nothing is not recorded
    with _logged_invocation(out, workers) if trains else contextlib.nullcontext():
        if workers > 1 and len(pending) > 1:
            failed = _run_parallel(pending, study, out, processor_dir, workers, deadline)
        else:
            for number, cell in enumerate(pending, 1):
                if time.monotonic() >= deadline:
                    logger.info("time budget spent: %d cells left for the next run", len(pending) - number + 1)
                    break
                logger.info("[%d/%d] %s", number, len(pending), cell.id)
                error = _attempt(cell, study, out, processor_dir)
                if error:
                    failed[cell.id] = error
    done = [cell for cell in cells if _finished(out, cell, study, quiet=True)]
    results = [json.loads((out / "cells" / f"{cell.id}.json").read_text()) for cell in done]
    summary = {
        "study": study["name"],
        "smoke": smoke,
        "cells": len(results),
        "total_cells": len(cells),
        "complete": len(results) == len(cells),
        "failed": failed,
        "rows": summarize(results),
    }
    out.mkdir(parents=True, exist_ok=True)  # a study stopped before its first cell still gets a summary
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary) + "\n")
    return summary


@contextlib.contextmanager
def _logged_invocation(out: Path, workers: int) -> Iterator[None]:
    """Append this run's start (UTC), wall seconds, device, workers and cells done to ``out/invocations.json``
    when it ends, also when a time limit stops it with SIGTERM, so that the device time a study took adds up over
    the runs that resumed it (``hybridvl ablate-report`` sums it)."""
    started, start = datetime.now(UTC), time.monotonic()

    def record(ended_by: str) -> None:
        path = out / INVOCATIONS
        records = json.loads(path.read_text()) if path.is_file() else []
        records.append(
            {
                "started": started.isoformat(timespec="seconds"),
                "seconds": round(time.monotonic() - start, 1),
                "ended_by": ended_by,
                "workers": workers,
                "cells_done": len(list((out / "cells").glob("*.json"))),
                "device": _device(),
            }
        )
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=2) + "\n")

    def on_terminate(signum: int, frame: Any) -> None:
        record("SIGTERM")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # end as SIGTERM ends a process, now that the run is recorded

    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, on_terminate) if in_main_thread else None
    ended_by = "raised"
    try:
        yield
        ended_by = "returned"
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        record(ended_by)


def _settings(train: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """A cell's settings as one flat dict, to compare two runs of it: the study's ``train`` keys and the task's
    options as ``task.<option>``."""
    return {**train, **{f"task.{key}": value for key, value in task.items() if key != "train"}}


def _finished(out: Path, cell: Cell, study: dict, quiet: bool = False) -> bool:
    """Whether ``cells/<id>.json`` holds this cell trained with the study's current settings: its ``train``
    section and the cell's task (a task option the cell's name leaves out, such as ``size_per_task``, may have
    changed). A cell trained with other settings is run again."""
    path = out / "cells" / f"{cell.id}.json"
    if not path.is_file():
        return False
    recorded = json.loads(path.read_text())
    current = _settings(cell_train(cell, study), cell.task_dict)
    trained = _settings(recorded.get("train") or {}, recorded["task_config"])
    changed = sorted(key for key in set(current) | set(trained) if current.get(key) != trained.get(key))
    if changed and not quiet:
        logger.warning("%s was trained with other settings (%s differ): running it again", cell.id, changed)
    return not changed


def _attempt(cell: Cell, study: dict, out: Path, processor_dir: Path, concurrent_cells: int = 1) -> str | None:
    """Run one cell; a cell that fails is logged with its traceback and its error returned, so that one broken
    cell does not stop the study's other cells (the study reports it and exits with an error)."""
    try:
        run_cell(cell, study, out, processor_dir, concurrent_cells)
    except Exception as error:  # any failure of one cell is reported; the others go on
        logger.exception("%s failed", cell.id)
        return f"{type(error).__name__}: {error}"
    return None


def _start_worker(log_level: int, threads: int) -> None:
    """Set up a process that trains cells: the study's log lines (a spawned process starts without the parent's
    logging setup) and its share of the CPU threads (each process would otherwise start a thread per core, and
    many processes' threads contending for the cores slow the CPU work of every step)."""
    from lit.cli import show_project_logs

    show_project_logs(log_level)
    torch.set_num_threads(threads)


def _run_parallel(
    pending: list[Cell], study: dict, out: Path, processor_dir: Path, workers: int, deadline: float
) -> dict[str, str]:
    """Keep ``workers`` cells in flight until the cells or the time run out; return the failed cells' errors."""
    context = multiprocessing.get_context("spawn")
    queue = list(reversed(pending))
    finished, failed = 0, {}
    threads = max(1, (os.cpu_count() or 1) // workers)
    logger.info("%d cells at once, %d CPU threads each", workers, threads)
    pool = concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(logger.getEffectiveLevel(), threads)
    )
    with pool:
        running: dict[concurrent.futures.Future, Cell] = {}
        while queue or running:
            while queue and len(running) < workers and time.monotonic() < deadline:
                cell = queue.pop()
                running[pool.submit(_attempt, cell, study, out, processor_dir, workers)] = cell
            if not running:
                logger.info("time budget spent: %d cells left for the next run", len(queue))
                break
            completed, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in completed:
                cell, finished = running.pop(future), finished + 1
                error = future.result()
                if error:
                    failed[cell.id] = error
                logger.info("[%d/%d] %s%s", finished, len(pending), cell.id, " FAILED" if error else "")
    return failed


def summary_markdown(summary: dict[str, Any]) -> str:
    progress = (
        "" if summary.get("complete", True) else f" ({summary['cells']} of {summary['total_cells']} cells so far)"
    )
    failed = "".join(f"\n- `{cell}` failed: {error}" for cell, error in summary.get("failed", {}).items())
    failed = f"\n\nFailed this run (run the study again to retry them):{failed}" if failed else ""
    title = f"# {summary['study']}{' (smoke)' if summary['smoke'] else ''}{progress}"
    return f"{title}\n\n{rows_table(summary['rows'])}{failed}"


def rows_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`summarize` rows."""
    lines = [
        "| task | layout | d_model | accuracy (mean ± std) | seeds | best lr | ms/step (cells sharing the device) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = r.get("seconds_per_step")
        sharing = r.get("concurrent_cells") or "not recorded"
        timing = f"{1000 * step:.0f} ({sharing})" if step else "not recorded"
        lines.append(
            f"| {r['task']} | `{r['layout']}` | {r['d_model']} | {r['mean']:.3f} ± {r['std']:.3f} | {r['seeds']} | "
            f"{r['best_learning_rate']:g} | {timing} |"
        )
    return "\n".join(lines)
