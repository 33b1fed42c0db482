"""Training losses computed from hidden states in chunks, so that ``[tokens, vocab]`` logits never exist in
full (151,936 vocabulary entries x 8K tokens would be 5 GB in fp32). Each chunk's logits are recomputed in
the backward pass (activation checkpointing)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _ce_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=-100, reduction="sum")


def next_token_cross_entropy(
    hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of predicting ``labels[:, t + 1]`` from ``hidden[:, t]``, and the token count.

    Args:
        hidden: ``[B, T, H]`` final hidden states.
        head: the LM head.
        labels: ``[B, T]`` with -100 where no loss is taken.
    """
    hidden, targets = hidden[:, :-1].flatten(0, 1), labels[:, 1:].flatten()
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
) -> torch.Tensor:
    """Mean over tokens of ``KL(teacher || student)`` of the softened token distributions, times ``T**2``
    (Hinton et al.'s distillation loss: the gradient scale stays that of the hard loss).

    Args:
        student_hidden, teacher_hidden: ``[..., H]`` final hidden states at the same tokens.
    """
    student_hidden, teacher_hidden = student_hidden.flatten(0, -2), teacher_hidden.flatten(0, -2)
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
