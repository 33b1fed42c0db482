"""How fast MQAR cells train: milliseconds per training step of each arm of the recall study, as the runner
trains them (the step captured as one CUDA graph; also with ``compile: true``, the step compiled first) against
the same step run eagerly and against the Lightning
loop the ablations used before (the SFT stage over packed batches, logits at every position), each alone on the
GPU; then each arm's step with ``--concurrent`` copies sharing the GPU (one process each; start CUDA MPS first
for them to overlap). Same model, batch and data in every column.

    python -m benchmarks.recall_throughput                       # writes results/recall_throughput.{json,md}
    python -m benchmarks.recall_throughput --arms D,A --steps 50 # a quicker look
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, at_least, environment, markdown_table, report, write_json

STUDY = Path(__file__).resolve().parents[1] / "experiments" / "ablations" / "recall.yaml"


def _cell(arm: str, size: int | None):
    from hybridvl.lit.ablation import expand, load_study

    study = load_study(STUDY)
    count = study.arm(arm).size_count
    size = count - 1 if size is None else size
    cell = next(c for c in expand(study) if c.arm == arm and c.size == size)
    return study, cell


def _trainer(arm: str, size: int | None, graphs: bool, steps: int, compiled: bool = False):
    import dataclasses

    from hybridvl.lit.ablation.cells import model_config
    from hybridvl.lit.ablation.recall import QuerySet, RecallTrainer, mqar_sets
    from hybridvl.models.hybrid import HybridVLM

    study, cell = _cell(arm, size)
    train = dataclasses.replace(
        study.train_for(cell.task), max_steps=steps, cuda_graphs=graphs, compile=compiled, train_examples=8192
    )
    sets = mqar_sets(cell.task, train, 0)
    torch.manual_seed(0)
    model = HybridVLM(model_config(study, cell, sets["train"].vocab_size)).cuda()
    trainer = RecallTrainer(model, QuerySet.from_dataset(sets["train"], "cuda"), train, 1e-3, 0)
    return trainer, train


def step_ms(arm: str, size: int | None, graphs: bool, steps: int, compiled: bool = False) -> float:
    """Median of five timings of ``steps // 5`` steps each, after warm-up (and compilation, and capture)."""
    trainer, _ = _trainer(arm, size, graphs, steps + 10, compiled)
    trainer.train_until(4)
    trainer.capture()
    trainer.train_until(10)
    torch.cuda.synchronize()
    times, chunk = [], max(1, steps // 5)
    for _ in range(5):
        start = time.perf_counter()
        trainer.train_until(trainer.step + chunk)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / chunk * 1000)
    return statistics.median(times)


def lightning_ms(arm: str, size: int | None, steps: int) -> float:
    """The same model and batch through the SFT stage and Lightning's loop (the path MQAR cells took before)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from hybridvl.lit.ablation.cells import model_config
    from hybridvl.lit.ablation.recall import mqar_sets
    from hybridvl.lit.callbacks import StepTimer
    from hybridvl.lit.data.packing import pack
    from hybridvl.lit.modules import SFT
    from hybridvl.models.hybrid import HybridVLM

    study, cell = _cell(arm, size)
    train = study.train_for(cell.task)
    sets = mqar_sets(cell.task, train, 0)
    batch = max(1, train.max_tokens // sets["train"].seq_len)
    with tempfile.TemporaryDirectory() as scratch:
        torch.manual_seed(0)
        HybridVLM(model_config(study, cell, sets["train"].vocab_size)).save_pretrained(Path(scratch) / "init")
        stage = SFT(model=str(Path(scratch) / "init"), trainable=["*"], learning_rate=1e-3, generation_max_new_tokens=0)
        loader = DataLoader(sets["train"], batch_size=batch, collate_fn=pack, shuffle=True)
        timer = StepTimer(str(Path(scratch) / "steps.json"), warmup=5)
        trainer = L.Trainer(
            max_steps=steps + 5,
            precision=train.precision,
            accelerator="gpu",
            devices=1,
            default_root_dir=scratch,
            limit_val_batches=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            logger=False,
            callbacks=[timer],
        )
        trainer.fit(stage, loader)
        import json

        return json.loads(timer.path.read_text())["seconds_per_step"] * 1000


def _concurrent_worker(arm: str, size: int | None, steps: int, start, queue) -> None:
    trainer, _ = _trainer(arm, size, True, steps + 10)
    trainer.train_until(4)
    trainer.capture()
    trainer.train_until(10)
    torch.cuda.synchronize()
    start.wait()
    begin = time.perf_counter()
    trainer.train_until(trainer.step + steps)
    torch.cuda.synchronize()
    queue.put(time.perf_counter() - begin)


def concurrent_rate(arm: str, size: int | None, steps: int, copies: int) -> float:
    """Cell-steps per second of ``copies`` processes training the arm's graphed step at once."""
    context = multiprocessing.get_context("spawn")
    start, queue = context.Barrier(copies + 1), context.Queue()
    workers = [context.Process(target=_concurrent_worker, args=(arm, size, steps, start, queue)) for _ in range(copies)]
    for worker in workers:
        worker.start()
    start.wait()
    seconds = [queue.get() for _ in workers]
    for worker in workers:
        worker.join()
    return copies * steps / max(seconds)


