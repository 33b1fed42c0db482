"""Running a study: every cell trained once and written as ``cells/<id>.json``, resumably.

Finished cells are skipped (a cell recorded with other settings runs again); a cell stopped part-way resumes
from its last checkpoint; ``time_budget`` starts no cell after that many seconds; ``workers`` trains that many
cells at once in worker processes, each training one cell after another (small models leave a GPU mostly idle:
run them under CUDA MPS); a worker whose cell fails or dies is replaced by a fresh one. Every run
that trains cells appends to ``invocations.json`` its start, wall seconds, device, the cell-steps it trained and
their rate, also when SIGTERM ends it. ``repeat`` trains finished cells again, each in a fresh process, into another
folder, each pinned to the kernel configurations it recorded, to check that a cell's number reproduces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import gc
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import lightning as L
import torch

from hybridvl import mixers
from hybridvl.lit.ablation import kernels
from hybridvl.lit.ablation.cells import (
    Cell,
    cell_settings,
    choose_learning_rate,
    expand,
    matched_intermediate_size,
    model_config,
    prepare_run_dir,
)
from hybridvl.lit.ablation.recall import mqar_sets, train_recall_cell
from hybridvl.lit.ablation.schema import Study, import_plugins, load_study
from hybridvl.lit.ablation.verdicts import estimate
from hybridvl.models.hybrid import HybridVLM

logger = logging.getLogger("hybridvl.ablation")

INVOCATIONS = "invocations.json"
OTHER_RUNS = "other_runs"
"""``<results>/<study>/other_runs/<name>/cells``: other runs of a study (``--repeat``, or ``--out``), which the
report compares with the study's cells."""


