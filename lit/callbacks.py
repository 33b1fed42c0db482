"""Callbacks for measuring training runs, and the checkpoint writer every stage uses."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from hybridvl.models.checkpoint import load_torch_checkpoint
from hybridvl.models.files import atomic_write, write_text

logger = logging.getLogger("hybridvl.train")
progress_logger = logging.getLogger("hybridvl.progress")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints that a kill or a full disk cannot damage.

    Lightning's own writer stages a checkpoint in ``$TMPDIR`` and moves it into place; across filesystems that
    move is a copy into the final file, and a kill during the copy leaves the previous ``last.ckpt`` truncated.
    This one writes to a temporary file beside the checkpoint, flushes it and renames it into place
    (:func:`hybridvl.models.files.atomic_write`), so the previous checkpoint stays whole until the new one is complete;
    a failed write raises :class:`hybridvl.models.files.WriteError` naming the checkpoint. Reading a damaged checkpoint
    raises :class:`hybridvl.models.checkpoint.CheckpointReadError` naming the file. Every
    :class:`hybridvl.lit.modules.HybridStage` installs it (:func:`use_atomic_checkpoints`).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_write(path, lambda temporary: torch.save(checkpoint, temporary))

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return load_torch_checkpoint(path, map_location=map_location, weights_only=weights_only)


def use_atomic_checkpoints(trainer: L.Trainer) -> None:
    """Give ``trainer`` an :class:`AtomicCheckpointIO` in place of Lightning's default writer; a writer of another
    kind (configured on purpose) is kept, with a warning that its writes may not be atomic."""
    io = trainer.strategy.checkpoint_io
    if type(io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    elif not isinstance(io, AtomicCheckpointIO):
        logger.warning(
            "checkpoints are written by %s, not AtomicCheckpointIO: a kill or a full disk during a write may "
            "damage the previous checkpoint",
            type(io).__name__,
        )


class StepTimer(L.Callback):
    """Time every training step and write throughput and memory to a JSON file when training ends.

    Each step is timed on the host after synchronising the device, so the time is the step's whole cost
    (forward, backward, optimiser, communication). Tokens are the packed batch's tokens summed over ranks.

    The file holds per-step seconds, global tokens, rank 0's loss and a digest of rank 0's samples' sources (so
    two runs can be checked to have trained on the same data step by step), tokens per second over the steps
    after ``warmup``, and every rank's peak allocated GPU memory. Add it from YAML::

        trainer:
          callbacks:
            - class_path: hybridvl.lit.callbacks.StepTimer
              init_args: {path: runs/stage1/steps.json, warmup: 2}

    Args:
        path: where rank 0 writes the JSON.
        warmup: first steps left out of the throughput (compilation, autotuning, allocator warm-up).
    """

    def __init__(self, path: str, warmup: int = 2) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be at least 0, got {warmup}")
        self.path = Path(path)
        self.warmup = warmup
        self.steps: list[dict[str, float]] = []
        self._start = 0.0

    def _synchronize(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._synchronize(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self._synchronize(pl_module)
        seconds = time.perf_counter() - self._start
        tokens = torch.tensor(float(batch.input_ids.numel()), device=pl_module.device)
        tokens = float(trainer.strategy.reduce(tokens, reduce_op="sum"))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append(
            {
                "step": trainer.global_step,
                "seconds": seconds,
                "tokens": tokens,
                "loss": None if loss is None else float(loss.detach()),
                "samples": _digest(sample.source for sample in getattr(batch, "samples", ())),
            }
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        peak = torch.cuda.max_memory_allocated(pl_module.device) if pl_module.device.type == "cuda" else 0
        peaks = trainer.strategy.all_gather(torch.tensor(float(peak), device=pl_module.device))
        timed = self.steps[self.warmup :]
        seconds = sum(step["seconds"] for step in timed)
        summary = {
            "world_size": trainer.world_size,
            "strategy": type(trainer.strategy).__name__,
            "precision": trainer.precision,
            "warmup_steps": self.warmup,
            "timed_steps": len(timed),
            "tokens_per_second": sum(step["tokens"] for step in timed) / seconds if seconds else None,
            "seconds_per_step": seconds / len(timed) if timed else None,
            "peak_gib_per_rank": [float(p) / 2**30 for p in peaks.reshape(-1)],
            "steps": self.steps,
        }
        if trainer.is_global_zero:
            write_text(self.path, json.dumps(summary, indent=2) + "\n")


def _digest(sources: Iterable[str]) -> str:
    """A short fingerprint of a batch's sample sources, in order."""
    return hashlib.sha1("\n".join(sources).encode()).hexdigest()[:16]


class StageProgress(L.Callback):
    """One log line at every ``every`` fraction of a stage's steps (and at least every ``interval`` seconds): the
    step of the total, the mean training loss since the previous line, time elapsed and time left.

    Unlike a progress bar it writes whole lines, so a log file or a CI console gets a few readable lines rather
    than thousands of carriage returns. ``hybridvl quickstart`` adds it to every stage; add it from YAML::

        trainer:
          callbacks:
            - class_path: hybridvl.lit.callbacks.StageProgress

    Lines go to the ``hybridvl.progress`` logger (the ``hybridvl`` command shows them), from rank 0 only.

    Args:
        name: the stage's name in each line (default: the name of the trainer's ``default_root_dir``).
        every: fraction of the steps between lines.
        interval: seconds after which a line is written even before the next fraction is reached.
    """

    def __init__(self, name: str | None = None, every: float = 0.1, interval: float = 60.0) -> None:
        if not 0 < every <= 1:
            raise ValueError(f"every must be in (0, 1], got {every}")
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.name = name
        self.every = every
        self.interval = interval
        self._start = self._last_time = 0.0
        self._first_step = self._next_mark = 0
        self._losses: list[float] = []

    def _total(self, trainer: L.Trainer) -> int | None:
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        return int(total) if total not in (None, float("inf")) else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self._last_time = time.perf_counter()
        self._first_step = trainer.global_step  # a resumed run measures its rate from where it resumed
        self._losses = []
        total = self._total(trainer)
        self._next_mark = trainer.global_step + max(1, round(total * self.every)) if total else 0
        if self.name is None:
            self.name = Path(trainer.default_root_dir).name or "train"
        if trainer.is_global_zero:
            progress_logger.info("%s: %s steps", self.name, total if total else "unknown number of")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(float(loss.detach()))
        step, now, total = trainer.global_step, time.perf_counter(), self._total(trainer)
        at_mark = bool(total) and (step >= self._next_mark or step >= total)
        if not (at_mark or now - self._last_time >= self.interval) or step == self._first_step:
            return
        if total and step >= self._next_mark:
            size = max(1, round(total * self.every))
            self._next_mark = (step // size + 1) * size
        self._last_time = now
        if trainer.is_global_zero:
            progress_logger.info(self.line(step, total, now - self._start))
        self._losses = []

    def line(self, step: int, total: int | None, elapsed: float) -> str:
        """``teacher: step 200/2000 (10%)  loss 2.3412  elapsed 0:01:05  left 0:09:45``."""
        parts = [f"{self.name}: step {step}/{total} ({step / total:.0%})" if total else f"{self.name}: step {step}"]
        if self._losses:
            parts.append(f"loss {sum(self._losses) / len(self._losses):.4f}")
        parts.append(f"elapsed {_clock(elapsed)}")
        done = step - self._first_step
        if total and done > 0:
            parts.append(f"left {_clock(elapsed / done * max(0, total - step))}")
        return "  ".join(parts)


def _clock(seconds: float) -> str:
    """``0:01:05`` for 65 seconds."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
