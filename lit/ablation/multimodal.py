"""Cells of the multimodal tasks: the synthetic suite trained from scratch through the SFT stage (Lightning,
checkpointed so a cell stopped part-way resumes), and the distillation track (a tiny Transformer teacher
converted, distilled and fine-tuned by :mod:`hybridvl.lit.pipeline`)."""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from filelock import FileLock
from lightning.pytorch.callbacks import ModelCheckpoint

from hybridvl.lit.ablation.cells import Cell, matched_intermediate_size, model_config, prepare_run_dir
from hybridvl.lit.ablation.schema import Study
from hybridvl.lit.callbacks import StepTimer
from hybridvl.lit.data.synthetic import SyntheticSuite
from hybridvl.lit.datamodule import HybridDataModule
from hybridvl.lit.modules import SFT
from hybridvl.models.files import write_json
from hybridvl.models.hybrid import HybridVLM, residual_stream

logger = logging.getLogger("hybridvl.ablation")

SYNTHETIC_ENCODE_WORKERS = 4
"""Processes that encode a synthetic split into the study's data cache."""
STEP_TIMER_WARMUP = 10
"""Steps of a cell left out of its ``seconds_per_step`` (kernel compilation and autotuning happen in them)."""
CHECKPOINT_EVERY = 200
"""Steps between a synthetic cell's checkpoints (and progress lines)."""
VISION_TOKENS = {
    "image_token_id": "<|image_pad|>",
    "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>",
    "vision_end_token_id": "<|vision_end|>",
}


class CellProgress(L.Callback):
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


def vision_tower_config(d_model: int) -> dict[str, Any]:
    """The vision tower of synthetic cells: 2 blocks of width 64 on the tiny processor's patches, its merged
    features ``d_model`` wide."""
    from hybridvl.models.tiny_qwen import TinyQwenDims

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
    from hybridvl.models.chat import load_processor

    return load_processor(directory)


def synthetic_data(study: Study, cell: Cell, processor_dir: Path) -> HybridDataModule:
    """The cell's synthetic suite: its seed's training split and the task's validation split, encoded once per task
    and seed into the study's data cache (``<results>/data``, memory-mapped by every cell)."""
    train = study.train_for(cell.task)
    options = _source_options(cell.task.suite_options)
    return HybridDataModule(
        processor=str(processor_dir),
        train=[{"type": "synthetic", "split": "train", "seed": cell.seed, **options}],
        val=[{**options, "type": "synthetic", "split": "val", "size_per_task": train.val_size}],
        max_tokens=train.max_tokens,
        length_grouping=0,
        seed=cell.seed,
        # rendering and processing a batch of about 200 synthetic samples takes ~0.35 s of CPU, an order of
        # magnitude more than a small model's step: every (task, seed) is encoded once for all the study's cells
        cache_dir=str(processor_dir.parent / "data"),
        num_workers=SYNTHETIC_ENCODE_WORKERS,
    )


