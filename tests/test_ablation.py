"""The ablation runner: study files checked key by key, the cells they define (learning-rate sweeps first),
running, resuming, time budgets, workers, failures, the device-time record, and the report (CPU, smoke sizes)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from hybridvl import mixers
from hybridvl.lit.ablation import cells as cells_module
from hybridvl.lit.ablation import runner
from hybridvl.lit.ablation.cells import (
    Cell,
    choose_learning_rate,
    count_parameters,
    expand,
    matched_intermediate_size,
    model_config,
)
from hybridvl.lit.ablation.schema import StudyError, load_study
from hybridvl.lit.commands.ablate import main as ablate
from hybridvl.models.hybrid import HybridVLM

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "experiments" / "ablations"
MIXER_TYPE = STUDIES / "mixer_type.yaml"
RECALL = STUDIES / "recall.yaml"
TINY = """\
name: tiny
arms: ["S,D", "A,A"]
grid: {d_model: [16], seed: [0], learning_rate: [1.0e-3]}
tasks: [{type: mqar, vocab_size: 64, seq_len: 16, num_kv_pairs: 2}]
train: {max_steps: 4, max_tokens: 64, train_examples: 32, val_examples: 8, test_examples: 8, eval_every: 2,
        window: 4}
"""


def _write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_study_expands_at_full_and_smoke_size():
    for path in sorted(STUDIES.glob("*.yaml")):
        for smoke in (False, True):
            assert expand(load_study(path, smoke)), (path, smoke)


GRID = "grid: {d_model: [8], seed: [0], learning_rate: [1.0e-3]}\n"
TASK = "tasks: [{type: mqar, vocab_size: 64, seq_len: 16, num_kv_pairs: 2}]\n"
ARMS = "arms: ['S,D']\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: x\nbatch: 1\n" + ARMS + GRID + TASK, "study: unknown key 'batch'"),
        ("name: x\n" + ARMS + GRID.replace("seed", "seeds") + TASK, "grid: unknown key 'seeds'"),
        ("name: x\n" + ARMS + GRID.replace("[8]", "[]") + TASK, "grid.d_model: needs a non-empty list"),
        ("name: x\n" + ARMS + GRID.replace("[8]", "['wide']") + TASK, "grid.d_model: expected positive int"),
        ("name: x\n" + ARMS + GRID.replace("[0]", "[0, 0]") + TASK, "grid.seed: lists a value twice"),
        ("name: x\n" + ARMS + GRID, "tasks: a study needs at least one task"),
        ("name: x\narms: ['S,,D']\n" + GRID + TASK, "arms\\[0\\].layout: empty item"),
        ("name: x\narms: [{layout: 'S,D', depth: 2}]\n" + GRID + TASK, "arms\\[0\\]: unknown key 'depth'"),
        ("name: x\narms: [{name: a}]\n" + GRID + TASK, "arms\\[0\\]: an arm needs a layout"),
        ("name: x\narms: ['S,D', 'S,D']\n" + GRID + TASK, "arm names must be non-empty and unique"),
        ("name: x\narms: [{layout: 'S,D', mixer_options: {M: {d_state: 8}}}]\n" + GRID + TASK, "does not use"),
        ("name: x\narms: [{layout: 'S,D', mixer_options: {Q: {}}}]\n" + GRID + TASK, "Q"),
        (
            "name: x\narms: [{layout: 'S,D', mixer_options: {D: {heads: 2}}}]\n" + GRID + TASK,
            "arm 'S,D' at d_model 8: .*heads",
        ),
        ("name: x\narms: [{layout: 'D', sizes: [{D: {head_dim: 0}}]}]\n" + GRID + TASK, "arm 'D', size 0"),
        ("name: x\narms: [{layout: 'D', mlp_ratio: -1}]\n" + GRID + TASK, "mlp_ratio: must be >= 0"),
        ("name: x\n" + ARMS + GRID + "tasks: [{type: essay}]", "tasks\\[0\\].type: must be one of"),
        ("name: x\n" + ARMS + GRID + "tasks: [{type: mqar, grid: {depth: [2]}}]", "tasks\\[0\\].grid: unknown key"),
        ("name: x\n" + ARMS + GRID + "tasks: [{type: mqar, grid: {arm: [Z]}}]", "no arm named 'Z'"),
        ("name: x\n" + ARMS + GRID + "tasks: [{type: mqar, kv: 4}]", "tasks\\[0\\]: unknown key 'kv'"),
        ("name: x\n" + ARMS + GRID + "tasks: [{type: mqar, seq_len: 15}]", "tasks\\[0\\]: .*even"),
        ("name: x\n" + ARMS + GRID + "tasks: [{type: mqar, train: {steps: 2}}]", "tasks\\[0\\].train: unknown key"),
        ("name: x\n" + ARMS + GRID + "tasks: [{type: mqar, train: {max_steps: 0}}]", "max_steps: must be at least 1"),
        ("name: x\n" + ARMS + GRID + "tasks: [{type: mqar, eval_sets: {far: {}}}]", "unknown key 'eval_sets'"),
        (
            "name: x\n" + ARMS + GRID + "tasks: [{type: synthetic, eval_sets: {far: {max_distance: 3}}}]",
            "tasks\\[0\\].eval_sets.far: .*even",
        ),
        (
            "name: x\n" + ARMS + GRID + "tasks: [{type: synthetic, eval_sets: {far: {depth: 3}}}]",
            "tasks\\[0\\].eval_sets.far: unknown key 'depth'",
        ),
        ("name: x\n" + ARMS + GRID + "tasks: [{type: synthetic, eval_sets: {far: 3}}]", "eval_sets.far: .*mapping"),
        ("name: x\n" + ARMS + GRID + "tasks: [{type: synthetic, eval_sets: {'a b': {}}}]", "letters, digits"),
        ("name: x\n" + ARMS + GRID + "tasks: [{type: synthetic}]\ntrain: {test_size: 0}", "test_size: must be"),
        ("name: x\n" + ARMS + GRID + "tasks: [{type: distill, init: copy}]", "mimic or transfer"),
        ("name: x\n" + ARMS + GRID + TASK + "train: {steps: 2}", "train: unknown key 'steps'"),
        ("name: x\n" + ARMS + GRID + TASK + "train: {max_steps: many}", "train.max_steps: expected int"),
        ("name: x\n" + ARMS + GRID + TASK + "train: {precision: fp8}", "precision: must be"),
        ("name: x\n" + ARMS + GRID + TASK + "train: {backends: {D: cuda}}", "supports backends"),
        ("name: x\n" + ARMS + GRID + TASK + "tuning: {seed: [0]}", "tuning: unknown key 'seed'"),
        ("name: x\n" + ARMS + GRID + TASK + "smoke: {grid: {size: [1]}}", None),
        ("name: x\n" + ARMS + GRID + TASK + "plugins: [no_such_module_of_mixers]", "cannot import"),
        ("name: x\n" + ARMS + GRID + TASK + "match_parameters: 'S,,A'", "match_parameters: empty item"),
        ("arms: ['S,D']\n" + GRID + TASK, "a study needs a name"),
        ("- not a mapping", "a study must be a mapping"),
    ],
)
def test_a_bad_study_names_the_problem_and_where_it_sits(tmp_path, text, message):
    path = _write(tmp_path, text)
    if message is None:  # a smoke section is checked when it is merged in
        load_study(path)
        with pytest.raises(StudyError, match="grid: unknown key 'size'"):
            load_study(path, smoke=True)
        return
    with pytest.raises(StudyError, match=message):
        load_study(path)


def test_a_bad_study_gives_one_line_and_status_2_from_the_command_line(tmp_path, capsys):
    path = _write(tmp_path, "name: x\n" + ARMS + GRID + "tasks: [{type: mqar, grid: {depth: [2]}}]")
    assert ablate(["--config", str(path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "tasks[0].grid: unknown key 'depth'" in error and "Traceback" not in error
    assert ablate(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_task_grid_replaces_the_study_grid_for_that_task(tmp_path):
    path = _write(
        tmp_path,
        "name: x\narms: ['S,D', 'A,A']\ngrid: {d_model: [8, 16], seed: [0, 1], learning_rate: [1]}\n"
        "tasks: [{type: mqar, vocab_size: 64, seq_len: 16, num_kv_pairs: 2},"
        " {type: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 2, grid: {d_model: [16], seed: [3], arm: ['A,A']}}]",
    )
    study = load_study(path)
    found = expand(study)
    assert len(found) == 2 * 2 * 2 + 1
    (last,) = [cell for cell in found if cell.task.get("seq_len") == 32]
    assert (last.arm, last.d_model, last.seed) == ("A,A", 16, 3)


def test_a_sweep_on_the_tuning_seeds_decides_the_rate_of_the_other_seeds(tmp_path):
    path = _write(tmp_path, TINY.replace("seed: [0]", "seed: [0, 1, 2]").replace("[1.0e-3]", "[1.0e-3, 1.0e-2]")
                  + "tuning: {seeds: [0]}\n")  # fmt: skip
    study = load_study(path)
    sweep = expand(study)
    assert {(cell.seed, cell.learning_rate) for cell in sweep} == {(0, 1e-3), (0, 1e-2)}
    scores = {1e-3: 0.4, 1e-2: 0.9}
    finished = {cell.id(study): {"learning_rate": cell.learning_rate, "val_accuracy": scores[cell.learning_rate],
                                 "val_loss": 1.0} for cell in sweep}  # fmt: skip
    after = expand(study, finished)
    assert len(after) == 2 * (2 + 2)
    assert {(cell.seed, cell.learning_rate) for cell in after if cell.seed} == {(1, 1e-2), (2, 1e-2)}
    assert expand(study, {key: finished[key] for key in list(finished)[:1]}) == sweep  # the sweep is not done


@pytest.mark.parametrize(("scores", "extended"), [((0.95, 0.3), True), ((0.95, 0.92), False), ((0.4, 0.3), False)])
def test_groups_whose_seeds_split_get_the_bimodal_seeds(tmp_path, scores, extended):
    path = _write(tmp_path, TINY.replace("seed: [0]", "seed: [0, 1]").replace("[1.0e-3]", "[1.0e-3, 1.0e-2]")
                  + "tuning: {seeds: [0], bimodal_seeds: [2, 3]}\n")  # fmt: skip
    study = load_study(path)
    finished = {}
    for _ in range(3):  # the sweep, then the grid's seeds at the chosen rate, then (if they split) two more
        for cell in expand(study, finished):
            score = scores[cell.seed % 2] if cell.learning_rate == 1e-2 else 0.0
            finished.setdefault(cell.id(study), {"learning_rate": cell.learning_rate, "val_accuracy": score})
    seeds = {cell.seed for cell in expand(study, finished) if cell.learning_rate == 1e-2}
    assert seeds == ({0, 1, 2, 3} if extended else {0, 1})
    with pytest.raises(StudyError, match="bimodal_seeds: are added to the grid's seeds"):
        load_study(_write(tmp_path, TINY + "tuning: {seeds: [0], bimodal_seeds: [0]}\n", "bad.yaml"))


def test_the_learning_rate_is_chosen_on_validation_accuracy_then_loss():
    results = [
        {"learning_rate": 1e-3, "val_accuracy": 0.9, "val_loss": 0.5, "accuracy": 0.1},
        {"learning_rate": 1e-2, "val_accuracy": 0.9, "val_loss": 0.3, "accuracy": 0.0},
        {"learning_rate": 3e-2, "val_accuracy": 0.5, "val_loss": 0.1, "accuracy": 1.0},
    ]
    assert choose_learning_rate(results) == 1e-2  # not the one the test set would have picked


def test_parameter_matching_equalises_model_sizes(tmp_path):
    path = _write(tmp_path, TINY.replace('arms: ["S,D", "A,A"]', 'arms: ["S,D,D,D", "M x4", "G x4", "L x4", "A x4"]')
                  + 'match_parameters: "A x4"\n')  # fmt: skip
    study = load_study(path)
    counts = {}
    for arm in study.arms:
        cell = Cell(arm.name, 0, study.tasks[0], 128, 0, 1e-3)
        width = matched_intermediate_size(study, cell, 8192)
        counts[arm.name] = count_parameters(model_config(study, cell, 8192, intermediate_size=width))
    reference = counts["A x4"]
    assert all(abs(count - reference) / reference < 0.01 for count in counts.values()), counts


def test_an_arm_sets_its_options_size_and_mlp_and_the_study_its_backends():
    study = load_study(RECALL)
    task = study.tasks[0]
    textbook = model_config(study, Cell("L-textbook", 0, task, 128, 0, 1e-3), 8192)
    assert textbook.intermediate_size == 0 and textbook.layout == "L x2"
    assert textbook.mixer_options["L"] | {} == {"num_heads": 2, "head_dim": 32, "expand_v": 2, "conv_size": 0,
                                                "feature_map": "elu1", "qk_norm": "none", "normalize": True,
                                                "output_norm": False}  # fmt: skip
    assert model_config(study, Cell("D+MLP", 0, task, 128, 0, 1e-3), 8192).intermediate_size == 256
    mixer_type = load_study(MIXER_TYPE)
    config = model_config(mixer_type, Cell("S,G,G,G", 0, mixer_type.tasks[0], 128, 0, 1e-3), 8192)
    model = HybridVLM(config)
    assert {layer.self_attn.backend for layer in model.language_model.layers[1:]} == {"torch"}
    assert "backend" not in config.mixer_options.get("S", {})


def test_the_recall_arms_share_state_size_points():
    """Every linear arm of recall.yaml holds about the same state at each of its sizes (within the convolution
    tails), so the figure compares them at equal state."""
    study = load_study(RECALL)
    task = study.tasks[0]
    sizes = {}
    for name in ("D", "M", "G", "L", "L-textbook"):
        sizes[name] = []
        for size in range(study.arm(name).size_count):
            model = HybridVLM(model_config(study, Cell(name, size, task, 128, 0, 1e-3), 8192))
            sizes[name].append(sum(layer.self_attn.state_bytes(1, dtype=torch.bfloat16)
                                   for layer in model.language_model.layers))  # fmt: skip
    for name, found in sizes.items():
        assert len(found) >= 3 and found == sorted(found)
        for mine, ds in zip(found, sizes["D"]):
            assert 0.75 < mine / ds < 1.34, (name, found, sizes["D"])


def test_a_stale_or_missing_cell_runs_again_and_finished_cells_do_not(tmp_path, monkeypatch, caplog):
    path = _write(tmp_path, TINY)
    out = tmp_path / "out"
    summary = runner.run_study(path, out=out)
    assert summary["complete"] and summary["cells"] == 2
    cell_files = sorted((out / "cells").glob("*.json"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    with monkeypatch.context() as patch:
        patch.setattr(runner, "run_cell", must_not_run)
        assert runner.run_study(path, out=out)["complete"]
    cell_files[0].unlink()
    assert runner.run_study(path, out=out)["cells"] == 2 and cell_files[0].is_file()
    path.write_text(TINY.replace("max_steps: 4", "max_steps: 6"))
    with caplog.at_level(logging.WARNING, logger="hybridvl.ablation"):
        summary = runner.run_study(path, out=out)
    assert "trained with other settings (['train'] differ)" in caplog.text
    assert {json.loads(p.read_text())["steps"] for p in cell_files} == {6}


def test_time_budget_stops_starting_cells_and_the_next_run_finishes(tmp_path):
    path = _write(tmp_path, TINY)
    summary = runner.run_study(path, out=tmp_path / "out", time_budget=0)
    assert summary["cells"] == 0 and summary["total_cells"] == 2 and not summary["complete"]
    assert "(0 of 2 cells so far)" in (tmp_path / "out" / "summary.md").read_text()
    assert not (tmp_path / "out" / runner.INVOCATIONS).exists()  # a run that trains nothing takes no device time
    summary = runner.run_study(path, out=tmp_path / "out")
    assert summary["complete"]
    (record,) = json.loads((tmp_path / "out" / runner.INVOCATIONS).read_text())
    assert record["ended_by"] == "returned" and record["cells_done"] == 2 and record["cell_steps"] == 8
    assert record["device"] == "cpu" and record["seconds"] > 0


def test_cells_run_in_worker_processes_with_their_share_of_threads(tmp_path, capfd, caplog):
    path = _write(tmp_path, TINY)
    caplog.set_level(logging.INFO, logger="hybridvl")  # the cells' processes take the study's log level
    summary = runner.run_study(path, out=tmp_path / "out", workers=2)
    assert summary["complete"] and not summary["failed"]
    (record,) = json.loads((tmp_path / "out" / runner.INVOCATIONS).read_text())
    assert record["workers"] == 2 and record["cell_steps"] == 8
    assert capfd.readouterr().err.count(": step 4/4, ") == 2  # the cells' processes log their progress
    assert {row["concurrent_cells"] for row in summary["rows"]} == {2}
    assert not list((tmp_path / "out" / "cells").glob("*.partial"))


def test_a_run_stopped_by_sigterm_still_records_its_wall_time(tmp_path):
    script = (
        "import os, signal, sys; from pathlib import Path\n"
        "from hybridvl.lit.ablation.runner import _logged_invocation\n"
        "with _logged_invocation(Path(sys.argv[1]), 3):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "print('not stopped')\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == -signal.SIGTERM and "not stopped" not in run.stdout, run.stderr
    (record,) = json.loads((tmp_path / runner.INVOCATIONS).read_text())
    assert record["ended_by"] == "SIGTERM" and record["workers"] == 3 and record["seconds"] >= 0


def test_a_cell_process_takes_its_share_of_cpu_threads_and_the_study_log_level():
    project, threads = logging.getLogger("hybridvl"), torch.get_num_threads()
    try:  # the project logger's level and handlers are put back by conftest's _project_logging
        runner._start_worker(logging.DEBUG, 1)
        assert torch.get_num_threads() == 1 and project.level == logging.DEBUG and project.handlers
    finally:
        torch.set_num_threads(threads)


def test_a_failing_cell_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    path = _write(tmp_path, TINY)
    real_run_cell = runner.run_cell

    def first_arm_breaks(study, cell, *args, **kwargs):
        if cell.arm == "S,D":
            raise RuntimeError("CUDA error: out of memory")
        return real_run_cell(study, cell, *args, **kwargs)

    monkeypatch.setattr(runner, "run_cell", first_arm_breaks)
    assert ablate(["--config", str(path), "--out", str(tmp_path / "out")]) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cells"] == 1 and not summary["complete"]
    (failed,) = summary["failed"]
    assert failed.startswith("SD__") and summary["failed"][failed] == "RuntimeError: CUDA error: out of memory"
    assert f"`{failed}` failed: RuntimeError" in capsys.readouterr().out
    monkeypatch.undo()
    assert ablate(["--config", str(path), "--out", str(tmp_path / "out")]) == 0  # retried, then complete


def _plugin(tmp_path: Path, monkeypatch, module: str, source: str) -> None:
    """Write a plugin module a study can name, importable here and in the cells' processes."""
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))


