"""Training-step throughput of every stage at InfiniteVL's shape, the hybrid beside an all-`A` Transformer trained
by the same code.

Stages (each a :mod:`hybridvl.lit.modules` stage driven step by step, as Lightning drives it, with AdamW):

* ``distill``: Stage I layer-wise distillation (the teacher's forward, and forward and backward of the layers that
  train, each fed the teacher's input to it);
* ``sft``: Stage II SFT (the whole student forward and backward; the mixers train);
* ``long_sft``: long SFT through LoRA adapters (rank 64) on ``--long-tokens`` tokens (default 32K).

Models: the hybrid ``S,D,D,D x9`` and the Transformer ``A x36``, each training the same layer positions (the
hybrid's defaults: Stage I its ``D`` layers, Stage II every mixer; long SFT the LoRA adapters alone).
Qwen2.5-VL-3B dimensions, random bf16 weights under autocast, one packed sample of ``--tokens`` tokens (default
8K) with a 448x448 image, activation checkpointing as ``--checkpointing`` selects (whole layers by default; give
the option several times to compare selections, such as ``mlp`` or ``mlp,S``, each a row with its peak memory),
and with ``--compile`` also through blocks compiled by ``torch.compile`` (a row each; the warm-up steps compile).
The ``tiny`` flavor runs the same code at toy size on the CPU (``S,D,D,D x2`` against ``A x8``), to check it.

Reported per stage and model: tokens/s, model TFLOP/s and MFU (the FLOPs training logs,
:meth:`hybridvl.lit.modules.HybridStage.batch_flops`, against the GPU's dense bf16 peak as Lightning knows it, or
``--peak-tflops``), peak memory, trainable parameters, and the backend each mixer kind and the LM-head loss ran
(``D`` trains through fla's kernels only where fla's gated backward can run: with tilelang on Hopper with Triton
< 3.7.1; else through PyTorch, several times slower).

    python -m benchmarks.train_step                      # on a CUDA machine; writes results/train_step.{json,md}
    python -m benchmarks.train_step --stages sft         # some stages (the others measured earlier stay)
    python -m benchmarks.train_step --flavor tiny        # a CPU-sized run of the same code, to check it
    python -m benchmarks.train_step --stages sft --checkpointing true --checkpointing mlp   # memory for speed
    python -m benchmarks.train_step --stages sft --compile                                  # eager and compiled
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, at_least, environment, environment_lines, markdown_table, report, write_json
from hybridvl.lit.data.types import PackedBatch, Sample
from hybridvl.lit.losses import loss_backend
from hybridvl.lit.modules import SFT, DistillLayerwise, HybridStage, LongSFT
from hybridvl.mixers import parse_layout
from hybridvl.mixers.backends import fla_gated_backward_issue, tilelang_enabled
from hybridvl.models.config import HybridConfig
from hybridvl.models.hybrid import HybridVLM, checkpoint_selection

STAGES = {"distill": "Stage I layer-wise distillation", "sft": "Stage II SFT", "long_sft": "long SFT (LoRA)"}
MODELS = ("hybrid", "transformer")
WORKDIR_MARK = ".train_step_workdir"  # in a --workdir whose model folders this benchmark wrote (and may replace)


@dataclasses.dataclass(frozen=True)
class Flavor:
    """Model dimensions and batch shape of a run."""

    text: dict
    vision: dict
    groups: int  # the hybrid is S,D,D,D x groups, the Transformer A x (4 groups)
    image_side: int  # patches per side of the image (32: 448 px)
    tokens: int
    long_tokens: int
    vocab_ids: int  # random token ids are drawn below this


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
FLAVORS = {
    "3b": Flavor({}, VISION_3B, groups=9, image_side=32, tokens=8192, long_tokens=32768, vocab_ids=150_000),
    "tiny": Flavor(
        dict(
            vocab_size=512,
            num_hidden_layers=8,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=16,
            mrope_section=[2, 3, 3],
            mixer_options={"D": {"num_heads": 2, "head_dim": 16}},
            image_token_id=500,
            video_token_id=501,
            vision_start_token_id=502,
            vision_end_token_id=503,
            bos_token_id=None,
            eos_token_id=504,
            pad_token_id=0,
        ),
        dict(
            VISION_3B,
            depth=2,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
        ),
        groups=2,
        image_side=4,
        tokens=96,
        long_tokens=160,
        vocab_ids=500,
    ),
}


def layout(flavor: Flavor, model: str) -> str:
    return f"S,D,D,D x{flavor.groups}" if model == "hybrid" else f"A x{4 * flavor.groups}"


def model_config(flavor: Flavor, model: str) -> HybridConfig:
    return HybridConfig(layout=layout(flavor, model), vision_config=flavor.vision, **flavor.text)


def make_batch(flavor: Flavor, config: HybridConfig, tokens: int, device: torch.device) -> PackedBatch:
    """One packed sample: 16 text tokens, an image, text; the loss on the second half."""
    side = flavor.image_side
    image_tokens = side * side // 4
    ids = torch.randint(0, flavor.vocab_ids, (tokens,))
    ids[16 : 16 + image_tokens] = config.image_token_id
    labels = ids.clone()
    labels[: tokens // 2] = -100
    patch = 3 * 2 * 14 * 14
    vision = {"pixel_values": torch.randn(side * side, patch), "image_grid_thw": torch.tensor([[1, side, side]])}
    sample = Sample(ids, labels, tokens // 2, vision)
    return PackedBatch(ids[None], labels[None], torch.tensor([0, tokens]), vision, [sample]).to(device)


def transformer_trainable(flavor: Flavor) -> dict[str, list[str] | None]:
    """Per stage, what the Transformer trains: the hybrid's defaults at the same layer positions (Stage I the
    positions of its ``D`` layers, Stage II every layer's mixer, long SFT the LoRA adapters alone)."""
    kinds = model_config(flavor, "hybrid").kinds
    distilled = [f"language_model.layers.{i}.self_attn.*" for i, kind in enumerate(kinds) if kind not in ("A", "S")]
    return {"distill": distilled, "sft": ["mixers:*"], "long_sft": None}