def device_name() -> str:
    """The device cells train on here, as recorded in their JSON and in ``invocations.json``."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for package in ("torch", "triton", "flash-linear-attention", "tilelang", "transformers", "lightning"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


# --- one cell -------------------------------------------------------------------------------------------


def run_cell(
    study: Study,
    cell: Cell,
    out: Path,
    processor_dir: Path,
    concurrent_cells: int = 1,
    kernel_record: kernels.Record | None = None,
) -> dict[str, Any]:
    """Train one cell and write its result to ``cells/<id>.json`` (atomically); returns the result.

    ``kernel_record`` pins the autotuned kernels (default: the study's ``kernel_configs.json``); the
    configurations the cell ran with are recorded in its result.
    """
    import_plugins(study.plugins)  # a worker process registers the study's own mixers too
    arm = study.arm(cell.arm)
    identity = {
        "cell": cell.id(study),
        "arm": arm.name,
        "size": cell.size,
        "layout": mixers.format_layout(mixers.parse_layout(arm.layout)),
        "task": cell.task.name,
        "task_config": cell.task.record(),
        "d_model": cell.d_model,
        "seed": cell.seed,
        "learning_rate": cell.learning_rate,
    }
    if cell.task.type == "mqar":
        if kernel_record is None:
            path = out / kernels.KERNEL_CONFIGS
            kernel_record = json.loads(path.read_text()) if path.is_file() else {}
        measured = run_recall_cell(study, cell, out, kernel_record, concurrent_cells)
    elif cell.task.type == "synthetic":
        from hybridvl.lit.ablation.multimodal import run_synthetic_cell

        measured = run_synthetic_cell(study, cell, out, processor_dir, concurrent_cells)
    else:
        from hybridvl.lit.ablation.multimodal import run_distillation_cell

        measured = run_distillation_cell(study, cell, out)
    settings = cell_settings(study, cell)
    result = {
        **identity,
        **measured,
        "settings": settings,
        "train": settings["train"],
        "device": device_name(),
        "versions": versions(),
    }
    _write_json(out / "cells" / f"{cell.id(study)}.json", result)
    return result


def run_recall_cell(
    study: Study, cell: Cell, out: Path, kernel_record: kernels.Record, concurrent_cells: int
) -> dict[str, Any]:
    """Train an MQAR cell (:mod:`hybridvl.lit.ablation.recall`) on the GPU when there is one, and measure its model."""
    cell_id, train = cell.id(study), study.train_for(cell.task)
    run_dir = out / "runs" / cell_id
    prepare_run_dir(study, cell, run_dir)
    sets = mqar_sets(cell.task, train, cell.seed)
    L.seed_everything(cell.seed, verbose=False)
    vocab = sets["train"].vocab_size
    config = model_config(study, cell, vocab, intermediate_size=matched_intermediate_size(study, cell, vocab))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = HybridVLM(config).to(device)
    if device.type == "cuda":
        with contextlib.suppress(ImportError):
            import fla.ops  # noqa: F401  (loads every autotuned kernel, so that all recorded ones can be pinned)
        kernels.forget_configs()  # a worker's earlier cells chose for their own shapes
        logger.info("%s: %d kernel configurations pinned", cell_id, kernels.pin_configs(kernel_record))

    def progress(step: int, loss: float, accuracy: float) -> None:
        logger.info("%s: step %d/%d, loss %.3f, val accuracy %.3f", cell_id, step, train.max_steps, loss, accuracy)

    result = train_recall_cell(model, sets, train, cell.learning_rate, cell.seed, run_dir, progress)
    chosen = kernels.chosen_configs()
    if chosen:
        kernels.merge_into(out / kernels.KERNEL_CONFIGS, chosen)
    departed = kernels.departures(kernel_record, chosen)
    for line in departed:
        logger.warning("%s: a pinned kernel ran another configuration: %s", cell_id, line)
    dtype = torch.bfloat16 if train.precision == "bf16-mixed" else torch.float32
    layers = [layer.self_attn for layer in model.language_model.layers]
    length, pairs = sets["train"].seq_len, sets["train"].num_kv_pairs
    measured = {
        **dataclasses.asdict(result),
        "no_recall_accuracy": 1 / pairs,
        "parameters": sum(p.numel() for p in model.parameters()),
        "intermediate_size": config.intermediate_size,
        "state_bytes": sum(mixer.state_bytes(1, seq_len=length, dtype=dtype) for mixer in layers),
        "window": train.window if "S" in config.kinds else None,
        "kernel_configs": chosen,
        "kernel_configs_not_pinned": departed,
        "concurrent_cells": concurrent_cells,
    }
    shutil.rmtree(run_dir)  # the cell is done: its JSON is what stays
    return measured


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    partial.write_text(json.dumps(data, indent=2) + "\n")
    partial.replace(path)


# --- the study ------------------------------------------------------------------------------------------


def finished_results(study: Study, out: Path, cells: list[Cell], quiet: bool = False) -> dict[str, dict[str, Any]]:
    """The results in ``out/cells`` of ``cells`` trained with the study's current settings (see
    :func:`hybridvl.lit.ablation.cells.cell_settings`); a cell recorded with other settings is left out, to run
    again."""
    found = {}
    for cell in cells:
        cell_id = cell.id(study)
        path = out / "cells" / f"{cell_id}.json"
        if not path.is_file():
            continue
        result = _read_result(path)
        current, recorded = cell_settings(study, cell), result.get("settings", {})
        changed = sorted(key for key in set(current) | set(recorded) if current.get(key) != recorded.get(key))
        if changed:
            if not quiet:
                logger.warning("%s was trained with other settings (%s differ): running it again", cell_id, changed)
            continue
        found[cell_id] = result
    return found


_RESULTS: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}


def _read_result(path: Path) -> dict[str, Any]:
    """A cell's JSON, parsed once per version of the file (the scheduler lists the cells after every cell)."""
    stat = path.stat()
    version = (stat.st_mtime_ns, stat.st_size)
    cached = _RESULTS.get(path)
    if cached is None or cached[0] != version:
        cached = _RESULTS[path] = (version, json.loads(path.read_text()))
    return cached[1]


def _all_finished(study: Study, out: Path) -> dict[str, dict[str, Any]]:
    """Every finished cell of the study, following the tuning sweeps as far as they have gone."""
    finished: dict[str, dict[str, Any]] = {}
    while True:
        cells = expand(study, finished)
        found = finished_results(study, out, cells, quiet=True)
        if found.keys() == finished.keys():
            return found
        finished = found


