"""The quickstart's pieces: its table (chance beside each task, a verdict on the teacher), loss smoothing and the
plot, and stage configs that say what ``hybridvl.lit.pipeline`` declares. The whole quickstart at reduced size
runs in ``tests/test_training.py``."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml

from hybridvl.lit import pipeline
from hybridvl.lit.ablation.multimodal import DISTILL_SUITE
from hybridvl.lit.commands.quickstart import LEARNED, VAL, chances, table
from hybridvl.lit.evaluate import loss_figure, smooth

ROOT = Path(__file__).resolve().parents[1]


def _results(teacher: dict[str, float], student: dict[str, float]) -> dict:
    role = {"cache_bytes_1k": 4096, "cache_bytes_64k": 262144}
    return {
        "chance": {"ocr": 1 / 12, "counting": 0.2},
        "teacher": {"layout": "A x4", "accuracy": teacher, **role},
        "student": {"layout": "S,D,D,D", "accuracy": student, **role},
        "minutes": 7.5,
    }


def test_table_gives_each_task_its_chance_accuracies_and_recovery():
    printed = table(_results({"ocr": 0.9, "counting": 0.8}, {"ocr": 0.45, "counting": 0.8}))
    lines = printed.splitlines()
    assert lines[0].split()[:2] == ["task", "chance"] and "student / teacher" in lines[0]
    assert next(line for line in lines if line.startswith("ocr")).split() == ["ocr", "0.083", "0.900", "0.450", "50%"]
    assert next(line for line in lines if line.startswith("counting")).split()[1:] == [
        "0.200",
        "0.800",
        "0.800",
        "100%",
    ]
    assert next(line for line in lines if line.startswith("mean")).split()[1:] == ["0.142", "0.850", "0.625", "74%"]
    assert f"at least {LEARNED:g}x chance on every task" in printed
    assert "recovers 74% of the teacher's mean accuracy (7.5 minutes in all)" in printed


def test_table_names_the_tasks_the_teacher_has_not_learned():
    printed = table(_results({"ocr": 0.08, "counting": 0.59}, {"ocr": 0.08, "counting": 0.5}))
    verdict = next(line for line in printed.splitlines() if line.startswith("the teacher scores"))
    assert f"below {LEARNED:g}x chance on ocr, counting" in verdict and "means little" in verdict


def test_chances_are_the_suite_tasks_chances():
    assert chances(VAL[0]) == pytest.approx({"ocr": 1 / 12, "chart": 1 / 6, "counting": 1 / 5, "video_memory": 1 / 6})


def test_smooth_is_tensorboards_debiased_exponential_average():
    assert smooth([]) == []
    assert smooth([3.0, 1.0, 2.0], weight=0) == [3.0, 1.0, 2.0]
    assert smooth([2.0] * 5, weight=0.9) == pytest.approx([2.0] * 5)  # debiased: no pull towards zero
    step = smooth([1.0] * 3 + [0.0] * 20, weight=0.6)
    assert step[:3] == pytest.approx([1.0] * 3)
    assert all(a > b for a, b in itertools.pairwise(step[2:])) and 0 < step[-1] < 0.01
    assert smooth([1.0, 0.0], weight=0.5) == pytest.approx([1.0, 1 / 3])  # (0.25 + 0) / (1 - 0.25)
    with pytest.raises(ValueError, match="smoothing weight"):
        smooth([1.0], weight=1.0)


def test_loss_figure_draws_raw_and_smoothed_loss_per_stage(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    losses = [4.0, 2.0, 3.0, 1.0, 1.5, 0.8]
    for stage in ("teacher", "sft"):
        with SummaryWriter(tmp_path / stage / "lightning_logs" / "version_0") as writer:
            for step, value in enumerate(losses):
                writer.add_scalar("train/loss", value, step * 10)
            if stage == "sft":
                writer.add_scalar("val/loss", 0.9, 50)
    figure = loss_figure(tmp_path, ["teacher", "sft"], weight=0.5)
    axes = figure.axes
    assert [ax.get_title() for ax in axes] == ["teacher", "sft"]
    for ax in axes:
        assert ax.get_xlabel() == "step" and "loss" in ax.get_ylabel()
        raw, smoothed = ax.lines[:2]
        assert list(raw.get_ydata()) == pytest.approx(losses)  # float32 in TensorBoard
        assert list(smoothed.get_ydata()) == pytest.approx(smooth(losses, 0.5), rel=1e-6)
        assert raw.get_color() == smoothed.get_color()
        assert raw.get_alpha() < 0.5 and smoothed.get_alpha() is None  # raw faint, smoothed on top
    assert [line.get_label() for line in axes[1].lines] == ["train/loss", "smoothed (0.5)", "val/loss"]


def _stage_config(stage: str) -> dict:
    return yaml.safe_load((ROOT / "experiments" / "tiny" / f"{stage}.yaml").read_text())


@pytest.mark.parametrize("stage", pipeline.STAGES)
def test_stage_configs_state_the_pipelines_steps_and_suite(stage):
    """What a stage YAML says by itself (``hybridvl fit --config``) is what the quickstart runs; the quickstart,
    and the initialisation ablation, score on the suite the teacher learned (image size, tasks)."""
    config = _stage_config(stage)
    assert config["trainer"]["max_steps"] == pipeline.STEPS[stage]
    for source in config["data"]["train"] + config["data"].get("val", []):
        assert source["type"] == "synthetic" and source["image_size"] == VAL[0]["image_size"], source
    train_tasks = sorted(task for source in config["data"]["train"] for task in chances(source))
    assert train_tasks == sorted(chances(VAL[0])), stage  # every task scored, each from one source


def test_initialisation_study_scores_on_the_quickstarts_suite():
    assert {"type": "synthetic", "image_size": VAL[0]["image_size"]} == DISTILL_SUITE


def test_teacher_dims_are_the_initialisation_studys_width():
    study = yaml.safe_load((ROOT / "experiments" / "ablations" / "init.yaml").read_text())
    assert study["grid"]["d_model"] == [pipeline.TEACHER_DIMS["hidden_size"]]
