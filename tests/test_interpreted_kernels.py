"""Triton kernels (fla's fused glue of the mixers and of the decoder layer, its LM-head losses, chunked gated delta
rule, linear attention and softmax attention, the decode step's attention; fla's own Gated DeltaNet, GLA and
Mamba2 layers as oracles for the D, G and M mixers) run on the CPU by Triton's interpreter at tiny shapes against
their PyTorch references (in a process of their own: see tests/interpreted_kernels.py). The same kernels at real
shapes on a GPU: tests/test_gpu_kernels.py and tests/test_losses.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("interpreted_kernels.py")


CHECKS = [
    "fla_glue",
    "fla_layer_glue",
    "fla_losses",
    "fla_chunk_gated_delta_rule",
    "fla_linear_attention",
    "fla_parallel_attention",
    "decode_attention_step_triton",
    "fla_layers_as_oracles",
]


@pytest.fixture(scope="module")
def failed_checks() -> dict[str, str]:
    """Every check run in one interpreter process (starting one costs seconds); the failed ones with tracebacks."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *CHECKS], capture_output=True, text=True, timeout=600, env=env, cwd=SCRIPT.parent
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("check", CHECKS)
def test_kernel_matches_reference_in_the_interpreter(failed_checks, check):
    assert check not in failed_checks, failed_checks[check]
