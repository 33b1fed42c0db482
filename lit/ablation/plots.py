"""What the ablation reports' figures share: matplotlib without a display, and points drawn with their 95%
bootstrap intervals (:class:`~hybridvl.lit.ablation.verdicts.Estimate`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hybridvl.lit.ablation.verdicts import Estimate


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (reports are written where there is no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_estimates(ax: Any, xs: Sequence[float], estimates: Sequence[Estimate], **style: Any) -> None:
    """One line of means at ``xs`` with their 95% intervals as error bars (caps of 3 points unless ``style``
    says otherwise)."""
    ax.errorbar(
        list(xs),
        [e.mean for e in estimates],
        yerr=[[e.mean - e.low for e in estimates], [e.high - e.mean for e in estimates]],
        **{"capsize": 3, **style},
    )
