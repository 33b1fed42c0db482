"""Evaluating a saved model on conversation sources, and plotting the loss curves of training runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L

from hybridvl.lit.datamodule import HybridDataModule
from hybridvl.lit.modules import SFT

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def evaluate(
    model_dir: str | Path, sources: list[dict[str, Any]], max_tokens: int = 2048, max_new_tokens: int = 8
) -> dict[str, float]:
    """Greedy-generation exact match per task of the model in ``model_dir`` on ``sources``."""
    stage = SFT(model=str(model_dir), trainable=["*"], generation_max_new_tokens=max_new_tokens)
    data = HybridDataModule(processor=str(model_dir), val=sources, max_tokens=max_tokens)
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    metrics = trainer.validate(stage, data, verbose=False)[0]
    return {
        key.split("/")[1]: float(value)
        for key, value in sorted(metrics.items())
        if key.startswith("val/") and key.endswith("/exact_match")
    }


def latest_run(root: Path) -> Path:
    """The newest ``lightning_logs/version_N`` under a run's root directory."""
    versions = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise FileNotFoundError(f"no TensorBoard logs under {root / 'lightning_logs'}")
    return versions[-1]


def read_scalars(run: Path, tag: str) -> tuple[list[int], list[float]]:
    """Steps and values of one scalar from a TensorBoard run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return [], []
    scalars = events.Scalars(tag)
    return [s.step for s in scalars], [s.value for s in scalars]


def smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average, ``ema = weight * ema + (1 - weight) * value``,
    divided by ``1 - weight ** n`` after ``n`` values so the start is not pulled towards zero (the first smoothed
    value is the first value). ``weight`` 0 returns the values unchanged; closer to 1 smooths more."""
    if not 0 <= weight < 1:
        raise ValueError(f"the smoothing weight must be in [0, 1), got {weight}")
    smoothed, ema, mass = [], 0.0, 0.0
    for value in values:
        ema = weight * ema + (1 - weight) * value
        mass = weight * mass + (1 - weight)
        smoothed.append(ema / mass)
    return smoothed


def loss_figure(runs_root: Path, stages: Sequence[str], weight: float = 0.8) -> Figure:
    """One panel per stage (``runs_root/<stage>``, its newest TensorBoard run): the training loss raw (a faint
    line) and smoothed (:func:`smooth` with ``weight``, on top), and the validation loss where logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        run = latest_run(runs_root / stage)
        steps, values = read_scalars(run, "train/loss")
        if steps:
            (raw,) = ax.plot(steps, values, alpha=0.25, linewidth=1, label="train/loss")
            ax.plot(steps, smooth(values, weight), color=raw.get_color(), linewidth=2, label=f"smoothed ({weight:g})")
        steps, values = read_scalars(run, "val/loss")
        if steps:
            ax.plot(steps, values, "o", markersize=5, label="val/loss")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (log scale)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_losses(runs_root: Path, stages: Sequence[str], path: Path, weight: float = 0.8) -> Path:
    """:func:`loss_figure` saved as a PNG at ``path``."""
    import matplotlib.pyplot as plt

    fig = loss_figure(runs_root, stages, weight)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