def test_a_worker_process_that_dies_fails_its_cells_and_the_study_goes_on(tmp_path, monkeypatch):
    """A cell whose process dies (a CUDA fault can abort one) is reported failed with its exit code; it takes no
    other cell with it, and the run returns rather than raise."""
    _plugin(
        tmp_path,
        monkeypatch,
        "crashing_mixer",
        "import multiprocessing, os\n"
        "from hybridvl import mixers\n"
        "from hybridvl.mixers.linear import LinearAttention\n\n"
        "@mixers.register_mixer('K', 'crashing_linear')\n"
        "class CrashingLinear(LinearAttention):\n"
        "    letter, name = 'K', 'crashing_linear'\n\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        super().__init__(*args, **kwargs)\n"
        "        if multiprocessing.parent_process() is not None:  # in a worker: die as an aborted process does\n"
        "            os._exit(3)\n",
    )
    study = TINY.replace('arms: ["S,D", "A,A"]', "plugins: [crashing_mixer]\narms: ['K,K', 'A,A']")
    path = _write(tmp_path, study.replace("seed: [0]", "seed: [0, 1, 2]"))
    summary = runner.run_study(path, out=tmp_path / "out", workers=2)
    assert set(summary["failed"]) == {f"KK__mqar_T16_kv2__d16__s{seed}__lr0.001" for seed in range(3)}
    assert set(summary["failed"].values()) == {"its process died (exit code 3)"}
    assert len(list((tmp_path / "out" / "cells").glob("AA__*.json"))) == 3  # every cell beside them trained
    assert not summary["complete"]


