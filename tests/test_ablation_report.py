"""The ablation report: claims with verdicts from cells (recall and multimodal), figures, other runs and device
time (CPU, from cells written by the tests)."""

from __future__ import annotations

import json
import shutil

import pytest

from hybridvl.lit.ablation.recall_report import arm_scores, distance_bins, family, recall_claims
from hybridvl.lit.ablation.report import write_report
from hybridvl.lit.ablation.runner import INVOCATIONS
from hybridvl.lit.ablation.verdicts import Outcome


def _cell(layout: str, task: str, accuracy: float, seed: int, d_model: int = 128, **extra) -> dict:
    return {"layout": layout, "task": task, "d_model": d_model, "seed": seed, "learning_rate": 1e-3,
            "accuracy": accuracy, "task_config": {}, "device": "cpu", "versions": {}, **extra}  # fmt: skip


def _mm_cell(layout: str, seed: int, per_task: dict, *, sets: dict | None = None, state: int = 2**17) -> dict:
    """A synthetic-suite cell as the runner writes it: test scores per task and per eval set, with chance."""
    sets = {
        name: {"accuracy": value, "per_task": {"video_memory": value}, "chance": {"video_memory": 1 / 6}}
        for name, value in (sets or {}).items()
    }
    accuracy = sum(per_task.values()) / len(per_task)
    return _cell(layout, "synthetic_suite", accuracy, seed, arm=layout, per_task=per_task, val_accuracy=accuracy,
                 chance={task: 0.1 for task in per_task}, eval_sets=sets, state_bytes_per_sequence=state)  # fmt: skip


def _arms(cells: list[dict]):
    from hybridvl.lit.ablation.multimodal_report import chosen_arms

    return chosen_arms(cells)


JITTER = (0.0, 0.01, -0.01, 0.02, -0.02)


@pytest.mark.parametrize(
    ("d", "m", "spread", "outcome"),
    [
        (0.8, 0.5, 1, Outcome.REPRODUCED),
        (0.4, 0.7, 1, Outcome.REFUTED),
        (0.6, 0.61, 1, Outcome.INCONCLUSIVE),
        (0.995, 0.996, 0.1, Outcome.SATURATED),
        (0.05, 0.06, 0.1, Outcome.SATURATED),  # both at or under chance (0.1)
    ],
)
def test_the_mixer_claim_comes_out_as_the_intervals_say(d, m, spread, outcome):
    from hybridvl.lit.ablation.multimodal_report import mixer_claims

    cells = [
        _mm_cell(layout, seed, {"document": score + spread * jitter, "ocr": 0.5 + jitter})
        for layout, score in (("S,D,D,D", d), ("S,M,M,M", m))
        for seed, jitter in enumerate(JITTER)
    ]
    beats, largest = mixer_claims(_arms(cells))
    assert beats.outcome is outcome
    margin = {Outcome.REPRODUCED: Outcome.REPRODUCED, Outcome.REFUTED: Outcome.REFUTED}
    if outcome in margin:  # D's margin on the document task against its (zero) margin on ocr
        assert largest.outcome is margin[outcome]
    unmatched = [_mm_cell(c["layout"], c["seed"], c["per_task"], state=2**14 if "M" in c["layout"] else 2**17)
                 for c in cells]  # fmt: skip
    assert mixer_claims(_arms(unmatched))[0].outcome is Outcome.NOT_MEASURED  # other state: not compared


