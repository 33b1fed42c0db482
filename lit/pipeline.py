"""The toy-size InfiniteVL pipeline the quickstart and the initialisation ablation share: a tiny Transformer
teacher trained from scratch on the synthetic suite, then a converted student distilled layer-wise, end to end
and fine-tuned, each stage through ``hybridvl fit`` with ``experiments/tiny/<stage>.yaml``."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from lit.commands.train import main as train
from models.convert import ConversionReport, convert_directory
from models.tiny_qwen import make_tiny_qwen2_5_vl

logger = logging.getLogger("hybridvl.pipeline")

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments" / "tiny"
TEACHER_DIMS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vision_depth=2,
    vision_hidden_size=64,
)
STEPS = {"teacher": 2000, "distill_layerwise": 300, "distill_e2e": 300, "sft": 300}
STAGES = tuple(STEPS)


def run_stage(name: str, out: Path, scale: float, **paths: Path) -> None:
    """``hybridvl fit --config experiments/tiny/<name>.yaml`` with this run's paths and step count."""
    config = EXPERIMENTS / f"{name}.yaml"
    steps = STEPS[name]
    argv = [
        "fit",
        "--config",
        str(config),
        "--trainer.default_root_dir",
        str(out / "runs" / name),
        "--trainer.max_steps",
        str(max(2, round(steps * scale))),
        "--trainer.enable_progress_bar",
        "false",
    ]
    if name in ("teacher", "sft"):
        argv += ["--trainer.val_check_interval", str(max(2, round(steps * scale)))]
    for key, value in paths.items():
        argv += [f"--{key}", str(value)]
    logger.info("stage %s: hybridvl %s", name, " ".join(argv))
    train(argv)


def train_teacher(out: Path, scale: float = 1.0, seed: int = 0) -> Path:
    """A tiny Qwen2.5-VL built from random weights and trained on the synthetic suite; returns its directory."""
    # the stages run LightningCLI in this process with their own argument lists, as intended
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    make_tiny_qwen2_5_vl(out / "qwen", seed=seed, **TEACHER_DIMS)
    convert_directory(out / "qwen", out / "teacher_init", "A x4")
    run_stage(
        "teacher",
        out,
        scale,
        **{
            "model.init_args.model": out / "teacher_init",
            "model.init_args.export_dir": out / "teacher",
            "data.processor": out / "teacher_init",
        },
    )
    return out / "teacher"


def distill_student(
    teacher: Path, out: Path, layout: str, init: str = "mimic", window: int = 64, scale: float = 1.0
) -> tuple[Path, ConversionReport]:
    """Convert ``teacher`` to ``layout``, distil layer-wise and end to end, fine-tune; return the student."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    report = convert_directory(teacher, out / "student_init", layout, init=init, sliding_window=window)
    shared = {"model.init_args.teacher": teacher, "data.processor": teacher}
    run_stage(
        "distill_layerwise",
        out,
        scale,
        **shared,
        **{"model.init_args.model": out / "student_init", "model.init_args.export_dir": out / "stage1_layerwise"},
    )
    run_stage(
        "distill_e2e",
        out,
        scale,
        **shared,
        **{"model.init_args.model": out / "stage1_layerwise", "model.init_args.export_dir": out / "stage1"},
    )
    run_stage(
        "sft",
        out,
        scale,
        **{
            "model.init_args.model": out / "stage1",
            "model.init_args.export_dir": out / "student",
            "data.processor": teacher,
        },
    )
    return out / "student", report
