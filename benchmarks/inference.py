"""Inference at InfiniteVL's shape: the hybrid (``S,D,D,D x9``) against the matching all-``A`` Transformer.

Both models have Qwen2.5-VL-3B's dimensions and vision tower, random bf16 weights, and run in the same process
on one GPU. Measured:

* **prefill**: one pass over ``T`` tokens (last-token logits), eager; the Transformer's attention is PyTorch's
  SDPA flash kernel, the hybrid's SWA layers fla's windowed kernel;
* **decode**: ms per token by CUDA-graph replay (:class:`hybridvl.models.cuda_graphs.GraphedDecoder`), at a context of
  ``C`` tokens. The state at context ``C`` is built directly (ring buffers full of random keys and values, random
  recurrent states, positions at ``C``): decoding costs the same whatever the values, and it spares prefilling
  1M tokens. Eager decoding is timed at 4K for comparison. Both models decode through the same code: fused input
  projections and MLP, a static state (the Transformer's cache reserved up front), one graph per step, attention
  steps written into the cache and attended in one Triton kernel pair
  (:func:`hybridvl.mixers.ops.decode_attention.decode_attention_step`); the kernels of a step are counted from
  graph replays (torch.profiler);
* **weight-bandwidth floor**: the bytes of the decoder's weights (vision tower excluded) over the measured
  device-to-device copy bandwidth (bytes read plus written): no decoder reading every weight once per token is
  faster;
* **streaming**: 448x448 frames (1,024 patches, 256 merged tokens) through the vision tower and the decoder
  into the state by CUDA-graph replay (:class:`hybridvl.models.cuda_graphs.GraphedFramePrefill`), frames per second over
  ``--frames`` frames, with the allocated memory after every frame; eager frames for comparison. Frames enter
  as processed patches on the GPU: decoding the video and resizing on the CPU are not timed.

    python -m benchmarks.inference            # on a CUDA machine; writes results/inference.{json,md,png}
    python -m benchmarks.inference --plot-only
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS,
    cuda_time_ms,
    environment,
    environment_lines,
    markdown_table,
    report,
    write_json,
)
from benchmarks.train_step import VISION_3B
from hybridvl.mixers.state import KVCache, RecurrentState
from hybridvl.models.config import HybridConfig
from hybridvl.models.cuda_graphs import GraphedDecoder, GraphedFramePrefill
from hybridvl.models.generation import prefill
from hybridvl.models.hybrid import HybridVLM

MODELS = {"hybrid": "S,D,D,D x9", "transformer": "A x36"}
FRAME_GRID = (1, 32, 32)  # a 448x448 frame


def build(layout: str) -> HybridVLM:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = HybridVLM(HybridConfig(layout=layout, vision_config=VISION_3B))
    return model.to(torch.bfloat16).eval()


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus written (2 GiB buffers)."""
    source = torch.randn(2**29, device="cuda")
    target = torch.empty_like(source)
    ms = cuda_time_ms(lambda: target.copy_(source), warmup=3, repeats=20)
    return 2 * source.numel() * source.element_size() / (ms / 1e3)


def decoder_weight_bytes(model: HybridVLM) -> int:
    """Bytes a decode step must read: every decoder and head weight once (tied embeddings counted once)."""
    seen, total = set(), 0
    for module in (model.language_model, model.lm_head):
        for parameter in module.parameters():
            if id(parameter) not in seen:
                seen.add(id(parameter))
                total += parameter.numel() * parameter.element_size()
    # the embedding table is read one row per token, not whole (unless tied to the head, which reads it whole)
    embedding = model.language_model.embed_tokens.weight
    if model.lm_head.weight is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def prefill_ms(model: HybridVLM, tokens: int, repeats: int, chunk: int | None = None) -> dict:
    """Median of ``repeats`` prefills of ``tokens`` random tokens after one warm-up (in chunks of ``chunk`` tokens
    carrying the state, if given)."""
    ids = torch.randint(0, 150_000, (1, tokens), device="cuda")
    torch.cuda.reset_peak_memory_stats()
    try:
        with torch.no_grad():
            ms = cuda_time_ms(lambda: prefill(model, ids, prefill_chunk_size=chunk), warmup=1, repeats=repeats)
    except torch.OutOfMemoryError:
        return {"tokens": tokens, "chunk": chunk, "ms": None, "error": "out of memory"}
    finally:
        torch.cuda.empty_cache()
    return {"tokens": tokens, "chunk": chunk, "ms": ms, "tokens_per_second": tokens / ms * 1e3, "peak_gib": _peak_gib()}