def checkpointing_option(text: str) -> bool | str:
    """``--checkpointing``'s value as a stage takes it: ``true``/``false``, else a selection such as ``mlp,S``."""
    return {"true": True, "false": False}.get(text.lower(), text)


def transformer_selection(recompute: bool | str) -> bool | str:
    """The Transformer's counterpart of the hybrid's checkpointing selection: its MLPs where the hybrid's are
    recomputed, its attention layers where the hybrid's attention-type mixers (``S``, ``A``) are."""
    if isinstance(recompute, bool) or recompute == "layers":
        return recompute
    parts = recompute.split(",")
    chosen = [name for name, wanted in (("mlp", "mlp" in parts), ("A", "S" in parts or "A" in parts)) if wanted]
    return ",".join(chosen) or False


def build_stage(
    stage: str,
    student: Path,
    teacher: Path,
    trainable: list[str] | None,
    checkpointing: bool | str = True,
    compiled: bool = False,
) -> HybridStage:
    options = dict(
        trainable=trainable, gradient_checkpointing=checkpointing, compile=compiled, generation_max_new_tokens=0
    )
    if stage == "distill":
        return DistillLayerwise(str(student), str(teacher), **options)
    if stage == "long_sft":
        return LongSFT(str(student), **options)
    return SFT(str(student), **options)


def time_steps(
    stage: HybridStage, batch: PackedBatch, steps: int, warmup: int, device: torch.device
) -> tuple[float, float]:
    """Seconds per optimizer step (mean of ``steps`` after ``warmup``) and the peak memory in GiB (CUDA)."""
    optimizer = torch.optim.AdamW([p for p in stage.student.parameters() if p.requires_grad], lr=1e-5)
    cuda = device.type == "cuda"
    for step in range(steps + warmup):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss, _ = stage.compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return seconds, (torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))


def backends_ran(stage: HybridStage, device: torch.device) -> dict[str, str]:
    """The backends the student's layers of each mixer kind ran in their last call (``"not run"``: the stage
    runs no layer of that kind, as Stage I its shared attention layers), and the LM-head loss's."""
    ran: dict[str, set[str]] = {}
    for kind, backend in zip(stage.student.kinds, stage.student.mixer_backends()):
        ran.setdefault(kind, set()).update([backend] if backend else [])
    named = {kind: "+".join(sorted(backends)) or "not run" for kind, backends in ran.items()}
    return {**named, "loss": loss_backend(stage.hparams.loss_backend, device, "next_token_cross_entropy")}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    """The device's dense bf16 FLOP/s: ``override`` (TFLOP/s) or Lightning's table; ``None`` where unknown."""
    if override is not None:
        return override * 1e12
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, torch.bfloat16)


