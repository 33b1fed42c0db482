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


def test_serving_sizes_batches_by_the_state_per_sequence_and_reports_the_claim(tmp_path):
    """The serving benchmark's arithmetic and report (its GPU part needs CUDA): a Transformer's state grows with the
    context, the hybrid's does not; batches are the powers of two up to the largest that fits, and that one."""
    import torch

    from benchmarks.serving import batch_sizes, largest_batch, markdown, plot, serving_ratio, state_bytes_per_sequence
    from hybridvl.models.config import HybridConfig
    from hybridvl.models.hybrid import HybridVLM

    sizes = {}
    for layout in ("S,D,D,D x2", "A x8"):
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
            model = HybridVLM(config)
        sizes[layout] = [state_bytes_per_sequence(model, context, 16) for context in (1024, 4096)]
    assert sizes["A x8"][1] > 3 * sizes["A x8"][0]  # the KV cache grows with the context
    assert sizes["S,D,D,D x2"][0] == sizes["S,D,D,D x2"][1]  # the hybrid's state does not
    assert largest_batch(10 * 2**30, 2**30, headroom=2**30) == 9 and largest_batch(2**30, 2**31) == 0
    assert batch_sizes(9) == [1, 2, 4, 8, 9] and batch_sizes(8) == [1, 2, 4, 8] and batch_sizes(0) == []

    def point(context, runs, largest):
        fitted = [r for r in runs if "error" not in r]
        best = max(r["tokens_per_second"] for r in fitted)
        return {
            "context": context,
            "state_bytes_per_sequence": 2**20,
            "predicted_largest": largest,
            "runs": runs,
            "largest_fitting": largest,
            "best_tokens_per_second": best,
        }

    def run(batch, rate):
        return {"batch": batch, "context": 131072, "ms_per_step": batch / rate * 1e3, "tokens_per_second": rate}

    results = {
        "environment": {"device": "GPU", "cuda": "12", "versions": {}, "date": "today"},
        "compiled_graphs": False,
        "steps": 10,
        "models": {
            "hybrid": {"layout": "S,D,D,D x9", "contexts": [point(131072, [run(1, 50), run(512, 6000)], 512)]},
            "transformer": {
                "layout": "A x36",
                "contexts": [point(131072, [run(1, 40), run(14, 500), {"batch": 16, "error": "out of memory"}], 14)],
            },
        },
    }
    assert serving_ratio(results) == 12.0
    text = markdown(results)
    assert "12.0x the Transformer's at its largest fitting batch" in text and "16: OOM" in text
    plot(results, tmp_path / "serving.png")
    assert (tmp_path / "serving.png").stat().st_size > 0
