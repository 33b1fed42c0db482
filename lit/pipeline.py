"""The toy-size InfiniteVL pipeline the quickstart and the initialisation ablation share: a tiny Transformer
teacher trained from scratch on the synthetic suite, then a converted student distilled layer-wise, end to end
and fine-tuned, each stage through ``hybridvl fit`` with ``experiments/tiny/<stage>.yaml``.

A stage that finished writes ``runs/<stage>/done.json``: its arguments and a digest of the weights it started
from. Run again with the same arguments on the same weights, the stage is skipped, so a pipeline stopped part-way
(a time limit, a lost machine) resumes at the stage it was in. The pipeline's own folders (``qwen``,
``teacher_init``, ``student_init`` and the stages' exports) are rewritten when it runs again."""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import torch

from hybridvl.lit.commands.train import main as train
from hybridvl.models.convert import ConversionReport, convert_directory
from hybridvl.models.files import write_json
from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl

logger = logging.getLogger("hybridvl.pipeline")


def _experiments() -> Path:
    """The stage YAMLs: ``experiments/tiny`` of a checkout (or an editable install), else the copy a wheel ships
    inside this package (``hybridvl/lit/experiments/tiny``, see ``setup.py``)."""
    source = Path(__file__).resolve().parents[1] / "experiments" / "tiny"
    return source if source.is_dir() else Path(__file__).resolve().parent / "experiments" / "tiny"


EXPERIMENTS = _experiments()
TEACHER_DIMS = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vision_depth=2,
    vision_hidden_size=64,
)
STEPS = {"teacher": 3500, "distill_layerwise": 300, "distill_e2e": 300, "sft": 300}
STAGES = tuple(STEPS)


def run_stage(name: str, out: Path, scale: float, accelerator: str | None = None, **paths: Path) -> None:
    """``hybridvl fit --config experiments/tiny/<name>.yaml`` with this run's paths and step count, on
    ``accelerator`` (a Lightning accelerator name; ``None`` keeps the config's, the CPU)."""
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
    if accelerator is not None:
        argv += ["--trainer.accelerator", accelerator]
    for key, value in paths.items():
        argv += [f"--{key}", str(value)]
    done = out / "runs" / name / "done.json"
    inputs = {key: Path(value) for key, value in paths.items() if not key.endswith("export_dir")}
    record = {"argv": argv, "inputs": _weights_digests(inputs)}
    exported = all((Path(v) / "model.safetensors").is_file() for k, v in paths.items() if k.endswith("export_dir"))
    if exported and done.is_file() and json.loads(done.read_text()) == record:
        logger.info("stage %s: done before with these arguments and input weights (%s), skipped", name, done)
        return
    logger.info("stage %s: hybridvl %s", name, " ".join(argv))
    done.unlink(missing_ok=True)  # a stage that stops part-way leaves no record of an earlier run behind
    # a line every 10% of the steps (step, loss, time left) in place of the progress bar; outside `record`, so
    # stages finished before it was added are still recognised
    train([*argv, "--trainer.callbacks+=hybridvl.lit.callbacks.StageProgress"])
    write_json(done, record)


def _weights_digests(directories: dict[str, Path]) -> dict[str, str]:
    """SHA-256 over the tensors (names and values) of each model directory a stage reads."""
    from safetensors.torch import load_file

    digests = {}
    for key, directory in directories.items():
        if (directory / "model.safetensors").is_file():
            digest = hashlib.sha256()
            for name, tensor in sorted(load_file(directory / "model.safetensors").items()):
                digest.update(name.encode())
                digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            digests[key] = digest.hexdigest()
    return digests


def train_teacher(out: Path, scale: float = 1.0, seed: int = 0, accelerator: str | None = None) -> Path:
    """A tiny Qwen2.5-VL built from random weights and trained on the synthetic suite (on ``accelerator``, as in
    :func:`run_stage`); returns its directory."""
    # the stages run LightningCLI in this process with their own argument lists, as intended
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    make_tiny_qwen2_5_vl(out / "qwen", seed=seed, overwrite=True, **TEACHER_DIMS)
    convert_directory(out / "qwen", out / "teacher_init", "A x4", overwrite=True)
    run_stage(
        "teacher",
        out,
        scale,
        accelerator,
        **{
            "model.init_args.model": out / "teacher_init",
            "model.init_args.export_dir": out / "teacher",
            "data.processor": out / "teacher_init",
        },
    )
    return out / "teacher"


def distill_student(
    teacher: Path,
    out: Path,
    layout: str,
    init: str = "mimic",
    window: int = 64,
    scale: float = 1.0,
    accelerator: str | None = None,
    last_stage: str = "sft",
) -> tuple[Path, ConversionReport]:
    """Convert ``teacher`` to ``layout``, distil layer-wise and end to end, fine-tune (on ``accelerator``, as in
    :func:`run_stage`), stopping after ``last_stage`` (``"distill_layerwise"``, ``"distill_e2e"`` or ``"sft"``);
    return that stage's export."""
    student_stages = STAGES[1:]
    if last_stage not in student_stages:
        raise ValueError(f"last_stage must be one of {', '.join(student_stages)}, got {last_stage!r}")
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    report = convert_directory(teacher, out / "student_init", layout, init=init, sliding_window=window, overwrite=True)
    shared = {"model.init_args.teacher": teacher, "data.processor": teacher}
    run_stage(
        "distill_layerwise",
        out,
        scale,
        accelerator,
        **shared,
        **{"model.init_args.model": out / "student_init", "model.init_args.export_dir": out / "stage1_layerwise"},
    )
    if last_stage == "distill_layerwise":
        return out / "stage1_layerwise", report
    run_stage(
        "distill_e2e",
        out,
        scale,
        accelerator,
        **shared,
        **{"model.init_args.model": out / "stage1_layerwise", "model.init_args.export_dir": out / "stage1"},
    )
    if last_stage == "distill_e2e":
        return out / "stage1", report
    run_stage(
        "sft",
        out,
        scale,
        accelerator,
        **{
            "model.init_args.model": out / "stage1",
            "model.init_args.export_dir": out / "student",
            "data.processor": teacher,
        },
    )
    return out / "student", report
