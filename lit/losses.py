"""Training losses computed from hidden states and the LM head, so that ``[tokens, vocab]`` logits never exist in
full (151,936 vocabulary entries x 8K tokens would be 5 GB in fp32).

Two backends compute the same losses (``backend=``, as for the mixers, see :mod:`hybridvl.mixers.backends`):

* ``"torch"``: chunks of tokens, each chunk's logits recomputed in the backward pass (activation checkpointing);
  runs anywhere, the reference.
* ``"fla"``: flash-linear-attention's fused kernels on CUDA (``fused_linear_cross_entropy_loss``,
  ``fused_kl_div_loss``), which compute each chunk's logits once and their gradients in the same pass.

``"auto"`` takes ``fla`` on a CUDA device where it imports and ``torch`` elsewhere, and logs the choice once.
fla's kernels form the gradients in the forward pass: for a loss without gradients (validation) ask for
``"torch"``. Its cross-entropy kernel also forms the head's weight gradient when the head is frozen (one more
``[tokens, vocab] x [tokens, hidden]`` product and a float32 ``[vocab, hidden]`` buffer); its KL kernel does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hybridvl.mixers.backends import select_backend

LOSS_BACKENDS = ("fla", "torch")
"""Backends of the losses, in the order ``"auto"`` tries them."""


def loss_backend(requested: str, device: torch.device, owner: str) -> str:
    """Resolve ``requested`` (``"auto"``, ``"fla"`` or ``"torch"``) for a loss computed on ``device``.

    Raises:
        BackendUnavailableError: ``"fla"`` was asked for where it cannot run (not CUDA, not installed).
        ValueError: another name.
    """
    return select_backend(requested, device, LOSS_BACKENDS, owner)


def _ce_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100, reduction="sum")


def next_token_cross_entropy(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk_size: int = 4096, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of predicting ``labels[:, t + 1]`` from ``hidden[:, t]``, and the token count.

    Args:
        hidden: ``[B, T, H]`` final hidden states.
        head: the LM head.
        labels: ``[B, T]`` with -100 where no loss is taken.
        chunk_size: tokens per chunk of the ``torch`` backend.
        backend: ``"auto"``, ``"fla"`` or ``"torch"`` (see the module's docstring).
    """
    hidden, targets = hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    if loss_backend(backend, hidden.device, "next_token_cross_entropy") == "fla":
        from fla.modules.fused_linear_cross_entropy import fused_linear_cross_entropy_loss

        total = fused_linear_cross_entropy_loss(hidden, targets, head.weight, ignore_index=-100, reduction="sum")
        return total, (targets != -100).sum()
    keep = targets != -100
    hidden, targets = hidden[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), chunk_size):
        piece = slice(start, start + chunk_size)
        total = total + checkpoint(_ce_chunk, hidden[piece], head.weight, targets[piece], use_reentrant=False)
    return total, keep.sum()


def _kl_chunk(student: torch.Tensor, weight: torch.Tensor, teacher_logp: torch.Tensor, temperature: float):
    student_logp = (F.linear(student, weight).float() / temperature).log_softmax(-1)
    return F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")


def distillation_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: nn.Linear,
    teacher_head: nn.Linear,
    temperature: float = 2.0,
    chunk_size: int = 2048,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean over tokens of ``KL(teacher || student)`` of the softened token distributions, times ``T**2``
    (Hinton et al.'s distillation loss: the gradient scale stays that of the hard loss).

    Args:
        student_hidden, teacher_hidden: ``[..., H]`` final hidden states at the same tokens.
        temperature: ``T``; the logits are divided by it before the softmax.
        chunk_size: tokens per chunk of the ``torch`` backend.
        backend: ``"auto"``, ``"fla"`` or ``"torch"`` (see the module's docstring).
    """
    student_hidden, teacher_hidden = student_hidden.flatten(0, -2), teacher_hidden.flatten(0, -2)
    if loss_backend(backend, student_hidden.device, "distillation_kl") == "fla":
        from fla.modules.fused_kl_div import fused_kl_div_loss

        # logits / T = (hidden / T) @ W^T: the kernel's logits come out softened, and the gradients flow through
        # the division to the student's hidden states (and head, when it trains)
        kl = fused_kl_div_loss(
            student_hidden / temperature,
            teacher_hidden.detach() / temperature,
            student_head.weight,
            teacher_head.weight.detach(),
            reduction="batchmean",
        )
        return kl * temperature**2
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, student_hidden.shape[0], chunk_size):
        piece = slice(start, start + chunk_size)
        with torch.no_grad():
            teacher_logp = (teacher_head(teacher_hidden[piece]).float() / temperature).log_softmax(-1)
        total = total + checkpoint(
            _kl_chunk, student_hidden[piece], student_head.weight, teacher_logp, temperature, use_reentrant=False
        )
    return total / student_hidden.shape[0] * temperature**2


@torch.no_grad()
def next_token_hits(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax predictions and targets at the labelled positions (for token accuracy)."""
    hidden, targets = hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
    keep = targets != -100
    hidden, targets = hidden[keep], targets[keep]
    chunks = [head(hidden[s : s + chunk_size]).argmax(-1) for s in range(0, targets.numel(), chunk_size)]
    return (torch.cat(chunks) if chunks else targets.clone()), targets