def run_synthetic_cell(
    study: Study, cell: Cell, out: Path, processor_dir: Path, concurrent_cells: int = 1
) -> dict[str, Any]:
    """Train a synthetic-suite cell from scratch (from its last checkpoint, if an earlier run left one) and return
    what it measured. ``concurrent_cells`` (how many cells share the device) is recorded with its step time."""
    cell_id, train = cell.id(study), study.train_for(cell.task)
    L.seed_everything(cell.seed, verbose=False)
    data = synthetic_data(study, cell, processor_dir)
    tokenizer = _processor(processor_dir).tokenizer
    token_ids = {field: tokenizer.convert_tokens_to_ids(token) for field, token in VISION_TOKENS.items()}
    vision, vocab = vision_tower_config(cell.d_model), len(tokenizer)
    width = matched_intermediate_size(study, cell, vocab, vision, token_ids)
    config = model_config(study, cell, vocab, vision, width, token_ids)
    cell_dir = out / "runs" / cell_id
    prepare_run_dir(study, cell, cell_dir)
    checkpoint = cell_dir / "checkpoints" / "last.ckpt"
    if checkpoint.is_file():
        logger.info("%s: resuming from %s", cell_id, checkpoint)
    else:
        checkpoint = None
        from hybridvl.models.tiny_qwen import init_tiny_vision_tower

        model = HybridVLM(config)
        init_tiny_vision_tower(model.visual)
        model.save_pretrained(cell_dir / "init", overwrite=True)  # the cell's own folder (a start cut short)
        _processor(processor_dir).save_pretrained(cell_dir / "init")
    resumed_from = 0 if checkpoint is None else torch.load(checkpoint, mmap=True, weights_only=False)["global_step"]
    stage = SFT(
        model=str(cell_dir / "init"),
        trainable=["*"],
        learning_rate=cell.learning_rate,
        warmup_ratio=train.warmup_ratio,
        min_lr_ratio=train.min_lr_ratio,
        generation_max_new_tokens=4,
        export_dir=str(cell_dir / "model"),
    )
    steps_left = train.max_steps - resumed_from
    timer = StepTimer(str(cell_dir / "steps.json"), warmup=max(0, min(STEP_TIMER_WARMUP, steps_left - 1)))
    sharing = cell_dir / "concurrent_cells.json"  # the cells that shared the device while the timed steps ran
    if steps_left > 0:
        sharing.write_text(json.dumps(concurrent_cells))
    checkpoints = ModelCheckpoint(
        dirpath=cell_dir / "checkpoints", every_n_train_steps=CHECKPOINT_EVERY, save_top_k=0, save_last=True
    )
    trainer = L.Trainer(
        max_steps=train.max_steps,
        precision=train.precision,
        accelerator="auto",
        devices=1,
        default_root_dir=cell_dir,
        log_every_n_steps=max(1, min(50, train.max_steps // 10)),
        val_check_interval=train.max_steps,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer, checkpoints, CellProgress(cell_id, train.max_steps, CHECKPOINT_EVERY)],
    )
    start = time.perf_counter()
    trainer.fit(stage, data, ckpt_path=checkpoint)
    timing = json.loads(timer.path.read_text())
    if "val/accuracy" not in trainer.callback_metrics:  # resumed from a checkpoint of the last step: validate here
        trainer.validate(stage, data, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    student = stage.student
    result = {
        **_test_scores(study, cell, cell_dir / "model"),
        "val_accuracy": metrics.get("val/accuracy", math.nan),
        "val_per_task": {k.split("/")[1]: v for k, v in metrics.items() if k.endswith("/exact_match")},
        "val_loss": metrics.get("val/loss", math.nan),
        "parameters": sum(p.numel() for p in student.parameters()),
        "intermediate_size": config.intermediate_size,
        "state_bytes_per_sequence": sum(
            layer.self_attn.state_bytes(1, seq_len=4096) for layer in student.language_model.layers
        ),
        "train_seconds": time.perf_counter() - start,
        "steps": train.max_steps,
        "resumed_from_step": resumed_from,
        "seconds_per_step": timing["seconds_per_step"],
        "concurrent_cells": json.loads(sharing.read_text()) if sharing.is_file() else concurrent_cells,
        "first_steps_seconds": sum(step["seconds"] for step in timing["steps"][: timing["warmup_steps"]]),
        "window": train.window if "S" in config.kinds else None,
    }
    shutil.rmtree(checkpoints.dirpath)  # the cell is done: its JSON and exported model are what stay
    return result


def _source_options(options: dict[str, Any]) -> dict[str, Any]:
    """Suite options as a data source takes them (YAML lists where the study froze tuples)."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in options.items()}


def _test_scores(study: Study, cell: Cell, model_dir: Path) -> dict[str, Any]:
    """The trained model on the held-out test split (the same samples for every cell of the task): greedy exact
    match per task (``per_task``) and its mean (``accuracy``, what the tables report), and the mean exact match
    of each of the task's ``eval_sets`` (``eval_sets``: name -> the same keys); ``chance`` is each task's score
    without looking at the media (:attr:`~hybridvl.lit.data.synthetic.SyntheticTask.chance`)."""
    from hybridvl.lit.evaluate import evaluate

    train, task = study.train_for(cell.task), cell.task
    test = {"type": "synthetic", "split": "test", "size_per_task": train.test_size}

    def scores(options: dict[str, Any]) -> dict[str, Any]:
        per_task = evaluate(model_dir, [{**_source_options(options), **test}])
        chance = {t.name: t.chance for t in SyntheticSuite(**options).tasks}
        return {"accuracy": statistics.fmean(per_task.values()), "per_task": per_task, "chance": chance}

    sets = {name: scores({**task.suite_options, **overrides}) for name, overrides in task.eval_sets.items()}
    return {**scores(task.suite_options), "eval_sets": sets}


DISTILL_SUITE = {"type": "synthetic", "image_size": 112}
"""The suite the tiny pipeline's teacher trains on (``experiments/tiny/teacher.yaml``)."""


def run_distillation_cell(study: Study, cell: Cell, out: Path) -> dict[str, Any]:
    """The initialisation track: a tiny Transformer teacher trained on the synthetic suite (one per seed, shared
    by the cells), converted to the cell's layout with the task's initialisation and distilled layer-wise (Stage I
    alone) for the task's ``stage1_steps``, by :mod:`hybridvl.lit.pipeline` on the device every cell trains on. Measured
    after Stage I: against the teacher on the validation split (:func:`stage1_measures`) and by greedy exact match
    on the test split, with the teacher's own test scores and each task's chance beside."""
    from hybridvl.lit.evaluate import evaluate
    from hybridvl.lit.pipeline import STEPS, distill_student, train_teacher

    train, init = study.train_for(cell.task), cell.task.get("init")
    steps = cell.task.get("stage1_steps", STEPS["distill_layerwise"])
    layout = study.arm(cell.arm).layout
    teacher_root = out / "teachers" / f"seed{cell.seed}"
    teacher = teacher_root / "teacher"
    start = time.perf_counter()
    teacher_root.mkdir(parents=True, exist_ok=True)
    test = [{**DISTILL_SUITE, "split": "test", "size_per_task": train.test_size}]
    with FileLock(teacher_root / "teacher.lock"):  # the cells of a seed share its teacher: one trains and scores it
        if not (teacher / "config.json").is_file():
            L.seed_everything(cell.seed, verbose=False)
            train_teacher(teacher_root, train.pipeline_scale, cell.seed, accelerator="auto")
        teacher_per_task = _teacher_scores(teacher_root / TEACHER_SCORES, teacher, test)
    L.seed_everything(cell.seed, verbose=False)
    scale = steps / STEPS["distill_layerwise"]
    student, report = distill_student(
        teacher, out / "runs" / cell.id(study), layout, init, train.window, scale, "auto", "distill_layerwise"
    )
    per_task = evaluate(student, test)
    val = [{**DISTILL_SUITE, "split": "val", "size_per_task": train.val_size}]
    measures = stage1_measures(student, teacher, val)
    accuracy = statistics.fmean(per_task.values())
    return {
        "init": init,
        "stage1_steps": steps,
        "accuracy": accuracy,
        "per_task": per_task,
        "chance": {task.name: task.chance for task in SyntheticSuite(image_size=DISTILL_SUITE["image_size"]).tasks},
        "stage1": {**measures, "accuracy": accuracy},
        "teacher_accuracy": statistics.fmean(teacher_per_task.values()),
        "teacher_per_task": teacher_per_task,
        "transferred_tensors": len(report.transferred),
        "train_seconds": time.perf_counter() - start,
    }


TEACHER_SCORES = "test_scores.json"
"""Beside a seed's teacher: its exact match per task on the test sources it was scored on."""


def _teacher_scores(path: Path, teacher: Path, sources: list[dict[str, Any]]) -> dict[str, float]:
    """The teacher's test scores, computed by the first cell of its seed that asks for these sources and read
    back by the others (the caller holds the teacher's lock)."""
    from hybridvl.lit.evaluate import evaluate

    if path.is_file() and (saved := json.loads(path.read_text()))["sources"] == sources:
        return saved["per_task"]
    per_task = evaluate(teacher, sources)
    write_json(path, {"sources": sources, "per_task": per_task})
    return per_task


@torch.no_grad()
def stage1_measures(student_dir: Path, teacher_dir: Path, sources: list[dict[str, Any]]) -> dict[str, float]:
    """A Stage I student against its teacher on ``sources``, per token: ``layer_mse``, each layer's output given
    the teacher's input to that layer against the teacher layer's output, averaged over layers (Stage I's own
    objective, without its scale), and ``kl``, KL(teacher || student) of the next-token distributions at
    temperature 1 with the student running on its own hidden states."""
    from hybridvl.lit.datamodule import HybridDataModule
    from hybridvl.lit.losses import distillation_kl

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = HybridVLM.from_pretrained(teacher_dir, device_map=device)
    student = HybridVLM.from_pretrained(student_dir, device_map=device)
    data = HybridDataModule(processor=str(teacher_dir), val=sources, max_tokens=2048)
    data.setup("validate")
    mse, kl, tokens = 0.0, 0.0, 0
    for batch in data.val_dataloader():
        batch = batch.to(device)
        taught = teacher.decode(batch.input_ids, cu_seqlens=batch.cu_seqlens, output_hidden_states=True, **batch.vision)
        inputs, positions = taught.layer_inputs, taught.rope_position_ids
        errors = []
        for i, layer in enumerate(student.language_model.layers):
            stream, update, _ = layer(inputs[i], None, positions, taught.cu_seqlens)
            errors.append(F.mse_loss(residual_stream(stream, update).float(), inputs[i + 1].float()))
        run = student.decode(batch.input_ids, cu_seqlens=batch.cu_seqlens, **batch.vision)
        count = batch.num_tokens
        mse += float(torch.stack(errors).mean()) * count
        kl += float(distillation_kl(run.hidden, taught.hidden, student.lm_head, teacher.lm_head, 1.0)) * count
        tokens += count
    return {"layer_mse": mse / tokens, "kl": kl / tokens}
