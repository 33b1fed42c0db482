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
