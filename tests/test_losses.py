"""The LM-head losses (lit/losses.py) against the plain full-logits formulas in float64 (the chunks accumulate in
float32: float32's bound), and fla's fused kernels against the PyTorch chunks on CUDA (bf16 bounds)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn

from hybridvl.lit.losses import distillation_kl, loss_backend, next_token_cross_entropy
from hybridvl.mixers.backends import BackendUnavailableError

HIDDEN, VOCAB = 16, 50


def head(dtype=torch.float64, device="cpu") -> nn.Linear:
    return nn.Linear(HIDDEN, VOCAB, bias=False, dtype=dtype, device=device)


def labels_for(tokens: int, device="cpu") -> torch.Tensor:
    labels = torch.randint(0, VOCAB, (1, tokens), device=device)
    labels[:, : tokens // 3] = -100  # a prompt without loss
    return labels


def reference_cross_entropy(hidden, weight, labels):
    logits = hidden[:, :-1] @ weight.T
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def reference_kl(student, teacher, student_weight, teacher_weight, temperature):
    student_logp = ((student @ student_weight.T) / temperature).log_softmax(-1)
    teacher_logp = ((teacher @ teacher_weight.T) / temperature).log_softmax(-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return kl.mean() * temperature**2


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_chunked_cross_entropy_equals_the_full_logits_one(chunk_size):
    lm_head, hidden, labels = (
        head(),
        torch.randn(1, 30, HIDDEN, dtype=torch.float64, requires_grad=True),
        labels_for(30),
    )
    total, count = next_token_cross_entropy(hidden, lm_head, labels, chunk_size, backend="torch")
    expected = reference_cross_entropy(hidden, lm_head.weight, labels)
    assert count == (labels[:, 1:] != -100).sum() and rel_err(total, expected) < 1e-6
    (grad_hidden, grad_weight) = torch.autograd.grad(total, [hidden, lm_head.weight])
    (ref_hidden, ref_weight) = torch.autograd.grad(expected, [hidden, lm_head.weight])
    assert rel_err(grad_hidden, ref_hidden) < 1e-6 and rel_err(grad_weight, ref_weight) < 1e-6


@pytest.mark.parametrize("chunk_size", [1, 5, 2048])
def test_chunked_distillation_kl_equals_the_full_logits_one(chunk_size):
    student_head, teacher_head = head(), head()
    student = torch.randn(2, 9, HIDDEN, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 9, HIDDEN, dtype=torch.float64)
    kl = distillation_kl(student, teacher, student_head, teacher_head, 2.0, chunk_size, backend="torch")
    expected = reference_kl(student, teacher, student_head.weight, teacher_head.weight, 2.0)
    assert rel_err(kl, expected) < 1e-6
    (grad,) = torch.autograd.grad(kl, student)
    (ref,) = torch.autograd.grad(expected, student)
    assert rel_err(grad, ref) < 1e-6


def test_auto_computes_losses_with_pytorch_off_cuda_and_fla_is_refused_there():
    assert loss_backend("auto", torch.device("cpu"), "next_token_cross_entropy") == "torch"
    with pytest.raises(BackendUnavailableError, match="backend 'fla' cannot run: its kernels need a CUDA device"):
        next_token_cross_entropy(torch.randn(1, 4, HIDDEN), head(torch.float32), labels_for(4), backend="fla")
    with pytest.raises(ValueError, match="unknown backend 'liger'"):
        loss_backend("liger", torch.device("cpu"), "distillation_kl")


@pytest.mark.gpu
@pytest.mark.parametrize("head_trains", [True, False])
def test_fla_fused_cross_entropy_equals_the_pytorch_chunks_on_cuda(head_trains):
    device = torch.device("cuda")
    lm_head = nn.Linear(256, 4096, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(head_trains)
    hidden = torch.randn(1, 3000, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    labels = labels_for(3000, device)
    labels = torch.where(labels >= 0, labels * 81 % 4096, labels)
    results = {}
    for backend in ("fla", "torch"):
        total, count = next_token_cross_entropy(hidden, lm_head, labels, 1024, backend=backend)
        wanted = [hidden, lm_head.weight] if head_trains else [hidden]
        results[backend] = (total, count, torch.autograd.grad(total, wanted))
    (fused, fused_count, fused_grads), (chunks, chunk_count, chunk_grads) = results["fla"], results["torch"]
    assert torch.isfinite(fused) and fused_count == chunk_count
    assert rel_err(fused, chunks) < 1e-3  # both accumulate the loss in fp32 from bf16 logits
    for fast, reference in zip(fused_grads, chunk_grads):
        assert torch.isfinite(fast).all() and rel_err(fast.float(), reference.float()) < 1e-2


@pytest.mark.gpu
def test_fla_fused_distillation_kl_equals_the_pytorch_chunks_on_cuda():
    device = torch.device("cuda")
    student_head = nn.Linear(256, 4096, bias=False, device=device, dtype=torch.bfloat16)
    teacher_head = nn.Linear(256, 4096, bias=False, device=device, dtype=torch.bfloat16).requires_grad_(False)
    student = torch.randn(1, 3000, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    teacher = (student.detach() + 0.3 * torch.randn_like(student)).detach()
    results = {}
    for backend in ("fla", "torch"):
        kl = distillation_kl(student, teacher, student_head, teacher_head, 2.0, 1024, backend=backend)
        results[backend] = (kl, torch.autograd.grad(kl, [student, student_head.weight]))
    (fused, fused_grads), (chunks, chunk_grads) = results["fla"], results["torch"]
    assert torch.isfinite(fused) and rel_err(fused, chunks) < 1e-2
    for fast, reference in zip(fused_grads, chunk_grads):
        assert torch.isfinite(fast).all() and rel_err(fast.float(), reference.float()) < 1e-2
