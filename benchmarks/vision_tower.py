"""The vision tower on a packed batch: transformers' tower as it comes against ``hybridvl.vision.tower``'s packed use
of it.

One 16K-token batch of the synthetic suite the ablations train on (84-pixel images, 32-frame 56-pixel videos),
through the ablations' vision tower (2 blocks, width 64), forward and backward. Counted: the operations the tower
runs on its tensors (top-level ATen calls; on a GPU each is a kernel launch or a view) and its SDPA calls, and
the CPU time of the pass; the table preparation (``vision_inputs``) is timed apart, since it runs on the CPU
whatever the device. Outputs and gradients of the two are compared.

    python -m benchmarks.vision_tower            # writes results/vision_tower.{json,md}
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import RESULTS, environment, markdown_table, report, write_json
from hybridvl.lit.ablation.multimodal import vision_tower_config
from hybridvl.lit.data.packing import LengthGroupedBatchSampler, pack
from hybridvl.lit.datamodule import HybridDataModule
from hybridvl.models.tiny_qwen import init_tiny_vision_tower, make_tiny_qwen2_5_vl
from hybridvl.vision.tower import build_vision_tower, vision_inputs

SUITE = {"tasks": ["ocr", "chart", "counting", "video_memory"], "image_size": 84, "video_frames": 32}
MEDIA = {"images": ("pixel_values", "image_grid_thw"), "videos": ("pixel_values_videos", "video_grid_thw")}


def synthetic_batch(max_tokens: int) -> dict[str, torch.Tensor]:
    """The vision inputs of the first training batch of the suite (seed 0)."""
    with tempfile.TemporaryDirectory() as scratch:
        processor = make_tiny_qwen2_5_vl(Path(scratch) / "processor")
        train = [{"type": "synthetic", "split": "train", "seed": 0, "size_per_task": 100, **SUITE}]
        samples = HybridDataModule(processor=str(processor), train=train, max_tokens=max_tokens)._dataset("train")
        lengths = [len(samples[i]) for i in range(len(samples))]
        first = next(iter(LengthGroupedBatchSampler(lengths, max_tokens, seed=0, mega_batch_factor=0)))
        return pack([samples[i] for i in first]).vision


def towers() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The ablations' tower (``hybridvl.vision.tower``) and the same weights under transformers' plain SDPA
    attention."""
    config = vision_tower_config(d_model=128)
    torch.manual_seed(0)
    packed = build_vision_tower(config)
    init_tiny_vision_tower(packed)
    plain = build_vision_tower(config)
    plain.load_state_dict(packed.state_dict())
    plain.config._attn_implementation = "sdpa"
    return packed, plain


def forward_backward(tower: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor, tables: dict | None):
    tower.zero_grad()
    out = tower(pixels, grid_thw=grid, **(tables or {})).pooler_output
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in tower.parameters()]


def _top_level_aten(event) -> bool:
    """An ATen call made by the model's code, not inside another ATen call."""
    parent = event.cpu_parent
    return event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::"))


def measure(tower: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor, packed: bool, repeats: int) -> dict:
    tables = vision_inputs(tower, grid, "cpu") if packed else None
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        forward_backward(tower, pixels, grid, tables)
    ops = Counter(event.name for event in profiler.events() if _top_level_aten(event))
    seconds, table_seconds = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        tables = vision_inputs(tower, grid, "cpu") if packed else None
        middle = time.perf_counter()
        forward_backward(tower, pixels, grid, tables)
        seconds.append(time.perf_counter() - middle)
        table_seconds.append(middle - start)
    return {
        "ops": sum(ops.values()),
        "sdpa_calls": ops["aten::scaled_dot_product_attention"],
        "ms": 1000 * statistics.median(seconds),
        "tables_ms": 1000 * statistics.median(table_seconds) if packed else None,
    }


def markdown(results: dict) -> str:
    env = results["environment"]
    rows = [
        [
            media,
            f"{run['items']}",
            tower,
            f"{run[tower]['ops']:,}",
            str(run[tower]["sdpa_calls"]),
            f"{run[tower]['ms']:.0f}",
            "" if run[tower]["tables_ms"] is None else f"{run[tower]['tables_ms']:.1f}",
            f"{run['max_relative_difference']:.1e}" if tower == "packed" else "",
        ]
        for media, run in results["runs"].items()
        for tower in ("plain", "packed")
    ]
    header = ["media", "items", "tower", "ops", "SDPA calls", "CPU ms", "tables ms", "max rel. difference"]
    return "\n".join(
        [
            "# The vision tower on a packed batch",
            "",
            f"CPU: {results['cpu_count']} cores. torch {env['versions']['torch']}, transformers "
            f"{env['versions']['transformers']}. Date: {env['date']}. One {results['max_tokens']}-token batch of "
            "the synthetic suite, forward and backward. `plain`: transformers' tower with SDPA; `packed`: "
            "`vision.tower` (tables from `vision_inputs`, attention once per chunk length).",
            "",
            markdown_table(header, rows),
            "",
            "Command: `python -m benchmarks.vision_tower`",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks.vision_tower", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "vision_tower")
    args = parser.parse_args()

    def run(path: Path) -> dict:
        vision = synthetic_batch(args.max_tokens)
        packed, plain = towers()
        runs = {}
        for media, (pixels_key, grid_key) in MEDIA.items():
            pixels, grid = vision[pixels_key], vision[grid_key]
            expected, expected_grads = forward_backward(plain, pixels, grid, None)
            actual, grads = forward_backward(packed, pixels, grid, vision_inputs(packed, grid, "cpu"))
            differences = [
                float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                for a, b in zip([actual, *grads], [expected, *expected_grads], strict=True)
            ]
            runs[media] = {
                "items": len(grid),
                "plain": measure(plain, pixels, grid, False, args.repeats),
                "packed": measure(packed, pixels, grid, True, args.repeats),
                "max_relative_difference": max(differences),
            }
        results = {
            "environment": environment(),
            "cpu_count": os.cpu_count(),
            "max_tokens": args.max_tokens,
            "runs": runs,
        }
        write_json(path, results)
        return results

    report("vision_tower", args.out, False, run, markdown, plot=None, needs_cuda=False)


if __name__ == "__main__":
    main()
