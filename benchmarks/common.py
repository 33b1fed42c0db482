"""Shared pieces of the benchmark scripts: timing with CUDA events, environment, result files."""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import NoReturn

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def fail(name: str, message: str) -> NoReturn:
    """End benchmark ``name`` on a bad input or machine: one line, ``benchmarks.<name>: error: <message>``, on
    stderr and exit status 2, as for a bad option."""
    print(f"benchmarks.{name}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def cuda_time_ms(fn: Callable[[], object], warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of ``fn`` measured with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def environment() -> dict:
    """Device, library versions and date, stored with every result."""
    versions = {}
    for package in ("torch", "triton", "flash-linear-attention", "fla-core", "flash-attn", "mamba-ssm", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "cuda": torch.version.cuda,
        "versions": versions,
        "date": datetime.date.today().isoformat(),
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def environment_lines(env: dict) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
    return f"Device: {env['device']} (CUDA {env['cuda']}). Versions: {versions}. Date: {env['date']}."


def report(
    name: str,
    out: Path,
    plot_only: bool,
    run: Callable[[Path], dict],
    markdown: Callable[[dict], str],
    plot: Callable[[dict, Path], None] | None,
    needs_cuda: bool = True,
) -> None:
    """The end of a benchmark script: measure (``run`` writes ``out.json`` as it goes) or, with ``plot_only``,
    reload that JSON; then write ``out.md`` and ``out.png`` (when there is a ``plot``) and print the markdown.
    ``needs_cuda``: measuring refuses to start without a CUDA device (false for benchmarks of CPU work)."""
    if plot_only:
        measured = out.with_suffix(".json")
        if not measured.is_file():
            fail(name, f"--plot-only redraws {measured}, which does not exist; measure first or give an earlier --out")
        results = json.loads(measured.read_text())
    else:
        if needs_cuda and not torch.cuda.is_available():
            fail(name, "measuring needs a CUDA device and this machine has none; run it on a GPU (or --plot-only)")
        results = run(out.with_suffix(".json"))
    text = markdown(results)
    out.with_suffix(".md").write_text(text)
    if plot is not None:
        plot(results, out.with_suffix(".png"))
    print(text)
