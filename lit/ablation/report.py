"""``RESULTS.md`` for the ablation studies: tables, plots and one verdict per InfiniteVL claim, computed from the
cells the runner wrote (``<results>/<study>/cells/*.json``).

    hybridvl ablate-report --results experiments/ablations/results --out experiments/ablations/RESULTS.md
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from hybridvl.lit.ablation.multimodal_report import multimodal_claims, multimodal_section
from hybridvl.lit.ablation.recall_report import recall_claims, recall_section
from hybridvl.lit.ablation.runner import INVOCATIONS, OTHER_RUNS, rows_table, summarize
from hybridvl.lit.ablation.schema import StudyError

CELL_KEYS = ("layout", "task", "d_model", "seed", "learning_rate", "accuracy")
"""Keys the runner writes into every cell's JSON, which the report reads."""


def read_json(path: Path, what: type[dict] | type[list]) -> Any:
    """``path``'s JSON, which must be a ``what`` (object or list); a file that is not, say one cut off by a crash,
    is named with the fix."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise StudyError(
            f"{path} is not valid JSON ({error}); delete it (hybridvl ablate writes it again) or restore it"
        ) from None
    if not isinstance(data, what):
        raise StudyError(
            f"{path} holds a JSON {type(data).__name__}, not the {'object' if what is dict else 'list'} hybridvl "
            "ablate writes; delete it (hybridvl ablate writes it again) or restore it"
        )
    return data


def load_cells(study_dir: Path) -> list[dict[str, Any]]:
    """The results under ``study_dir/cells``, each checked to be a cell the runner wrote."""
    cells = []
    for path in sorted((study_dir / "cells").glob("*.json")):
        cell = read_json(path, dict)
        if missing := [key for key in CELL_KEYS if key not in cell]:
            raise StudyError(
                f"{path} is not a cell result (it lacks {', '.join(missing)}); delete it (hybridvl ablate trains "
                "the cell again) or move it out of the results folder"
            )
        cells.append(cell)
    return cells


def progress(study_dir: Path) -> str:
    """`` (N of M cells)`` for a study the runner has not finished, from its ``summary.json``."""
    summary_path = study_dir / "summary.json"
    if not summary_path.is_file():
        return ""
    summary = read_json(summary_path, dict)
    return "" if summary.get("complete", True) else f" ({summary['cells']} of {summary['total_cells']} cells)"


REPEAT_TOLERANCE = 0.005


def other_runs(results: Path, name: str, cells: list[dict]) -> list[str]:
    """Lines comparing a study's cells with each other run of it under ``<study>/other_runs/``: how many cells
    that run reached, how many reproduce their accuracy exactly and within ``REPEAT_TOLERANCE``, and a table of
    those that do not. Nothing without other runs."""
    folders = sorted(path.parent for path in (results / name / OTHER_RUNS).glob("*/cells"))
    if not folders:
        return []
    these = {c["cell"]: c for c in cells}
    lines = []
    for folder in folders:
        other = {c["cell"]: c for c in load_cells(folder)}
        both = sorted(set(other) & set(these))
        if not both:
            continue
        differ = [c for c in both if abs(other[c]["accuracy"] - these[c]["accuracy"]) > REPEAT_TOLERANCE]
        exact = sum(other[c]["accuracy"] == these[c]["accuracy"] for c in both)
        lines.append(
            f"- `{name}/{OTHER_RUNS}/{folder.name}` reached {len(other)} of the {len(these)} cells; "
            f"{exact} of {len(both)} reproduce their accuracy exactly, {len(both) - len(differ)} within "
            f"{REPEAT_TOLERANCE}" + (", these do not:" if differ else ".")
        )
        if differ:
            lines += ["", f"  | cell | accuracy | {folder.name} |", "  |---|---|---|"]
            lines += [f"  | {c} | {these[c]['accuracy']:.3f} | {other[c]['accuracy']:.3f} |" for c in differ]
            lines.append("")
    return lines


def device_time(results: Path, names: Iterable[str]) -> list[str]:
    """Lines on the wall time of the runs that trained the studies' cells (each study's ``invocations.json``):
    in all, with the times that runs of several studies overlapped (sharing the device) counted once, and per
    study. Nothing when no study recorded its runs."""
    spans: dict[str, list[tuple[float, float, str]]] = {}
    for name in names:
        path = results / name / INVOCATIONS
        if path.is_file():
            spans[name] = [
                (start := datetime.fromisoformat(run["started"]).timestamp(), start + run["seconds"], run["device"])
                for run in read_json(path, list)
            ]
    if not spans:
        return []
    total, reach = 0.0, -float("inf")
    for start, end, _ in sorted(span for runs in spans.values() for span in runs):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    devices = sorted({device for runs in spans.values() for *_, device in runs})
    lines = [
        f"The runs that trained these cells took {total / 60:.1f} minutes of wall time on {', '.join(devices)} "
        "(`invocations.json` of each study; where runs of several studies overlapped, sharing the device, the "
        "time counts once):",
        "",
    ]
    for name in names:
        runs = spans.get(name)
        if not runs:
            lines.append(f"- `{name}`: not recorded")
            continue
        minutes = sum(end - start for start, end, _ in runs) / 60
        lines.append(f"- `{name}`: {minutes:.1f} minutes in {len(runs)} run{'s' if len(runs) > 1 else ''}")
    return lines


def throughput(results: Path, names: Iterable[str]) -> list[str]:
    """Lines on the training throughput each study's runs recorded (cell-steps per second of wall time)."""
    lines = []
    for name in names:
        path = results / name / INVOCATIONS
        runs = [run for run in read_json(path, list) if run.get("cell_steps")] if path.is_file() else []
        if runs:
            steps, seconds = sum(run["cell_steps"] for run in runs), sum(run["seconds"] for run in runs)
            workers = sorted({run["workers"] for run in runs})
            lines.append(
                f"- `{name}`: {steps:,} cell-steps in {seconds / 60:.1f} minutes, {steps / seconds:.0f} cell-steps "
                f"per second ({' or '.join(map(str, workers))} {'cell' if workers == [1] else 'cells'} at once)"
            )
    return lines


