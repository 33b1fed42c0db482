"""Training and measuring one MQAR cell, fast: the whole training step (batch gather, learning rate, forward,
backward, optimizer) captured as one CUDA graph, no host synchronisation between evaluations, logits only where
a value is asked.

A 2-layer model of width 128 does well under a millisecond of arithmetic a step, so a step run through the
Lightning loop (a Python-driven step, a device synchronisation for its timer, logits over every position of the
vocabulary) spends most of its time waiting. Here every batch is gathered on the device from the training set
held there, the learning-rate schedule is a device tensor indexed by a step counter the graph itself advances,
and the loss is taken at the ``kv`` query positions of each sequence (the only positions MQAR labels, so the
loss is the one Zoology trains on). On the CPU, and with ``cuda_graphs: false``, the same step runs eagerly. With
``compile: true`` the step's forward and loss go through ``torch.compile`` first (:func:`query_loss`).

Sets: the training set is drawn with the cell's seed; the validation set (learning-rate choice, learning curve,
early stop) and the test set (the reported accuracy) are the same for every cell of a task, each drawn with its
own fixed seed, so arms are compared on identical questions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hybridvl.lit.ablation.schema import Task, TrainSettings
from hybridvl.lit.data.mqar import MQARDataset
from hybridvl.lit.modules import decays, warmup_cosine
from hybridvl.models.hybrid import HybridVLM

logger = logging.getLogger("hybridvl.ablation")

VAL_SEED = 1_000_003
TEST_SEED = 2_000_003
"""Seeds of every cell's validation and test sets (training sets use the cell's seed)."""
GRAPH_WARMUP_STEPS = 3
"""Eager training steps before the step is captured (autotuning, optimizer state, allocator warm-up)."""
CHECKPOINT = "checkpoint.pt"


@dataclasses.dataclass
class QuerySet:
    """An MQAR set on a device: tokens ``[N, T]``, query positions, the values asked and query-to-key distances
    ``[N, kv]``."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    distances: torch.Tensor

    @classmethod
    def from_dataset(cls, data: MQARDataset, device: torch.device | str) -> QuerySet:
        def tensor(array: Any) -> torch.Tensor:
            return torch.as_tensor(array.astype("int64"), device=device)

        return cls(tensor(data.input_ids), tensor(data.query_positions), tensor(data.targets), tensor(data.distances))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def mqar_sets(task: Task, train: TrainSettings, seed: int) -> dict[str, MQARDataset]:
    """The cell's training set (its seed) and the task's validation and test sets (fixed seeds)."""
    options = task.option_dict
    return {
        "train": MQARDataset(num_examples=train.train_examples, seed=seed, **options),
        "val": MQARDataset(num_examples=train.val_examples, seed=VAL_SEED, **options),
        "test": MQARDataset(num_examples=train.test_examples, seed=TEST_SEED, **options),
    }


def query_logits(model: HybridVLM, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, kv, vocab]`` at each sequence's query positions ``[B, kv]`` (the LM head runs there only)."""
    batch, length = input_ids.shape
    steps = torch.arange(length, device=input_ids.device).expand(3, batch, length)
    hidden = model.decode(input_ids, position_ids=steps).hidden
    picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    return model.lm_head(picked)


def query_loss(
    model: HybridVLM, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, precision: str
) -> torch.Tensor:
    """The training loss: cross-entropy of :func:`query_logits` (in float32) against the values asked for."""
    with _autocast(input_ids.device, precision):
        logits = query_logits(model, input_ids, positions)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@functools.cache
def _compiled_query_loss() -> Callable[..., torch.Tensor]:
    """:func:`query_loss` through ``torch.compile``, in Inductor's deterministic mode: no kernel configuration is
    chosen by timing on the device, so every process compiles the same kernels and a cell reruns to the same
    numbers. Kernel libraries (fla, flash-attn) run as they are between the compiled parts. One compiled function
    per process, shared by its cells (models of one shape reuse its code; each other shape compiles anew)."""
    import torch._dynamo
    import torch._inductor.config as inductor

    if not hasattr(inductor, "deterministic"):
        raise RuntimeError(
            f"train.compile needs Inductor's deterministic mode (torch >= 2.10), not torch {torch.__version__}; "
            "set compile: false"
        )
    inductor.deterministic = True
    # a worker process trains cells of many shapes through this one function: compile each, and fail a cell rather
    # than let it run uncompiled once the limit is reached
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(query_loss)


@dataclasses.dataclass
class Evaluation:
    """Accuracy and loss over a set, and how many queries were asked and answered at each query-to-key distance
    (index = distance in tokens)."""

    accuracy: float
    loss: float
    asked: list[int]
    answered: list[int]


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16-mixed", cache_enabled=False)


