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
  as processed patches on the GPU: decoding the video and resizing on the CPU are not timed;
* **accounting**: one decode step of each model at 4K (batch 1) as the CUDA graph replays it: kernels, GPU time,
  the bytes the step must move (weights, the state read and written, from the configuration) against the copy
  bandwidth, and the costliest kernels (torch.profiler over graph replays);
* **serving**: batched decoding at 32K and 128K context, one CUDA graph per batch size with the next token chosen
  inside it, every sequence's state built directly as for decode. The batch sizes are the powers of two up to the
  largest batch the free memory holds by each model's need per sequence (its state, which for the Transformer grows
  with the context, and what a step holds beside it), and that batch; one that runs out of memory anyway is recorded
  so and smaller ones are tried. Reported: tokens/s per batch, the largest fitting batch, and the hybrid's tokens/s
  at 128K against the Transformer's at its largest fitting batch.

    python -m benchmarks.inference                          # on a CUDA machine; writes results/inference.{json,md,png}
    python -m benchmarks.inference --only serving --out /tmp/serving    # some parts only
    python -m benchmarks.inference --plot-only
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import (
    RESULTS,
    at_least,
    cuda_time_ms,
    environment,
    environment_lines,
    markdown_table,
    report,
    write_json,
)
from benchmarks.train_step import VISION_3B
from hybridvl.mixers.ops.attention import DECODE_BLOCK
from hybridvl.mixers.state import KVCache, RecurrentState
from hybridvl.models.config import HybridConfig
from hybridvl.models.cuda_graphs import GraphedDecoder, GraphedFramePrefill
from hybridvl.models.generation import prefill
from hybridvl.models.hybrid import HybridVLM

MODELS = {"hybrid": "S,D,D,D x9", "transformer": "A x36"}
LABELS = {"hybrid": "hybrid", "transformer": "Transformer"}
PARTS = ("prefill", "decode", "accounting", "streaming", "serving")
FRAME_GRID = (1, 32, 32)  # a 448x448 frame
ACCOUNTING_CONTEXT = 4096
SERVING_HEADROOM = 4 * 2**30
SERVING_TIMINGS = 3  # a serving run's ms per step: the median of this many timings
"""Bytes serving keeps free beside the batch's memory: the graph's workspace, the allocator's slack."""
SERVING_TARGET = 5.0
"""The serving claim: the hybrid's tokens/s at 128K at least this many times the Transformer's at its largest
fitting batch."""


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


def decode_reserve(steps: int, timings: int) -> int:
    """Tokens past the context that :func:`graphed_decode` reserves for its three warm-up steps and ``timings``
    timings of ``steps`` replays (with room to spare)."""
    return (timings + 1) * steps + 16


