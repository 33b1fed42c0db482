"""The training stages as LightningModules.

========================  ===============================================================  =====================
stage                     loss                                                             trains by default
========================  ===============================================================  =====================
:class:`DistillLayerwise`  each student layer fed the teacher's input to that layer; MSE     the converted mixers
                           to the teacher layer's output, summed over distilled layers,
                           divided by the layer count, times ``mse_factor`` (1000)
:class:`DistillEndToEnd`   ``T**2 * KL(teacher || student)`` of token distributions at       the converted mixers
                           temperature ``T`` (2) over all tokens; optional CE and
                           final-hidden-state MSE terms
:class:`SFT`               next-token cross-entropy on assistant tokens                     mixers + SWA layers
:class:`LongSFT`           as SFT, through LoRA adapters (peft), gradient checkpointing     the LoRA adapters
========================  ===============================================================  =====================

Each stage starts from a model directory (a conversion or an earlier stage's export) or an earlier stage's
Lightning checkpoint, and exports its student as a model directory when the fit ends: also when a fit resumes from
a checkpoint of its last step, so an export that a kill cut short is redone by resuming.

Nothing a stage writes replaces what it was not asked to: the export folder may not be the stage's model,
teacher or tokenizer folder, and one that holds files another run wrote is refused unless ``overwrite``; a
resume (``--ckpt_path``) from a checkpoint another run wrote is refused unless ``resume_other_run``. Checkpoints
are written atomically (:class:`hybridvl.lit.callbacks.AtomicCheckpointIO`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import signal
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybridvl.lit import flops
from hybridvl.lit.callbacks import use_atomic_checkpoints
from hybridvl.lit.data.packing import pack
from hybridvl.lit.data.types import PackedBatch
from hybridvl.lit.losses import distillation_kl, next_token_cross_entropy, next_token_hits
from hybridvl.lit.metrics import ANLS, ExactMatch, RelaxedAccuracy, TokenAccuracy, VQAAccuracy
from hybridvl.lit.params import DISTILL_DEFAULT, SFT_DEFAULT, freeze_all_but, select_parameters
from hybridvl.mixers.modules import fused_part_names, with_part_names
from hybridvl.models.chat import load_processor
from hybridvl.models.checkpoint import check_weights, save_weights
from hybridvl.models.convert import copy_processor_files
from hybridvl.models.files import EXPORT_RECORD, check_output, write_json
from hybridvl.models.generation import generate
from hybridvl.models.hybrid import HybridVLM, checkpoint_selection, residual_stream
from hybridvl.models.loading import LORA_KEY, STAGE_CONFIG_KEY

logger = logging.getLogger("hybridvl.train")

RUN_KEY = "hybridvl_run"  # the checkpoint entry naming the run that wrote it (see HybridStage.run_record)


class ForeignCheckpointError(ValueError):
    """A resume from a checkpoint that another run wrote."""


class StageOptionError(ValueError):
    """A stage option (``model.init_args`` in a stage YAML) of the wrong type or out of its range."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive(name: str, value: Any) -> None:
    """Raise :class:`StageOptionError` unless ``value`` is a positive finite number."""
    if not (_is_number(value) and value > 0):
        raise StageOptionError(f"model: {name} must be a positive finite number, got {value!r}")


def _check_range(name: str, value: Any, low: float, high: float, high_open: bool = False) -> None:
    """Raise :class:`StageOptionError` unless ``value`` is a number in ``[low, high]`` (``[low, high)`` with
    ``high_open``)."""
    if not (_is_number(value) and low <= value and (value < high if high_open else value <= high)):
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}{')' if high_open else ']'}"
        raise StageOptionError(f"model: {name} must be a finite number {bounds}, got {value!r}")


def _check_count(name: str, value: Any, minimum: int) -> None:
    """Raise :class:`StageOptionError` unless ``value`` is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StageOptionError(f"model: {name} must be an integer >= {minimum}, got {value!r}")


def _check_model_path(name: str, path: Any) -> None:
    """Raise :class:`StageOptionError` if ``path`` names a file that is no stage checkpoint (``.ckpt``): a model is a
    directory, a stage's ``.ckpt`` or a hub id in the local cache (a missing one is named when it loads)."""
    if not isinstance(path, str | Path) or not str(path):
        raise StageOptionError(f"model: {name} must be the path of a model directory or a stage's .ckpt, got {path!r}")
    if Path(path).is_file() and Path(path).suffix != ".ckpt":
        raise StageOptionError(
            f"model: {name} {str(path)!r} is a file, not a model directory or a stage's .ckpt checkpoint; give the "
            "folder that holds config.json and the weights"
        )


GENERATION_METRICS = {"exact_match": ExactMatch, "vqa_accuracy": VQAAccuracy, "anls": ANLS, "relaxed": RelaxedAccuracy}