def is_recall_study(cells: list[dict[str, Any]]) -> bool:
    """Whether a study's cells are all MQAR cells (the recall report reads them)."""
    return bool(cells) and all(cell.get("task_config", {}).get("type") == "mqar" and "curve" in cell for cell in cells)


def write_report(results: Path, out: Path) -> Path:
    """Tables, plots and claim verdicts for every study under ``results`` into ``out`` (plots beside it)."""
    if results.is_file():
        raise NotADirectoryError(f"--results {results} is a file; give the folder of the studies' results")
    if not results.is_dir():
        raise FileNotFoundError(f"results folder {results} does not exist (run hybridvl ablate first)")
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give the report's file, e.g. {out / 'RESULTS.md'}")
    studies = {d.name: load_cells(d) for d in sorted(results.iterdir()) if (d / "cells").is_dir()}
    if not studies:
        raise FileNotFoundError(f"no study results under {results} (run hybridvl ablate first)")
    figures = out.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    parts = ["# Ablation results", ""]
    devices = sorted({c.get("device", "?") for cells in studies.values() for c in cells})
    versions = sorted({json.dumps(c.get("versions", {}), sort_keys=True) for cells in studies.values() for c in cells})
    parts += [
        f"Devices: {', '.join(devices)}. Versions: {', '.join(versions)}. Regenerate the cells with "
        "`hybridvl ablate --config experiments/ablations/<study>.yaml` and this page with "
        f"`hybridvl ablate-report --results {results} --out {out}`.",
        "",
        "Verdicts: **Reproduced** / **Refuted** when the 95% bootstrap intervals (over seeds) of the arms "
        "compared do not overlap, in the claim's direction or against it; **Inconclusive** when they overlap; "
        "**Saturated** when both arms sit at the ceiling (0.99) or at chance (the no-recall guess, or the score "
        "without looking at the media); a claim judged in several settings is Reproduced (Refuted) when every "
        "setting that can tell is; one-sided checks (a gain not negative) are Refuted only by an interval wholly "
        "below zero. Learning rates are chosen per arm and "
        "size on the validation set; tables and verdicts use the test set.",
        "",
        "## Claims",
        "",
    ]
    recall = {name: cells for name, cells in studies.items() if is_recall_study(cells)}
    recall_cells = [cell for cells in recall.values() for cell in cells]
    others = {name: cells for name, cells in studies.items() if name not in recall}
    claims = [*recall_claims(recall_cells), *multimodal_claims(others)]  # "Not measured" without their cells
    parts += [f"- {claim.paragraph()}" for claim in claims]
    compared = [line for name, cells in studies.items() for line in other_runs(results, name, cells)]
    if compared:
        parts += [
            "",
            "## Other runs",
            "",
            f"Other runs of the same configs, kept under `<study>/{OTHER_RUNS}/`, compared cell by cell with the "
            "cells above:",
            "",
            *compared,
        ]
    if timing := device_time(results, studies):
        parts += ["", "## Device time", "", *timing]
        if rates := throughput(results, studies):
            parts += ["", "Training throughput (`invocations.json`):", "", *rates]
    for name, cells in studies.items():
        parts += ["", f"## {name}{progress(results / name)}", ""]
        if name in recall:
            parts.append(rows_table(summarize(cells)))
            parts += recall_section(name, cells, figures)
            details = [claim for claim in recall_claims(cells) if claim.settings]
            if details:
                parts += ["", "### Claims in detail"]
                for claim in details:
                    parts += ["", claim.table()]
        else:
            parts += multimodal_section(name, cells, figures)
            details = [claim for claim in multimodal_claims({name: cells}) if claim.settings]
            if details:
                parts += ["", "### Claims in detail"]
                for claim in details:
                    parts += ["", claim.table()]
    out.write_text("\n".join(parts) + "\n")
    return out


def main(argv: list[str]) -> int:
    from hybridvl.lit.cli import ArgumentParser

    parser = ArgumentParser(prog="hybridvl ablate-report", description=__doc__)
    parser.add_argument(
        "--results", type=Path, default=Path("experiments/ablations/results"), help="folder of the studies' results"
    )
    parser.add_argument("--out", type=Path, default=Path("experiments/ablations/RESULTS.md"), help="report to write")
    args = parser.parse_args(argv)
    print(write_report(args.results, args.out))
    return 0