def graphed_decode(
    model: HybridVLM,
    batch: int,
    context: int,
    steps: int,
    *,
    timings: int = 1,
    next_token: bool = False,
    compile: bool = False,
) -> dict:
    """Decoding ``batch`` sequences at ``context`` tokens by CUDA-graph replay (:class:`GraphedDecoder`, the state
    built by :func:`fill_context`): ms per step, the median of ``timings`` timings of ``steps`` replays after three
    warm-up steps. ``next_token``: the graph chooses the next tokens (greedy) and they are fed back; else it returns
    logits and the same tokens are fed at every step. Returns the batch, the context, ``ms_per_step``,
    ``tokens_per_second``, the state's bytes and the peak allocated bytes, or ``{"error": "out of memory"}`` in
    their place when it does not fit. Memory is freed before and after."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    decoder = None
    try:
        decoder = GraphedDecoder(
            model,
            batch_size=batch,
            max_context=context + decode_reserve(steps, timings),
            next_token=next_token,
            compile=compile,
        )
        fill_context(decoder, context)
        tokens = torch.randint(0, model.config.vocab_size, (batch,), device="cuda")

        def step() -> None:
            nonlocal tokens
            out = decoder.step(tokens)
            if next_token:
                tokens = out

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(timings):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / steps)
        ms = statistics.median(times)
        result = {
            "batch": batch,
            "context": context,
            "ms_per_step": ms,
            "tokens_per_second": batch / ms * 1e3,
            "state_bytes": decoder.state.nbytes,
            "peak_bytes": torch.cuda.max_memory_allocated(),
        }
    except torch.OutOfMemoryError:
        result = {"batch": batch, "context": context, "error": "out of memory"}
    decoder = None
    gc.collect()  # a failed graph's tensors, held by the traceback's frames until now
    torch.cuda.empty_cache()
    return result


def decode_ms(model: HybridVLM, context: int, steps: int, compile: bool = False) -> dict:
    """ms per token of one sequence at ``context`` tokens: :func:`graphed_decode` of batch 1, one timing, logits
    out; the state and the peak memory in GiB."""
    run = graphed_decode(model, 1, context, steps, compile=compile)
    if "error" in run:
        return {"context": context, "ms_per_token": None, "error": run["error"]}
    return {
        "context": context,
        "ms_per_token": run["ms_per_step"],
        "state_gib": run["state_bytes"] / 2**30,
        "peak_gib": run["peak_bytes"] / 2**30,
    }


def step_bytes_moved(model: HybridVLM, context: int) -> dict[str, int]:
    """The bytes one decode step of one sequence at ``context`` tokens must move, from the configuration: every
    decoder weight read once (:func:`decoder_weight_bytes`); the state read once (the occupied slots of each ring
    buffer or cache, each recurrent and convolution state); the recurrent and convolution states written once (the
    new token's key and value, a few KiB, are left out)."""
    read = written = 0
    for layer in model.init_state(1, "meta").layers:
        if isinstance(layer, KVCache):
            tokens = context if layer.window is None else min(context, layer.window)
            slot = 2 * math.prod(layer.key.shape[2:]) * layer.key.element_size()  # a key and a value
            read += tokens * slot
        else:
            read += layer.nbytes
            written += layer.nbytes
    return {"weights": decoder_weight_bytes(model), "state_read": read, "state_written": written}


def decode_accounting(
    model: HybridVLM, context: int, bandwidth: float, replays: int = 20, compile: bool = False
) -> dict:
    """One decode step at ``context`` (batch 1) as the CUDA graph replays it: its GPU time (median of ``replays``
    replays), its kernels (:func:`kernel_profile` over ``replays`` more), the bytes it must move
    (:func:`step_bytes_moved`) and the time they take at ``bandwidth`` bytes/s (the floor)."""
    torch.cuda.empty_cache()
    decoder = GraphedDecoder(model, batch_size=1, max_context=context + 2 * replays + 8, compile=compile)
    fill_context(decoder, context)
    token = torch.randint(0, model.config.vocab_size, (1,), device="cuda")
    replay_ms = cuda_time_ms(lambda: decoder.step(token), warmup=3, repeats=replays)
    profile = kernel_profile(lambda: decoder.step(token), repeats=replays)
    decoder = None
    torch.cuda.empty_cache()
    moved = step_bytes_moved(model, context)
    return {
        "context": context,
        "batch": 1,
        "graph_ms_per_step": replay_ms,
        **profile,
        "bytes": moved,
        "floor_ms": sum(moved.values()) / bandwidth * 1e3,
    }


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


def state_bytes_per_sequence(model: HybridVLM, context: int, reserve: int) -> int:
    """Bytes one sequence's decoding state takes at ``context`` tokens: ring buffers and recurrent states fixed,
    full-attention caches reserved for ``context + reserve`` tokens in whole blocks, as :class:`GraphedDecoder`
    reserves them (counted on the meta device)."""
    state = model.init_state(1, "meta")
    for layer in state.layers:
        if isinstance(layer, KVCache) and layer.window is None:
            layer.reserve(-(-(context + reserve) // DECODE_BLOCK) * DECODE_BLOCK)
    return state.nbytes


def step_bytes_per_sequence(model: HybridVLM) -> int:
    """Bytes a graphed decode step holds per sequence beside the state until it ends: the recurrent layers' new
    states (they come out as new tensors, copied into the static state at the end of the step) and the logits."""
    recurrent = sum(layer.nbytes for layer in model.init_state(1, "meta").layers if isinstance(layer, RecurrentState))
    return recurrent + model.config.vocab_size * model.lm_head.weight.element_size()


def largest_batch(free_bytes: int, per_sequence: int, headroom: int = SERVING_HEADROOM, cap: int = 4096) -> int:
    """The most sequences of ``per_sequence`` bytes that ``free_bytes`` less ``headroom`` holds (at most ``cap``;
    0 when none)."""
    return max(0, min(cap, (free_bytes - headroom) // per_sequence))


def batch_sizes(largest: int) -> list[int]:
    """The batch-size buckets up to ``largest``: the powers of two below it, then ``largest`` itself."""
    if largest < 1:
        return []
    return [*(2**k for k in range(math.ceil(math.log2(largest)))), largest]


def try_batches(measure: Callable[[int], dict], largest: int) -> list[dict]:
    """``measure`` each of :func:`batch_sizes` up to ``largest`` in increasing order until one reports an
    ``"error"`` (out of memory); then, the estimate having been optimistic, step down from that batch by 10% until
    one fits or the step reaches the last batch that did. Returns every measurement, in the order taken."""
    runs, fitted = [], 0
    for batch in batch_sizes(largest):
        runs.append(measure(batch))
        if "error" in runs[-1]:
            break
        fitted = batch
    if runs and "error" in runs[-1]:
        batch = int(runs[-1]["batch"] * 0.9)
        while batch > fitted:
            runs.append(measure(batch))
            if "error" not in runs[-1]:
                break
            batch = int(batch * 0.9)
    return runs


def serving(model: HybridVLM, contexts: list[int], steps: int, compile: bool = False) -> dict:
    """Batched decoding at each of ``contexts``: the memory each sequence needs, the largest batch predicted to fit
    the memory free beside the weights, and :func:`graphed_decode` (the next tokens chosen inside the graph, the median
    of ``SERVING_TIMINGS`` timings) over :func:`try_batches` up to it."""
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    result = {
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "device_bytes": total,
        "free_bytes": free,
        "headroom_bytes": SERVING_HEADROOM,
        "step_bytes_per_sequence": step_bytes_per_sequence(model),
        "contexts": [],
    }
    for context in contexts:
        state = state_bytes_per_sequence(model, context, decode_reserve(steps, SERVING_TIMINGS))
        predicted = largest_batch(free, state + result["step_bytes_per_sequence"])

        def measure(batch: int, context: int = context) -> dict:
            run = graphed_decode(
                model, batch, context, steps, timings=SERVING_TIMINGS, next_token=True, compile=compile
            )
            print("serving", run, flush=True)
            return run

        runs = try_batches(measure, predicted)
        fitted = [run for run in runs if "error" not in run]
        result["contexts"].append(
            {
                "context": context,
                "state_bytes_per_sequence": state,
                "predicted_largest": predicted,
                "runs": sorted(runs, key=lambda run: run["batch"]),
                "largest_fitting": max((run["batch"] for run in fitted), default=0),
                "best_tokens_per_second": max((run["tokens_per_second"] for run in fitted), default=None),
            }
        )
    return result


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def _prefill(model: HybridVLM, name: str, results: dict, args: argparse.Namespace) -> None:
    entry = results["models"][name]
    entry["prefill"] = []
    for tokens in args.prefill + (args.hybrid_prefill if name == "hybrid" else []):
        chunk = args.prefill_chunk if tokens > args.prefill_chunk_above else None
        entry["prefill"].append(prefill_ms(model, tokens, repeats=1 if tokens > 65536 else 5, chunk=chunk))
        print(name, entry["prefill"][-1], flush=True)


def _decode(model: HybridVLM, name: str, results: dict, args: argparse.Namespace) -> None:
    entry = results["models"][name]
    entry["eager_decode_ms_per_token_at_4k"] = eager_decode_ms(model, 4096, 20)
    entry["decode_profile_at_4k"] = decode_profile(model, 4096)
    print(name, "decode kernels", {k: v for k, v in entry["decode_profile_at_4k"].items() if k != "top"}, flush=True)
    entry["decode"] = []
    for context in args.contexts:
        entry["decode"].append(decode_ms(model, context, args.decode_steps, args.compile))
        print(name, entry["decode"][-1], flush=True)


def _accounting(model: HybridVLM, name: str, results: dict, args: argparse.Namespace) -> None:
    bandwidth = results["copy_bandwidth_gbps"] * 1e9
    accounting = decode_accounting(model, ACCOUNTING_CONTEXT, bandwidth, compile=args.compile)
    results["models"][name]["accounting"] = accounting
    print(name, "accounting", {k: v for k, v in accounting.items() if k != "top"}, flush=True)


def _streaming(model: HybridVLM, name: str, results: dict, args: argparse.Namespace) -> None:
    if name == "hybrid":
        stream = results["models"][name]["streaming"] = streaming(model, args.frames, args.eager_frames, args.compile)
        print(name, {k: v for k, v in stream.items() if k != "memory_bytes"}, flush=True)


def _serving(model: HybridVLM, name: str, results: dict, args: argparse.Namespace) -> None:
    results["models"][name]["serving"] = serving(model, args.serving_contexts, args.serving_steps, args.compile)


RUN_PART = {
    "prefill": _prefill,
    "decode": _decode,
    "accounting": _accounting,
    "streaming": _streaming,
    "serving": _serving,
}


def run(args: argparse.Namespace, out: Path) -> dict:
    """Measure the parts in ``args.only`` for both models, writing ``out`` after each."""
    results = {
        "environment": environment(),
        "parts": [part for part in PARTS if part in args.only],
        "copy_bandwidth_gbps": copy_bandwidth() / 1e9,
        "compiled_graphs": args.compile,
        "decode_steps": args.decode_steps,
        "serving_steps": args.serving_steps,
        "seconds": {},
        "models": {},
    }
    for name, layout in MODELS.items():
        model = build(layout)
        entry = results["models"][name] = {
            "layout": layout,
            "parameters": sum(p.numel() for p in model.parameters()),
            "decoder_weight_bytes": decoder_weight_bytes(model),
        }
        entry["floor_ms_per_token"] = entry["decoder_weight_bytes"] / (results["copy_bandwidth_gbps"] * 1e9) * 1e3
        for part in results["parts"]:
            start = time.perf_counter()
            RUN_PART[part](model, name, results, args)
            results["seconds"][f"{name} {part}"] = round(time.perf_counter() - start, 1)
            write_json(out, results)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return results


# --- report --------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "OOM" if value is None else f"{value:,.1f}" if value >= 10 else f"{value:.2f}"


def _serving_point(results: dict, model: str, context: int) -> dict | None:
    serving = results["models"].get(model, {}).get("serving", {})
    return next((point for point in serving.get("contexts", []) if point["context"] == context), None)


def serving_ratio(results: dict, context: int = 131072) -> float | None:
    """The hybrid's best tokens/s at ``context`` over the Transformer's at its largest fitting batch (``None``
    when either was not measured or nothing fit)."""
    hybrid, transformer = _serving_point(results, "hybrid", context), _serving_point(results, "transformer", context)
    if not hybrid or not transformer or not hybrid["best_tokens_per_second"]:
        return None
    at_largest = [r for r in transformer["runs"] if r["batch"] == transformer["largest_fitting"] and "error" not in r]
    return hybrid["best_tokens_per_second"] / at_largest[0]["tokens_per_second"] if at_largest else None


def targets(results: dict) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for the goals this benchmark tracks, those measured."""
    hybrid, transformer = results["models"]["hybrid"], results["models"]["transformer"]
    prefill_h = {p["tokens"]: p.get("ms") for p in hybrid.get("prefill", [])}
    prefill_t = {p["tokens"]: p.get("ms") for p in transformer.get("prefill", [])}
    rows = []
    for tokens, goal in ((4096, 1.0), (131072, 4.0)):
        if prefill_h.get(tokens) and prefill_t.get(tokens):
            ratio = prefill_t[tokens] / prefill_h[tokens]
            rows.append((f"prefill {tokens // 1024}K >= {goal:g}x the Transformer", f"{ratio:.2f}x", ratio >= goal))
    decode = [d for d in hybrid.get("decode", []) if d.get("ms_per_token")]
    if decode:
        worst = max(d["ms_per_token"] for d in decode)
        ratio = worst / hybrid["floor_ms_per_token"]
        rows.append(("decode <= 1.5x the weight-bandwidth floor", f"{ratio:.2f}x (worst context)", ratio <= 1.5))
        spread = worst / min(d["ms_per_token"] for d in decode) - 1
        span = f"{decode[0]['context'] // 1024}K-{decode[-1]['context'] // 1024}K"
        rows.append((f"decode flat within 5% over {span}", f"{spread:.1%}", spread <= 0.05))
    stream = hybrid.get("streaming")
    if stream:
        rows.append(("streaming >= 100 FPS at 448x448", f"{stream['fps']:.1f} FPS", stream["fps"] >= 100))
        growth = stream["memory_growth_after_warmup"]
        rows.append(("memory growth <= 1% after warm-up", f"{growth:.2%}", growth <= 0.01))
    ratio = serving_ratio(results)
    if ratio is not None:
        rows.append(
            (
                f"serving at 128K >= {SERVING_TARGET:g}x the Transformer's tokens/s at its largest fitting batch",
                f"{ratio:.1f}x",
                ratio >= SERVING_TARGET,
            )
        )
    return rows


def markdown(results: dict) -> str:
    """The results page: targets, then a section for each part measured."""
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
        + ". Regenerate with `python -m benchmarks.inference` on a CUDA machine"
        + (
            f" (this run: `--only {' '.join(results['parts'])}`)"
            if results.get("parts", list(PARTS)) != list(PARTS)
            else ""
        )
        + ".",
        "",
        "## Targets",
        "",
        markdown_table(
            ["target", "measured", "met"],
            [[goal, measured, "yes" if met else "**no**"] for goal, measured, met in targets(results)],
        ),
        "",
    ]
    lines += prefill_lines(results) + decode_lines(results) + streaming_lines(results)
    lines += accounting_lines(results) + serving_lines(results) + where_the_time_goes(results)
    return "\n".join(lines) + "\n"


def prefill_lines(results: dict) -> list[str]:
    hybrid, transformer = results["models"]["hybrid"], results["models"]["transformer"]
    if not hybrid.get("prefill"):
        return []
    prefill_t = {p["tokens"]: p for p in transformer.get("prefill", [])}
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
    lines = [
        "## Prefill (ms, last-token logits)",
        "",
        markdown_table(
            ["tokens", "hybrid", "Transformer", "hybrid speed-up", "hybrid peak GiB", "Transformer peak GiB"], rows
        ),
        "",
    ]
    chunked = [p for p in hybrid["prefill"] if p.get("chunk")]
    if chunked:
        lengths = ", ".join(f"{p['tokens'] // 1024}K" for p in chunked)
        lines += [
            f"Prefills of {lengths} run in chunks of {chunked[-1]['chunk']:,} tokens carrying the state (one pass "
            "does not fit the GPU).",
            "",
        ]
    return lines


def decode_lines(results: dict) -> list[str]:
    hybrid, transformer = results["models"]["hybrid"], results["models"]["transformer"]
    if not hybrid.get("decode"):
        return []
    lines = [
        "## Decode (ms/token, CUDA graph, batch 1)",
        "",
        f"Copy bandwidth {results['copy_bandwidth_gbps']:,.0f} GB/s. Weight-bandwidth floor: hybrid "
        f"{hybrid['decoder_weight_bytes'] / 1e9:.2f} GB -> {hybrid['floor_ms_per_token']:.2f} ms, Transformer "
        f"{transformer['decoder_weight_bytes'] / 1e9:.2f} GB -> {transformer['floor_ms_per_token']:.2f} ms. "
        f"Eager decoding at 4K: hybrid {hybrid['eager_decode_ms_per_token_at_4k']:.1f} ms/token, Transformer "
        f"{transformer['eager_decode_ms_per_token_at_4k']:.1f} ms/token.",
        "",
    ]
    decode_t = {d["context"]: d for d in transformer.get("decode", [])}
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
    header = ["context", "hybrid ms", "hybrid / floor", "hybrid state GiB", "Transformer ms", "Transformer / floor"]
    return [*lines, markdown_table([*header, "Transformer cache GiB"], rows), ""]


def streaming_lines(results: dict) -> list[str]:
    stream = results["models"]["hybrid"].get("streaming")
    if not stream:
        return []
    return [
        "## Streaming (448x448 frames, CUDA graph)",
        "",
        f"{stream['frames']:,} frames of {stream['tokens_per_frame']} tokens ({stream['tokens_streamed']:,} M-RoPE "
        f"positions): **{stream['fps']:.1f} FPS** (eager: {stream['eager_fps']:.1f} FPS; the vision tower alone, "
        f"eager: {stream['vision_tower_eager_ms']:.1f} ms/frame). State {stream['state_bytes'] / 2**20:.1f} MiB; "
        f"allocated memory grew {stream['memory_growth_after_warmup']:.2%} after the first 10% of frames.",
        "",
    ]


def accounting_lines(results: dict) -> list[str]:
    """One graphed decode step of each model: kernels, GPU time, bytes moved against the floor, costliest kernels."""
    entries = [(name, entry["accounting"]) for name, entry in results["models"].items() if "accounting" in entry]
    if not entries:
        return []
    context = entries[0][1]["context"]
    rows, top = [], []
    for name, acc in entries:
        moved = acc["bytes"]
        rows.append(
            [
                LABELS[name],
                f"{acc['kernels']:,}",
                f"{acc['graph_ms_per_step']:.2f}",
                f"{acc['kernel_ms']:.2f}",
                f"{moved['weights'] / 1e9:.2f} + {moved['state_read'] / 1e9:.3f} + {moved['state_written'] / 1e9:.3f}",
                f"{acc['floor_ms']:.2f}",
                f"{acc['graph_ms_per_step'] / acc['floor_ms']:.2f}x",
            ]
        )
        top += [[LABELS[name], f"`{k['name'][:70]}`", f"{k['count']:g}", f"{k['ms']:.3f}"] for k in acc["top"][:3]]
    return [
        f"## Accounting: one decode step at {context // 1024}K (batch 1, CUDA graph)",
        "",
        "GPU time is the median of 20 graph replays timed by CUDA events; the kernels and their times come from "
        "torch.profiler over 20 more replays (per step). Bytes the step must move, from the configuration: every "
        "decoder weight read once, the state read once (occupied cache slots, recurrent and convolution states) and "
        f"the recurrent states written once; the floor is their time at the copy bandwidth "
        f"({results['copy_bandwidth_gbps']:,.0f} GB/s, bytes read plus written).",
        "",
        markdown_table(
            [
                "model",
                "kernels",
                "GPU ms/step",
                "kernel ms/step",
                "GB moved (weights + state read + written)",
                "floor ms",
                "GPU time / floor",
            ],
            rows,
        ),
        "",
        "The three costliest kernels of each step:",
        "",
        markdown_table(["model", "kernel", "launches/step", "ms/step"], top),
        "",
    ]


def measured_bytes_per_sequence(runs: list[dict]) -> float | None:
    """The peak memory's growth per sequence between the two largest batches that fit (``None`` with fewer)."""
    fitted = sorted((r for r in runs if "error" not in r and "peak_bytes" in r), key=lambda r: r["batch"])
    if len(fitted) < 2:
        return None
    small, large = fitted[-2], fitted[-1]
    return (large["peak_bytes"] - small["peak_bytes"]) / (large["batch"] - small["batch"])


def serving_lines(results: dict) -> list[str]:
    """Tokens/s per batch at each context, the largest batch each model fits, and the serving claim."""
    models = {name: entry["serving"] for name, entry in results["models"].items() if "serving" in entry}
    if not models:
        return []
    lines = [
        "## Serving: batched decoding at long context",
        "",
        "One CUDA graph per batch size, the next token chosen inside it (greedy) and fed back; every sequence's "
        f"state built directly at the context (random contents). Median of three timings of "
        f"{results['serving_steps']} steps after three warm-up steps. Memory per sequence from the configuration: "
        "the state (the Transformer's cache reserved for the context) and what a step holds beside it (the recurrent "
        "layers' new states, the logits). Batch sizes: the powers of two below the largest batch whose memory fits "
        "the free memory beside the weights less the headroom, and that batch; a batch that runs out of memory is "
        "marked OOM and smaller ones tried.",
        "",
    ]
    for name, serving in models.items():
        lines.append(
            f"- {LABELS[name]}: weights {serving['weight_bytes'] / 2**30:.1f} GiB (vision tower included), free "
            f"beside them {serving['free_bytes'] / 2**30:.1f} of {serving['device_bytes'] / 2**30:.1f} GiB, headroom "
            f"{serving['headroom_bytes'] / 2**30:.0f} GiB; a step holds "
            f"{serving['step_bytes_per_sequence'] / 2**20:.0f} MiB per sequence beside the state."
        )
    lines.append("")
    ratio = serving_ratio(results)
    if ratio is not None:
        met = "met" if ratio >= SERVING_TARGET else "**not met**"
        lines += [
            f"**Claim**: the hybrid's best tokens/s at 128K is {ratio:.1f}x the Transformer's at its largest fitting "
            f"batch (target >= {SERVING_TARGET:g}x: {met}).",
            "",
        ]
    contexts = sorted({point["context"] for serving in models.values() for point in serving["contexts"]})
    for context in contexts:
        rows = []
        for name, serving in models.items():
            point = next((p for p in serving["contexts"] if p["context"] == context), None)
            if point is None:
                continue
            measured = measured_bytes_per_sequence(point["runs"])
            best = point["best_tokens_per_second"]
            rows.append(
                [
                    LABELS[name],
                    f"{(point['state_bytes_per_sequence'] + serving['step_bytes_per_sequence']) / 2**20:,.0f}",
                    "-" if measured is None else f"{measured / 2**20:,.0f}",
                    str(point["predicted_largest"]),
                    str(point["largest_fitting"]),
                    "-" if best is None else f"{best:,.0f}",
                    "; ".join(
                        f"{r['batch']}: " + ("OOM" if "error" in r else f"{r['tokens_per_second']:,.0f}")
                        for r in point["runs"]
                    ),
                ]
            )
        header = ["model", "MiB per sequence", "measured MiB per sequence", "predicted largest batch"]
        lines += [
            f"### {context // 1024}K context",
            "",
            markdown_table([*header, "largest fitting batch", "best tokens/s", "batch: tokens/s"], rows),
            "",
        ]
    lines += [
        "Measured MiB per sequence: the peak allocated memory's growth per sequence between the two largest batches "
        "that fit.",
        "",
    ]
    return lines


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
    hybrid = results["models"]["hybrid"]
    lines = []
    for name, entry in results["models"].items():
        graph = next((d["ms_per_token"] for d in entry.get("decode", []) if d["context"] == 4096), None)
        profile = entry.get("decode_profile_at_4k")
        if profile:
            lines += _profile_lines(f"{LABELS[name]} decode step at 4K", profile, graph)
        accounting = entry.get("accounting")
        if accounting:
            label = f"{LABELS[name]} decode step at {accounting['context'] // 1024}K, as the graph replays it"
            lines += _profile_lines(label, accounting, accounting["graph_ms_per_step"])
    stream = hybrid.get("streaming") or {}
    if "frame_profile" in stream:
        lines += _profile_lines(
            "hybrid 448x448 frame (vision tower + decoder)", stream["frame_profile"], 1e3 / stream["fps"]
        )
        lines += _profile_lines("the vision tower alone", stream["vision_tower_profile"], None)
    if not lines:
        return []
    intro = (
        "Kernels of one eager step, and of one decode step as the CUDA graph replays it (averaged over 20 replays), "
        "by torch.profiler; a graph replays the eager step's kernels without launch gaps, so their summed time "
        "bounds the replay from below."
    )
    return ["## Where the time goes", "", intro, "", *lines]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    prefill_ax, decode_ax, stream_ax, serving_ax = axes.flat
    for name, entry in results["models"].items():
        pre = [p for p in entry.get("prefill", []) if p.get("ms")]
        if pre:
            prefill_ax.plot([p["tokens"] for p in pre], [p["ms"] / 1e3 for p in pre], "o-", label=name)
        dec = [d for d in entry.get("decode", []) if d.get("ms_per_token")]
        if dec:
            decode_ax.plot([d["context"] for d in dec], [d["ms_per_token"] for d in dec], "o-", label=name)
            color = decode_ax.lines[-1].get_color()
            decode_ax.axhline(entry["floor_ms_per_token"], ls=":", color=color, label=f"{name} floor")
        for point in entry.get("serving", {}).get("contexts", []):
            runs = sorted((r for r in point["runs"] if "error" not in r), key=lambda r: r["batch"])
            if runs:
                serving_ax.plot(
                    [r["batch"] for r in runs],
                    [r["tokens_per_second"] for r in runs],
                    "-" if name == "hybrid" else "--",
                    marker="o",
                    label=f"{LABELS[name]} at {point['context'] // 1024}K",
                )
    panels = (
        (prefill_ax, "Prefill", "tokens", "seconds"),
        (decode_ax, "Decode (CUDA graph)", "context tokens", "ms / token"),
        (serving_ax, "Serving: batched decoding", "batch (sequences decoded together)", "tokens/s"),
    )
    for ax, title, xlabel, ylabel in panels:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if ax.lines:
            ax.legend()
    stream = results["models"]["hybrid"].get("streaming")
    if stream:
        stream_ax.plot([m / 2**30 for m in stream["memory_bytes"]])
        stream_ax.set_title(f"Streaming 448x448: {stream['fps']:.0f} FPS")
    stream_ax.set_xlabel("frame")
    stream_ax.set_ylabel("allocated GiB")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks.inference", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    positive = at_least(1)
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="measure these parts only")
    parser.add_argument("--prefill", type=positive, nargs="+", default=[4096, 16384, 32768, 131072])
    parser.add_argument("--hybrid-prefill", type=positive, nargs="*", default=[524288], help="hybrid-only lengths")
    parser.add_argument("--contexts", type=positive, nargs="+", default=[4096, 65536, 262144, 1048576])
    parser.add_argument("--prefill-chunk", type=positive, default=16384, help="chunk size for the longest prefills")
    parser.add_argument(
        "--prefill-chunk-above", type=at_least(0), default=131072, help="chunk prefills longer than this"
    )
    parser.add_argument("--decode-steps", type=positive, default=50)
    parser.add_argument("--frames", type=positive, default=2000)
    parser.add_argument("--eager-frames", type=positive, default=30)
    parser.add_argument("--serving-contexts", type=positive, nargs="+", default=[32768, 131072])
    parser.add_argument("--serving-steps", type=positive, default=20, help="graph replays per serving timing")
    parser.add_argument(
        "--compile", action="store_true", help="the CUDA graphs (decode, frames) capture the compiled forward"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "inference")
    parser.add_argument("--plot-only", action="store_true", help="redraw the markdown and PNG from the JSON")
    args = parser.parse_args()
    if not args.plot_only:
        check_kept_parts(parser, args.out.with_suffix(".json"), args.only)
    report("inference", args.out, args.plot_only, lambda path: run(args, path), markdown, plot)


def check_kept_parts(parser: argparse.ArgumentParser, earlier: Path, only: list[str]) -> None:
    """Refuse to replace ``earlier`` (the JSON a run rewrites) when it holds parts of an earlier run that ``only``
    leaves out: they would be lost."""
    if not earlier.is_file():
        return
    try:
        measured = json.loads(earlier.read_text()).get("parts", PARTS)
    except (json.JSONDecodeError, AttributeError):
        parser.error(f"{earlier} is not the JSON of an earlier run; move it away or give another --out")
    if lost := [part for part in measured if part not in only]:
        parser.error(
            f"{earlier} holds the {', '.join(lost)} measurements of an earlier run, which measuring only "
            f"{', '.join(only)} would replace; give another --out (e.g. --out /tmp/{'_'.join(only)})"
        )


if __name__ == "__main__":
    main()
