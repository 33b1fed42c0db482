"""The mixers' glue on fla's fused kernels, checked without a GPU: the gated RMSNorm, which backend each call
chooses and that every fallback is logged,
the PyTorch forms against the formulas (float64), and fla's kernels themselves run by Triton's interpreter at tiny
shapes. Their accuracy on a GPU, forward and backward, is tested in ``test_gpu_kernels.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import rel_err

from hybridvl import mixers
from hybridvl.mixers import backends
from hybridvl.mixers.backends import BackendUnavailableError
from hybridvl.mixers.modules import GatedRMSNorm
from hybridvl.mixers.ops import gated_rms_norm
from hybridvl.mixers.ops import norm as norm_module

F64 = torch.float64
ROOT = Path(__file__).parent.parent


def norm_formula(x, gate, weight, eps, norm_before_gate, group_size):
    """The gated RMSNorm written out: ``x / sqrt(mean(x^2) + eps)`` per group, the weight, the SiLU gate."""
    silu = gate * torch.sigmoid(gate)
    if not norm_before_gate:
        x = x * silu
    groups = x.unflatten(-1, (-1, group_size))
    y = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight
    return y * silu if norm_before_gate else y


@pytest.fixture
def kernels_run_here(monkeypatch):
    """Every backend counts as runnable on the input's device (as on a GPU with fla installed); log lines start
    afresh."""
    monkeypatch.setattr(backends, "unavailable_reason", lambda backend, device: None)
    monkeypatch.setattr(backends, "_logged", set())


def backend_lines(caplog, owner):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{owner} on ")]


@pytest.mark.parametrize(("norm_before_gate", "group_size"), [(True, 16), (True, 4), (False, 16), (False, 8)])
def test_gated_rms_norm_matches_the_formula(norm_before_gate, group_size):
    x, gate = torch.randn(2, 5, 3, 16, dtype=F64), torch.randn(2, 5, 3, 16, dtype=F64)
    weight = torch.randn(16, dtype=F64)
    options = dict(eps=1e-6, norm_before_gate=norm_before_gate, group_size=group_size)
    y = gated_rms_norm(x, gate, weight, **options, backend="torch")
    assert rel_err(y, norm_formula(x, gate, weight, **options)) < 1e-12
    module = GatedRMSNorm(16, **options).double()
    module.weight.data.copy_(weight)
    assert torch.equal(module(x, gate), y)
    low = gated_rms_norm(x.bfloat16(), gate.bfloat16(), weight.float(), **options, backend="torch")
    assert low.dtype == torch.bfloat16  # computed in float32, returned in the input's dtype


def test_gated_rms_norm_rejects_bad_inputs():
    x, weight = torch.randn(2, 3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="gate must have x's shape"):
        gated_rms_norm(x, x[..., :4], weight)
    with pytest.raises(ValueError, match="weight must be"):
        gated_rms_norm(x, x, weight[:4])
    with pytest.raises(ValueError, match="group_size must divide"):
        gated_rms_norm(x, x, weight, group_size=3)
    with pytest.raises(BackendUnavailableError, match=r"needs? a CUDA device|not installed"):
        gated_rms_norm(x, x, weight, backend="fla")


def test_gated_rms_norm_logs_its_fallback_on_the_cpu(monkeypatch, caplog):
    monkeypatch.setattr(backends, "_logged", set())
    x = torch.randn(2, 3, 8)
    with caplog.at_level("INFO", logger="hybridvl.mixers"):
        gated_rms_norm(x, x, torch.ones(8))
    (line,) = backend_lines(caplog, "gated_rms_norm")
    assert line.startswith("gated_rms_norm on cpu uses backend 'torch' (fla skipped:")


@pytest.mark.parametrize(
    ("dtype", "backend", "chosen"),
    [
        (torch.bfloat16, "auto", "fla"),
        (torch.float32, "auto", "fla"),  # no dot products: float32 in, float32 arithmetic
        (torch.float64, "auto", "torch"),  # the kernel computes in float32
        (torch.float64, "fla", "fla"),  # asked for by name, it runs
        (torch.bfloat16, "torch", "torch"),
    ],
)
def test_gated_rms_norm_chooses_fla_where_it_meets_the_dtype(
    kernels_run_here, monkeypatch, caplog, dtype, backend, chosen
):
    calls = []
    monkeypatch.setattr(norm_module, "_fla", lambda x, *rest: calls.append(rest) or x)
    x = torch.randn(2, 3, 8, dtype=dtype)
    with caplog.at_level("INFO", logger="hybridvl.mixers"):
        gated_rms_norm(x, x, torch.ones(8), norm_before_gate=False, group_size=4, backend=backend)
    assert len(calls) == (chosen == "fla")
    if chosen == "fla":
        assert calls[0][-2:] == (False, 4)  # norm_before_gate, group_size
    if backend == "auto":
        (line,) = backend_lines(caplog, "gated_rms_norm")
        assert line.startswith(f"gated_rms_norm on cpu uses backend {chosen!r}")
        if chosen == "torch":
            assert "fla skipped: its fused norm computes float64 inputs in float32" in line


@pytest.mark.parametrize("kind", ["D", "G", "M"])
def test_mixers_run_their_gated_norm_on_their_own_backend(monkeypatch, kind):
    """Each mixer hands its gated norm the backend it chose for itself (here ``torch``: the CPU)."""
    seen = []

    def spy(x, gate, weight, **options):
        seen.append(options["backend"])
        return gated_rms_norm(x, gate, weight, **options)

    monkeypatch.setattr("hybridvl.mixers.modules.gated_rms_norm", spy)
    options = {"D": dict(num_heads=2, head_dim=8), "G": dict(num_heads=2), "M": dict(d_state=8, headdim=8)}[kind]
    mixer = mixers.build_mixer(kind, 32, **options)
    mixer(torch.randn(1, 5, 32))
    assert seen == [mixer.last_backend] == ["torch"]


INTERPRETED = """
import torch
import triton.runtime.autotuner as autotuner

# no GPU to time an autotuned kernel's configurations on: each runs its first
autotuner.Autotuner._bench = lambda self, *args, config, **kwargs: [0.0, 0.0, 0.0]

from hybridvl.mixers import backends
from hybridvl.mixers.ops import gated_rms_norm

backends.unavailable_reason = lambda backend, device: None  # fla's Triton kernels run here, interpreted


def rel_err(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


torch.manual_seed(0)
for norm_before_gate, group_size in [(True, None), (False, 8)]:
    inputs = [torch.randn(2, 7, 3, 16).requires_grad_() for _ in range(2)] + [torch.randn(16).requires_grad_()]
    options = dict(eps=1e-6, norm_before_gate=norm_before_gate, group_size=group_size)
    y_fla = gated_rms_norm(*inputs, **options, backend="fla")
    y_ref = gated_rms_norm(*inputs, **options, backend="torch")
    cotangent = torch.randn_like(y_ref)
    grads_fla = torch.autograd.grad(y_fla, inputs, cotangent)
    grads_ref = torch.autograd.grad(y_ref, inputs, cotangent)
    errors = [rel_err(y_fla, y_ref)] + [rel_err(a, b) for a, b in zip(grads_fla, grads_ref)]
    assert max(errors) < 1e-5, (norm_before_gate, errors)

print("ok")
"""


def test_fla_kernels_interpreted_equal_the_pytorch_forms():
    """fla's fused gated RMSNorm (both forms, forward and backward), run on the CPU by Triton's interpreter
    against the PyTorch form in float32."""
    pytest.importorskip("fla")
    pytest.importorskip("triton")
    environment = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(INTERPRETED)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
