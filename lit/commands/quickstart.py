"""``hybridvl quickstart``: the whole InfiniteVL recipe at toy size, on CPU, with nothing to download.

1. build a tiny random Qwen2.5-VL (tokenizer, chat template, processor) and train it from scratch on the
   synthetic suite: the Transformer teacher (``experiments/tiny/teacher.yaml``);
2. convert it into an ``S,D,D,D`` hybrid student (mimic initialisation);
3. distil layer-wise, 4. end-to-end, 5. fine-tune (``experiments/tiny/{distill_layerwise,distill_e2e,sft}.yaml``),
   each through ``hybridvl fit``;
6. validate teacher and student per task and print the table: each task's chance, the teacher's and the student's
   accuracy and their ratio, and their cache memory.

Each stage logs a line every 10% of its steps: step, loss, time elapsed and left
(:class:`hybridvl.lit.callbacks.StageProgress`). TensorBoard logs land in ``<out>/runs``, the loss curves in
``<out>/loss_curves.png``, the table in ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from hybridvl import mixers
from hybridvl.lit.cli import ArgumentParser
from hybridvl.lit.datamodule import build_source
from hybridvl.lit.evaluate import evaluate, plot_losses
from hybridvl.lit.pipeline import STAGES, TEACHER_DIMS, distill_student, train_teacher
from hybridvl.models.hybrid import HybridVLM

VAL = [{"type": "synthetic", "size_per_task": 100, "split": "val", "image_size": 112}]
"""The validation source teacher and student are scored on: the teacher's training suite (``experiments/tiny``),
held-out split."""
LEARNED = 3.0
"""A teacher has learned a task when its accuracy is at least this many times the task's chance."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="hybridvl quickstart", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="where everything is written")
    parser.add_argument("--layout", default="S,D,D,D", help="the student's layout (one mixer per teacher layer: 4)")
    parser.add_argument("--window", type=int, default=64, help="the student's sliding window (tokens)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (0.05 for a smoke run)")
    parser.add_argument("--val-size", type=int, default=VAL[0]["size_per_task"], help="validation samples per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the teacher's random weights")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.scale) and args.scale > 0):
        parser.error(f"--scale must be a positive number (0.05 for a smoke run), got {args.scale}")
    for flag, value in (("--window", args.window), ("--val-size", args.val_size)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    mixers.parse_layout(args.layout, num_layers=TEACHER_DIMS["num_hidden_layers"])
    return args


def cache_bytes(model: HybridVLM, tokens: int) -> int:
    """Bytes of the per-sequence state after ``tokens`` tokens of context (every layer)."""
    return sum(layer.self_attn.state_bytes(1, seq_len=tokens) for layer in model.language_model.layers)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    teacher = train_teacher(out, args.scale, args.seed)
    student, report = distill_student(teacher, out, args.layout, "mimic", args.window, args.scale)
    print(report.summary())

    val = [{**VAL[0], "size_per_task": args.val_size}]
    results: dict = {"chance": chances(val[0])}
    for role, directory in (("teacher", teacher), ("student", student)):
        accuracy = evaluate(directory, val)
        model = HybridVLM.from_pretrained(directory)
        results[role] = {
            "layout": model.config.layout,
            "accuracy": accuracy,
            "cache_bytes_1k": cache_bytes(model, 1024),
            "cache_bytes_64k": cache_bytes(model, 65536),
        }
    results["minutes"] = (time.perf_counter() - start) / 60
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_losses(out / "runs", STAGES, out / "loss_curves.png")
    print(table(results))
    print(
        f"\nresults: {out / 'results.json'}    loss curves: {out / 'loss_curves.png'}    "
        f"TensorBoard logs: tensorboard --logdir {out / 'runs'}"
    )
    return 0


def chances(source: dict) -> dict[str, float]:
    """Each task's chance score on a synthetic ``source``: the exact match of the best answer given without
    looking at the image or video (:attr:`~hybridvl.lit.data.synthetic.SyntheticTask.chance`)."""
    return {task.name: task.chance for task in build_source(source).tasks}


def table(results: dict) -> str:
    """Each task's chance beside the teacher's and the student's accuracy and their ratio (the share of the
    teacher's accuracy the student recovers), cache memory, and a verdict on whether the teacher learned every
    task (at least :data:`LEARNED` times its chance); without that the recovery means little."""
    teacher, student, chance = results["teacher"], results["student"], results["chance"]
    tasks = list(teacher["accuracy"])
    rows = [("task", "chance", f"teacher ({teacher['layout']})", f"student ({student['layout']})", "student / teacher")]
    for task in tasks:
        t, s = teacher["accuracy"][task], student["accuracy"][task]
        rows.append((task, f"{chance[task]:.3f}", f"{t:.3f}", f"{s:.3f}", _ratio(s, t)))
    mean_c, mean_t, mean_s = (
        sum(values[task] for task in tasks) / len(tasks)
        for values in (chance, teacher["accuracy"], student["accuracy"])
    )
    rows.append(("mean", f"{mean_c:.3f}", f"{mean_t:.3f}", f"{mean_s:.3f}", _ratio(mean_s, mean_t)))
    for tokens, key in ((1024, "cache_bytes_1k"), (65536, "cache_bytes_64k")):
        rows.append((f"cache @ {tokens // 1024}K tokens", "", _kib(teacher[key]), _kib(student[key]), ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    unlearned = [task for task in tasks if teacher["accuracy"][task] < LEARNED * chance[task]]
    lines.append("")
    if unlearned:
        lines.append(
            f"the teacher scores below {LEARNED:g}x chance on {', '.join(unlearned)}: it has not learned "
            "(enough of) these tasks, so the student's recovery there means little; train it longer (--scale)"
        )
    else:
        lines.append(f"the teacher scores at least {LEARNED:g}x chance on every task")
    if mean_t:
        lines.append(
            f"the student recovers {mean_s / mean_t:.0%} of the teacher's mean accuracy "
            f"({results['minutes']:.1f} minutes in all)"
        )
    return "\n".join(lines)


def _ratio(student: float, teacher: float) -> str:
    return f"{student / teacher:.0%}" if teacher else "-"


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"
