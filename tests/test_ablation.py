"""Ablation runner and MQAR (CPU, smoke sizes)."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

import mixers
from lit import ablation
from lit.commands.ablate import main as ablate
from models.hybrid import HybridVLM

ROOT = Path(__file__).resolve().parents[1]
MIXER_TYPE = ROOT / "experiments" / "ablations" / "mixer_type.yaml"


def test_smoke_study_writes_cells_and_summary_then_resumes(tmp_path, monkeypatch, capsys, caplog):
    assert ablate(["--config", str(MIXER_TYPE), "--smoke", "--out", str(tmp_path)]) == 0
    cells = sorted((tmp_path / "cells").glob("*.json"))
    assert len(cells) == 2
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["smoke"] and {row["layout"] for row in summary["rows"]} == {"S,D", "M x2"}
    result = json.loads(cells[0].read_text())
    assert 0.0 <= result["accuracy"] <= 1.0 and result["parameters"] > 0
    assert result["seconds_per_step"] > 0 and result["first_steps_seconds"] > 0
    assert "| mqar_T32_kv4 |" in capsys.readouterr().out

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(ablation, "run_cell", must_not_run)
    assert ablate(["--config", str(MIXER_TYPE), "--smoke", "--out", str(tmp_path)]) == 0
    (tmp_path / "cells" / cells[0].name).unlink()  # an interrupted study: one cell missing
    monkeypatch.undo()
    assert ablation.run_study(MIXER_TYPE, smoke=True, out=tmp_path)["cells"] == 2
    assert (tmp_path / "cells" / cells[0].name).is_file()
    stale = json.loads(cells[1].read_text())  # trained before the YAML's training settings changed
    stale["train"]["max_steps"] += 1
    cells[1].write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="hybridvl.ablation"):
        ablation.run_study(MIXER_TYPE, smoke=True, out=tmp_path)
    assert "trained with other settings (['max_steps'] differ)" in caplog.text
    stale = json.loads(cells[1].read_text())  # a task option the cell's name does not show
    stale["task_config"]["power_a"] = 0.5
    cells[1].write_text(json.dumps(stale))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hybridvl.ablation"):
        ablation.run_study(MIXER_TYPE, smoke=True, out=tmp_path)
    assert (
        "(['task.power_a'] differ)" in caplog.text and "power_a" not in json.loads(cells[1].read_text())["task_config"]
    )
    assert json.loads(cells[1].read_text())["train"] == ablation.load_study(MIXER_TYPE, smoke=True)["train"]

    from lit.ablation_report import write_report

    results = tmp_path / "results"
    results.mkdir()
    (results / "mixer_type").symlink_to(tmp_path)
    report = write_report(results, tmp_path / "report" / "RESULTS.md").read_text()
    assert "## Claims" in report and "| mqar_T32_kv4 | `S,D` |" in report and "torch" in report
    assert (tmp_path / "report" / "figures" / "mixer_type.png").stat().st_size > 1000


# synthetic multimodal cells; distillation cells, two at once sharing their seed's teacher
@pytest.mark.parametrize(("study", "workers"), [("swa_ratio", 1), ("init", 2)])
def test_every_kind_of_cell_runs_at_smoke_size(study, workers, tmp_path):
    summary = ablation.run_study(MIXER_TYPE.parent / f"{study}.yaml", smoke=True, out=tmp_path, workers=workers)
    assert summary["complete"] and summary["cells"] == summary["total_cells"] > 0 and not summary["failed"]
    if study == "init":  # trained once, by whichever cell came first
        assert len(list((tmp_path / "teachers" / "seed0" / "runs" / "teacher" / "lightning_logs").iterdir())) == 1
    assert all(0.0 <= row["mean"] <= 1.0 for row in summary["rows"])
    if study == "swa_ratio":  # held-out videos at exact cue distances, read against the window in frames
        for path in (tmp_path / "cells").glob("*.json"):
            result = json.loads(path.read_text())
            assert set(result["distance_accuracy"]) == {"2", "6"}
            assert all(0.0 <= value <= 1.0 for value in result["distance_accuracy"].values())
            assert result["window_frames"] == 32 / 2  # 56x56 frames: 2 tokens each (2x2 merge of 4x4, 2 frames)


def test_parameter_matching_equalises_model_sizes():
    study = ablation.load_study(MIXER_TYPE)
    counts = {}
    for layout in ("S,D,D,D", "M x4", "G x4", "L x4", "A x4"):
        cell = ablation.Cell(layout, (("type", "mqar"),), 128, 0, 1e-3)
        width = ablation.matched_intermediate_size(cell, study, 8192, None)
        counts[layout] = ablation.count_parameters(ablation.model_config(cell, study, 8192, None, width))
    reference = counts["A x4"]
    assert all(abs(count - reference) / reference < 0.01 for count in counts.values()), counts


def test_every_study_expands_and_bad_studies_name_the_problem(tmp_path):
    for path in sorted((ROOT / "experiments" / "ablations").glob("*.yaml")):
        for smoke in (False, True):
            study = ablation.load_study(path, smoke)
            assert ablation.expand(study), path
    grid = "grid: {layout: ['S,D'], d_model: [8], seed: [0], learning_rate: [1]}\n"
    cases = {
        "name: x\nbatch: 1\n" + grid + "tasks: [{type: mqar}]": "unknown study keys",
        "name: x\n" + grid.replace("'S,D'", "'S,,D'") + "tasks: [{type: mqar}]": "empty item",
        "name: x\n" + grid + "tasks: [{type: essay}]": "task type must be",
        "name: x\n" + grid: "the grid needs",
        "name: x\n" + grid + "tasks: [{type: mqar, grid: {depth: [2]}}]": "a task's grid must map",
        "name: x\n" + grid + "tasks: [{type: mqar, grid: {layout: ['S,X']}}]": "unknown",
        "name: x\n" + grid + "tasks: [{type: mqar, eval_distances: [4]}]": "eval_distances belongs",
        "name: x\n" + grid + "tasks: [{type: synthetic, tasks: [video_memory], eval_distances: [3]}]": "even",
        "name: x\n" + grid + "tasks: [{type: mqar, train: {steps: 2}}]": "a task's train must map",
        "name: x\n" + grid + "tasks: [{type: mqar}]\ntrain: {steps: 2}": "unknown train keys",
    }
    for text, message in cases.items():
        path = tmp_path / "study.yaml"
        path.write_text(text)
        with pytest.raises((ValueError, mixers.LayoutError), match=message):
            ablation.load_study(path)
    assert ablate(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_a_task_grid_replaces_the_study_grid_for_that_task(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(
        "name: x\ngrid: {layout: ['S,D', 'A,A'], d_model: [8, 16], seed: [0, 1], learning_rate: [1]}\n"
        "tasks: [{type: mqar}, {type: mqar, seq_len: 32, grid: {d_model: [16], seed: [3]}}]"
    )
    cells = ablation.expand(ablation.load_study(path))
    assert len(cells) == 2 * 2 * 2 + 2
    last = [cell for cell in cells if cell.task_dict.get("seq_len") == 32]
    assert {(cell.layout, cell.d_model, cell.seed) for cell in last} == {("S,D", 16, 3), ("A,A", 16, 3)}
    assert all("grid" not in cell.task_dict for cell in cells)


def test_a_task_train_section_replaces_the_study_settings_for_that_task(tmp_path):
    path = tmp_path / "study.yaml"
    study_text = (
        "name: x\ngrid: {layout: ['S,D'], d_model: [16], seed: [0], learning_rate: [1.0e-3]}\n"
        "tasks: [{type: mqar, vocab_size: 64, seq_len: 16, num_kv_pairs: 2},"
        " {type: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 2, train: {max_steps: 2}}]\n"
        "train: {max_steps: 3, max_tokens: 64, train_examples: 16, test_examples: 8}\n"
    )
    path.write_text(study_text)
    assert ablation.run_study(path, out=tmp_path / "out")["complete"]
    cells = [json.loads(cell.read_text()) for cell in (tmp_path / "out" / "cells").glob("*.json")]
    assert {cell["task"]: (cell["steps"], cell["train"]["max_steps"]) for cell in cells} == {
        "mqar_T16_kv2": (3, 3),
        "mqar_T32_kv2": (2, 2),
    }
    path.write_text(study_text.replace("max_steps: 2}", "max_steps: 1}"))
    study = ablation.load_study(path)
    assert [ablation._finished(tmp_path / "out", cell, study, quiet=True) for cell in ablation.expand(study)] == [
        True,
        False,
    ]


def test_study_backends_reach_every_cell_model():
    study = ablation.load_study(ROOT / "experiments" / "ablations" / "mixer_type.yaml")
    cell = next(cell for cell in ablation.expand(study) if cell.layout == "S,G,G,G")
    config = ablation.model_config(cell, study, vocab_size=8192, vision=None)
    assert config.mixer_options["G"]["backend"] == "torch"
    assert "backend" not in config.mixer_options["D"]
    model = HybridVLM(config)
    assert {layer.self_attn.backend for layer in model.language_model.layers[1:]} == {"torch"}


def test_a_study_stopped_before_its_first_cell_still_writes_its_summary(tmp_path):
    summary = ablation.run_study(MIXER_TYPE.parent / "init.yaml", smoke=True, out=tmp_path / "init", time_budget=0)
    assert summary["cells"] == 0 and "(0 of 2 cells so far)" in (tmp_path / "init" / "summary.md").read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_time_budget_stops_starting_cells_and_the_next_run_finishes(tmp_path, workers, capfd, caplog):
    summary = ablation.run_study(MIXER_TYPE, smoke=True, out=tmp_path, workers=workers, time_budget=0)
    assert summary["cells"] == 0 and summary["total_cells"] == 2 and not summary["complete"]
    assert "(0 of 2 cells so far)" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / ablation.INVOCATIONS).exists()  # a run that trains nothing takes no device time
    caplog.set_level(logging.INFO, logger="hybridvl")  # the cells' processes take the study's log level
    summary = ablation.run_study(MIXER_TYPE, smoke=True, out=tmp_path, workers=workers)
    assert summary["cells"] == 2 and summary["complete"]
    (run,) = json.loads((tmp_path / ablation.INVOCATIONS).read_text())
    assert run["ended_by"] == "returned" and run["cells_done"] == 2 and run["workers"] == workers
    assert run["seconds"] > 0 and run["device"] == "cpu"
    if workers > 1:  # the cells' processes log their progress too
        assert capfd.readouterr().err.count(": step 4/4, ") == 2
    assert not list((tmp_path / "cells").glob("*.partial"))
    assert {row["concurrent_cells"] for row in summary["rows"]} == {workers}  # recorded with the step times
    assert all(row["seconds_per_step"] > 0 for row in summary["rows"])
    assert (
        f"| 0.001 | {1000 * summary['rows'][0]['seconds_per_step']:.0f} ({workers}) |"
        in (tmp_path / "summary.md").read_text()
    )


def test_a_run_stopped_by_sigterm_still_records_its_wall_time(tmp_path):
    script = (
        "import os, signal, sys; from pathlib import Path; from lit.ablation import _logged_invocation\n"
        "with _logged_invocation(Path(sys.argv[1]), 3):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('not stopped')\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == -signal.SIGTERM and "not stopped" not in run.stdout, run.stderr
    (record,) = json.loads((tmp_path / ablation.INVOCATIONS).read_text())
    assert record["ended_by"] == "SIGTERM" and record["workers"] == 3 and record["seconds"] >= 0


def test_a_cell_process_takes_its_share_of_cpu_threads_and_the_study_log_level():
    project, threads = logging.getLogger("hybridvl"), torch.get_num_threads()
    try:  # the project logger's level and handlers are put back by conftest's _project_logging
        ablation._start_worker(logging.DEBUG, 1)
        assert torch.get_num_threads() == 1 and project.level == logging.DEBUG and project.handlers
    finally:
        torch.set_num_threads(threads)


def test_a_failing_cell_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    real_run_cell = ablation.run_cell

    def first_layout_breaks(cell, *args, **kwargs):
        if cell.layout == "S,D":
            raise RuntimeError("CUDA error: out of memory")
        return real_run_cell(cell, *args, **kwargs)

    monkeypatch.setattr(ablation, "run_cell", first_layout_breaks)
    assert ablate(["--config", str(MIXER_TYPE), "--smoke", "--out", str(tmp_path)]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["cells"] == 1 and not summary["complete"]
    (failed,) = summary["failed"]
    assert failed.startswith("SD__") and summary["failed"][failed] == "RuntimeError: CUDA error: out of memory"
    assert f"`{failed}` failed: RuntimeError" in capsys.readouterr().out
    monkeypatch.undo()
    assert ablate(["--config", str(MIXER_TYPE), "--smoke", "--out", str(tmp_path)]) == 0  # retried, then complete
    assert json.loads((tmp_path / "summary.json").read_text())["failed"] == {}


def _cell(layout: str, task: str, accuracy: float, seed: int, d_model: int = 128, **extra) -> dict:
    return {"layout": layout, "task": task, "d_model": d_model, "seed": seed, "learning_rate": 1e-3,
            "accuracy": accuracy, "task_config": {}, "device": "cpu", "versions": {}, **extra}  # fmt: skip


def test_report_gives_each_claim_a_verdict_from_the_cells(tmp_path):
    from lit.ablation_report import write_report

    studies = {
        "mixer_type": [
            _cell(f"S,{x},{x},{x}", "mqar_T64_kv4", score + 0.01 * seed, seed)
            for x, score in (("D", 0.9), ("M", 0.6), ("G", 0.95))
            for seed in (0, 1)
        ]
        + [
            _cell(f"S,{x},{x},{x}", "synthetic", score, seed, per_task={"ocr": score, "chart": score})
            for x, score in (("D", 0.5), ("M", 0.3), ("G", 0.2))
            for seed in (0, 1)
        ],
        "swa_ratio": [
            _cell(
                layout,
                "synthetic",
                0.5,
                seed,
                per_task={"ocr": ocr, "chart": 0.2, "video_memory": 0.5},
                distance_accuracy={"6": 0.9, "22": 0.9, "70": far + 0.01 * seed},
                window_frames=16.0,
            )
            for layout, ocr, far in (
                ("D x4", 0.1, 0.8),
                ("S,D,D,D", 0.5, 0.85),
                ("S,D,S,D", 0.6, 0.8),
                ("S x4", 0.3, 0.1),
            )
            for seed in (0, 1, 2)
        ],
        "init": [
            _cell("S,D,D,D", f"distill_{init}", score + 0.1 * seed, seed, init=init, teacher_accuracy=0.5 + 0.1 * seed)
            for init, score in (("mimic", 0.4), ("transfer", 0.3))
            for seed in (0, 1)
        ],
    }
    results = tmp_path / "results"
    for name, cells in studies.items():
        (results / name / "cells").mkdir(parents=True)
        for number, cell in enumerate(cells):
            (results / name / "cells" / f"{number}.json").write_text(json.dumps(cell))
    (results / "swa_ratio" / "summary.json").write_text(json.dumps({"complete": False, "cells": 12, "total_cells": 15}))
    report = write_report(results, tmp_path / "RESULTS.md").read_text()
    assert "**Reproduced.** Gated DeltaNet beats Mamba2 and GLA on text-rich tasks" in report
    assert "**Not reproduced.** Gated DeltaNet recalls at least as well as Mamba2 and GLA on MQAR" in report
    assert "in 0 of 1 (task, width) settings: mqar_T64_kv4 d128: D 0.905, M 0.605, G 0.955" in report
    assert (
        "**Reproduced.** More SWA helps text-rich tasks with diminishing returns (share: accuracy) 0: 0.150, "
        "0.25: 0.350, 0.5: 0.400, 1: 0.250." in report
    )
    assert (
        "**Reproduced.** Window-only models lose answers beyond the window (16 frames, reaching 64 frames through 4 "
        "layers): held-out video-memory accuracy of `S x4` is 0.900 within one window and 0.110 beyond the reach"
        in report
    )
    assert "| `S x4` | 0.900 ± 0.000 | 0.900 ± 0.000 | 0.110 ± 0.010 |" in report
    assert "## swa_ratio (12 of 15 cells)" in report
    for figure in ("mixer_type.png", "swa_ratio.png", "swa_ratio_video_memory_distance.png"):
        assert (tmp_path / "figures" / figure).stat().st_size > 1000
    assert (
        "mimic 0.450 ± 0.071, transfer 0.350 ± 0.071 after distillation and fine-tuning; their Transformer teachers "
        "score 0.550 ± 0.071." in report
    )
    for path in (results / "swa_ratio" / "cells").glob("*.json"):  # no cue beyond what 4 stacked windows reach
        cell = json.loads(path.read_text())
        del cell["distance_accuracy"]["70"]
        path.write_text(json.dumps(cell))
    near = write_report(results, tmp_path / "near.md").read_text()
    assert (
        "**Not measured.** Window-only models lose answers beyond the window: the farthest cue measured, 22 frames "
        "back, lies within what the 4 stacked windows of `S x4` reach (4 x 16 = 64 frames)" in near
    )
    (results / "mixer_type" / "cells").rename(tmp_path / "mixer_cells")
    for path in (results / "swa_ratio" / "cells").glob("*.json"):
        path.unlink()
    (results / "mixer_type" / "cells").mkdir()
    for path in (tmp_path / "mixer_cells").glob("*.json"):
        if "mqar" in path.read_text():
            path.rename(results / "mixer_type" / "cells" / path.name)
    partial = write_report(results, tmp_path / "partial.md").read_text()  # every claim still gets a paragraph
    assert "**Not measured.** Gated DeltaNet vs Mamba2 and GLA on text-rich tasks: cells missing." in partial
    assert "**Not measured.** More SWA helps text-rich tasks with diminishing returns: needs cells at 3" in partial
    assert "**Not measured.** Window-only models lose answers beyond the window: needs" in partial
    assert "**Not reproduced.** Gated DeltaNet recalls at least as well" in partial
    for path in (results / "init" / "cells").glob("*.json"):
        path.unlink()
    assert "init cells missing" in write_report(results, tmp_path / "no_init.md").read_text()


def test_mixer_plot_gives_a_mixer_one_colour_and_tells_hybrid_from_pure_stacks():
    from lit.ablation_report import layout_style

    hybrid = {x: layout_style(f"S,{x},{x},{x}") for x in "DMGL"}
    pure = {x: layout_style(f"{x} x4") for x in "DMGL"}
    assert len({style["color"] for style in hybrid.values()}) == 4
    for x in "DMGL":
        assert hybrid[x]["color"] == pure[x]["color"] and hybrid[x]["linestyle"] != pure[x]["linestyle"]
    references = {layout_style("S x4")["color"], layout_style("A x4")["color"]}
    assert len(references) == 2 and not references & {style["color"] for style in hybrid.values()}


def test_a_cell_stopped_part_way_resumes_from_its_checkpoint_to_the_same_result(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(ablation, "CHECKPOINT_EVERY", 2)  # smoke cells train 4 steps
    whole = ablation.run_study(MIXER_TYPE, smoke=True, out=tmp_path / "whole")

    class MachineLost(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                raise RuntimeError("machine lost")

    real_trainer = L.Trainer

    def trainer_losing_its_machine(**kwargs):
        return real_trainer(**{**kwargs, "callbacks": [*kwargs["callbacks"], MachineLost()]})

    with monkeypatch.context() as patch:
        patch.setattr(L, "Trainer", trainer_losing_its_machine)
        stopped = ablation.run_study(MIXER_TYPE, smoke=True, out=tmp_path / "resumed")
    assert stopped["cells"] == 0 and len(stopped["failed"]) == 2
    with caplog.at_level(logging.INFO, logger="hybridvl.ablation"):
        resumed = ablation.run_study(MIXER_TYPE, smoke=True, out=tmp_path / "resumed")
    assert resumed["complete"] and caplog.text.count("resuming from") == 2
    assert caplog.text.count("step 4/4") == 2 and "since step 2" in caplog.text  # progress lines
    for path in sorted((tmp_path / "whole" / "cells").glob("*.json")):
        first, again = (
            json.loads(path.read_text()),
            json.loads((tmp_path / "resumed" / "cells" / path.name).read_text()),
        )
        assert (first["resumed_from_step"], again["resumed_from_step"]) == (0, 2)
        assert (again["accuracy"], again["val_loss"]) == (first["accuracy"], first["val_loss"])
        runs = [tmp_path / name / "runs" / first["cell"] for name in ("whole", "resumed")]
        weights = [load_file(run / "model" / "model.safetensors") for run in runs]
        assert weights[0].keys() == weights[1].keys()
        assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
        assert not (runs[1] / "checkpoints").exists()  # a finished cell keeps its JSON and model only
    assert [row["mean"] for row in resumed["rows"]] == [row["mean"] for row in whole["rows"]]


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path, caplog):
    study = ablation.load_study(MIXER_TYPE, smoke=True)
    cell = ablation.expand(study)[0]
    cell_dir = tmp_path / "runs" / cell.id
    assert ablation._resume_point(cell, study, cell_dir) is None
    (cell_dir / "checkpoints").mkdir()
    (cell_dir / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint")
    assert ablation._resume_point(cell, study, cell_dir) == cell_dir / "checkpoints" / "last.ckpt"
    study["train"]["max_steps"] += 1
    with caplog.at_level(logging.INFO, logger="hybridvl.ablation"):
        assert ablation._resume_point(cell, study, cell_dir) is None
    assert "starting afresh" in caplog.text and not (cell_dir / "checkpoints").exists()


def test_a_synthetic_cell_validates_on_val_size_samples_per_task(tmp_path):
    study = ablation.load_study(MIXER_TYPE.parent / "swa_ratio.yaml")
    cell = next(cell for cell in ablation.expand(study) if cell.task_dict["type"] == "synthetic")
    from models.tiny_qwen import make_tiny_qwen2_5_vl

    make_tiny_qwen2_5_vl(tmp_path / "processor")
    data, *_ = ablation._data(cell, study, tmp_path / "processor")
    (train,), (val,) = data.hparams.train, data.hparams.val
    assert train["size_per_task"] == cell.task_dict["size_per_task"] and train["seed"] == cell.seed
    assert val["size_per_task"] == study["train"]["val_size"] and val["split"] == "val"
    assert val["video_frames"] == train["video_frames"] and "eval_distances" not in val


def test_a_cell_trained_in_an_earlier_run_keeps_that_runs_device_sharing(tmp_path, monkeypatch):
    """A cell whose training finished but whose evaluation failed is evaluated in a later run; its step time is
    the earlier run's, and so is the number of cells that shared the device then."""
    study = ablation.load_study(MIXER_TYPE, smoke=True)
    cell = ablation.expand(study)[0]
    monkeypatch.setattr(ablation, "CHECKPOINT_EVERY", 2)  # smoke cells train 4 steps
    with monkeypatch.context() as patch:
        patch.setattr(ablation, "_distance_accuracy", lambda *args: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            ablation.run_cell(cell, study, tmp_path, tmp_path / "processor", concurrent_cells=3)
    result = ablation.run_cell(cell, study, tmp_path, tmp_path / "processor", concurrent_cells=1)
    assert result["resumed_from_step"] == study["train"]["max_steps"] and result["concurrent_cells"] == 3


def test_report_compares_other_runs_cell_by_cell(tmp_path):
    from lit.ablation_report import write_report

    results = tmp_path / "results"
    runs = {
        results / "mixer_type": (1.0, 0.9, 0.8),
        results / "mixer_type" / "other_runs" / "a": (1.0, 0.5),
        results / "mixer_type" / "other_runs" / "b": (1.0, 0.9, 0.803),
    }
    for folder, accuracies in runs.items():
        (folder / "cells").mkdir(parents=True)
        for seed, accuracy in enumerate(accuracies):
            cell = _cell("S,D,D,D", "mqar_T64_kv4", accuracy, seed, cell=f"c{seed}")
            (folder / "cells" / f"c{seed}.json").write_text(json.dumps(cell))
    report = write_report(results, tmp_path / "RESULTS.md").read_text()
    assert "`mixer_type/other_runs/a` reached 2 of the 3 cells; 1 of 2 reproduce their accuracy within 0.005" in report
    table = "  | cell | accuracy | a |\n  |---|---|---|\n  | c1 | 0.900 | 0.500 |\n"
    assert table + "\n- `mixer_type/other_runs/b` reached 3 of the 3 cells; 3 of 3 reproduce" in report
    assert "3 of 3 reproduce their accuracy within 0.005.\n" in report
    assert "| c0 |" not in report
    shutil.rmtree(results / "mixer_type" / "other_runs")
    assert "## Other runs" not in write_report(results, tmp_path / "none.md").read_text()


def test_report_adds_up_the_device_time_of_the_studies_runs(tmp_path):
    from lit.ablation_report import write_report

    results = tmp_path / "results"
    runs = {  # mixer_type's second run overlaps swa_ratio's run by 60 s; init recorded nothing
        "mixer_type": [("2026-01-01T10:00:00+00:00", 300.0), ("2026-01-01T10:10:00+00:00", 240.0)],
        "swa_ratio": [("2026-01-01T10:13:00+00:00", 120.0)],
        "init": [],
    }
    for name, spans in runs.items():
        (results / name / "cells").mkdir(parents=True)
        (results / name / "cells" / "c.json").write_text(json.dumps(_cell("S,D,D,D", "t", 0.5, 0, cell="c")))
        if spans:
            records = [{"started": start, "seconds": seconds, "device": "H100"} for start, seconds in spans]
            (results / name / ablation.INVOCATIONS).write_text(json.dumps(records))
    report = write_report(results, tmp_path / "RESULTS.md").read_text()
    assert "took 10.0 minutes of wall time on H100" in report  # 300 + 240 + 120 - 60 seconds
    assert "- `mixer_type`: 9.0 minutes in 2 runs" in report and "- `swa_ratio`: 2.0 minutes in 1 run\n" in report
    assert "- `init`: not recorded" in report


@pytest.mark.gpu
def test_an_mqar_training_step_is_bitwise_repeatable_on_cuda(tmp_path):
    """One bf16 training step of each S,X,X,X layout, built and batched as the study's cells are (kernels and
    per-mixer backends included), gives the same gradients bit for bit when repeated: cells whose accuracy
    differs between runs do not get that from the step itself."""
    from lit.modules import SFT

    study = ablation.load_study(MIXER_TYPE)
    study["train"]["train_examples"] = 512
    for cell in ablation.expand(study):
        if cell.task_dict["type"] != "mqar" or cell.seed or cell.d_model != 64 or cell.learning_rate != 3e-3:
            continue
        data, vocab, vision, token_ids = ablation._data(cell, study, tmp_path / "processor")
        width = ablation.matched_intermediate_size(cell, study, vocab, vision, token_ids)
        config = ablation.model_config(cell, study, vocab, vision, width, token_ids)
        torch.manual_seed(0)
        HybridVLM(config).save_pretrained(tmp_path / cell.id)
        stage = SFT(model=str(tmp_path / cell.id), trainable=["*"])
        stage.configure_model()
        stage.cuda()
        batch = next(iter(data.train_dataloader())).to("cuda")
        grads = []
        for _ in range(2):
            stage.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = stage.compute_loss(batch)
            loss.backward()
            grads.append({name: p.grad.clone() for name, p in stage.named_parameters() if p.grad is not None})
        differ = [name for name, grad in grads[0].items() if not torch.equal(grad, grads[1][name])]
        assert len(grads[0]) > 10 and not differ, f"{cell.layout}: {differ}"