def run(path: Path, arms: list[str], steps: int, copies: int, baseline: list[str]) -> dict:
    results = {"environment": environment(), "steps": steps, "copies": copies, "rows": []}
    for arm in arms:
        row = {"arm": arm, "graphed_ms": step_ms(arm, None, True, steps), "eager_ms": step_ms(arm, None, False, steps)}
        row["compiled_graphed_ms"] = step_ms(arm, None, True, steps, compiled=True)
        if arm in baseline:
            row["lightning_ms"] = lightning_ms(arm, None, steps)
        if copies > 1:
            row["concurrent_cell_steps_per_s"] = concurrent_rate(arm, None, steps, copies)
        results["rows"].append(row)
        write_json(path, results)
        print(row, flush=True)
    return results


def markdown(results: dict) -> str:
    env = results["environment"]
    rows = []
    for row in results["rows"]:
        lightning = row.get("lightning_ms")
        rows.append(
            [
                f"`{row['arm']}`",
                f"{row['graphed_ms']:.2f}",
                f"{row['compiled_graphed_ms']:.2f}" if "compiled_graphed_ms" in row else "not run",
                f"{row['eager_ms']:.2f}",
                f"{lightning:.2f}" if lightning else "not run",
                f"{lightning / row['graphed_ms']:.1f}x" if lightning else "",
                f"{row['concurrent_cell_steps_per_s']:.0f}" if "concurrent_cell_steps_per_s" in row else "not run",
            ]
        )
    return "\n".join(
        [
            "# MQAR training step of the recall study's arms",
            "",
            f"Device: {env['device']}, torch {env['versions']['torch']}, triton {env['versions']['triton']}, fla "
            f"{env['versions']['flash-linear-attention']}, {env['date']}. Each arm at its largest size on the "
            f"study's first task; milliseconds per step (median of five runs of {results['steps'] // 5} steps after "
            f"warm-up); the last column: {results['copies']} processes at once, cell-steps per second in all.",
            "",
            markdown_table(
                [
                    "arm",
                    "graphed ms",
                    "compiled + graphed ms",
                    "eager ms",
                    "Lightning ms",
                    "Lightning / graphed",
                    "cell-steps/s, concurrent",
                ],
                rows,
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks.recall_throughput", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arms", default="D,M,G,L,L-textbook,A")
    parser.add_argument("--baseline", default="D,A", help="arms also timed through the Lightning loop")
    parser.add_argument("--steps", type=at_least(5), default=100, help="timed steps (five timings of a fifth each)")
    parser.add_argument("--concurrent", type=at_least(1), default=8, help="processes at once for the last column")
    parser.add_argument("--out", type=Path, default=RESULTS / "recall_throughput")
    parser.add_argument("--plot-only", action="store_true", help="rewrite the markdown from the JSON")
    args = parser.parse_args()
    arms, baseline = args.arms.split(","), args.baseline.split(",")
    from hybridvl.lit.ablation import load_study

    known = [arm.name for arm in load_study(STUDY).arms]
    for flag, names in (("--arms", arms), ("--baseline", baseline)):
        if unknown := [name for name in names if name not in known]:
            parser.error(f"{flag}: no arm {', '.join(map(repr, unknown))} in {STUDY.name}; arms: {', '.join(known)}")
    report(
        "recall_throughput",
        args.out,
        args.plot_only,
        lambda path: run(path, arms, args.steps, args.concurrent, baseline),
        markdown,
        None,
    )


if __name__ == "__main__":
    main()