@torch.no_grad()
def evaluate(model: HybridVLM, data: QuerySet, batch_size: int, precision: str) -> Evaluation:
    """Exact-match accuracy of the value predicted (argmax over the whole vocabulary) at every query."""
    device = data.input_ids.device
    was_training = model.training
    model.eval()
    correct, losses = [], []
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        with _autocast(device, precision):
            logits = query_logits(model, data.input_ids[rows], data.positions[rows]).float()
        losses.append(F.cross_entropy(logits.flatten(0, 1), data.targets[rows].flatten(), reduction="sum"))
        correct.append(logits.argmax(-1) == data.targets[rows])
    model.train(was_training)
    hits = torch.cat(correct)
    length = data.input_ids.shape[1]
    asked = torch.bincount(data.distances.flatten(), minlength=length)
    answered = torch.bincount(data.distances.flatten(), weights=hits.flatten().float(), minlength=length)
    return Evaluation(
        accuracy=float(hits.float().mean()),
        loss=float(torch.stack(losses).sum()) / hits.numel(),
        asked=asked.tolist(),
        answered=[round(value) for value in answered.tolist()],
    )


class RecallTrainer:
    """Trains one model on an MQAR training set, step by step, on the model's device.

    Args:
        model: the cell's model (its device is the training device).
        train_set: the training set (on the same device).
        settings: the cell's training settings.
        learning_rate: the peak learning rate.
        seed: orders the training set (one permutation per epoch).
    """

    def __init__(
        self, model: HybridVLM, train_set: QuerySet, settings: TrainSettings, learning_rate: float, seed: int
    ) -> None:
        self.model, self.data, self.settings = model, train_set, settings
        self.device = next(model.parameters()).device
        length = train_set.input_ids.shape[1]
        self.batch_size = max(1, settings.max_tokens // length)
        self.graphs = settings.cuda_graphs and self.device.type == "cuda"
        self.compiled = settings.compile and self.device.type == "cuda"
        self.loss = _compiled_query_loss() if self.compiled else query_loss
        # on a GPU the learning rate is a device tensor the step reads (so a captured step can take each step's),
        # with graphs or without, so that a graphed and an eager run compute the same
        self.device_rate = self.device.type == "cuda"
        steps = settings.max_steps
        generator = torch.Generator().manual_seed(seed)
        epochs = math.ceil(steps * self.batch_size / len(train_set))
        order = torch.cat([torch.randperm(len(train_set), generator=generator) for _ in range(epochs)])
        self.order = order[: steps * self.batch_size].view(steps, self.batch_size).to(self.device)
        factors = [warmup_cosine(step, steps, settings.warmup_ratio, settings.min_lr_ratio) for step in range(steps)]
        self.rates = torch.tensor(factors, dtype=torch.float64) * learning_rate
        self.device_rates = self.rates.to(self.device, torch.float32)
        self.cursor = torch.zeros((), dtype=torch.long, device=self.device)  # the next step, advanced by the step
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self.rate = torch.tensor(float(self.rates[0]), device=self.device) if self.device_rate else float(self.rates[0])
        groups: dict[bool, list[torch.nn.Parameter]] = {True: [], False: []}
        for parameter in model.parameters():
            groups[decays(parameter)].append(parameter)
        self.optimizer = torch.optim.AdamW(
            [
                {"params": groups[True], "weight_decay": settings.weight_decay},
                {"params": groups[False], "weight_decay": 0.0},
            ],
            lr=self.rate,
            betas=(0.9, 0.95),
            **({"fused": True, "capturable": True} if self.device_rate else {}),
        )
        self.step = 0
        self.graph: torch.cuda.CUDAGraph | None = None

    def _train_step(self) -> None:
        """One step: the batch at the cursor, its learning rate, forward, backward, update, cursor + 1."""
        at = self.cursor.view(1)  # indexed on the device: a captured step may not read the cursor on the host
        rows = self.order.index_select(0, at).squeeze(0)
        input_ids, positions = self.data.input_ids[rows], self.data.positions[rows]
        if self.device_rate:
            self.rate.copy_(self.device_rates.index_select(0, at).squeeze(0))
        loss = self.loss(self.model, input_ids, positions, self.data.targets[rows], self.settings.precision)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach()
        self.cursor += 1

    def train_until(self, stop: int) -> None:
        """Take steps until step ``stop``: eagerly, or by replaying the captured step once there is one."""
        while self.step < stop:
            if self.graph is not None:
                self.graph.replay()
            else:
                self._eager_step()
            self.step += 1

    def _eager_step(self) -> None:
        if not self.device_rate:
            for group in self.optimizer.param_groups:
                group["lr"] = float(self.rates[self.step])
        self.optimizer.zero_grad(set_to_none=True)
        if not self.graphs:
            self._train_step()
            return
        side = torch.cuda.Stream()  # warm-up before a capture runs on a side stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._train_step()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self) -> None:
        """Capture the training step as a CUDA graph (after some eager steps); later steps replay it. Nothing
        happens without graphs."""
        if not self.graphs or self.graph is not None:
            return
        self.optimizer.zero_grad(set_to_none=True)  # the captured backward writes fresh gradient buffers
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._train_step()
        torch.cuda.empty_cache()  # hand the warm-up's cached blocks back: several cells share the GPU

    def take_loss(self) -> float:
        """Mean training loss since the last call (one device synchronisation)."""
        total = float(self.loss_sum)
        self.loss_sum.zero_()
        return total

    # --- resuming ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (before the first step of this trainer)."""
        if self.step or self.graph is not None:
            raise RuntimeError("load a trainer's state before it takes a step")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the rate is the trainer's own (a device tensor on a GPU)
            group["lr"] = self.rate
        self.step = state["step"]
        self.cursor.fill_(self.step)


@dataclasses.dataclass
class RecallResult:
    """What one MQAR cell measured."""

    accuracy: float
    test_loss: float
    val_accuracy: float
    val_loss: float
    curve: list[dict[str, float]]
    distance_asked: list[int]
    distance_answered: list[int]
    steps: int
    stopped_early: bool
    resumed_from_step: int
    seconds: float
    seconds_per_step: float | None
    first_steps_seconds: float
    cuda_graphs: bool
    compiled: bool
    batch_size: int
    backends: list[str]
    """The backend each layer's mixer trained with (its forward and backward; evaluation may pick another, a
    forward-only kernel)."""


def train_recall_cell(
    model: HybridVLM,
    sets: dict[str, MQARDataset],
    settings: TrainSettings,
    learning_rate: float,
    seed: int,
    run_dir: Path,
    progress: Callable[[int, float, float], None] = lambda step, loss, accuracy: None,
) -> RecallResult:
    """Train ``model`` (on its device) and measure it: validation accuracy every ``eval_every`` steps (the
    learning curve; early stop at ``early_stop``), then test accuracy by query-to-key distance.

    The trainer's state is saved to ``run_dir`` at each evaluation, so a cell stopped part-way resumes from its
    last evaluation to the same result; ``progress(step, train_loss, val_accuracy)`` is called at every
    evaluation.
    """
    device = next(model.parameters()).device
    data = {name: QuerySet.from_dataset(dataset, device) for name, dataset in sets.items()}
    trainer = RecallTrainer(model, data["train"], settings, learning_rate, seed)
    eval_batch = trainer.batch_size  # the logits of a bigger batch took GBs beside the training step's memory
    checkpoint = run_dir / CHECKPOINT
    curve: list[dict[str, float]] = []
    backends: list[str] = []
    if checkpoint.is_file():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        trainer.load_state_dict(saved["trainer"])
        curve, backends = saved["curve"], saved["backends"]
        logger.info("resuming from step %d (%s)", trainer.step, checkpoint)
    resumed_from = trainer.step
    start = time.perf_counter()
    every = settings.eval_every or settings.max_steps
    stopped_early = bool(curve) and _reached(curve[-1]["val_accuracy"], settings.early_stop)
    first_steps, timed_steps, timed_seconds = 0.0, 0, 0.0
    for stop in _evaluation_points(trainer.step, settings.max_steps, every):
        if stopped_early:
            break
        if trainer.step == resumed_from:  # eager warm-up steps (kernel tuning) and the capture, timed apart
            begin = time.perf_counter()
            trainer.train_until(min(stop, resumed_from + GRAPH_WARMUP_STEPS))
            backends = _backends(model)
            trainer.capture()
            _synchronize(device)
            first_steps = time.perf_counter() - begin
        begin, steps_before = time.perf_counter(), trainer.step
        trainer.train_until(stop)
        _synchronize(device)
        timed_seconds, timed_steps = timed_seconds + time.perf_counter() - begin, timed_steps + stop - steps_before
        loss = trainer.take_loss() / (stop - (curve[-1]["step"] if curve else resumed_from))
        val = evaluate(model, data["val"], eval_batch, settings.precision)
        curve.append({"step": stop, "train_loss": loss, "val_accuracy": val.accuracy, "val_loss": val.loss})
        progress(stop, loss, val.accuracy)
        stopped_early = _reached(val.accuracy, settings.early_stop) and stop < settings.max_steps
        _save(checkpoint, {"trainer": trainer.state_dict(), "curve": curve, "backends": backends})
    test = evaluate(model, data["test"], eval_batch, settings.precision)
    return RecallResult(
        accuracy=test.accuracy,
        test_loss=test.loss,
        val_accuracy=curve[-1]["val_accuracy"],
        val_loss=curve[-1]["val_loss"],
        curve=curve,
        distance_asked=test.asked,
        distance_answered=test.answered,
        steps=trainer.step,
        stopped_early=stopped_early,
        resumed_from_step=resumed_from,
        seconds=time.perf_counter() - start,
        seconds_per_step=timed_seconds / timed_steps if timed_steps else None,
        first_steps_seconds=first_steps,
        cuda_graphs=trainer.graphs,
        compiled=trainer.compiled,
        batch_size=trainer.batch_size,
        backends=backends,
    )


def _backends(model: HybridVLM) -> list[str]:
    """The backend each layer's mixer chose in its latest call."""
    return [backend or "not recorded" for backend in model.mixer_backends()]


def _reached(accuracy: float, threshold: float | None) -> bool:
    return threshold is not None and accuracy >= threshold


def _evaluation_points(done: int, total: int, every: int) -> Iterator[int]:
    """The steps after which the model is evaluated: every ``every`` steps and the last, those after ``done``."""
    points = sorted({*range(every, total, every), total})
    return iter([point for point in points if point > done])


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _save(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)
