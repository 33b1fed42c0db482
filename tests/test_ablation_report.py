"""The ablation report: claims with verdicts from cells (recall and multimodal), figures, other runs and device
time (CPU, from cells written by the tests)."""

from __future__ import annotations

import json
import shutil

import pytest

from lit.ablation.recall_report import arm_scores, distance_bins, family, recall_claims
from lit.ablation.report import write_report
from lit.ablation.runner import INVOCATIONS
from lit.ablation.verdicts import Outcome


def _cell(layout: str, task: str, accuracy: float, seed: int, d_model: int = 128, **extra) -> dict:
    return {"layout": layout, "task": task, "d_model": d_model, "seed": seed, "learning_rate": 1e-3,
            "accuracy": accuracy, "task_config": {}, "device": "cpu", "versions": {}, **extra}  # fmt: skip


def test_report_gives_each_claim_a_verdict_from_the_cells(tmp_path):
    from lit.ablation.report import write_report

    studies = {
        "mixer_type": [
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
    for path in [*(results / "swa_ratio" / "cells").glob("*.json"), *(results / "mixer_type" / "cells").glob("*")]:
        path.unlink()
    partial = write_report(results, tmp_path / "partial.md").read_text()  # every claim still gets a paragraph
    assert "**Not measured.** Gated DeltaNet vs Mamba2 and GLA on text-rich tasks: cells missing." in partial
    assert "**Not measured.** More SWA helps text-rich tasks with diminishing returns: needs cells at 3" in partial
    assert "**Not measured.** Window-only models lose answers beyond the window: needs" in partial
    for path in (results / "init" / "cells").glob("*.json"):
        path.unlink()
    assert "init cells missing" in write_report(results, tmp_path / "no_init.md").read_text()


def test_mixer_plot_gives_a_mixer_one_colour_and_tells_hybrid_from_pure_stacks():
    from lit.ablation.multimodal_report import layout_style

    hybrid = {x: layout_style(f"S,{x},{x},{x}") for x in "DMGL"}
    pure = {x: layout_style(f"{x} x4") for x in "DMGL"}
    assert len({style["color"] for style in hybrid.values()}) == 4
    for x in "DMGL":
        assert hybrid[x]["color"] == pure[x]["color"] and hybrid[x]["linestyle"] != pure[x]["linestyle"]
    references = {layout_style("S x4")["color"], layout_style("A x4")["color"]}
    assert len(references) == 2 and not references & {style["color"] for style in hybrid.values()}


def test_report_compares_other_runs_cell_by_cell(tmp_path):
    from lit.ablation.report import write_report

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
    assert (
        "`mixer_type/other_runs/a` reached 2 of the 3 cells; 1 of 2 reproduce their accuracy exactly, 1 within 0.005"
        in report
    )
    table = "  | cell | accuracy | a |\n  |---|---|---|\n  | c1 | 0.900 | 0.500 |\n"
    assert (
        table
        + "\n- `mixer_type/other_runs/b` reached 3 of the 3 cells; 2 of 3 reproduce their accuracy exactly, 3 within"
        in report
    )
    assert "3 within 0.005.\n" in report
    assert "| c0 |" not in report
    shutil.rmtree(results / "mixer_type" / "other_runs")
    assert "## Other runs" not in write_report(results, tmp_path / "none.md").read_text()


def test_report_adds_up_the_device_time_of_the_studies_runs(tmp_path):
    from lit.ablation.report import write_report

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
            (results / name / INVOCATIONS).write_text(json.dumps(records))
    report = write_report(results, tmp_path / "RESULTS.md").read_text()
    assert "took 10.0 minutes of wall time on H100" in report  # 300 + 240 + 120 - 60 seconds
    assert "- `mixer_type`: 9.0 minutes in 2 runs" in report and "- `swa_ratio`: 2.0 minutes in 1 run\n" in report
    assert "- `init`: not recorded" in report


def _recall_cell(arm, layout, accuracy, seed, *, size=0, state=8192, mlp=0, options=None, task="mqar_T256_kv64",
                 window=None, far=None, rate=1e-3, val=None):  # fmt: skip
    """A recall cell as the runner writes it; ``far``: accuracy on queries beyond ``window`` (else ``accuracy``)."""
    length = 256
    asked = [0] + [4] * length
    if window is None:
        answered = [0] + [round(4 * accuracy)] * length
    else:
        answered = [0] + [round(4 * (accuracy if d < window else far)) for d in range(1, length + 1)]
    return {
        "cell": f"{arm}-z{size}-s{seed}-lr{rate}", "arm": arm, "size": size, "layout": layout, "task": task,
        "task_config": {"type": "mqar"}, "d_model": 128, "seed": seed, "learning_rate": rate,
        "accuracy": accuracy, "val_accuracy": accuracy if val is None else val, "val_loss": 1.0,
        "curve": [{"step": 100, "val_accuracy": accuracy / 2, "train_loss": 3.0, "val_loss": 2.0},
                  {"step": 200, "val_accuracy": accuracy, "train_loss": 1.0, "val_loss": 1.0}],
        "distance_asked": asked, "distance_answered": answered, "state_bytes": state, "no_recall_accuracy": 1 / 64,
        "intermediate_size": mlp, "window": window, "backends": ["fla"] * len(layout.split(",")),
        "settings": {"mixer_options": options or {}}, "device": "cpu", "versions": {},
    }  # fmt: skip


TEXTBOOK = {"L": {"conv_size": 0, "feature_map": "elu1", "qk_norm": "none", "normalize": True, "output_norm": False}}


def _recall_study():
    seeds = range(5)
    cells = []
    for seed in seeds:  # at 8 KiB: D well above M, D level with G (bimodal), textbook at chance; at 64 KiB all solve
        cells += [
            _recall_cell("D", "D,D", 0.90 + 0.01 * seed, seed),
            _recall_cell("M", "M,M", 0.40 + 0.01 * seed, seed, state=9000),
            _recall_cell("G", "G,G", [1.0, 0.3][seed % 2], seed, state=7600),
            _recall_cell("Lt", "L,L", 0.01, seed, options=TEXTBOOK, state=8200),
            *(_recall_cell(arm, f"{arm},{arm}", 1.0, seed, size=1, state=65536) for arm in "DMG"),
            _recall_cell("Lt", "L,L", 0.999, seed, size=1, options=TEXTBOOK, state=66000),
            _recall_cell("A", "A,A", 0.99 + 0.002 * seed, seed, state=262144),
            _recall_cell("SD", "S,D,D,D", 0.99, seed, mlp=256, window=32, far=0.9, state=40000),
            _recall_cell("SM", "S,M,M,M", 0.99, seed, mlp=256, window=32, far=0.3 + 0.01 * seed, state=40000),
            _recall_cell("Sx4", "S,S,S,S", 1.0, seed, mlp=256, window=32, far=0.0, state=30000),
        ]
        # a worse learning rate, whose test accuracy would look better: the validation set decides
        cells.append(_recall_cell("D", "D,D", 1.0, seed, rate=1e-2, val=0.5))
    return cells


def test_recall_claims_come_out_as_the_intervals_say(tmp_path):
    claims = {claim.text.split(" (")[0]: claim for claim in recall_claims(_recall_study())}
    gdn = claims["Gated DeltaNet recalls more than Mamba2 and GLA at equal state"]
    by_setting = {(setting.split(", state ")[1], evidence.split(" vs ")[1].split(" ")[0]): outcome
                  for setting, evidence, outcome in gdn.settings}  # fmt: skip
    assert by_setting == {
        ("8.0 KiB", "M"): Outcome.REPRODUCED,
        ("8.0 KiB", "G"): Outcome.INCONCLUSIVE,
        ("64.0 KiB", "M"): Outcome.SATURATED,
        ("64.0 KiB", "G"): Outcome.SATURATED,
    }
    assert gdn.outcome is Outcome.INCONCLUSIVE and "1 Reproduced, 1 Inconclusive, 2 Saturated" in gdn.paragraph()
    textbook = claims["Textbook linear attention recalls less than the gated and delta mixers at equal state"]
    outcomes = [outcome for *_, outcome in textbook.settings]
    assert outcomes.count(Outcome.REPRODUCED) == 3 and outcomes.count(Outcome.SATURATED) == 3  # all solve at 64 KiB
    assert textbook.outcome is Outcome.REPRODUCED
    solves = claims["Attention solves every setting"]
    assert solves.outcome is Outcome.REPRODUCED and len(solves.settings) == 1
    beyond = claims["In S,X,X,X hybrids Gated DeltaNet recalls keys beyond the window more than Mamba2 and GLA"]
    assert [outcome for *_, outcome in beyond.settings] == [Outcome.REPRODUCED]
    reach = claims["A window-only stack loses recall beyond what its stacked windows reach"]
    assert reach.outcome is Outcome.REPRODUCED and "beyond 128: 0.000" in reach.settings[0][1]


def test_recall_rows_use_the_rate_chosen_on_validation_and_report_its_test_accuracy():
    panels = arm_scores(_recall_study())
    (d_small,) = [arm for arm in panels[("mqar_T256_kv64", 2, False)] if arm.arm == "D" and arm.size == 0]
    assert {cell["learning_rate"] for cell in d_small.cells} == {1e-3} and d_small.score.seeds == 5
    assert d_small.score.mean == pytest.approx(0.92)
    assert family({"layout": "L,L", "settings": {"mixer_options": TEXTBOOK}}) == "L-textbook"
    assert family({"layout": "L,L", "settings": {"mixer_options": {"L": {"conv_size": 0}}}}) == "L"
    assert family({"layout": "S,S,S,S"}) == "S" and family({"layout": "A x2"}) == "A"
    assert distance_bins(256)[:3] == [(1, 2), (2, 4), (4, 8)] and distance_bins(256)[-1] == (256, 257)


def test_the_report_writes_recall_figures_tables_and_claim_details(tmp_path):
    results = tmp_path / "results"
    (results / "recall" / "cells").mkdir(parents=True)
    for number, cell in enumerate(_recall_study()):
        (results / "recall" / "cells" / f"{number}.json").write_text(json.dumps(cell))
    record = {"started": "2026-01-01T10:00:00+00:00", "seconds": 600.0, "device": "H100", "workers": 8,
              "cell_steps": 120000}  # fmt: skip
    (results / "recall" / INVOCATIONS).write_text(json.dumps([record]))
    report = write_report(results, tmp_path / "RESULTS.md").read_text()
    assert "**Inconclusive.** Gated DeltaNet recalls more than Mamba2 and GLA at equal state" in report
    assert "### Claims in detail" in report and "| mqar_T256_kv64, 2 layers, no MLP, state 8.0 KiB |" in report
    assert "- `recall`: 120,000 cell-steps in 10.0 minutes, 200 cell-steps per second (8 cells at once)" in report
    assert "| mqar_T256_kv64 | `D` | 0 | 128 | 0.920 [" in report and "| 5/5 | 0.001 (0.001, 0.01) |" in report
    for name in ("recall_state_size.png", "recall_distance.png", "recall_curves_0.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 10_000, name
    assert "test accuracy by query-to-key distance (tokens), window 32" in report
