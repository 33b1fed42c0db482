"""Serving throughput: batched decoding at long context, the hybrid's fixed-size state against a Transformer's
growing KV cache.

Both models have Qwen2.5-VL-3B's dimensions (hybrid ``S,D,D,D x9``, Transformer ``A x36``), random bf16 weights,
and decode one token per sequence per step through a CUDA graph per batch size
(:class:`hybridvl.models.cuda_graphs.GraphedDecoder` with the token choice inside the graph). At each context
(32K and 128K tokens by default) every sequence's state is built directly, as ``benchmarks/inference.py`` does
(ring buffers and caches full of random keys and values, random recurrent states): decoding costs the same whatever
the values. The batch sizes are the powers of two up to the largest batch the GPU's free memory holds, by the
state's size per sequence (the Transformer's cache grows with the context, the hybrid's state does not), and that
largest batch itself; a batch that runs out of memory anyway is recorded so, and the next smaller one tried.

Reported: tokens/s (batch over ms per step) for every batch, the largest batch each model fits at each context,
and the claim that matters for serving: the hybrid's tokens/s at 128K against the Transformer's at its largest
fitting batch.

    python -m benchmarks.serving                      # on a CUDA machine; writes results/serving.{json,md,png}
    python -m benchmarks.serving --contexts 32768     # one context
    python -m benchmarks.serving --plot-only          # redraw the markdown and PNG from the JSON
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from benchmarks.common import RESULTS, environment, environment_lines, markdown_table, report, write_json
from benchmarks.inference import MODELS, build, fill_context
from hybridvl.mixers.state import KVCache
from hybridvl.models.cuda_graphs import GraphedDecoder
from hybridvl.models.hybrid import HybridVLM

HEADROOM = 4 * 2**30
"""Bytes kept free beside the states: logits, the graph's workspace, the allocator's slack."""
TARGET_RATIO = 5.0
"""The serving claim: the hybrid's tokens/s at 128K at least this many times the Transformer's."""


def state_bytes_per_sequence(model: HybridVLM, context: int, reserve: int) -> int:
    """Bytes one sequence's decoding state takes at ``context`` tokens (full-attention caches reserved for
    ``context + reserve``), counted on the meta device."""
    state = model.init_state(1, "meta")
    for layer in state.layers:
        if isinstance(layer, KVCache) and layer.window is None:
            layer.reserve(context + reserve)
    return state.nbytes


def largest_batch(free_bytes: int, per_sequence: int, headroom: int = HEADROOM, cap: int = 4096) -> int:
    """The most sequences whose states fit ``free_bytes`` less ``headroom`` (at most ``cap``; 0 when none)."""
    return max(0, min(cap, (free_bytes - headroom) // per_sequence))


def batch_sizes(largest: int) -> list[int]:
    """Powers of two below ``largest``, then ``largest`` itself."""
    if largest < 1:
        return []
    sizes = [2**k for k in range(int(math.log2(largest)) + 1) if 2**k < largest]
    return [*sizes, largest]


def decode_rate(model: HybridVLM, batch: int, context: int, steps: int, compile: bool) -> dict:
    """ms per step and tokens/s of ``batch`` sequences at ``context`` tokens (median of three timings of ``steps``
    graph replays each, after warm-up), and the peak memory; ``error`` instead when it runs out of memory."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    decoder = None
    try:
        decoder = GraphedDecoder(
            model, batch_size=batch, max_context=context + 4 * steps + 16, next_token=True, compile=compile
        )
        fill_context(decoder, context)
        tokens = torch.randint(0, 150_000, (batch,), device="cuda")
        for _ in range(3):
            tokens = decoder.step(tokens).clone()
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                tokens = decoder.step(tokens)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / steps)
        ms = sorted(times)[1]
        return {
            "batch": batch,
            "context": context,
            "ms_per_step": ms,
            "tokens_per_second": batch / ms * 1e3,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
    except torch.OutOfMemoryError:
        return {"batch": batch, "context": context, "error": "out of memory"}
    finally:
        del decoder
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, out: Path) -> dict:
    results = {"environment": environment(), "compiled_graphs": args.compile, "steps": args.steps, "models": {}}
    for name, layout in MODELS.items():
        model = build(layout)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        entry = results["models"][name] = {
            "layout": layout,
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
            "free_bytes_after_weights": free,
            "device_bytes": total,
            "contexts": [],
        }
        for context in args.contexts:
            per_sequence = state_bytes_per_sequence(model, context, 4 * args.steps + 16)
            predicted = largest_batch(free, per_sequence)
            point = {"context": context, "state_bytes_per_sequence": per_sequence, "predicted_largest": predicted}
            point["runs"] = runs = []
            sizes = batch_sizes(predicted)
            while sizes:
                batch = sizes.pop(0)
                runs.append(decode_rate(model, batch, context, args.steps, args.compile))
                print(name, runs[-1], flush=True)
                if "error" in runs[-1]:
                    if not sizes:  # the predicted largest did not fit: one try 10% smaller
                        smaller = int(batch * 0.9)
                        if smaller > max((r["batch"] for r in runs if "error" not in r), default=0):
                            sizes = [smaller]
                    else:
                        break
            fitted = [r for r in runs if "error" not in r]
            point["largest_fitting"] = max((r["batch"] for r in fitted), default=0)
            point["best_tokens_per_second"] = max((r["tokens_per_second"] for r in fitted), default=None)
            entry["contexts"].append(point)
            write_json(out, results)
        del model
        torch.cuda.empty_cache()
    return results