def warmup_cosine(step: int, total: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """The learning-rate factor at ``step`` (from 0) of ``total``: a linear warm-up over ``warmup_ratio`` of the
    steps (at least one), then a cosine decay to ``min_lr_ratio``."""
    warmup = max(1, round(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def decays(parameter: nn.Parameter) -> bool:
    """Whether AdamW decays ``parameter``: matrices do; biases, norms and decay rates (``_no_weight_decay``) not."""
    return parameter.ndim >= 2 and not getattr(parameter, "_no_weight_decay", False)


def _describe_run(record: dict[str, str | None]) -> str:
    return (
        f"stage {record.get('stage')}, root folder {record.get('root')}, model {record.get('model')}, "
        f"export_dir {record.get('export_dir')}"
    )


def _export_record(directory: Path) -> dict[str, Any]:
    """The export record in ``directory`` (``{}`` if there is none or it cannot be read)."""
    try:
        return json.loads((directory / EXPORT_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block a SIGTERM raises :class:`SIGTERMException` where the process is, so that a file being
    written is removed and the stage reports that it stopped, instead of the process ending at once."""
    if threading.current_thread() is not threading.main_thread():
        logger.info("not the main thread: a SIGTERM during the export ends the process at once")
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SIGTERMException

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def compile_blocks(model: HybridVLM) -> None:
    """Compile ``model``'s decoder layers and vision blocks in place (``nn.Module.compile``; names unchanged), one
    block at a time as torchtitan does: blocks of one kind share their compiled code, and activation checkpointing
    and FSDP wrap them as before."""
    blocks = list(model.language_model.layers)
    if model.visual is not None:
        blocks += list(model.visual.blocks)
    for block in blocks:
        block.compile()
    logger.info("compiled %d blocks with torch.compile", len(blocks))


class HybridStage(L.LightningModule):
    """Behaviour every stage shares: the student, which parameters train, AdamW with warm-up and cosine decay,
    validation (loss, token accuracy and generation-based accuracy per task), export.

    Args:
        model: the student: a model directory or an earlier stage's ``.ckpt``.
        trainable: parameter patterns that train (see :mod:`hybridvl.lit.params`); default per stage.
        learning_rate: peak learning rate of the default optimizer.
        vision_learning_rate: peak learning rate of the vision tower's parameters (``visual.*``: patch embedding,
            blocks and merger), which then form groups of their own, given to an ``optimizer`` too as their
            ``lr``; the schedule scales every group alike. ``None``: the vision tower trains at the rate of the
            rest. A tower trained from scratch under a language model may need another rate than the model's (the
            tiny teacher's learns best at a tenth of it: ``experiments/tiny/teacher.yaml``).
        weight_decay: weight decay of the default optimizer (never on biases, norms, decays).
        warmup_ratio: share of the steps the default schedule spends warming up linearly.
        min_lr_ratio: the default schedule's cosine decays to ``learning_rate * min_lr_ratio``.
        optimizer: builds the optimizer from two parameter groups, the matrices and the rest (the rest with
            ``weight_decay: 0``), and with ``vision_learning_rate`` the vision tower's two apart; in YAML a
            ``class_path`` with ``init_args`` (``torch.optim.SGD``, ``lr: 0.01``). Default: AdamW at
            ``learning_rate`` with betas (0.9, 0.95) and ``weight_decay`` on the matrices.
        lr_scheduler: builds the learning-rate schedule (stepped every optimizer step) from the optimizer; in YAML
            a ``class_path``. Default: linear warm-up over ``warmup_ratio``, then cosine decay to
            ``min_lr_ratio``.
        gradient_checkpointing: what the backward pass recomputes instead of storing
            (:func:`~hybridvl.models.hybrid.checkpoint_selection`): ``false`` nothing, ``true`` (or ``"layers"``)
            every whole decoder layer, or parts, comma-separated: ``"mlp"`` and mixer letters (``"mlp,S"``:
            the MLPs and the sliding-window layers' mixers; the other activations stay stored).
        compile: compile each decoder layer and each vision block with ``torch.compile`` (in place, as
            ``nn.Module.compile``: parameter names and checkpoints stay as they are), which fuses their elementwise
            work (norms, residuals, rotary, activations); fla's and flash-attn's kernels run as they are between
            the compiled parts. The first steps of each new batch shape take longer while they compile.
        loss_chunk_size: tokens per chunk of the LM-head losses (their ``torch`` backend).
        loss_backend: how the LM-head losses run (:mod:`hybridvl.lit.losses`): ``"auto"`` (fla's fused kernels
            on CUDA, chunks of PyTorch elsewhere), ``"fla"`` or ``"torch"``.
        tokenizer_dir: directory with the tokenizer and processor files, to decode generated answers and to
            copy next to the export (default: ``model`` when it is a directory).
        generation_max_new_tokens: answer length for generation-based validation (0 turns it off).
        export_dir: where the trained student is written at the end of training (default
            ``<log dir>/model``). It may not be ``model``, ``teacher`` or ``tokenizer_dir``.
        overwrite: export into a folder that holds files another run wrote (its model files are replaced). An
            export of an earlier attempt of this same run (same stage, model, export folder and root folder) is
            replaced without it.
        resume_other_run: resume (``--ckpt_path``) from a checkpoint that another run wrote (another stage, model,
            export folder or root folder); without it such a resume is refused, naming both.

    Raises:
        StageOptionError: an option of the wrong type or out of its range, a ``model`` that is a file but no
            ``.ckpt``; a distillation teacher whose sizes do not fit the student's, when the models load.
    """

    default_trainable: ClassVar[tuple[str, ...]] = SFT_DEFAULT
    flops_per_batch: int | None = None
    """FLOPs of the batch being trained (:meth:`batch_flops`, set by :meth:`training_step`), which Lightning's
    throughput monitor reads after each step and logs as FLOP/s and, on GPUs whose peak it knows, MFU."""
    student_shape: flops.ModelShape | None = None
    """The student's sizes for counting FLOPs, read in :meth:`configure_model` before a strategy shards them."""

    def __init__(
        self,
        model: str,
        trainable: list[str] | None = None,
        learning_rate: float = 2e-4,
        vision_learning_rate: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.01,
        min_lr_ratio: float = 0.0,
        gradient_checkpointing: bool | str = False,
        compile: bool = False,
        loss_chunk_size: int = 4096,
        loss_backend: Literal["auto", "fla", "torch"] = "auto",
        tokenizer_dir: str | None = None,
        generation_max_new_tokens: int = 16,
        export_dir: str | None = None,
        overwrite: bool = False,
        resume_other_run: bool = False,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        _check_model_path("model", model)
        if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
            raise StageOptionError(f"model: tokenizer_dir {tokenizer_dir!r} is not an existing folder")
        if trainable is not None and (isinstance(trainable, str) or not trainable):
            raise StageOptionError(
                f"model: trainable must be a non-empty list of patterns, e.g. ['mixers:new'], got {trainable!r}; "
                "leave it out for the stage's default"
            )
        _check_positive("learning_rate", learning_rate)
        if vision_learning_rate is not None:  # 0 keeps the vision tower as it is
            _check_range("vision_learning_rate", vision_learning_rate, 0, math.inf)
        _check_range("weight_decay", weight_decay, 0, math.inf)
        _check_range("warmup_ratio", warmup_ratio, 0, 1)
        _check_range("min_lr_ratio", min_lr_ratio, 0, 1)
        if not isinstance(compile, bool):
            raise StageOptionError(f"model: compile must be true or false, got {compile!r}")
        _check_count("loss_chunk_size", loss_chunk_size, 1)
        _check_count("generation_max_new_tokens", generation_max_new_tokens, 0)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])  # the run's config.yaml records them
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.student: HybridVLM | None = None
        self.token_accuracy = TokenAccuracy()
        self.task_metrics = nn.ModuleDict()
        self._processor = None
        self.exported_to: Path | None = None  # set once this fit has exported the student

    # --- model --------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Checkpoints written atomically; and before a fit trains, the check of its export folder that the export
        makes (see :meth:`export`), so that a bad folder fails now rather than after training."""
        use_atomic_checkpoints(self.trainer)
        if stage == "fit":
            self._check_export(self.export_directory())

    def configure_model(self) -> None:
        if self.student is not None:
            return
        self.student = HybridVLM.from_pretrained(self.hparams.model).train()
        checkpoint_selection(self.hparams.gradient_checkpointing, self.student.config.kinds)  # a bad part fails here
        self.student.language_model.gradient_checkpointing = self.hparams.gradient_checkpointing
        for parameter in self.student.parameters():  # decided on whole shapes: FSDP later flattens them into shards
            parameter._weight_decay = decays(parameter)
        self._select_trainable()
        self.student_shape = flops.model_shape(self.student)
        if self.hparams.compile:
            compile_blocks(self.student)

    def _select_trainable(self) -> None:
        patterns = self.hparams.trainable or list(self.default_trainable)
        names = select_parameters(self.student, patterns)
        count = freeze_all_but(self.student, names)
        total = sum(p.numel() for p in self.student.parameters())
        logger.info(
            "training %s of %s parameters (%.1f%%), patterns %s",
            f"{count:,}",
            f"{total:,}",
            100 * count / total,
            patterns,
        )

    @property
    def processor(self) -> Any:
        if self._processor is None:
            source = self.hparams.tokenizer_dir or self.hparams.model
            if Path(source).suffix == ".ckpt":
                raise ValueError("generation-based validation needs `tokenizer_dir`: a directory with the tokenizer")
            self._processor = load_processor(source)
        return self._processor

    # --- optimisation -------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict:
        # the matrices and the rest (no weight decay); with a vision rate, the vision tower's two groups apart
        vision_lr = self.hparams.get("vision_learning_rate")
        params: dict[tuple[bool, bool], list[torch.nn.Parameter]] = defaultdict(list)  # (vision, decayed) -> params
        for name, parameter in self.student.named_parameters():
            if parameter.requires_grad:
                vision = vision_lr is not None and name.startswith("visual.")
                params[vision, getattr(parameter, "_weight_decay", decays(parameter))].append(parameter)
        default = self.optimizer_factory is None
        decayed = {"weight_decay": self.hparams.weight_decay} if default else {}
        groups = [{"params": params[False, True], **decayed}, {"params": params[False, False], "weight_decay": 0.0}]
        groups += [
            group
            for group in (
                {"params": params[True, True], "lr": vision_lr, **decayed},
                {"params": params[True, False], "lr": vision_lr, "weight_decay": 0.0},
            )
            if group["params"]
        ]
        if default:
            optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
        else:
            optimizer = self.optimizer_factory(groups)
        if self.lr_scheduler_factory is None:
            total, warmup, floor = self._schedule_length(), self.hparams.warmup_ratio, self.hparams.min_lr_ratio
            factor = functools.partial(warmup_cosine, total=total, warmup_ratio=warmup, min_lr_ratio=floor)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        else:
            scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_length(self) -> int:
        """Optimizer steps the run will take (``Trainer.estimated_stepping_batches``'s rule).

        The trainer's own estimate builds its training loader as soon as it is asked, which happens here, before
        a checkpoint's data position is restored: a resumed run would start the epoch over. So the batches are
        counted on a loader of our own from the DataModule.
        """
        trainer = self.trainer
        by_steps = trainer.max_steps if trainer.max_steps != -1 else math.inf
        if trainer.max_epochs in (None, -1) or trainer.datamodule is None:
            return max(1, int(min(by_steps, trainer.estimated_stepping_batches)))
        batches = len(trainer.datamodule.train_dataloader())
        limit = trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        by_epochs = math.ceil(batches / trainer.accumulate_grad_batches) * trainer.max_epochs
        return max(1, int(min(by_steps, by_epochs)))

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as the trainer is configured; under FSDP through FSDP's own ``clip_grad_norm_``, which takes the
        norm over every rank's shard (Lightning's FSDP precision plugin refuses to clip by norm)."""
        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(
                    f"gradient_clip_algorithm={gradient_clip_algorithm!r} is not supported with FSDP: use 'norm'"
                )
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # --- steps --------------------------------------------------------------------------------------

    def compute_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stage's loss and the parts to log."""
        raise NotImplementedError

    def batch_flops(self, batch: PackedBatch) -> float:
        """Model FLOPs of a training step on ``batch`` (see :mod:`hybridvl.lit.flops`): fine-tuning's by default."""
        return flops.fine_tuning_flops(self.student_shape, batch)

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        self.flops_per_batch = int(self.batch_flops(batch))
        loss, parts = self.compute_loss(batch)
        size = len(batch.samples)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=size)
        self.log("train/tokens", float(batch.num_tokens), batch_size=size, reduce_fx="sum")
        return loss

    def validation_step(self, batch: PackedBatch, batch_idx: int) -> None:
        run = self.student.decode(batch.input_ids, cu_seqlens=batch.cu_seqlens, **batch.vision)
        loss_sum, count = next_token_cross_entropy(  # no gradients: PyTorch's chunks (fla's kernels form them)
            run.hidden, self.student.lm_head, batch.labels, self.hparams.loss_chunk_size, backend="torch"
        )
        self.log("val/loss", loss_sum / count.clamp_min(1), prog_bar=True, batch_size=len(batch.samples))
        self.token_accuracy.update(*next_token_hits(run.hidden, self.student.lm_head, batch.labels))
        if self.hparams.generation_max_new_tokens > 0:
            self._validate_generation(batch)

    def _validate_generation(self, batch: PackedBatch) -> None:
        samples = [s for s in batch.samples if s.answer is not None]
        if not samples:
            return
        answers = self.generate_answers(samples)
        by_task: dict[str, list[int]] = defaultdict(list)
        for i, sample in enumerate(samples):
            by_task[sample.task].append(i)
        for task, indices in by_task.items():
            metrics = self._metrics_for(task)
            predictions, references = [answers[i] for i in indices], [samples[i].answer for i in indices]
            for metric in metrics.values():
                metric.update(predictions, references)

    def _metrics_for(self, task: str) -> nn.ModuleDict:
        if task not in self.task_metrics:
            self.task_metrics[task] = nn.ModuleDict({name: cls() for name, cls in GENERATION_METRICS.items()}).to(
                self.device
            )
        return self.task_metrics[task]

    @torch.no_grad()
    def generate_answers(self, samples: list) -> list[str]:
        """Greedy answers to each sample's prompt (its tokens up to the last assistant reply)."""
        prompts = [s.input_ids[: s.prompt_length] for s in samples]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.student.config.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
        vision = {k: v.to(self.device) for k, v in pack(samples).vision.items()}
        tokens = generate(
            self.student,
            ids.to(self.device),
            attention_mask=mask.to(self.device),
            **vision,
            max_new_tokens=self.hparams.generation_max_new_tokens,
        )
        return [text.strip() for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]

    def on_validation_epoch_end(self) -> None:
        if self.token_accuracy.update_count:
            self.log("val/token_accuracy", self.token_accuracy.compute())
        self.token_accuracy.reset()
        accuracies = []
        for task, metrics in self.task_metrics.items():
            for name, metric in metrics.items():
                if metric.update_count:
                    value = metric.compute()
                    self.log(f"val/{task}/{name}", value)
                    if name == "exact_match":
                        accuracies.append(value)
                metric.reset()
        if accuracies:
            self.log("val/accuracy", torch.stack(accuracies).mean(), prog_bar=True)

    # --- checkpoints and export ---------------------------------------------------------------------

    def run_record(self) -> dict[str, str | None]:
        """What identifies this run: the stage class, its model, its export folder and the trainer's root folder
        (absolute paths). Checkpoints and exports carry it, so that a resume or an export can tell this run's files
        from another's."""

        def absolute(path: str | Path | None) -> str | None:
            return None if path is None else str(Path(path).resolve())

        root = None if self._trainer is None else self._trainer.default_root_dir
        return {
            "stage": f"{type(self).__module__}.{type(self).__qualname__}",
            "model": absolute(self.hparams.model),
            "export_dir": absolute(self.hparams.export_dir),
            "root": absolute(root),
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self.student.config.check_mixer_modules()
        checkpoint["state_dict"] = with_part_names(self, checkpoint["state_dict"])  # FSDP gathers fused names
        checkpoint[STAGE_CONFIG_KEY] = self.student.config.to_diff_dict()
        checkpoint[RUN_KEY] = self.run_record()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse to resume a fit from a checkpoint another run wrote, unless ``resume_other_run``."""
        if self._trainer is None or self.trainer.state.fn != TrainerFn.FITTING:  # loading outside a fit
            return
        path, recorded, current = self.trainer.ckpt_path, checkpoint.get(RUN_KEY), self.run_record()
        if recorded is None:
            logger.warning(
                "the checkpoint %s records no run (written before stages recorded theirs); resuming from it without "
                "checking that this run wrote it",
                path,
            )
        elif recorded != current and self.hparams.resume_other_run:
            logger.warning("resuming from %s, which another run wrote (%s)", path, _describe_run(recorded))
        elif recorded != current:
            raise ForeignCheckpointError(
                f"the checkpoint {path} was written by another run ({_describe_run(recorded)}), not by this one "
                f"({_describe_run(current)}); resuming would continue that run's weights under this run's settings "
                "and export them here. Resume that run with its own config, or set resume_other_run: true "
                "(--model.init_args.resume_other_run true) to resume from it anyway"
            )

    def export_directory(self) -> Path:
        """``export_dir``, or ``<log dir>/model`` (every rank must ask: under DDP the log dir is a collective)."""
        if self.hparams.export_dir:
            return Path(self.hparams.export_dir)
        return Path(self.trainer.log_dir or self.trainer.default_root_dir) / "model"

    def on_fit_end(self) -> None:
        """Export the student. This runs at the end of every fit, also one resumed from a checkpoint of its last
        step (whose loop trains nothing), so an export cut short is redone by resuming. A SIGTERM received during
        training stops the stage here, without exporting; one received during the export ends it at once, the
        file being written removed; both raise :class:`SIGTERMException`."""
        if self.trainer.received_sigterm:
            raise SIGTERMException
        directory = self.export_directory()
        with _sigterm_raises():
            if isinstance(self.trainer.strategy, FSDPStrategy):
                state = self.trainer.strategy.lightning_module_state_dict()  # every rank: gathers shards on rank 0
                state = with_part_names(self, state)  # FSDP gathers fused projections under their fused names
                if self.trainer.is_global_zero:
                    weights = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
                    self.export(directory, weights)
            elif self.trainer.is_global_zero:
                self.export(directory)
        self.exported_to = directory

    def export(self, directory: str | Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the student as a model directory, with the processor files next to the source model.

        ``weights``: the student's full state dict, where this process holds only shards of it (FSDP); they
        are checked against the student's config and written without building a second model.

        ``directory`` gets an ``export_record.json`` naming this run (:meth:`run_record`), marked complete once
        everything else is written.

        Raises:
            hybridvl.models.files.OutputIsInputError: ``directory`` is the stage's model, teacher or tokenizer folder.
            hybridvl.models.files.OutputExistsError: ``directory`` holds files another run wrote and ``overwrite`` is
            false.
        """
        directory = Path(directory)
        self._check_export(directory)
        write_json(directory / EXPORT_RECORD, {"run": self.run_record(), "complete": False})
        if weights is None:
            self.exportable_student().save_pretrained(directory, overwrite=True)
        else:
            with torch.device("meta"):
                shapes = HybridVLM(self.student.config)
            checked = check_weights(shapes, weights, "the gathered state")
            save_weights(self.student.config, checked, directory, overwrite=True)
        source = self.hparams.tokenizer_dir or self.hparams.model
        if Path(source).is_dir():
            copy_processor_files(source, directory)
        write_json(directory / EXPORT_RECORD, {"run": self.run_record(), "complete": True})
        logger.info("exported the student to %s", directory)
        return directory

    def _check_export(self, directory: Path) -> None:
        """Refuse an export folder that is an input, or that holds files another run wrote (unless ``overwrite``);
        an earlier attempt of this run's export is replaced (logged)."""
        inputs = [self.hparams.model, self.hparams.tokenizer_dir, self.hparams.get("teacher")]
        earlier = _export_record(directory).get("run") == self.run_record()
        check_output(
            directory,
            inputs=inputs,
            overwrite=self.hparams.overwrite or earlier,
            what="export",
            overwrite_hint="set the stage's overwrite: true (--model.init_args.overwrite true)",
        )
        if earlier:
            logger.info("the export folder %s holds an earlier export of this run, which will be replaced", directory)

    def exportable_student(self) -> HybridVLM:
        return self.student


class SFT(HybridStage):
    """Supervised fine-tuning: next-token loss on assistant tokens. Trains the new mixers and the SWA layers."""

    def compute_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        run = self.student.decode(batch.input_ids, cu_seqlens=batch.cu_seqlens, **batch.vision)
        loss_sum, count = next_token_cross_entropy(
            run.hidden, self.student.lm_head, batch.labels, self.hparams.loss_chunk_size, self.hparams.loss_backend
        )
        return loss_sum / count.clamp_min(1), {}


DEFAULT_LORA_TARGETS = ("qkv_proj", "in_proj", "o_proj", "gate_up_proj", "down_proj")  # LongSFT's, every layout


def _check_lora_targets(model: nn.Module, targets: list[str]) -> None:
    """Raise if a LoRA target names a part of fused projections (peft adapts whole modules), if one names no
    module and is none of the default targets (a typo), or if none names a module. A default target that this
    layout lacks (``in_proj`` without ``D``/``M`` layers) is logged, so one target list serves every layout."""
    modules = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    fused = {}
    for part, parameter in fused_part_names(model).items():
        fused.setdefault(part.split(".")[-2], set()).add(parameter.split(".")[-2])
    parts = [target for target in targets if target not in modules and target in fused]
    if parts:
        named = ", ".join(f"{part} (in {' / '.join(sorted(fused[part]))})" for part in parts)
        raise ValueError(
            f"the LoRA targets {named} are parts of fused projections, which take one adapter for all their parts: "
            "target the fused modules instead (e.g. qkv_proj, in_proj, gate_up_proj)"
        )
    absent = [target for target in targets if target not in modules]
    unknown = [target for target in absent if target not in DEFAULT_LORA_TARGETS]
    if unknown or len(absent) == len(targets):
        linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        projections = sorted(name for name in linear if not name.isdigit())  # not the items of a Sequential
        raise ValueError(
            f"the LoRA targets {', '.join(unknown or absent)} name no module of a model with layout "
            f"{model.config.layout!r}; its projections are {', '.join(projections)}"
        )
    if absent:  # projections of mixer kinds this layout does not use (in_proj in an all-attention model)
        logger.info(
            "LoRA targets %s name no module of layout %r; adapters go on %s",
            ", ".join(absent),
            model.config.layout,
            ", ".join(target for target in targets if target not in absent),
        )


def _teacher_keys_may_be_missing(module: nn.Module, incompatible_keys: Any) -> None:
    """Load post-hook: checkpoints leave the frozen teacher out (it loads from its own directory), so its keys
    are not missing; every other key still loads strictly. Names may carry FSDP's wrapper prefixes."""
    incompatible_keys.missing_keys[:] = [
        key
        for key in incompatible_keys.missing_keys
        if not key.replace("_fsdp_wrapped_module.", "").startswith("teacher.")
    ]


class _Distillation(HybridStage):
    """A stage with a frozen teacher. The teacher is not part of checkpoints: it is loaded from ``teacher``."""

    default_trainable = DISTILL_DEFAULT

    def __init__(self, model: str, teacher: str, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        _check_model_path("teacher", teacher)
        self.teacher: HybridVLM | None = None
        self.teacher_shape: flops.ModelShape | None = None
        self.register_load_state_dict_post_hook(_teacher_keys_may_be_missing)

    def configure_model(self) -> None:
        super().configure_model()
        if self.teacher is None:
            self.teacher = HybridVLM.from_pretrained(self.hparams.teacher).requires_grad_(False)
            self.teacher_shape = flops.model_shape(self.teacher)
            self.check_teacher()

    def check_teacher(self) -> None:
        """Raise :class:`StageOptionError` if the teacher's sizes do not fit the student's: the token distributions
        the stages compare need one vocabulary."""
        self._check_teacher_sizes("vocab_size")

    def _check_teacher_sizes(self, *names: str) -> None:
        student, teacher = self.student.config, self.teacher.config
        for name in names:
            if getattr(student, name) != getattr(teacher, name):
                raise StageOptionError(
                    f"model: the teacher {self.hparams.teacher} has {name} {getattr(teacher, name)} but the student "
                    f"{self.hparams.model} has {getattr(student, name)}; {type(self).__name__} needs the teacher the "
                    "student was converted from"
                )

    def train(self, mode: bool = True) -> _Distillation:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")}

    def teacher_pass(self, batch: PackedBatch, output_hidden_states: bool = False):
        with torch.no_grad():
            return self.teacher.decode(
                batch.input_ids, cu_seqlens=batch.cu_seqlens, output_hidden_states=output_hidden_states, **batch.vision
            )


class DistillLayerwise(_Distillation):
    """Stage I, layer-wise: every distilled student layer gets the teacher's input to that layer and matches the
    teacher layer's output (after MLP and residual) by MSE; layers are independent (teacher-forced).

    Args:
        model: the converted student.
        teacher: the teacher's directory (Qwen2.5-VL, hybridvl or InfiniteVL).
        mse_factor: the loss scale (1000 in InfiniteVL).
        **kwargs: as :class:`HybridStage`.

    The loss sums the MSE of the layers with trainable parameters and divides by the number of all layers:
    the layers left as they were (attention the student shares with the teacher) reproduce the teacher exactly,
    so this equals the mean over every layer.
    """

    def __init__(self, model: str, teacher: str, mse_factor: float = 1000.0, **kwargs: Any) -> None:
        super().__init__(model, teacher, **kwargs)
        _check_positive("mse_factor", mse_factor)

    def check_teacher(self) -> None:
        """Each student layer matches a teacher layer's output: the teacher needs the student's width and depth."""
        self._check_teacher_sizes("vocab_size", "hidden_size", "num_hidden_layers")

    def batch_flops(self, batch: PackedBatch) -> float:
        return flops.layerwise_distillation_flops(self.student_shape, self.teacher_shape, batch)

    def compute_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        taught = self.teacher_pass(batch, output_hidden_states=True)
        inputs = taught.layer_inputs
        layers = self.student.language_model.layers
        recompute = checkpoint_selection(self.hparams.gradient_checkpointing, self.student.config.kinds)
        losses = {}
        for index, layer in enumerate(layers):
            if not any(p.requires_grad for p in layer.parameters()):
                continue
            args = (inputs[index], None, taught.rope_position_ids, taught.cu_seqlens)
            if "layers" in recompute:
                stream, update, _ = checkpoint(layer, *args, use_reentrant=False)
            else:
                stream, update, _ = layer(*args, recompute)
            output = residual_stream(stream, update)  # the layer's last add is left to the next norm
            losses[f"mse/layer{index}"] = F.mse_loss(output.float(), inputs[index + 1].float())
        if not losses:
            raise ValueError("no decoder layer has trainable parameters: nothing to distill")
        loss = torch.stack(list(losses.values())).sum() / len(layers) * self.hparams.mse_factor
        return loss, losses


class DistillEndToEnd(_Distillation):
    """Stage I, end to end: KL divergence between teacher and student token distributions at temperature
    ``T``, times ``T**2``, over all tokens; optionally plus a cross-entropy term on assistant tokens and an MSE
    term on the final hidden states.

    Args:
        model: the student (normally the layer-wise stage's export).
        teacher: the teacher's directory.
        temperature: softening temperature (2 in InfiniteVL).
        ce_weight: weight of the next-token cross-entropy on labelled tokens.
        hidden_weight: weight of the MSE between final hidden states.
        **kwargs: as :class:`HybridStage`.
    """

    def __init__(
        self,
        model: str,
        teacher: str,
        temperature: float = 2.0,
        ce_weight: float = 0.0,
        hidden_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, teacher, **kwargs)
        _check_positive("temperature", temperature)
        _check_range("ce_weight", ce_weight, 0, math.inf)
        _check_range("hidden_weight", hidden_weight, 0, math.inf)

    def check_teacher(self) -> None:
        """One vocabulary, and with ``hidden_weight`` one width of the final hidden states."""
        self._check_teacher_sizes("vocab_size", *(["hidden_size"] if self.hparams.hidden_weight else []))

    def batch_flops(self, batch: PackedBatch) -> float:
        return flops.end_to_end_distillation_flops(self.student_shape, self.teacher_shape, batch)

    def compute_loss(self, batch: PackedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        taught = self.teacher_pass(batch)
        run = self.student.decode(batch.input_ids, cu_seqlens=batch.cu_seqlens, **batch.vision)
        parts = {
            "kl": distillation_kl(
                run.hidden,
                taught.hidden,
                self.student.lm_head,
                self.teacher.lm_head,
                self.hparams.temperature,
                self.hparams.loss_chunk_size,
                self.hparams.loss_backend,
            )
        }
        loss = parts["kl"]
        if self.hparams.ce_weight:
            loss_sum, count = next_token_cross_entropy(
                run.hidden, self.student.lm_head, batch.labels, self.hparams.loss_chunk_size, self.hparams.loss_backend
            )
            parts["ce"] = loss_sum / count.clamp_min(1)
            loss = loss + self.hparams.ce_weight * parts["ce"]
        if self.hparams.hidden_weight:
            parts["hidden_mse"] = F.mse_loss(run.hidden.float(), taught.hidden.float())
            loss = loss + self.hparams.hidden_weight * parts["hidden_mse"]
        return loss, parts


class LongSFT(SFT):
    """Stage III: long-sequence SFT through LoRA adapters (peft) with gradient checkpointing.

    Args:
        model: the student (normally the SFT stage's export).
        lora_rank, lora_alpha, lora_dropout: LoRA's shape (InfiniteVL published no rank).
        lora_targets: module names that get adapters (projections of mixers and MLPs). Fused input projections
            (``qkv_proj``, ``in_proj``, ``gate_up_proj``) take one adapter for all their parts; naming a part
            (``q_proj``, ``gate_proj``, ...) of one raises, and so does a name of no module. Default
            ``DEFAULT_LORA_TARGETS``, of which those the layout lacks are logged and left out.
        **kwargs: as :class:`HybridStage` (``trainable`` selects extra fully-trained parameters; default none).

    The export merges the adapters into the weights.
    """

    default_trainable = ()

    def __init__(
        self,
        model: str,
        lora_rank: int = 64,
        lora_alpha: float = 128.0,
        lora_dropout: float = 0.0,
        lora_targets: list[str] | None = None,
        gradient_checkpointing: bool | str = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, gradient_checkpointing=gradient_checkpointing, **kwargs)
        _check_count("lora_rank", lora_rank, 1)
        _check_positive("lora_alpha", lora_alpha)
        _check_range("lora_dropout", lora_dropout, 0, 1, high_open=True)
        if lora_targets is not None and (isinstance(lora_targets, str) or not lora_targets):
            raise StageOptionError(
                f"model: lora_targets must be a non-empty list of module names, e.g. [qkv_proj, in_proj], got "
                f"{lora_targets!r}; leave it out for the default"
            )
        self.lora = None

    def configure_model(self) -> None:
        if self.student is not None:
            return
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        if self._trainer is not None and isinstance(self._trainer.strategy, FSDPStrategy):
            raise ValueError(
                "LongSFT trains LoRA adapters, whose export merges them into a whole model: use strategy 'ddp' "
                "(experiments/infinitevl/long_sft.yaml), not FSDP"
            )
        super().configure_model()
        targets = self.hparams.lora_targets or list(DEFAULT_LORA_TARGETS)
        _check_lora_targets(self.student, targets)
        config = LoraConfig(
            r=self.hparams.lora_rank,
            lora_alpha=self.hparams.lora_alpha,
            lora_dropout=self.hparams.lora_dropout,
            target_modules=targets,
        )
        extra = {n for n, p in self.student.named_parameters() if p.requires_grad}
        self.lora = LoraModel(self.student, config, "default")  # freezes everything but the adapters
        for name, parameter in self.student.named_parameters():
            if name in extra:
                parameter.requires_grad_(True)
        self.student_shape = flops.model_shape(self.student)  # with the adapters
        adapters = sum(p.numel() for n, p in self.student.named_parameters() if "lora_" in n)
        logger.info("LoRA rank %d on %s: %s adapter parameters", self.hparams.lora_rank, targets, f"{adapters:,}")

    def _select_trainable(self) -> None:
        patterns = self.hparams.trainable or []
        freeze_all_but(self.student, select_parameters(self.student, patterns) if patterns else [])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[LORA_KEY] = True

    def exportable_student(self) -> HybridVLM:
        return self.lora.merge_and_unload()
