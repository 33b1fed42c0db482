"""The benchmark scripts' CPU-sized flavors: the code a GPU run measures with, run end to end at toy size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_step_measures_every_stage_for_the_hybrid_and_the_transformer(tmp_path):
    out = tmp_path / "train_step"
    command = [
        sys.executable,
        "-m",
        "benchmarks.train_step",
        "--flavor",
        "tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--out",
        str(out),
    ]
    result = subprocess.run(
        [*command, "--workdir", str(tmp_path / "models")], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    measured = {(row["stage"], row["layout"]) for row in rows}
    assert len(measured) == 6 and {layout for _, layout in measured} == {"S,D,D,D x2", "A x8"}
    by_key = {(row["stage"], row["layout"]): row for row in rows}
    for row in rows:
        assert row["tokens_per_second"] > 0 and row["tflops"] > 0 and row["mfu"] is None  # no known CPU peak
        assert row["backends"]["loss"] == "torch" and row["trainable_parameters"] > 0
    sft, distill = by_key[("Stage II SFT", "S,D,D,D x2")], by_key[("Stage I layer-wise distillation", "S,D,D,D x2")]
    assert sft["backends"]["D"] == "torch" and distill["backends"]["S"] == "not run"  # Stage I runs the D layers
    assert by_key[("long SFT (LoRA)", "A x8")]["tokens"] > sft["tokens"]
    assert "| Stage II SFT | `A x8` | `layers` |" in out.with_suffix(".md").read_text()
    assert {row["recompute"] for row in rows} == {"layers"}


def test_train_step_compares_checkpointing_selections_by_peak_memory(tmp_path):
    out = tmp_path / "train_step"
    command = [sys.executable, "-m", "benchmarks.train_step", "--flavor", "tiny", "--steps", "1", "--warmup", "0"]
    command += ["--stages", "sft", "--checkpointing", "false", "--checkpointing", "mlp,S", "--out", str(out)]
    result = subprocess.run(
        [*command, "--workdir", str(tmp_path / "models")], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {(row["layout"], row["recompute"]) for row in rows} == {
        ("S,D,D,D x2", "nothing"),
        ("S,D,D,D x2", "mlp,S"),
        ("A x8", "nothing"),
        ("A x8", "mlp,A"),  # the Transformer recomputes the counterparts: its MLPs and its attention
    }


def _tiny_meta_model(layout: str):
    import torch

    from hybridvl.models.config import HybridConfig
    from hybridvl.models.hybrid import HybridVLM

    config = HybridConfig(
        layout=layout,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=[4, 2, 2],
    )
    with torch.device("meta"):
        return HybridVLM(config)  # float32; S layers: 8192-slot ring buffers, D layers: 16 heads of 128 x 256


def test_inference_memory_and_bytes_per_sequence_come_from_the_configuration():
    """Serving's memory per sequence and the accounting's bytes per decode step, for a tiny hybrid (2 S and 6 D
    layers) and a tiny Transformer (8 A layers); a key or value slot of a layer is 2 heads x 16 x 4 bytes."""
    from benchmarks.inference import (
        decoder_weight_bytes,
        state_bytes_per_sequence,
        step_bytes_moved,
        step_bytes_per_sequence,
    )

    hybrid, transformer = _tiny_meta_model("S,D,D,D x2"), _tiny_meta_model("A x8")
    slot, recurrent = 2 * 2 * 16 * 4, 16 * 128 * 256 * 4 + (2048 + 2048 + 4096) * 4 * 4  # + the conv states
    logits = 151936 * 4
    # the Transformer's cache is reserved in whole 1,024-token blocks for the context and the steps to come
    assert state_bytes_per_sequence(transformer, 4096, 16) == 5120 * 8 * slot + 8 * 8 + 8
    assert state_bytes_per_sequence(transformer, 32768, 16) == 33792 * 8 * slot + 8 * 8 + 8
    for context in (4096, 32768):
        assert state_bytes_per_sequence(hybrid, context, 16) == 2 * 8192 * slot + 6 * recurrent + 2 * 8 + 8
    assert step_bytes_per_sequence(hybrid) == 6 * recurrent + logits
    assert step_bytes_per_sequence(transformer) == logits
    # a step reads the occupied slots (a ring buffer at most its window) and reads and writes recurrent states
    weights = decoder_weight_bytes(hybrid)
    assert step_bytes_moved(hybrid, 1000) == {
        "weights": weights,
        "state_read": 2 * 1000 * slot + 6 * recurrent,
        "state_written": 6 * recurrent,
    }
    assert step_bytes_moved(hybrid, 100_000)["state_read"] == 2 * 8192 * slot + 6 * recurrent
    assert step_bytes_moved(transformer, 1000) == {
        "weights": decoder_weight_bytes(transformer),
        "state_read": 1000 * 8 * slot,
        "state_written": 0,
    }
    assert weights == sum(p.numel() * 4 for p in hybrid.parameters())  # no vision tower; the head tied


def test_inference_serving_tries_batch_buckets_up_to_the_largest_that_fits():
    from benchmarks.inference import batch_sizes, largest_batch, try_batches

    assert largest_batch(10 * 2**30, 2**30, headroom=2**30) == 9 and largest_batch(2**30, 2**31) == 0
    assert largest_batch(2**50, 1, headroom=0) == 4096
    assert batch_sizes(9) == [1, 2, 4, 8, 9] and batch_sizes(8) == [1, 2, 4, 8] and batch_sizes(1) == [1]
    assert batch_sizes(0) == []

    def measure_up_to(fits: int):
        measured = []

        def measure(batch: int) -> dict:
            measured.append(batch)
            return (
                {"batch": batch, "tokens_per_second": 10.0 * batch} if batch <= fits else {"batch": batch, "error": "x"}
            )

        return measure, measured

    measure, measured = measure_up_to(100)
    assert [r["batch"] for r in try_batches(measure, 20)] == measured == [1, 2, 4, 8, 16, 20]
    # an optimistic estimate: the buckets stop at the first out of memory, then 10% steps down from it
    measure, measured = measure_up_to(11)
    runs = try_batches(measure, 16)
    assert measured == [1, 2, 4, 8, 16, 14, 12, 10] and "error" in runs[-2] and "error" not in runs[-1]
    measure, measured = measure_up_to(8)
    assert [r["batch"] for r in try_batches(measure, 9)] == [1, 2, 4, 8, 9]  # nothing between 8 and 9 to try
    measure, measured = measure_up_to(0)
    assert measured == [] and try_batches(measure, 0) == []
    assert [r["batch"] for r in try_batches(measure, 4)] == [1]


def test_inference_report_accounts_for_a_decode_step_and_serving_from_some_parts(tmp_path):
    """The markdown and plot of a run of the accounting and serving parts only (a small fake results dict)."""
    from benchmarks.inference import markdown, plot, serving_ratio

    def accounting(kernels: int, ms: float, state_read: int) -> dict:
        top = [{"name": f"kernel_{n}", "count": 36.0, "ms": 1.0 / (n + 1)} for n in range(5)]
        moved = {"weights": 6 * 10**9, "state_read": state_read, "state_written": 0}
        floor = sum(moved.values()) / 3e12 * 1e3
        return {
            "context": 4096,
            "batch": 1,
            "graph_ms_per_step": ms,
            "kernels": kernels,
            "kernel_ms": ms - 0.5,
            "top": top,
            "bytes": moved,
            "floor_ms": floor,
        }

    def run(batch: int, rate: float, peak_gib: float) -> dict:
        ms = batch / rate * 1e3
        return {
            "batch": batch,
            "context": 131072,
            "ms_per_step": ms,
            "tokens_per_second": rate,
            "peak_bytes": peak_gib * 2**30,
        }

    def serving(runs: list[dict], largest: int, state: int) -> dict:
        fitted = [r for r in runs if "error" not in r]
        point = {
            "context": 131072,
            "state_bytes_per_sequence": state,
            "predicted_largest": largest,
            "runs": runs,
            "largest_fitting": max(r["batch"] for r in fitted),
            "best_tokens_per_second": max(r["tokens_per_second"] for r in fitted),
        }
        return {
            "weight_bytes": 7 * 2**30,
            "device_bytes": 80 * 2**30,
            "free_bytes": 72 * 2**30,
            "headroom_bytes": 4 * 2**30,
            "step_bytes_per_sequence": 2**20,
            "contexts": [point],
        }

    results = {
        "environment": {"device": "GPU", "cuda": "12", "versions": {}, "date": "today"},
        "parts": ["accounting", "serving"],
        "copy_bandwidth_gbps": 3000.0,
        "compiled_graphs": False,
        "decode_steps": 50,
        "serving_steps": 20,
        "seconds": {},
        "models": {
            "hybrid": {
                "layout": "S,D,D,D x9",
                "floor_ms_per_token": 2.0,
                "accounting": accounting(2105, 7.5, 10**8),
                "serving": serving([run(1, 130, 8.5), run(256, 6000, 40.0), run(360, 6500, 50.0)], 360, 2**27),
            },
            "transformer": {
                "layout": "A x36",
                "floor_ms_per_token": 2.0,
                "accounting": accounting(3051, 8.0, 2 * 10**8),
                "serving": serving(
                    [run(1, 40, 12.0), run(8, 250, 44.0), run(14, 500, 70.0), {"batch": 16, "error": "out of memory"}],
                    16,
                    4 * 2**30,
                ),
            },
        },
    }
    assert serving_ratio(results) == 13.0
    text = markdown(results)
    assert "`--only accounting serving`" in text and "## Prefill" not in text and "## Decode" not in text
    assert "| serving at 128K >= 5x the Transformer's tokens/s at its largest fitting batch | 13.0x | yes |" in text
    assert "13.0x the Transformer's at its largest fitting batch (target >= 5x: met)" in text
    assert "| Transformer | 4,097 | 4,437 | 16 | 14 | 500 | 1: 40; 8: 250; 14: 500; 16: OOM |" in text
    assert "| hybrid | 2,105 | 7.50 | 7.00 | 6.00 + 0.100 + 0.000 | 2.03 | 3.69x |" in text
    assert text.count("| hybrid | `kernel_") == 3 and "| Transformer | `kernel_0` | 36 | 1.000 |" in text
    plot(results, tmp_path / "inference.png")
    assert (tmp_path / "inference.png").stat().st_size > 0