def _point(results: dict, model: str, context: int) -> dict | None:
    return next((p for p in results["models"].get(model, {}).get("contexts", []) if p["context"] == context), None)


def serving_ratio(results: dict, context: int = 131072) -> float | None:
    """The hybrid's best tokens/s at ``context`` over the Transformer's at its largest fitting batch."""
    hybrid, transformer = _point(results, "hybrid", context), _point(results, "transformer", context)
    if not hybrid or not transformer or not hybrid["best_tokens_per_second"]:
        return None
    at_largest = [r for r in transformer["runs"] if r["batch"] == transformer["largest_fitting"] and "error" not in r]
    return hybrid["best_tokens_per_second"] / at_largest[0]["tokens_per_second"] if at_largest else None


def markdown(results: dict) -> str:
    lines = [
        "# Serving: batched decoding at long context",
        "",
        environment_lines(results["environment"]),
        "",
        "Qwen2.5-VL-3B dimensions, random bf16 weights; hybrid `S,D,D,D x9` (SWA window 8192) against the all-`A` "
        "Transformer, in the same run. One CUDA graph per batch size"
        + (", capturing the compiled forward" if results.get("compiled_graphs") else "")
        + ", the next token chosen inside it (greedy); states built directly at the context (random contents). "
        f"Median of three timings of {results['steps']} steps. Batch sizes: powers of two up to the largest batch "
        "whose states fit the free memory, and that batch. Regenerate with `python -m benchmarks.serving` on a "
        "CUDA machine.",
        "",
    ]
    ratio = serving_ratio(results)
    if ratio is not None:
        met = "met" if ratio >= TARGET_RATIO else "**not met**"
        lines += [
            f"**Claim**: the hybrid's tokens/s at 128K is {ratio:.1f}x the Transformer's at its largest fitting batch "
            f"(target >= {TARGET_RATIO:g}x: {met}).",
            "",
        ]
    contexts = sorted({p["context"] for entry in results["models"].values() for p in entry["contexts"]})
    for context in contexts:
        points = {name: _point(results, name, context) for name in results["models"]}
        rows = []
        for name, point in points.items():
            if point is None:
                continue
            rows.append(
                [
                    f"`{results['models'][name]['layout']}`",
                    f"{point['state_bytes_per_sequence'] / 2**20:,.0f} MiB",
                    str(point["largest_fitting"]),
                    "; ".join(
                        f"{r['batch']}: " + ("OOM" if "error" in r else f"{r['tokens_per_second']:,.0f}")
                        for r in point["runs"]
                    ),
                ]
            )
        lines += [
            f"## {context // 1024}K context",
            "",
            markdown_table(["model", "state per sequence", "largest batch", "batch: tokens/s"], rows),
            "",
        ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in results["models"].items():
        for point in entry["contexts"]:
            runs = [r for r in point["runs"] if "error" not in r]
            if runs:
                style = "-" if name == "hybrid" else "--"
                label = f"{name} at {point['context'] // 1024}K"
                ax.plot(
                    [r["batch"] for r in runs], [r["tokens_per_second"] for r in runs], style, marker="o", label=label
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences decoded together)")
    ax.set_ylabel("tokens/s")
    ax.set_title("Batched decoding: fixed state vs growing KV cache")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--steps", type=int, default=10, help="graph replays per timing")
    parser.add_argument("--compile", action="store_true", help="the CUDA graphs capture the compiled forward")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving")
    parser.add_argument("--plot-only", action="store_true", help="redraw the markdown and PNG from the JSON")
    args = parser.parse_args()
    report("serving", args.out, args.plot_only, lambda path: run(args, path), markdown, plot)


if __name__ == "__main__":
    main()