def test_the_swa_share_claim_needs_gains_that_help_and_diminish():
    from hybridvl.lit.ablation.multimodal_report import swa_share_claim

    ladder = ("D x8", "S,D,D,D,D,D,D,D", "S,D,D,D x2", "S,D x4")

    def claim(scores):
        cells = [  # seeds scatter each arm its own way, so that gains scatter too
            _mm_cell(layout, seed, {"document": score + sign * jitter, "video_memory": score + sign * jitter})
            for (layout, score), sign in zip(zip(ladder, scores), (1, -1, 1, -1))
            for seed, jitter in enumerate(JITTER)
        ]
        return swa_share_claim(_arms(cells))

    diminishing = claim((0.3, 0.6, 0.7, 0.72))
    assert diminishing.outcome is Outcome.REPRODUCED and len(diminishing.settings) == 2  # mean and document
    assert claim((0.3, 0.4, 0.5, 0.6)).outcome is Outcome.INCONCLUSIVE  # helps, but the gains do not shrink
    assert claim((0.6, 0.3, 0.3, 0.3)).outcome is Outcome.REFUTED  # the first share hurts
    dropping = claim((0.3, 0.6, 0.7, 0.5))  # a gain wholly below zero
    assert dropping.outcome is Outcome.REFUTED and "gain 0.25->0.5 not negative: -0.200" in dropping.settings[0][1]
    assert claim((0.3, 0.6)).outcome is Outcome.NOT_MEASURED  # two shares cannot show diminishing returns


def test_the_window_claims_read_the_three_regimes():
    from hybridvl.lit.ablation.multimodal_report import window_claims

    def cells(beyond_window_only):
        regimes = {
            "S x8": {"inside_window": 0.95, "within_reach": 0.8, "beyond_reach": beyond_window_only},
            "S,D x4": {"inside_window": 0.95, "within_reach": 0.9, "beyond_reach": 0.7},
        }
        return [
            _mm_cell(layout, seed, {"video_memory": 0.5}, sets={k: v + jitter for k, v in sets.items()})
            for layout, sets in regimes.items()
            for seed, jitter in enumerate(JITTER)
        ]

    reach, stacked, memory = window_claims(_arms(cells(0.3)))
    assert (reach.outcome, stacked.outcome, memory.outcome) == (Outcome.REPRODUCED,) * 3
    reach, stacked, memory = window_claims(_arms(cells(0.95)))  # the window-only stack keeps the far cue
    assert (reach.outcome, stacked.outcome, memory.outcome) == (Outcome.INCONCLUSIVE, Outcome.REFUTED, Outcome.REFUTED)


def test_the_hybrid_claim_compares_a_hybrid_with_its_pure_stack():
    from hybridvl.lit.ablation.multimodal_report import hybrid_claim

    def claim(hybrid, pure):
        cells = [
            _mm_cell(layout, seed, {"document": score + jitter, "ocr": score + jitter})
            for layout, score in (("S,D,D,D", hybrid), ("D x4", pure), ("S,M,M,M", 0.1))
            for seed, jitter in enumerate(JITTER)
        ]
        return hybrid_claim(_arms(cells))

    assert claim(0.8, 0.5).outcome is Outcome.REPRODUCED
    assert claim(0.5, 0.8).outcome is Outcome.REFUTED  # the data point InfiniteVL's own table shows
    assert len(claim(0.8, 0.5).settings) == 2  # mean over tasks and the document task; S,M,M,M has no pure stack


SWA_LADDER = (
    ("D x8", 0.3, 0.7),
    ("S,D,D,D,D,D,D,D", 0.6, 0.7),
    ("S,D,D,D x2", 0.7, 0.7),
    ("S,D x4", 0.72, 0.7),
    ("S x8", 0.2, 0.17),
)


