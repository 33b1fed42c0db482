"""``hybridvl ablate --config experiments/ablations/<study>.yaml [--smoke]``: run or resume an ablation study.

Each cell (layout x task x size x seed x learning rate) trains through the normal Lightning stage and writes
``cells/<id>.json`` under the study's results folder; cells already written are skipped, so an interrupted study
resumes. ``--smoke`` merges the study's ``smoke`` section (tiny sizes, a few steps) for a CPU check;
``--time-budget SECONDS`` starts no cell after that long (running cells finish), to fit a run into a time slot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lit.ablation import run_study, summary_markdown


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hybridvl ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, type=Path, help="a study YAML")
    parser.add_argument("--smoke", action="store_true", help="the study's tiny CPU-sized version")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: next to the config)")
    parser.add_argument("--workers", type=int, default=1, help="cells trained at once, each in its own process")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds after which no new cell starts (resume later)"
    )
    args = parser.parse_args(argv)
    try:
        summary = run_study(
            args.config, smoke=args.smoke, out=args.out, workers=args.workers, time_budget=args.time_budget
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"hybridvl ablate: {error}", file=sys.stderr)
        return 2
    print(summary_markdown(summary))
    return 1 if summary["failed"] else 0