def test_a_worker_trains_cells_one_after_another_and_a_failed_cell_ends_it(tmp_path, monkeypatch):
    """Two workers train five cells: a worker takes cell after cell in one process (imports and kernels serve many
    cells), and a cell that fails ends its worker, so the next cell gets a fresh process."""
    log = tmp_path / "pids.txt"
    _plugin(
        tmp_path,
        monkeypatch,
        "pid_mixer",
        "import multiprocessing, os\n"
        "from hybridvl import mixers\n"
        "from hybridvl.mixers.linear import LinearAttention\n\n"
        "@mixers.register_mixer('P', 'pid_linear')\n"
        "class PidLinear(LinearAttention):\n"
        "    letter, name = 'P', 'pid_linear'\n\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        super().__init__(*args, **kwargs)\n"
        "        with open(os.environ['PID_LOG'], 'a') as log:\n"
        "            log.write(f'{os.getpid()}\\n')\n"
        "        if multiprocessing.parent_process():\n"
        "            try:  # created atomically: of two workers starting together, one cell breaks\n"
        "                os.close(os.open(os.environ['PID_LOG'] + '.failed', os.O_CREAT | os.O_EXCL))\n"
        "            except FileExistsError:\n"
        "                return\n"
        "            raise RuntimeError('the first cell breaks')\n",
    )
    monkeypatch.setenv("PID_LOG", str(log))
    study = TINY.replace('arms: ["S,D", "A,A"]', "plugins: [pid_mixer]\narms: ['P,A']")
    path = _write(tmp_path, study.replace("seed: [0]", "seed: [0, 1, 2, 3, 4]"))
    summary = runner.run_study(path, out=tmp_path / "out", workers=2)
    assert summary["cells"] == 4 and len(summary["failed"]) == 1
    assert set(summary["failed"].values()) == {"RuntimeError: the first cell breaks"}
    pids = [pid for pid in log.read_text().split() if pid != str(os.getpid())]  # this process sizes the models
    assert len(pids) == 5 and len(set(pids)) == 3  # two workers, and a fresh one after the failure
    assert pids.count(pids[0]) == 1  # the worker whose cell failed trained nothing more