def run_study(
    config: str | Path,
    smoke: bool = False,
    out: str | Path | None = None,
    workers: int = 1,
    time_budget: float | None = None,
    repeat: str | None = None,
    only: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) the cells of a study; write ``summary.json`` and ``summary.md`` and return the summary.

    Args:
        config: the study YAML.
        smoke: merge its ``smoke`` section (tiny sizes, a CPU check).
        out: the results folder (default ``<config's folder>/results/<name>``; with ``repeat``,
            ``<that>/other_runs/repeat``).
        workers: cells trained at once, in as many worker processes (a fresh one for each cell with ``repeat``).
        time_budget: seconds after which no cell starts; running cells finish (run again to go on).
        repeat: a glob of cell ids: train those finished cells again into ``out``, each pinned to the kernel
            configurations its first run recorded.
        only: globs of cell ids, comma-separated: train only the cells they match (e.g. one seed of each arm at
            its largest size, to see step times and learning curves before the rest); the summary covers all.
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    study = load_study(config, smoke)
    compiled = [task.name for task in study.tasks if task.type == "mqar" and study.train_for(task).compile]
    if compiled and not torch.cuda.is_available():
        logger.warning(
            "train.compile: true compiles MQAR steps on a GPU only; this machine has none, so the cells of %s train "
            "eagerly (their results record compiled: false)",
            ", ".join(compiled),
        )
    default_out = Path(config).parent / "results" / (study.name + ("_smoke" if smoke else ""))
    reference: dict[str, dict[str, Any]] = {}
    if repeat is not None:
        reference = {
            cell_id: result
            for cell_id, result in _all_finished(study, default_out).items()
            if fnmatch.fnmatchcase(cell_id, repeat)
        }
        if not reference:
            raise ValueError(f"no finished cell of {default_out} matches {repeat!r}; run the study first")
    out = Path(out) if out else (default_out / OTHER_RUNS / "repeat" if repeat else default_out)
    processor_dir = out / "processor"
    if any(task.type == "synthetic" for task in study.tasks) and not processor_dir.is_dir():
        from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl

        make_tiny_qwen2_5_vl(processor_dir)

    def defined() -> list[Cell]:
        cells = expand(study, {**_all_finished(study, out), **reference})
        return [cell for cell in cells if not repeat or cell.id(study) in reference]

    patterns = [pattern.strip() for pattern in (only or "*").split(",") if pattern.strip()]

    def to_train() -> list[Cell]:
        return [cell for cell in defined() if any(fnmatch.fnmatchcase(cell.id(study), p) for p in patterns)]

    cells = to_train()
    if not cells:
        raise ValueError(f"no cell of study {study.name} matches {only!r}")
    finished = finished_results(study, out, cells)
    logger.info("%s: %d cells so far, %d done before (skipped)", study.name, len(cells), len(finished))
    deadline = math.inf if time_budget is None else time.monotonic() + time_budget
    failed: dict[str, str] = {}
    trains = len(finished) < len(cells) and (time_budget is None or time_budget > 0)
    with _logged_invocation(out, workers) if trains else contextlib.nullcontext() as record:
        schedule = _Schedule(study, out, processor_dir, workers, deadline, record, reference)
        failed = schedule.run(to_train)
    cells = defined()
    results = finished_results(study, out, cells, quiet=True)
    summary = {
        "study": study.name,
        "smoke": smoke,
        "cells": len(results),
        "total_cells": len(cells),
        "complete": len(results) == len(cells) and not _open_sweeps(study, results),
        "failed": failed,
        "rows": summarize(list(results.values())),
    }
    out.mkdir(parents=True, exist_ok=True)  # a study stopped before its first cell still gets a summary
    _write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_markdown(summary) + "\n")
    return summary


def _open_sweeps(study: Study, results: dict[str, dict[str, Any]]) -> bool:
    """Whether a tuning sweep is done but the cells it decides are not listed yet (they are, once expanded)."""
    return len(expand(study, results)) > len(results) if study.tuning_seeds else False