def test_the_report_writes_the_multimodal_claims_tables_and_figures(tmp_path):
    studies = {
        "mixer_type": [
            _mm_cell(layout, seed, {"document": score + jitter, "ocr": 0.05, "chart": 0.995})
            for layout, score in (("S,D,D,D", 0.8), ("S,M,M,M", 0.5), ("S,G,G,G", 0.4), ("D x4", 0.6))
            for seed, jitter in enumerate(JITTER)
        ],
        "swa_ratio": [
            _mm_cell(layout, seed, {"document": score + jitter}, sets={"inside_window": 0.9, "beyond_reach": far})
            for layout, score, far in SWA_LADDER
            for seed, jitter in enumerate(JITTER)
        ],
    }
    results = tmp_path / "results"
    for name, cells in studies.items():
        (results / name / "cells").mkdir(parents=True)
        for number, cell in enumerate(cells):
            (results / name / "cells" / f"{number}.json").write_text(json.dumps(cell))
    report = write_report(results, tmp_path / "RESULTS.md").read_text()
    assert "- **Reproduced.** Gated DeltaNet beats Mamba2 and GLA on the text-rich task at matched state" in report
    assert "- **Reproduced.** A hybrid with sliding-window layers beats the same mixer without attention" in report
    assert "- **Reproduced.** More SWA layers help, with diminishing returns" in report
    assert "- **Not measured.** Stacked windows carry a cue beyond one window" in report  # no within_reach set
    assert "Cannot tell the arms apart: chart: every arm at the ceiling (0.99); ocr: every arm at chance." in report
    assert "| `S,D,D,D` | 0.995 [0.995, 0.995], 5/5 seeds >= 0.9 | 0.800 [" in report  # chart, document, ocr
    assert "| mixer_type: S,D,D,D vs S,M,M,M, 128.0 KiB |" in report  # a claim's settings in detail
    for figure in ("mixer_type_tasks.png", "swa_ratio_tasks.png", "swa_ratio_swa_share.png"):
        assert (tmp_path / "figures" / figure).stat().st_size > 1000


def test_report_compares_other_runs_cell_by_cell(tmp_path):
    from hybridvl.lit.ablation.report import write_report

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
    from hybridvl.lit.ablation.report import write_report

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


def _init_cell(init: str, steps: int, seed: int, mse: float, kl: float, accuracy: float) -> dict:
    chance = {"ocr": 1 / 12, "chart": 1 / 6}
    return _cell("S,D,D,D", f"distill_{init}_s{steps}", accuracy, seed, arm="S,D,D,D", init=init, stage1_steps=steps,
                 per_task={"ocr": accuracy, "chart": accuracy}, chance=chance, teacher_per_task={"ocr": 0.9,
                 "chart": 0.12}, stage1={"layer_mse": mse, "kl": kl, "accuracy": accuracy})  # fmt: skip


def test_the_init_claim_pairs_seeds_at_every_budget_and_the_report_plots_it(tmp_path):
    from hybridvl.lit.ablation.multimodal_report import init_claim

    cells = [
        _init_cell(init, steps, seed, mse * (1 + 0.01 * seed), kl, 0.3 + 0.01 * seed + bonus)
        for steps, (mse_mimic, mse_transfer) in ((50, (1.0, 2.0)), (300, (0.5, 0.5)))
        for init, mse, kl, bonus in (("mimic", mse_mimic, 0.1, 0.0), ("transfer", mse_transfer, 0.2, 0.0))
        for seed in range(5)
    ]
    claim = init_claim(cells)
    verdicts = {setting: outcome for setting, _, outcome in claim.settings}
    assert verdicts["50 Stage I steps, layer_mse (mimic's advantage, lower is better)"] is Outcome.REPRODUCED
    assert verdicts["300 Stage I steps, layer_mse (mimic's advantage, lower is better)"] is Outcome.INCONCLUSIVE
    assert verdicts["300 Stage I steps, kl (mimic's advantage, lower is better)"] is Outcome.REPRODUCED
    worse = [{**c, "stage1": {**c["stage1"], "kl": 0.3}} if c["init"] == "mimic" else c for c in cells]
    assert {o for s, _, o in init_claim(worse).settings if "kl" in s} == {Outcome.REFUTED}
    assert init_claim([c for c in cells if c["init"] == "mimic"]).outcome is Outcome.NOT_MEASURED
    results = tmp_path / "results"
    (results / "init" / "cells").mkdir(parents=True)
    for number, cell in enumerate(cells):
        (results / "init" / "cells" / f"{number}.json").write_text(json.dumps(cell))
    report = write_report(results, tmp_path / "RESULTS.md").read_text()
    assert "chart 0.120 [0.120, 0.120], 0/5 seeds >= 0.9 (chance 0.167: NOT clearly above chance)" in report
    assert "ocr 0.900 [0.900, 0.900], 5/5 seeds >= 0.9 (chance 0.083: learned)" in report
    assert "| mimic | 50 | 1.02 [" in report
    assert (tmp_path / "figures" / "init_stage1.png").stat().st_size > 1000