def test_a_user_mixer_from_a_plugin_joins_a_study(tmp_path, monkeypatch):
    """A mixer registered by a module the study names under ``plugins`` can be an arm, also in worker processes."""
    _plugin(
        tmp_path,
        monkeypatch,
        "my_lab_mixers",
        "from hybridvl import mixers\n"
        "from hybridvl.mixers.linear import LinearAttention\n\n"
        "@mixers.register_mixer('E', 'echo_linear')\n"
        "class EchoLinear(LinearAttention):\n"
        "    letter, name = 'E', 'echo_linear'\n",
    )
    arms = "plugins: [my_lab_mixers]\narms: [{name: E, layout: 'E,E', sizes: [{E: {head_dim: 4}}, {E: {head_dim: 8}}]}]"
    path = _write(tmp_path, TINY.replace('arms: ["S,D", "A,A"]', arms))
    summary = runner.run_study(path, out=tmp_path / "out", workers=2)
    assert summary["complete"] and {(row["arm"], row["size"]) for row in summary["rows"]} == {("E", 0), ("E", 1)}
    (state0, state1) = sorted(row["state_bytes"] for row in summary["rows"])
    assert state0 < state1


def test_every_kind_of_multimodal_cell_runs_at_smoke_size(tmp_path):
    for name, workers in (("mixer_type", 2), ("swa_ratio", 1), ("init", 2)):
        summary = runner.run_study(STUDIES / f"{name}.yaml", smoke=True, out=tmp_path / name, workers=workers)
        assert summary["complete"] and summary["cells"] == summary["total_cells"] > 0 and not summary["failed"]
        assert all(0.0 <= row["mean"] <= 1.0 for row in summary["rows"])
    teacher_runs = tmp_path / "init" / "teachers" / "seed0" / "runs" / "teacher" / "lightning_logs"
    assert len(list(teacher_runs.iterdir())) == 1  # trained once, by whichever cell came first
    for path in (tmp_path / "swa_ratio" / "cells").glob("*.json"):
        result = json.loads(path.read_text())
        assert set(result["eval_sets"]) == {"inside_window", "beyond_reach"}
        for scores in [result, *result["eval_sets"].values()]:  # the test split, and each eval set
            assert set(scores["per_task"]) == set(scores["chance"]) == {"video_memory"}
            assert scores["chance"]["video_memory"] == pytest.approx(1 / 6)
            assert 0 <= scores["accuracy"] <= 1
        assert result["val_per_task"].keys() == {"video_memory"} and "val_accuracy" in result
        assert result["window"] == (4 if "S" in result["layout"] else None)