class _Schedule:
    """Keeps ``workers`` cells in flight (in this process when ``workers`` is 1) until the cells or the time run
    out, listing the cells anew after each one finishes (a finished tuning sweep defines more)."""

    def __init__(
        self,
        study: Study,
        out: Path,
        processor_dir: Path,
        workers: int,
        deadline: float,
        record: dict[str, Any] | None,
        reference: dict[str, dict[str, Any]],
    ) -> None:
        self.study, self.out, self.processor_dir = study, out, processor_dir
        self.workers, self.deadline, self.record, self.reference = workers, deadline, record, reference
        self.tuned: set[tuple] = set()  # cell groups whose kernel configurations a finished cell has recorded

    def _pending(self, defined, running: set[str], failed: dict[str, str]) -> list[Cell]:
        cells = defined()
        done = finished_results(self.study, self.out, cells, quiet=True)
        skip = done.keys() | running | failed.keys()
        return [cell for cell in cells if cell.id(self.study) not in skip]

    def _kernel_record(self, cell: Cell) -> kernels.Record | None:
        reference = self.reference.get(cell.id(self.study))
        return None if reference is None else reference.get("kernel_configs", {})

    def _count(self, cell_id: str) -> None:
        """Add a finished cell's steps of this run to the run's record."""
        path = self.out / "cells" / f"{cell_id}.json"
        if self.record is not None and path.is_file():
            result = _read_result(path)
            self.record["cell_steps"] += result.get("steps", 0) - result.get("resumed_from_step", 0)

    def run(self, defined) -> dict[str, str]:
        failed: dict[str, str] = {}
        cells = defined()
        done = finished_results(self.study, self.out, cells, quiet=True)
        self.tuned |= {cell.group for cell in cells if cell.id(self.study) in done}  # earlier runs' record
        if self.workers == 1:
            while time.monotonic() < self.deadline and (pending := self._pending(defined, set(), failed)):
                cell = pending[0]
                logger.info("[%d left] %s", len(pending), cell.id(self.study))
                error = _attempt(self.study, cell, self.out, self.processor_dir, 1, self._kernel_record(cell))
                if error:
                    failed[cell.id(self.study)] = error
                else:
                    self._count(cell.id(self.study))
            self._log_left(defined, failed)
            return failed
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        logger.info("%d cells at once, %d CPU threads each, in worker processes", self.workers, threads)
        pool: list[_Worker] = []
        try:
            while True:
                busy = [worker for worker in pool if worker.cell is not None]
                pending = self._pending(defined, {worker.cell.id(self.study) for worker in busy}, failed)
                while pending and len(busy) < self.workers and time.monotonic() < self.deadline:
                    worker = next((worker for worker in pool if worker.cell is None), None)
                    if worker is None:
                        worker = _Worker.start(logger.getEffectiveLevel(), threads)
                        pool.append(worker)
                    cell = pending.pop(_next_cell(pending, [w.cell for w in busy], self.tuned, worker.group))
                    worker.send(
                        cell, (self.study, cell, self.out, self.processor_dir, self.workers, self._kernel_record(cell))
                    )
                    busy.append(worker)
                if not busy:
                    break
                for worker in _ready(busy):
                    cell, error = worker.cell, worker.receive()
                    if error:
                        failed[cell.id(self.study)] = error
                    else:
                        self._count(cell.id(self.study))
                        self.tuned.add(cell.group)
                    # a failed cell may leave its CUDA context unusable; a repeated cell shows what a fresh process
                    # computes: either way the worker ends
                    if error or self.reference:
                        pool.remove(worker)
                        worker.stop()
                    logger.info("%s%s", cell.id(self.study), f" FAILED: {error.splitlines()[0]}" if error else " done")
        finally:
            for worker in pool:
                worker.stop()
        self._log_left(defined, failed)
        return failed

    def _log_left(self, defined, failed: dict[str, str]) -> None:
        left = self._pending(defined, set(), failed)
        if left and time.monotonic() >= self.deadline:
            logger.info("time budget spent: %d cells left for the next run", len(left))


def _next_cell(pending: list[Cell], running: Iterable[Cell], tuned: set[tuple], prefer: tuple | None = None) -> int:
    """Which pending cell to start: the first of group ``prefer`` (the group a worker trained last: its kernels are
    loaded and specialised for those shapes there), else the first whose group (:attr:`Cell.group`: arm, size,
    task and width, so the shapes its autotuned kernels depend on) no running cell is still tuning (several cells
    of one shape started together would each autotune every kernel, which took minutes a cell with 8 sharing a
    GPU); the first pending cell when every one waits on such a group. Cells of a group pin the configurations the
    first one records."""
    tuning = {cell.group for cell in running} - tuned
    free = [i for i, cell in enumerate(pending) if cell.group not in tuning]
    return next((i for i in free if pending[i].group == prefer), free[0] if free else 0)


