"""``hybridvl ablate --config experiments/ablations/<study>.yaml [--smoke]``: run or resume an ablation study.

Each cell (an arm at one size x task x width x seed x learning rate) trains from scratch and writes
``cells/<id>.json`` under the study's results folder; cells already written are skipped, so an interrupted study
resumes. ``--smoke`` merges the study's ``smoke`` section (tiny sizes, a few steps) for a CPU check;
``--time-budget SECONDS`` starts no cell after that long (running cells finish), to fit a run into a time slot;
``--repeat GLOB`` trains finished cells again in fresh processes (into ``other_runs/repeat``), pinned to the kernel
configurations they recorded, to show that their numbers reproduce; ``--cells GLOBS`` trains only the cells whose ids
match (e.g. ``'*-z3__*__s0__*'``: the first seed of every arm at its largest size, to size the rest).
"""

from __future__ import annotations

import math
from pathlib import Path

from hybridvl.lit.ablation.runner import run_study, summary_markdown
from hybridvl.lit.cli import ArgumentParser, HelpFormatter, run_command


def main(argv: list[str]) -> int:
    """Run the study ``argv`` names; a bad study, config path or option is reported in one line with status 2, also
    when this is called as a function (through :func:`hybridvl.lit.cli.run_command`)."""
    return run_command("hybridvl ablate", _ablate, argv)


def _ablate(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="hybridvl ablate",
        description=__doc__,
        formatter_class=lambda prog: HelpFormatter(prog, max_help_position=32),
    )
    parser.add_argument("--config", required=True, type=Path, help="a study YAML")
    parser.add_argument("--smoke", action="store_true", help="the study's tiny CPU-sized version")
    parser.add_argument("--out", type=Path, default=None, help="results folder (unset: next to the config)")
    parser.add_argument("--workers", type=int, default=1, help="cells trained at once, each in its own process")
    parser.add_argument(
        "--time-budget", type=float, default=None, help="seconds after which no new cell starts (unset: no limit)"
    )
    parser.add_argument("--repeat", default=None, metavar="GLOB", help="train these finished cells again")
    parser.add_argument("--cells", default=None, metavar="GLOBS", help="train only these cells (comma-separated globs)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.time_budget is not None and not (math.isfinite(args.time_budget) and args.time_budget >= 0):
        parser.error(f"--time-budget must be a finite number of seconds >= 0, got {args.time_budget:g}")
    if args.config.is_dir():
        parser.error(f"--config {args.config} is a folder; give a study YAML, e.g. experiments/ablations/recall.yaml")
    if args.out is not None and args.out.is_file():
        parser.error(f"--out {args.out} is a file; give the folder for the study's results")
    summary = run_study(
        args.config,
        smoke=args.smoke,
        out=args.out,
        workers=args.workers,
        time_budget=args.time_budget,
        repeat=args.repeat,
        only=args.cells,
    )
    print(summary_markdown(summary))
    return 1 if summary["failed"] else 0