def test_a_synthetic_cell_stopped_part_way_resumes_from_its_checkpoint_to_the_same_result(tmp_path, monkeypatch):
    from hybridvl.lit.ablation import multimodal

    monkeypatch.setattr(multimodal, "CHECKPOINT_EVERY", 1)  # smoke cells train 2 steps
    one = "SD__*lr0.001"
    runner.run_study(MIXER_TYPE, smoke=True, out=tmp_path / "whole", only=one)

    class MachineLost(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                raise RuntimeError("machine lost")

    real_trainer = L.Trainer

    def trainer_losing_its_machine(**kwargs):
        return real_trainer(**{**kwargs, "callbacks": [*kwargs["callbacks"], MachineLost()]})

    with monkeypatch.context() as patch:
        patch.setattr(L, "Trainer", trainer_losing_its_machine)
        stopped = runner.run_study(MIXER_TYPE, smoke=True, out=tmp_path / "resumed", only=one)
    assert stopped["cells"] == 0 and len(stopped["failed"]) == 1
    runner.run_study(MIXER_TYPE, smoke=True, out=tmp_path / "resumed", only=one)
    for path in sorted((tmp_path / "whole" / "cells").glob("*.json")):
        first = json.loads(path.read_text())
        again = json.loads((tmp_path / "resumed" / "cells" / path.name).read_text())
        assert (first["resumed_from_step"], again["resumed_from_step"]) == (0, 1)  # the checkpoint of step 1
        assert (again["accuracy"], again["val_loss"]) == (first["accuracy"], first["val_loss"])
        runs = [tmp_path / name / "runs" / first["cell"] for name in ("whole", "resumed")]
        weights = [load_file(run / "model" / "model.safetensors") for run in runs]
        assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
        assert not (runs[1] / "checkpoints").exists()  # a finished cell keeps its JSON and model only


def test_a_run_folder_of_other_settings_is_emptied(tmp_path, caplog):
    study = load_study(_write(tmp_path, TINY))
    cell = expand(study)[0]
    run_dir = tmp_path / "runs" / cell.id(study)
    cells_module.prepare_run_dir(study, cell, run_dir)
    (run_dir / "checkpoint.pt").write_bytes(b"state")
    cells_module.prepare_run_dir(study, cell, run_dir)
    assert (run_dir / "checkpoint.pt").is_file()  # same settings: kept, to resume from
    study = load_study(_write(tmp_path, TINY.replace("max_steps: 4", "max_steps: 5")))
    with caplog.at_level(logging.INFO, logger="hybridvl.ablation"):
        cells_module.prepare_run_dir(study, cell, run_dir)
    assert "starting afresh" in caplog.text and not (run_dir / "checkpoint.pt").exists()


def test_the_repository_keeps_no_results_of_the_leaky_generator():
    """MQAR cells written before the generator stopped showing answers (no ``curve`` in them) are gone."""
    for path in (STUDIES / "results").rglob("cells/*mqar*.json"):
        assert "curve" in json.loads(path.read_text()), path
    for path in (STUDIES / "results").rglob("cells/*synthetic*.json"):  # scored on the test split, with chance
        assert {"eval_sets", "chance", "val_accuracy"} <= json.loads(path.read_text()).keys(), path


def test_only_the_cells_asked_for_train_and_the_summary_covers_the_study(tmp_path, capsys):
    path = _write(tmp_path, TINY)
    summary = runner.run_study(path, out=tmp_path / "out", only="SD__*, nothing*")
    assert [row["arm"] for row in summary["rows"]] == ["S,D"] and summary["total_cells"] == 2
    assert not summary["complete"]
    assert ablate(["--config", str(path), "--out", str(tmp_path / "out"), "--cells", "Q*"]) == 2
    assert "no cell of study tiny matches 'Q*'" in capsys.readouterr().err


def test_the_swa_ratio_regimes_place_video_cues_where_they_say(tmp_path):
    """Each regime's cue, in tokens before the position that predicts the answer (the processor's own grid):
    inside one window, between one window and the 8 stacked windows' reach, and beyond that reach."""
    from hybridvl.lit.data.encoding import encode
    from hybridvl.lit.data.synthetic import SyntheticSuite
    from hybridvl.models.chat import load_processor
    from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl

    study = load_study(Path("experiments/ablations/swa_ratio.yaml"))
    task, window = study.tasks[0], study.train.window
    reach = window * max(len(mixers.parse_layout(arm.layout)) for arm in study.arms if set(arm.layout) <= set("Sx 8"))
    bounds = {"inside_window": (0, window), "within_reach": (window, reach), "beyond_reach": (reach, 10**9)}
    processor = load_processor(make_tiny_qwen2_5_vl(tmp_path / "qwen", seed=0))
    pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    for name, options in task.eval_sets.items():
        suite = SyntheticSuite(**{**task.suite_options, **options, "size_per_task": 6}, split="test")
        low, high = bounds[name]
        for conversation in suite:
            sample = encode(conversation, processor)
            frames, height, width = sample.vision["video_grid_thw"][0].tolist()
            per_patch = height * width // processor.video_processor.merge_size**2
            positions = torch.nonzero(sample.input_ids == pad).flatten()
            assert len(positions) == frames * per_patch
            video_frames = suite.tasks[0].frames
            cue_patch = (video_frames - 2 - conversation.meta["distance"]) // 2
            distance = sample.prompt_length - 1 - int(positions[(cue_patch + 1) * per_patch - 1])
            assert low <= distance < high, (name, conversation.meta, distance)


def test_cells_of_a_shape_being_tuned_wait_while_other_shapes_start():
    from hybridvl.lit.ablation.runner import _next_cell

    study = load_study(STUDIES / "recall.yaml")
    cells = expand(study)
    first, same = cells[0], [c for c in cells[1:] if c.group == cells[0].group]
    other = next(c for c in cells if c.group != first.group)
    pending = [*same, other]
    assert _next_cell(pending, [first], set()) == len(same)  # the other shape starts; the same shape waits
    assert _next_cell(pending, [first], {first.group}) == 0  # tuned (its configs recorded): it starts
    assert _next_cell(same, [first], set()) == 0  # nothing else to start: no worker idles