def kernel_profile(step, repeats: int = 1) -> dict:
    """The GPU kernels of one ``step`` (eager, or a graph replay), averaged over ``repeats`` calls after one
    warm-up: how many, their summed time, and the costliest by name. Under a CUDA graph the same kernels run back
    to back, so their summed time bounds the replay from below."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                step()
            torch.cuda.synchronize()
    kernels = []
    for event in prof.key_averages():
        micros = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if micros > 0:
            kernels.append({"name": event.key[:90], "count": event.count / repeats, "ms": micros / 1e3 / repeats})
    kernels.sort(key=lambda k: -k["ms"])
    return {
        "kernels": round(sum(k["count"] for k in kernels)),
        "kernel_ms": sum(k["ms"] for k in kernels),
        "top": kernels[:8],
    }


def fill_context(decoder: GraphedDecoder, context: int) -> None:
    """Make the decoder's static state look like one that has seen ``context`` tokens (random contents)."""
    for layer in decoder.state.layers:
        if isinstance(layer, KVCache):
            slots = layer.key.shape[1] if layer.window is not None else context
            layer.key[:, :slots].normal_()
            layer.value[:, :slots].normal_()
            layer.length.fill_(context)
        elif isinstance(layer, RecurrentState):
            layer.recurrent.normal_(std=0.01)
            for conv in layer.conv.values():
                conv.normal_()
    decoder.state.next_position.fill_(context)
    decoder.load(decoder.state)  # recount the tokens held (the copy itself is a no-op)


def decode_ms(model: HybridVLM, context: int, steps: int, compile: bool = False) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        decoder = GraphedDecoder(model, batch_size=1, max_context=context + steps + 8, compile=compile)
        fill_context(decoder, context)
        token = torch.randint(0, 150_000, (1,), device="cuda")
        for _ in range(3):
            decoder.step(token)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            decoder.step(token)
        end.record()
        torch.cuda.synchronize()
        result = {
            "context": context,
            "ms_per_token": start.elapsed_time(end) / steps,
            "state_gib": decoder.state.nbytes / 2**30,
            "peak_gib": _peak_gib(),
        }
    except torch.OutOfMemoryError:
        result = {"context": context, "ms_per_token": None, "error": "out of memory"}
    finally:
        decoder = None
        torch.cuda.empty_cache()
    return result


def graph_decode_profile(model: HybridVLM, context: int, replays: int = 20, compile: bool = False) -> dict:
    """The kernels of one decode step as the CUDA graph replays it at ``context`` (:func:`kernel_profile` over
    ``replays`` replays): what the per-token time is made of, counted the same way for both models."""
    torch.cuda.empty_cache()
    decoder = GraphedDecoder(model, batch_size=1, max_context=context + replays + 8, compile=compile)
    fill_context(decoder, context)
    token = torch.randint(0, 150_000, (1,), device="cuda")
    profile = kernel_profile(lambda: decoder.step(token), repeats=replays)
    decoder = None
    torch.cuda.empty_cache()
    return profile


def eager_decode_ms(model: HybridVLM, context: int, steps: int) -> float:
    """Eager decoding from a prefill of ``context`` tokens (launch-bound; for comparison)."""
    with torch.no_grad():
        state = model(torch.randint(0, 150_000, (1, context), device="cuda"), logits_to_keep=1).state
        token = torch.randint(0, 150_000, (1, 1), device="cuda")
        for _ in range(3):
            state = model(token, state=state, logits_to_keep=1).state
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            state = model(token, state=state, logits_to_keep=1).state
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def decode_profile(model: HybridVLM, context: int) -> dict:
    with torch.no_grad():
        state = model(torch.randint(0, 150_000, (1, context), device="cuda"), logits_to_keep=1).state
    token = torch.randint(0, 150_000, (1, 1), device="cuda")
    return kernel_profile(lambda: model(token, state=state.clone(), logits_to_keep=1))