def _attempt(
    study: Study,
    cell: Cell,
    out: Path,
    processor_dir: Path,
    concurrent_cells: int,
    kernel_record: kernels.Record | None,
) -> str | None:
    """Run one cell; a cell that fails is logged with its traceback and its error returned, so that one broken
    cell does not stop the study's other cells (the study reports it and exits with an error)."""
    try:
        run_cell(study, cell, out, processor_dir, concurrent_cells, kernel_record)
    except Exception as error:  # any failure of one cell is reported; the others go on
        logger.exception("%s failed", cell.id(study))
        return f"{type(error).__name__}: {error}"
    return None


class _Worker:
    """A process that trains cells one after another, sent to it one at a time, so that the imports, the CUDA
    context and the loaded kernels serve many cells. It sends back each cell's error (or ``None``) and ends after
    a failed cell: CUDA errors are sticky to their process, and a cell must not inherit a context that a fault left
    unusable. A cell whose process dies takes no other cell with it."""

    def __init__(self, process: multiprocessing.Process, connection: Connection) -> None:
        self.process, self.connection = process, connection
        self.cell: Cell | None = None  # the cell it trains now
        self.group: tuple | None = None  # the group of the last cell it was sent

    @classmethod
    def start(cls, log_level: int, threads: int) -> _Worker:
        context = multiprocessing.get_context("spawn")
        connection, remote = context.Pipe()
        process = context.Process(target=_worker_process, args=(remote, log_level, threads), name="cells")
        process.start()
        remote.close()
        return cls(process, connection)

    def send(self, cell: Cell, arguments: tuple) -> None:
        self.cell, self.group = cell, cell.group
        self.connection.send(arguments)

    def receive(self) -> str | None:
        """The error of the cell it trained (``None`` when the cell finished), once it answered or died."""
        try:
            if not self.connection.poll():
                raise EOFError
            error = self.connection.recv()
        except EOFError:  # it died before answering
            self.process.join()
            error = f"its process died (exit code {self.process.exitcode})"
        self.cell = None
        return error

    def stop(self) -> None:
        """End the process: told to, when it waits for a cell; terminated, when it trains one."""
        if self.process.is_alive() and self.cell is None:
            with contextlib.suppress(OSError):
                self.connection.send(None)
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.connection.close()


def _ready(workers: list[_Worker]) -> list[_Worker]:
    """The workers among ``workers`` that answered or died (waits for at least one)."""
    by_handle = {}
    for worker in workers:
        by_handle[worker.connection] = worker
        by_handle[worker.process.sentinel] = worker
    ready = wait(list(by_handle))
    return list({id(by_handle[handle]): by_handle[handle] for handle in ready}.values())


def _worker_process(connection: Connection, log_level: int, threads: int) -> None:
    """The body of a worker process: set up as :func:`_start_worker`, then train each cell it is sent and send back
    its error (or ``None``), until told to stop, a cell fails or the study's process is gone."""
    _start_worker(log_level, threads)
    with contextlib.suppress(EOFError, BrokenPipeError):  # the study's process ended (a signal): end too
        while (arguments := connection.recv()) is not None:
            error = _attempt(*arguments)
            connection.send(error)
            if error:
                break
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the next cell starts from the memory this one held, given back
    connection.close()


def _start_worker(log_level: int, threads: int) -> None:
    """Set up a process that trains cells: the study's log lines (a spawned process starts without the parent's
    logging setup) and its share of the CPU threads (each process would otherwise start a thread per core, and
    many processes' threads contending for the cores slow the CPU work of every step)."""
    from hybridvl.lit.cli import show_project_logs

    show_project_logs(log_level)
    torch.set_num_threads(threads)