def run(args: argparse.Namespace, out: Path) -> dict:
    """Measure the chosen stages for both models; ``out`` is rewritten after each measurement, keeping those of an
    earlier call that this one does not repeat."""
    torch.manual_seed(0)
    flavor = FLAVORS[args.flavor]
    flavor = dataclasses.replace(
        flavor, tokens=args.tokens or flavor.tokens, long_tokens=args.long_tokens or flavor.long_tokens
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stages = args.stages.split(",")
    peak = peak_flops(device, args.peak_tflops)
    earlier = json.loads(out.read_text())["rows"] if out.exists() else []
    results = {
        "environment": environment(),
        "flavor": args.flavor,
        "steps": args.steps,
        "warmup": args.warmup,
        "peak_tflops": None if peak is None else peak / 1e12,
        "tilelang": tilelang_enabled(),
        "gated_backward_issue": fla_gated_backward_issue(device),
        "rows": earlier,
    }
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.workdir.mkdir(parents=True, exist_ok=True)
    (args.workdir / WORKDIR_MARK).touch()
    for model in MODELS:
        with device:  # random initialisation of 4B parameters is quick on the GPU
            HybridVLM(model_config(flavor, model)).to(dtype).save_pretrained(args.workdir / model, overwrite=True)
    teacher = args.workdir / "transformer"  # Stage I's teacher, for both students
    baseline = transformer_trainable(flavor)
    compile_options = [False, True] if args.compile else [False]
    grid = itertools.product(stages, MODELS, args.checkpointing or ["true"], compile_options)
    for key, model, checkpointing, compiled in grid:
        tokens = flavor.long_tokens if key == "long_sft" else flavor.tokens
        trainable = baseline[key] if model == "transformer" else None  # None: the stage's defaults
        recompute = checkpointing_option(checkpointing)
        if model == "transformer":
            recompute = transformer_selection(recompute)
        stage = build_stage(key, args.workdir / model, teacher, trainable, recompute, compiled)
        stage.configure_model()
        stage.to(device)
        batch = make_batch(flavor, stage.student.config, tokens, device)
        seconds, peak_gib = time_steps(stage, batch, args.steps, args.warmup, device)
        total = stage.batch_flops(batch)
        row = {
            "stage": STAGES[key],
            "model": model,
            "layout": layout(flavor, model),
            "device": str(results["environment"]["device"]),
            "tokens": tokens,
            "recompute": "layers" if recompute is True else (recompute or "nothing"),
            "compiled": compiled,
            "seconds_per_step": seconds,
            "tokens_per_second": tokens / seconds,
            "tflops": total / seconds / 1e12,
            "mfu": None if peak is None else total / seconds / peak,
            "peak_gib": peak_gib,
            "trainable_parameters": sum(p.numel() for p in stage.student.parameters() if p.requires_grad),
            "backends": backends_ran(stage, device),
        }
        results["rows"] = [r for r in results["rows"] if _key(r) != _key(row)] + [row]
        print(row, flush=True)
        write_json(out, results)
        del stage
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _key(row: dict) -> tuple[str, str, str, bool]:
    """A row's identity: stage, model, what it recomputes (rows from before the option recomputed layers) and
    whether its blocks were compiled."""
    return row["stage"], row["model"], row.get("recompute", "layers"), row.get("compiled", False)


def markdown(results: dict) -> str:
    rows = []
    for r in results["rows"]:
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        backends = ", ".join(f"{kind} {backend}" for kind, backend in r["backends"].items())
        rows.append(
            [
                r["stage"],
                f"`{r['layout']}`",
                f"`{r.get('recompute', 'layers')}`",
                "yes" if r.get("compiled") else "no",
                f"{r['tokens']:,}",
                f"{r['tokens_per_second']:,.0f}",
                f"{r['tflops']:.1f}",
                mfu,
                "n/a" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.1f}",  # NaN off CUDA
                f"{r['trainable_parameters'] / 1e6:.0f}M",
                backends,
            ]
        )
    measured = {(r["stage"], r["model"]) for r in results["rows"]}
    missing = [f"{stage} ({model})" for stage in STAGES.values() for model in MODELS if (stage, model) not in measured]
    peak = results["peak_tflops"]
    backward = results["gated_backward_issue"] or "fla's gated backward runs here"
    return "\n".join(
        [
            "# Training step of every stage: hybrid and Transformer",
            "",
            environment_lines(results["environment"]),
            "",
            f"Flavor `{results['flavor']}` (`3b`: Qwen2.5-VL-3B dimensions), random bf16 weights (autocast), one "
            "packed sample with an image (448x448 at `3b`), AdamW; both models train the same "
            f"layer positions. Mean of {results['steps']} steps after {results['warmup']} warm-ups. "
            "MFU: model FLOPs (`hybridvl/lit/flops.py`) against "
            + ("an unknown peak." if peak is None else f"{peak:.0f} dense bf16 TFLOP/s.")
            + f" tilelang installed: {results['tilelang']} ({backward}). Regenerate with "
            "`python -m benchmarks.train_step` on a CUDA machine. *recompute*: what activation checkpointing "
            "recomputes in the backward pass (`layers`: whole decoder layers; `mlp`, mixer letters: those parts "
            "alone; the Transformer recomputes the counterparts of the hybrid's: its MLPs, its attention for `S`).",
            "",
            markdown_table(
                [
                    "stage",
                    "layout",
                    "recompute",
                    "compiled",
                    "tokens",
                    "tokens/s",
                    "TFLOP/s",
                    "MFU",
                    "peak GiB",
                    "trainable",
                    "backends",
                ],
                rows,
            ),
            *(["", "Not measured yet: " + ", ".join(missing) + "."] if missing else []),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks.train_step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flavor", choices=sorted(FLAVORS), default="3b", help="model and batch size")
    parser.add_argument("--steps", type=at_least(1), default=5, help="timed steps")
    parser.add_argument("--warmup", type=at_least(0), default=2, help="untimed steps before them")
    parser.add_argument("--tokens", type=at_least(1), default=None, help="tokens per batch (default: the flavor's, 8K)")
    parser.add_argument(
        "--long-tokens", type=at_least(1), default=None, help="long SFT's tokens (default: the flavor's, 32K)"
    )
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of: " + ", ".join(STAGES))
    parser.add_argument(
        "--checkpointing",
        action="append",
        default=None,
        help="what activation checkpointing recomputes: true (whole layers, the default), false, or parts such as "
        "'mlp' or 'mlp,S'; give it several times to compare (a row each)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also measure each row with its blocks compiled by torch.compile"
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: Lightning's table)")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_step", help="results path without suffix")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hybridvl-train-step"), help="model folders")
    parser.add_argument("--plot-only", action="store_true", help="rewrite the markdown from the JSON")
    args = parser.parse_args()
    if unknown := set(args.stages.split(",")) - set(STAGES):
        parser.error(f"--stages: unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    kinds = parse_layout(layout(FLAVORS[args.flavor], "hybrid"))
    for selection in args.checkpointing or []:
        try:
            checkpoint_selection(checkpointing_option(selection), kinds)
        except ValueError as error:
            parser.error(f"--checkpointing: {error}")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        parser.error(f"--peak-tflops must be a positive number, got {args.peak_tflops}")
    if args.workdir.is_file():
        parser.error(f"--workdir {args.workdir} is a file; give a folder for the benchmark's model folders")
    found = [model for model in MODELS if (args.workdir / model).exists()]
    if found and not args.plot_only and not (args.workdir / WORKDIR_MARK).exists():
        parser.error(
            f"--workdir {args.workdir} holds {' and '.join(found)}, which this benchmark did not write and would "
            "replace with random-weight models; give a new or empty folder"
        )
    report(
        "train_step",
        args.out,
        args.plot_only,
        lambda path: run(args, path),
        markdown,
        None,
        needs_cuda=args.flavor != "tiny",
    )


if __name__ == "__main__":
    main()
