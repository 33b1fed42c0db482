"""Training-step throughput at InfiniteVL's real shape (Qwen2.5-VL-3B dimensions, random bf16 weights).

Times Stage I (layer-wise distillation: a full-attention teacher forward plus every Gated DeltaNet layer
forward and backward) and Stage II (SFT: the whole student forward and backward, the new mixers and SWA
layers training) on one packed sample of ``--tokens`` tokens that holds a 448x448 image, and reports
tokens/s, model FLOPs utilisation and peak memory.

MFU counts each stage's model FLOPs as training logs them (:meth:`hybridvl.lit.modules.HybridStage.batch_flops`,
:mod:`hybridvl.lit.flops`: ``2 x params x tokens`` per forward matmul, x3 with backward; attention
``4 x causal query-key pairs x head_dim x heads`` forward) against the GPU's dense bf16 peak (``--peak-tflops``,
989 for H100 SXM).

    python -m benchmarks.train_step                # on a CUDA machine; writes results/train_step.{json,md}
    python -m benchmarks.train_step --stages sft   # one stage (a stage measured earlier stays in the JSON)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, environment, environment_lines, markdown_table, report, write_json
from hybridvl.lit.data.types import PackedBatch, Sample
from hybridvl.lit.modules import SFT, DistillLayerwise
from hybridvl.models.config import HybridConfig
from hybridvl.models.hybrid import HybridVLM

VISION_3B = dict(
    depth=32,
    hidden_size=1280,
    num_heads=16,
    intermediate_size=3420,
    out_hidden_size=2048,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    tokens_per_second=2,
    in_channels=3,
    hidden_act="silu",
)


def make_batch(config: HybridConfig, tokens: int, device: str) -> PackedBatch:
    """One packed sample: text, then a 448x448 image (32x32 patches, 256 tokens), then text; labels on the end."""
    image_tokens = 256
    before = 16
    ids = torch.randint(0, 150_000, (tokens,))
    ids[before : before + image_tokens] = config.image_token_id
    labels = ids.clone()
    labels[: tokens // 2] = -100
    sample = Sample(
        ids,
        labels,
        tokens // 2,
        {
            "pixel_values": torch.randn(32 * 32, 3 * 2 * 14 * 14),
            "image_grid_thw": torch.tensor([[1, 32, 32]]),
        },
    )
    batch = PackedBatch(ids[None], labels[None], torch.tensor([0, tokens]), sample.vision, [sample])
    return batch.to(device)


def time_steps(stage, batch: PackedBatch, steps: int) -> tuple[float, float]:
    optimizer = torch.optim.AdamW([p for p in stage.student.parameters() if p.requires_grad], lr=1e-5)
    for step in range(steps + 2):
        if step == 2:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = stage.compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated() / 2**30


STAGES = {"distill": "Stage I layer-wise distillation", "sft": "Stage II SFT"}


def build_stage(name: str, workdir: Path) -> SFT | DistillLayerwise:
    if name == "distill":
        return DistillLayerwise(str(workdir / "student"), str(workdir / "teacher"), gradient_checkpointing=True)
    return SFT(str(workdir / "student"), gradient_checkpointing=True)


def run(args: argparse.Namespace, out: Path) -> dict:
    """Measure the chosen stages; ``out`` is rewritten after each, keeping stages measured by an earlier call."""
    torch.manual_seed(0)
    teacher_config = HybridConfig(layout="A x36", vision_config=VISION_3B)
    student_config = HybridConfig(layout="S,D,D,D x9", vision_config=VISION_3B)
    stages = args.stages.split(",")
    models = [("teacher", teacher_config)] if "distill" in stages else []
    for name, config in [*models, ("student", student_config)]:
        with torch.device("cuda"):  # random initialisation of 4B parameters is quick on the GPU
            model = HybridVLM(config)
        model.to(torch.bfloat16).save_pretrained(args.workdir / name, overwrite=True)
        del model
        torch.cuda.empty_cache()
    batch = make_batch(student_config, args.tokens, "cuda")
    earlier = json.loads(out.read_text())["stages"] if out.exists() else []
    results = {"environment": environment(), "tokens": args.tokens, "steps": args.steps, "stages": earlier}
    results["peak_tflops"] = args.peak_tflops
    for key in stages:
        stage = build_stage(key, args.workdir)
        stage.configure_model()
        stage.to("cuda")
        seconds, peak = time_steps(stage, batch, args.steps)
        total = stage.batch_flops(batch)
        measured = {
            "stage": STAGES[key],
            "device": torch.cuda.get_device_name(),
            "seconds_per_step": seconds,
            "tokens_per_second": args.tokens / seconds,
            "tflops": total / seconds / 1e12,
            "mfu": total / seconds / (args.peak_tflops * 1e12),
            "peak_gib": peak,
            "trainable_parameters": sum(p.numel() for p in stage.student.parameters() if p.requires_grad),
        }
        results["stages"] = [s for s in results["stages"] if s["stage"] != measured["stage"]] + [measured]
        print(measured, flush=True)
        write_json(out, results)
        del stage
        torch.cuda.empty_cache()
    return results


def markdown(results: dict) -> str:
    measured = {s["stage"]: s for s in results["stages"]}
    rows = [
        [
            s["stage"],
            s.get("device", results["environment"]["device"]),
            f"{s['tokens_per_second']:,.0f}",
            f"{s['tflops']:.0f}",
            f"{s['mfu']:.1%}",
            f"{s['peak_gib']:.1f}",
            f"{s['trainable_parameters'] / 1e6:.0f}M",
        ]
        for s in measured.values()
    ]
    missing = [label for label in STAGES.values() if label not in measured]
    return "\n".join(
        [
            "# Training step at the InfiniteVL shape",
            "",
            environment_lines(results["environment"]),
            "",
            f"Qwen2.5-VL-3B dimensions, layout `S,D,D,D x9`, random bf16 weights (autocast), one packed sample of "
            f"{results['tokens']:,} tokens with a 448x448 image, gradient checkpointing, AdamW. Mean of "
            f"{results.get('steps', 5)} steps after 2 warm-ups; MFU against {results['peak_tflops']:.0f} dense bf16 "
            "TFLOP/s. Regenerate with `python -m benchmarks.train_step` on a CUDA machine.",
            "",
            markdown_table(["stage", "device", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "trainable"], rows),
            *(["", "Not measured yet: " + ", ".join(missing) + "."] if missing else []),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--stages", default="distill,sft", help="comma-separated, of: " + ", ".join(STAGES))
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_step")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hybridvl-train-step"))
    parser.add_argument("--plot-only", action="store_true", help="rewrite the markdown from the JSON")
    args = parser.parse_args()
    if unknown := set(args.stages.split(",")) - set(STAGES):
        raise SystemExit(f"unknown stages {sorted(unknown)}; choose from {list(STAGES)}")
    report("train_step", args.out, args.plot_only, lambda path: run(args, path), markdown, None)


if __name__ == "__main__":
    main()