@contextlib.contextmanager
def _logged_invocation(out: Path, workers: int) -> Iterator[dict[str, Any]]:
    """Append this run's start (UTC), wall seconds, device, workers, cells done and the cell-steps it trained (and
    their rate) to ``out/invocations.json`` when it ends, also when a time limit stops it with SIGTERM, so that
    the device time a study took adds up over the runs that resumed it (``hybridvl ablate-report`` sums it)."""
    started, start = datetime.now(UTC), time.monotonic()
    counts = {"cell_steps": 0}

    def record(ended_by: str) -> None:
        path = out / INVOCATIONS
        records = json.loads(path.read_text()) if path.is_file() else []
        seconds = time.monotonic() - start
        records.append(
            {
                "started": started.isoformat(timespec="seconds"),
                "seconds": round(seconds, 1),
                "ended_by": ended_by,
                "workers": workers,
                "cells_done": len(list((out / "cells").glob("*.json"))),
                "cell_steps": counts["cell_steps"],
                "cell_steps_per_second": round(counts["cell_steps"] / seconds, 1) if seconds > 0 else None,
                "device": device_name(),
            }
        )
        _write_json(path, records)

    def on_terminate(signum: int, frame: Any) -> None:
        record("SIGTERM")
        for child in multiprocessing.active_children():  # the workers: no cell trains on after the study ends
            child.terminate()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # end as SIGTERM ends a process, now that the run is recorded

    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, on_terminate) if in_main_thread else None
    ended_by = "raised"
    try:
        yield counts
        ended_by = "returned"
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        record(ended_by)


# --- summaries ------------------------------------------------------------------------------------------


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group (arm at one size, task, width): the learning rate chosen on validation accuracy
    (:func:`hybridvl.lit.ablation.cells.choose_learning_rate`; cells without a validation score choose on their
    accuracy),
    and at it the test accuracy over seeds with its bootstrap interval and solved seeds, state size and the mean
    steady-state step time (with how many cells shared the device at most)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for result in results:
        key = (result["task"], result.get("arm", result["layout"]), result.get("size", 0), result["d_model"])
        groups.setdefault(key, []).append(result)
    rows = []
    for (task, arm, size, d_model), cells in sorted(groups.items()):
        scored = [{**cell, "val_accuracy": cell.get("val_accuracy", cell["accuracy"])} for cell in cells]
        rate = choose_learning_rate(scored)
        chosen = [cell for cell in cells if cell["learning_rate"] == rate]
        score = estimate(cell["accuracy"] for cell in chosen)
        step_times = [cell["seconds_per_step"] for cell in chosen if cell.get("seconds_per_step")]
        rows.append(
            {
                "task": task,
                "arm": arm,
                "layout": cells[0]["layout"],
                "size": size,
                "d_model": d_model,
                "best_learning_rate": rate,
                "learning_rates": sorted({cell["learning_rate"] for cell in cells}),
                "mean": score.mean,
                "low": score.low,
                "high": score.high,
                "solved": score.solved,
                "seeds": score.seeds,
                "state_bytes": chosen[0].get("state_bytes"),
                "seconds_per_step": sum(step_times) / len(step_times) if step_times else None,
                "concurrent_cells": max(
                    (c["concurrent_cells"] for c in chosen if "concurrent_cells" in c), default=None
                ),
            }
        )
    return rows


def summary_markdown(summary: dict[str, Any]) -> str:
    progress = (
        "" if summary.get("complete", True) else f" ({summary['cells']} of {summary['total_cells']} cells so far)"
    )
    failed = "".join(f"\n- `{cell}` failed: {error}" for cell, error in summary.get("failed", {}).items())
    failed = f"\n\nFailed this run (run the study again to retry them):{failed}" if failed else ""
    title = f"# {summary['study']}{' (smoke)' if summary['smoke'] else ''}{progress}"
    return f"{title}\n\n{rows_table(summary['rows'])}{failed}"


def rows_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of :func:`summarize` rows."""
    lines = [
        "| task | arm | size | d_model | accuracy, mean [95% CI] | seeds >= 0.9 | lr (of those swept) | state | "
        "ms/step (cells sharing the device) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step = r.get("seconds_per_step")
        sharing = r.get("concurrent_cells") or "not recorded"
        timing = f"{1000 * step:.1f} ({sharing})" if step else "not recorded"
        state = format_bytes(r["state_bytes"]) if r.get("state_bytes") else ""
        rates = ", ".join(f"{rate:g}" for rate in r["learning_rates"])
        lines.append(
            f"| {r['task']} | `{r['arm']}` | {r['size']} | {r['d_model']} | {r['mean']:.3f} [{r['low']:.3f}, "
            f"{r['high']:.3f}] | {r['solved']}/{r['seeds']} | {r['best_learning_rate']:g} ({rates}) | {state} | "
            f"{timing} |"
        )
    return "\n".join(lines)


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"
