"""Encoding the synthetic suite into a data cache, and collating batches of the cache.

The ablation studies encode the synthetic suite once (``HybridDataModule(cache_dir=...)``) and memory-map it in
every cell. This script times, on the suite the studies train on (OCR, chart, counting, 32-frame video memory):

* **encoding** the cache with ``num_workers`` processes, samples per second;
* **collating** 16K-token training batches of the cache, milliseconds per batch after the first: in the training
  process (what ``HybridDataModule`` does with a cache) and, for comparison, through DataLoader workers, which
  hand each batch over tensor by tensor through shared memory.

It runs on the CPU, where loading runs.

    python -m benchmarks.data_loading            # writes results/data_loading.{json,md}
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from benchmarks.common import RESULTS, environment, markdown_table, report, write_json
from hybridvl.lit.data.packing import LengthGroupedBatchSampler, pack
from hybridvl.lit.datamodule import CachedSamples, HybridDataModule
from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl

SUITE = {
    "tasks": ["ocr", "chart", "counting", "video_memory"],
    "image_size": 84,
    "video_frames": 32,
    "min_distance": 4,
}


def time_encoding(processor: Path, cache: Path, workers: int, size_per_task: int) -> tuple[dict, CachedSamples]:
    """Samples per second of encoding the suite's training split into a fresh cache."""
    data = HybridDataModule(
        processor=str(processor),
        train=[{"type": "synthetic", "split": "train", "seed": 0, "size_per_task": size_per_task, **SUITE}],
        num_workers=workers,
        cache_dir=str(cache),
    )
    start = time.perf_counter()
    samples = data._dataset("train")
    seconds = time.perf_counter() - start
    return {"num_workers": workers, "samples": len(samples), "samples_per_second": len(samples) / seconds}, samples


def time_collation(samples: CachedSamples, workers: int, max_tokens: int, epochs: int) -> dict:
    """Milliseconds per training batch of ``samples`` collated by ``workers`` loader processes (0: this one); the
    first batch, which starts the workers, is not counted."""
    sampler = LengthGroupedBatchSampler(samples.lengths(), max_tokens, seed=0, mega_batch_factor=0)
    loader = DataLoader(samples, batch_sampler=sampler, collate_fn=pack, num_workers=workers)
    batches, pixels, start = 0, 0.0, None
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            if start is None:
                start = time.perf_counter()
                continue
            batches += 1
            pixels += sum(v.numel() * v.element_size() for k, v in batch.vision.items() if k.startswith("pixel"))
    seconds = time.perf_counter() - start
    return {
        "num_workers": workers,
        "batches": batches,
        "ms_per_batch": 1000 * seconds / batches,
        "pixel_mib_per_batch": pixels / batches / 2**20,
    }


def markdown(results: dict) -> str:
    env = results["environment"]
    encoding = [
        [str(r["num_workers"]), f"{r['samples_per_second']:.0f}", str(r["samples"])] for r in results["encoding"]
    ]
    collation = [
        [
            "training process" if r["num_workers"] == 0 else f"loader workers ({r['num_workers']})",
            f"{r['ms_per_batch']:.1f}",
            f"{r['pixel_mib_per_batch']:.0f}",
            str(r["batches"]),
        ]
        for r in results["collation"]
    ]
    return "\n".join(
        [
            "# Encoding and collating the synthetic suite",
            "",
            f"CPU: {results['cpu_count']} cores. torch {env['versions']['torch']}, transformers "
            f"{env['versions']['transformers']}. Date: {env['date']}. {results['size_per_task']} samples per task; "
            f"{results['max_tokens']} tokens a batch.",
            "",
            "Encoding the cache:",
            "",
            markdown_table(["encoding processes", "samples / s", "samples"], encoding),
            "",
            "Collating batches of the cache:",
            "",
            markdown_table(["collated in", "ms / batch", "MiB of pixels / batch", "batches timed"], collation),
            "",
            "Command: `python -m benchmarks.data_loading`",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks.data_loading", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encode-workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader workers to collate")
    parser.add_argument("--size-per-task", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "data_loading")
    args = parser.parse_args()

    def run(path: Path) -> dict:
        encoding = []
        with tempfile.TemporaryDirectory() as scratch:
            processor = Path(scratch) / "processor"
            make_tiny_qwen2_5_vl(processor)
            for workers in args.encode_workers:
                cache = Path(scratch) / f"cache-{workers}"
                record, samples = time_encoding(processor, cache, workers, args.size_per_task)
                encoding.append(record)
            collation = [time_collation(samples, workers, args.max_tokens, args.epochs) for workers in args.workers]
        results = {
            "environment": environment(),
            "cpu_count": os.cpu_count(),
            "size_per_task": args.size_per_task,
            "max_tokens": args.max_tokens,
            "encoding": encoding,
            "collation": collation,
        }
        write_json(path, results)
        return results

    report("data_loading", args.out, False, run, markdown, plot=None, needs_cuda=False)


if __name__ == "__main__":
    main()
