"""Stage I layer-wise distillation at the InfiniteVL shape on one GPU against several, through ``hybridvl fit``.

Builds a random-weight Qwen2.5-VL-3B-shaped teacher (all ``A``) and student (``S,D,D,D x9``) with the 3B vision
tower, a JSONL of conversations truncated to ``--tokens`` tokens each (one 448x448 image per sample), and runs
``experiments/infinitevl/distill_layerwise_fsdp.yaml`` with its paths pointed there:

1. one GPU, plain single-device training (the baseline);
2. ``--gpus`` GPUs with FSDP (one decoder layer per unit, the frozen teacher sharded like the student),
   saving a checkpoint after ``--save-at`` steps;
3. the same, resumed from that checkpoint: the losses of the steps after it must equal run 2's.

Every run is a real ``torchrun -m hybridvl.lit.cli fit`` with :class:`hybridvl.lit.callbacks.StepTimer`, which records
seconds and tokens per step and each rank's peak memory. The speed-up is run 2's tokens/s over run 1's.

    python -m benchmarks.distributed --gpus 2     # on a machine with 2 GPUs; writes results/distributed.{json,md}
    python -m benchmarks.distributed --gpus 2 --runs fsdp            # the runs one at a time (in one --workdir)
    python -m benchmarks.distributed --gpus 2 --runs single,fsdp_resumed
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import RESULTS, environment, environment_lines, markdown_table, report, write_json
from benchmarks.train_step import VISION_3B
from hybridvl.models.config import HybridConfig
from hybridvl.models.hybrid import HybridVLM

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "experiments" / "infinitevl" / "distill_layerwise_fsdp.yaml"
WORDS = [
    "frame",
    "token",
    "window",
    "state",
    "memory",
    "layer",
    "vision",
    "delta",
    "gate",
    "decay",
    "stream",
    "answer",
    "model",
    "image",
    "video",
]


def prepare_models(workdir: Path) -> None:
    """Random 3B-shaped teacher and student directories, each with the tiny processor (448x448 images allowed)."""
    from hybridvl.models.chat import load_processor
    from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl

    processor = load_processor(make_tiny_qwen2_5_vl(workdir / "tiny", overwrite=True))
    processor.image_processor.max_pixels = 448 * 448  # let 448x448 images through unresized
    processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 448 * 448}
    tokenizer = processor.tokenizer
    ids = {  # the processor's special tokens, wherever its vocabulary puts them
        f"{name}_token_id": tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image", "<|image_pad|>"),
            ("video", "<|video_pad|>"),
            ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"),
            ("eos", "<|im_end|>"),
            ("pad", "<|endoftext|>"),
        )
    }
    torch.manual_seed(0)
    for name, layout in (("teacher", "A x36"), ("student", "S,D,D,D x9")):
        with torch.device("cuda"):
            model = HybridVLM(HybridConfig(layout=layout, vision_config=VISION_3B, bos_token_id=None, **ids))
        model.to(torch.bfloat16).save_pretrained(workdir / name, overwrite=True)
        processor.save_pretrained(workdir / name)
        del model
        torch.cuda.empty_cache()


def write_data(workdir: Path, samples: int, words: int) -> None:
    """``train.jsonl``: conversations of ``words`` random words about one 448x448 noise image each."""
    from PIL import Image

    rng = random.Random(0)
    media = workdir / "media"
    media.mkdir(parents=True, exist_ok=True)
    with open(workdir / "train.jsonl", "w") as file:
        for n in range(samples):
            pixels = torch.randint(0, 256, (448, 448, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
            Image.fromarray(pixels.numpy()).save(media / f"{n}.png")
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            record = {
                "id": str(n),
                "image": f"{n}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nRead it all."},
                    {"from": "gpt", "value": text},  # the long reply is what truncation cuts
                ],
            }
            file.write(json.dumps(record) + "\n")


def run_config(workdir: Path, name: str, gpus: int, steps: int, tokens: int, save_every: int | None) -> Path:
    """The recipe YAML with this run's devices, paths, steps and callbacks."""
    config = yaml.safe_load(RECIPE.read_text())
    trainer = config["trainer"]
    trainer.update(
        devices=gpus,
        max_steps=steps,
        accumulate_grad_batches=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        default_root_dir=str(workdir / "runs" / name),
        callbacks=[
            {
                "class_path": "hybridvl.lit.callbacks.StepTimer",
                "init_args": {"path": str(workdir / f"{name}.json"), "warmup": 2},
            }
        ],
    )
    if gpus == 1:
        trainer["strategy"] = "auto"
    config["model"]["init_args"].update(
        model=str(workdir / "student"),
        teacher=str(workdir / "teacher"),
        export_dir=str(workdir / "runs" / name / "model"),
    )
    config["data"].update(
        processor=str(workdir / "student"),
        max_tokens=tokens,
        max_length=tokens,
        num_workers=4,
        train=[{"type": "json", "path": str(workdir / "train.jsonl"), "media_root": str(workdir / "media")}],
    )
    config["data"].pop("val")  # throughput only: no validation
    config["checkpoint"] = {
        "dirpath": str(workdir / "runs" / name / "checkpoints"),
        "every_n_train_steps": save_every or 10**9,
        "save_last": False,
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, gpus: int, log: Path, ckpt_path: Path | None = None) -> float:
    """Run ``hybridvl.lit.cli fit`` under torchrun; return its wall seconds (raises with the log's tail on failure)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]
    command += ["-m", "hybridvl.lit.cli", "fit", "--config", str(config)]
    if ckpt_path is not None:
        command += ["--ckpt_path", str(ckpt_path)]
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ.copy())
    if done.returncode:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{tail}")
    return time.perf_counter() - start


RUNS = ("single", "fsdp", "fsdp_resumed")
RESUME_DATA_VERDICT = {
    True: "rank 0 trained on the same samples at those steps.",
    False: "rank 0 trained on DIFFERENT samples at those steps: the resume lost its place in the data.",
    None: "the samples were not recorded.",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks.distributed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per sample (one sample per GPU per step)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--save-at", type=int, default=5, help="checkpoint after this step; resume from it")
    parser.add_argument(
        "--runs",
        default=",".join(RUNS),
        help="which runs, comma-separated; the rest keep their results from an earlier call in --workdir "
        "(the models, data and checkpoint there are reused)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hybridvl-distributed"))
    parser.add_argument("--out", type=Path, default=RESULTS / "distributed")
    parser.add_argument("--plot-only", action="store_true", help="rewrite the markdown from the JSON")
    args = parser.parse_args()
    report("distributed", args.out, args.plot_only, lambda path: run(args, path), markdown, None)


def run(args: argparse.Namespace, out: Path) -> dict:
    """The chosen runs; results so far are kept in ``--workdir`` and written to ``out`` with the derived figures."""
    chosen = args.runs.split(",")
    if unknown := set(chosen) - set(RUNS):
        raise SystemExit(f"unknown runs {sorted(unknown)}; choose from {RUNS}")
    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"benchmarks.distributed needs {args.gpus} CUDA devices; found {torch.cuda.device_count()}")
    checkpoint = args.workdir / "runs" / "fsdp" / "checkpoints" / f"step{args.save_at}.ckpt"
    if "fsdp_resumed" in chosen and "fsdp" not in chosen and not checkpoint.exists():
        raise SystemExit(f"--runs fsdp_resumed resumes from {checkpoint}, which an earlier --runs fsdp writes")
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not (args.workdir / "student" / "config.json").exists():
        prepare_models(args.workdir)
        write_data(args.workdir, samples=args.gpus * (args.steps + 2), words=args.tokens // 2)  # cut to --tokens
    state = args.workdir / "results.json"
    results = json.loads(state.read_text()) if state.exists() else {"runs": {}}
    results.update(environment=environment(), tokens_per_sample=args.tokens, steps=args.steps)
    plan = {
        "single": (1, None, None),
        "fsdp": (args.gpus, args.save_at, None),
        "fsdp_resumed": (args.gpus, None, checkpoint),
    }
    for name in RUNS:
        if name not in chosen:
            continue
        gpus, save_every, resume = plan[name]
        config = run_config(args.workdir, name, gpus, args.steps, args.tokens, save_every)
        seconds = fit(config, gpus, args.workdir / f"{name}.log", resume)
        results["runs"][name] = {
            "gpus": gpus,
            "wall_seconds": seconds,
            **json.loads((args.workdir / f"{name}.json").read_text()),
        }
        if save_every:
            results["runs"][name]["checkpoint_gib"] = checkpoint.stat().st_size / 2**30
        print(name, {k: v for k, v in results["runs"][name].items() if k != "steps"}, flush=True)
        write_json(state, results)
    runs = results["runs"]
    if {"fsdp", "single"} <= set(runs):
        results["speedup"] = runs["fsdp"]["tokens_per_second"] / runs["single"]["tokens_per_second"]
    if {"fsdp", "fsdp_resumed"} <= set(runs):
        before = {s["step"]: s for s in runs["fsdp"]["steps"]}
        after = {s["step"]: s for s in runs["fsdp_resumed"]["steps"]}
        shared = sorted(set(before) & set(after))
        results["resume"] = {
            "steps_compared": shared,
            "max_relative_loss_difference": max(
                abs(after[s]["loss"] - before[s]["loss"]) / abs(before[s]["loss"]) for s in shared
            )
            if shared
            else None,
            # the data too (digests of rank 0's samples): near-identical samples give near-equal losses even after a
            # resume that lost its place
            "same_samples": all(after[s].get("samples") == before[s].get("samples") for s in shared),
        }
    write_json(out, results)
    return results


def markdown(results: dict) -> str:
    runs = results["runs"]
    rows = [
        [
            name,
            str(run["gpus"]),
            run["strategy"],
            f"{run['tokens_per_second']:,.0f}",
            f"{run['seconds_per_step']:.2f}",
            ", ".join(f"{p:.1f}" for p in run["peak_gib_per_rank"]),
            f"{run['wall_seconds']:.0f}",
        ]
        for name, run in runs.items()
    ]
    lines = [
        "# Stage I distillation on several GPUs",
        "",
        environment_lines(results["environment"]),
        "",
        f"`experiments/infinitevl/distill_layerwise_fsdp.yaml` at the Qwen2.5-VL-3B shape (random bf16 weights, "
        f"student `S,D,D,D x9`, teacher all `A`), one sample of {results['tokens_per_sample']:,} tokens with a "
        f"448x448 image per GPU per step, {results['steps']} steps (the first 2 not timed), bf16-mixed, layer "
        "recomputation. Regenerate with `python -m benchmarks.distributed --gpus 2`.",
        "",
        markdown_table(
            ["run", "GPUs", "strategy", "tokens/s", "s/step", "peak GiB per GPU", "wall s (incl. loading)"], rows
        ),
        "",
    ]
    if "speedup" in results:
        lines += [
            f"Scaling: **{results['speedup']:.2f}x** tokens/s on {runs['fsdp']['gpus']} GPUs over 1 (target 1.8x).",
            "",
        ]
    if "resume" in results:
        resume = results["resume"]
        data = RESUME_DATA_VERDICT[resume.get("same_samples")]
        lines += [
            f"Checkpoint after step {min(resume['steps_compared'], default=0) - 1} "
            f"({runs['fsdp'].get('checkpoint_gib', 0):.1f} GiB, gathered full state dict); the resumed run's losses "
            f"at steps {resume['steps_compared']} differ from the uninterrupted run's by at most "
            f"{resume['max_relative_loss_difference']:.2e} (relative); {data}",
            "",
        ]
    if missing := [name for name in RUNS if name not in runs]:
        lines += [f"Not measured yet: {', '.join(missing)} (`--runs {','.join(missing)}`).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
