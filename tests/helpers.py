"""Numeric helpers for tests."""

from __future__ import annotations

import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64; NaN never passes a bound."""
    actual, expected = actual.double(), expected.double()
    err = ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    return float("inf") if err != err else err