def streaming(model: HybridVLM, frames: int, eager_frames: int, compile: bool = False) -> dict:
    """Frames per second through the frame graph, with the allocated memory after each frame."""
    torch.cuda.empty_cache()
    graph = GraphedFramePrefill(model, FRAME_GRID, compile=compile)
    pool = torch.randn(16, *graph.pixel_values.shape, device="cuda", dtype=graph.pixel_values.dtype)  # rotated
    for n in range(10):
        graph.feed(pool[n % 16])
    torch.cuda.synchronize()
    memory, per_frame_ms = [], []
    start = time.perf_counter()
    mark = start
    for n in range(frames):
        graph.feed(pool[n % 16])
        memory.append(torch.cuda.memory_allocated())
        if (n + 1) % 100 == 0:  # a synchronised wall-clock lap every 100 frames
            torch.cuda.synchronize()
            now = time.perf_counter()
            per_frame_ms.append((now - mark) / 100 * 1e3)
            mark = now
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    warm = memory[len(memory) // 10]
    ids, grid = graph.input_ids, torch.tensor([FRAME_GRID], device="cuda")

    def eager_frame(n: int, state):
        return model(ids, pixel_values=pool[n % 16], image_grid_thw=grid, state=state, logits_to_keep=1).state

    with torch.no_grad():
        state = None
        for n in range(3):  # warm-up
            state = eager_frame(n, state)
        torch.cuda.synchronize()
        eager_start = time.perf_counter()
        for n in range(eager_frames):
            state = eager_frame(n, state)
        torch.cuda.synchronize()
        eager_fps = eager_frames / (time.perf_counter() - eager_start)
        vision_ms = cuda_time_ms(lambda: model.visual(pool[0], grid_thw=grid), warmup=3, repeats=20)
    empty = model.init_state(1)
    profile = kernel_profile(lambda: eager_frame(0, empty.clone()))
    vision_profile = kernel_profile(lambda: model.visual(pool[0], grid_thw=grid))
    return {
        "frame_profile": profile,
        "vision_tower_profile": vision_profile,
        "frames": frames,
        "tokens_per_frame": ids.shape[1],
        "fps": frames / seconds,
        "lap_ms_per_frame": per_frame_ms,
        "eager_fps": eager_fps,
        "vision_tower_eager_ms": vision_ms,
        "memory_bytes": memory,
        "memory_growth_after_warmup": (max(memory[len(memory) // 10 :]) - warm) / warm,
        "state_bytes": graph.state.nbytes,
        "tokens_streamed": int(graph.state.next_position[0]),
    }


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def run(args: argparse.Namespace, out: Path) -> dict:
    results = {
        "environment": environment(),
        "copy_bandwidth_gbps": copy_bandwidth() / 1e9,
        "compiled_graphs": args.compile,
        "models": {},
    }
    for name, layout in MODELS.items():
        model = build(layout)
        entry = results["models"][name] = {
            "layout": layout,
            "parameters": sum(p.numel() for p in model.parameters()),
            "decoder_weight_bytes": decoder_weight_bytes(model),
            "prefill": [],
            "decode": [],
        }
        entry["floor_ms_per_token"] = entry["decoder_weight_bytes"] / (results["copy_bandwidth_gbps"] * 1e9) * 1e3
        lengths = args.prefill + (args.hybrid_prefill if name == "hybrid" else [])
        for tokens in lengths:
            chunk = args.prefill_chunk if tokens > args.prefill_chunk_above else None
            entry["prefill"].append(prefill_ms(model, tokens, repeats=1 if tokens > 65536 else 5, chunk=chunk))
            print(name, entry["prefill"][-1], flush=True)
            write_json(out, results)
        entry["eager_decode_ms_per_token_at_4k"] = eager_decode_ms(model, 4096, 20)
        entry["decode_profile_at_4k"] = decode_profile(model, 4096)
        print(
            name, "decode kernels", {k: v for k, v in entry["decode_profile_at_4k"].items() if k != "top"}, flush=True
        )
        for context in args.contexts:
            entry["decode"].append(decode_ms(model, context, args.decode_steps, args.compile))
            print(name, entry["decode"][-1], flush=True)
            write_json(out, results)
        entry["decode_graph_profile_at_4k"] = graph_decode_profile(model, 4096, compile=args.compile)
        print(
            name,
            "graph decode kernels",
            {k: v for k, v in entry["decode_graph_profile_at_4k"].items() if k != "top"},
            flush=True,
        )
        if name == "hybrid":
            entry["streaming"] = streaming(model, args.frames, args.eager_frames, args.compile)
            print(name, {k: v for k, v in entry["streaming"].items() if k != "memory_bytes"}, flush=True)
        write_json(out, results)
        del model
        torch.cuda.empty_cache()
    return results


# --- report --------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "OOM" if value is None else f"{value:,.1f}" if value >= 10 else f"{value:.2f}"


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the goals this benchmark tracks."""
    hybrid, transformer = results["models"]["hybrid"], results["models"]["transformer"]
    prefill_h = {p["tokens"]: p.get("ms") for p in hybrid["prefill"]}
    prefill_t = {p["tokens"]: p.get("ms") for p in transformer["prefill"]}
    rows = []
    for tokens, goal in ((4096, 1.0), (131072, 4.0)):
        if prefill_h.get(tokens) and prefill_t.get(tokens):
            ratio = prefill_t[tokens] / prefill_h[tokens]
            rows.append((f"prefill {tokens // 1024}K >= {goal:g}x the Transformer", f"{ratio:.2f}x", ratio >= goal))
    decode = [d for d in hybrid["decode"] if d.get("ms_per_token")]
    if decode:
        worst = max(d["ms_per_token"] for d in decode)
        ratio = worst / hybrid["floor_ms_per_token"]
        rows.append(("decode <= 1.3x the weight-bandwidth floor", f"{ratio:.2f}x (worst context)", ratio <= 1.3))
        spread = worst / min(d["ms_per_token"] for d in decode) - 1
        span = f"{decode[0]['context'] // 1024}K-{decode[-1]['context'] // 1024}K"
        rows.append((f"decode flat within 5% over {span}", f"{spread:.1%}", spread <= 0.05))
    stream = hybrid.get("streaming")
    if stream:
        rows.append(("streaming >= 60 FPS at 448x448", f"{stream['fps']:.1f} FPS", stream["fps"] >= 60))
        growth = stream["memory_growth_after_warmup"]
        rows.append(("memory growth <= 1% after warm-up", f"{growth:.2%}", growth <= 0.01))
    return rows


def markdown(results: dict) -> str:
    hybrid, transformer = results["models"]["hybrid"], results["models"]["transformer"]
    lines = [
        "# Inference: hybrid vs Transformer at the InfiniteVL shape",
        "",
        environment_lines(results["environment"]),
        "",
        "Qwen2.5-VL-3B dimensions and vision tower, random bf16 weights; hybrid `S,D,D,D x9` (SWA window 8192) "
        "against the all-`A` Transformer (PyTorch SDPA flash attention), in the same run. CUDA graphs of both "
        + (
            "capture the forward compiled by `torch.compile` (`--compile`)"
            if results.get("compiled_graphs")
            else "capture the eager forward (`--compile`: compiled first)"
        )
        + ". Regenerate with `python -m benchmarks.inference` on a CUDA machine.",
        "",
        "## Targets",
        "",
        markdown_table(
            ["target", "measured", "met"],
            [[goal, measured, "yes" if met else "**no**"] for goal, measured, met in targets(results)],
        ),
        "",
        "## Prefill (ms, last-token logits)",
        "",
    ]
    prefill_t = {p["tokens"]: p for p in transformer["prefill"]}
    rows = []
    for p in hybrid["prefill"]:
        t = prefill_t.get(p["tokens"], {})
        ratio = f"{t['ms'] / p['ms']:.2f}x" if t.get("ms") and p.get("ms") else "-"
        rows.append(
            [
                f"{p['tokens'] // 1024}K",
                _ms(p.get("ms")),
                _ms(t.get("ms")) if t else "not run",
                ratio,
                f"{p.get('peak_gib', 0):.1f}",
                f"{t.get('peak_gib', 0):.1f}" if t.get("ms") else "-",
            ]
        )
    lines += [
        markdown_table(
            ["tokens", "hybrid", "Transformer", "hybrid speed-up", "hybrid peak GiB", "Transformer peak GiB"], rows
        ),
        "",
        "## Decode (ms/token, CUDA graph, batch 1)",
        "",
        f"Copy bandwidth {results['copy_bandwidth_gbps']:,.0f} GB/s. Weight-bandwidth floor: hybrid "
        f"{hybrid['decoder_weight_bytes'] / 1e9:.2f} GB -> {hybrid['floor_ms_per_token']:.2f} ms, Transformer "
        f"{transformer['decoder_weight_bytes'] / 1e9:.2f} GB -> {transformer['floor_ms_per_token']:.2f} ms. "
        f"Eager decoding at 4K: hybrid {hybrid['eager_decode_ms_per_token_at_4k']:.1f} ms/token, Transformer "
        f"{transformer['eager_decode_ms_per_token_at_4k']:.1f} ms/token.",
        "",
    ]
    counts = [
        f"{label} {entry['decode_graph_profile_at_4k']['kernels']:,}"
        for label, entry in (("hybrid", hybrid), ("Transformer", transformer))
        if "decode_graph_profile_at_4k" in entry
    ]
    if counts:
        lines += [f"Kernels per decode step (graph replay at 4K): {', '.join(counts)}.", ""]
    decode_t = {d["context"]: d for d in transformer["decode"]}
    rows = []
    for d in hybrid["decode"]:
        t = decode_t.get(d["context"], {})
        rows.append(
            [
                f"{d['context'] // 1024}K",
                _ms(d.get("ms_per_token")),
                f"{d['ms_per_token'] / hybrid['floor_ms_per_token']:.2f}x" if d.get("ms_per_token") else "-",
                f"{d.get('state_gib', 0):.3f}",
                _ms(t.get("ms_per_token")) if t else "not run",
                f"{t['ms_per_token'] / transformer['floor_ms_per_token']:.2f}x" if t.get("ms_per_token") else "-",
                f"{t.get('state_gib', 0):.2f}" if t.get("ms_per_token") else "-",
            ]
        )
    lines += [
        markdown_table(
            [
                "context",
                "hybrid ms",
                "hybrid / floor",
                "hybrid state GiB",
                "Transformer ms",
                "Transformer / floor",
                "Transformer cache GiB",
            ],
            rows,
        ),
        "",
    ]
    if hybrid["prefill"] and any(p.get("chunk") for p in hybrid["prefill"]):
        chunked = [f"{p['tokens'] // 1024}K" for p in hybrid["prefill"] if p.get("chunk")]
        lines.insert(
            lines.index("## Decode (ms/token, CUDA graph, batch 1)") - 1,
            f"\nPrefills of {', '.join(chunked)} run in chunks of {hybrid['prefill'][-1]['chunk']:,} tokens carrying "
            "the state (one pass does not fit the GPU).",
        )
    stream = hybrid.get("streaming")
    if stream:
        lines += [
            "## Streaming (448x448 frames, CUDA graph)",
            "",
            f"{stream['frames']:,} frames of {stream['tokens_per_frame']} tokens ({stream['tokens_streamed']:,} M-RoPE "
            f"positions): **{stream['fps']:.1f} FPS** (eager: {stream['eager_fps']:.1f} FPS; the vision tower alone, "
            f"eager: {stream['vision_tower_eager_ms']:.1f} ms/frame). State {stream['state_bytes'] / 2**20:.1f} MiB; "
            f"allocated memory grew {stream['memory_growth_after_warmup']:.2%} after the first 10% of frames.",
            "",
        ]
    lines += where_the_time_goes(results)
    return "\n".join(lines) + "\n"


MATMUL_KERNELS = ("gemm", "gemv", "nvjet", "cutlass", "xmma")


def _profile_lines(label: str, profile: dict, measured_ms: float | None) -> list[str]:
    matmul = sum(k["ms"] for k in profile["top"] if any(m in k["name"].lower() for m in MATMUL_KERNELS))
    replay = f"; the graph replay took {measured_ms:.1f} ms" if measured_ms else ""
    lines = [
        f"**{label}**: {profile['kernels']:,} kernels, {profile['kernel_ms']:.1f} ms of kernel time{replay}; matrix "
        f"products among the costliest kernels {matmul:.1f} ms.",
        "",
        markdown_table(
            ["kernel", "launches", "ms"],
            [[f"`{k['name'][:70]}`", f"{k['count']:g}", f"{k['ms']:.2f}"] for k in profile["top"]],
        ),
        "",
    ]
    return lines


def where_the_time_goes(results: dict) -> list[str]:
    """Kernel profiles of one eager step and of one graph replay (the same kernels without the launch gaps)."""
    hybrid, transformer = results["models"]["hybrid"], results["models"]["transformer"]
    lines = ["## Where the time goes", ""]
    lines += [
        "Kernels of one eager step, and of one decode step as the CUDA graph replays it (averaged over 20 replays), "
        "by torch.profiler; a graph replays the eager step's kernels without launch gaps, so their summed time "
        "bounds the replay from below.",
        "",
    ]
    for name, entry in (("hybrid", hybrid), ("Transformer", transformer)):
        graph = next((d["ms_per_token"] for d in entry["decode"] if d["context"] == 4096), None)
        profile = entry.get("decode_profile_at_4k")
        if profile:
            lines += _profile_lines(f"{name} decode step at 4K", profile, graph)
        profile = entry.get("decode_graph_profile_at_4k")
        if profile:
            lines += _profile_lines(f"{name} decode step at 4K, as the graph replays it", profile, graph)
    stream = hybrid.get("streaming") or {}
    if "frame_profile" in stream:
        lines += _profile_lines(
            "hybrid 448x448 frame (vision tower + decoder)", stream["frame_profile"], 1e3 / stream["fps"]
        )
        lines += _profile_lines("the vision tower alone", stream["vision_tower_profile"], None)
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, entry in results["models"].items():
        pre = [p for p in entry["prefill"] if p.get("ms")]
        axes[0].plot([p["tokens"] for p in pre], [p["ms"] / 1e3 for p in pre], "o-", label=name)
        dec = [d for d in entry["decode"] if d.get("ms_per_token")]
        axes[1].plot([d["context"] for d in dec], [d["ms_per_token"] for d in dec], "o-", label=name)
        axes[1].axhline(entry["floor_ms_per_token"], ls=":", color=axes[1].lines[-1].get_color(), label=f"{name} floor")
    for ax, title, ylabel in ((axes[0], "Prefill", "seconds"), (axes[1], "Decode (CUDA graph)", "ms / token")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens" if ax is axes[0] else "context tokens")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
    stream = results["models"]["hybrid"].get("streaming")
    if stream:
        axes[2].plot([m / 2**30 for m in stream["memory_bytes"]])
        axes[2].set_xlabel("frame")
        axes[2].set_ylabel("allocated GiB")
        axes[2].set_title(f"Streaming 448x448: {stream['fps']:.0f} FPS")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefill", type=int, nargs="+", default=[4096, 16384, 32768, 131072])
    parser.add_argument("--hybrid-prefill", type=int, nargs="*", default=[524288], help="hybrid-only lengths")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 65536, 262144, 1048576])
    parser.add_argument("--prefill-chunk", type=int, default=16384, help="chunk size for the longest prefills")
    parser.add_argument("--prefill-chunk-above", type=int, default=131072, help="chunk prefills longer than this")
    parser.add_argument("--decode-steps", type=int, default=50)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--eager-frames", type=int, default=30)
    parser.add_argument(
        "--compile", action="store_true", help="the CUDA graphs (decode, frames) capture the compiled forward"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "inference")
    parser.add_argument("--plot-only", action="store_true", help="redraw the markdown and PNG from the JSON")
    args = parser.parse_args()
    report("inference", args.out, args.plot_only, lambda path: run(args, path), markdown, plot)


if __name__ == "__main__":
    main()
