"""Verdicts that can fail: a claim about ablation results comes out Reproduced, Refuted, Inconclusive or Saturated.

Each arm of a comparison is summarised over its seeds as an :class:`Estimate`: the mean with a 95% percentile
bootstrap interval and how many seeds reached a "solved" threshold (``k/n seeds >= 0.9``), since synthetic-recall
outcomes are often bimodal (a seed learns the task or stays near chance) and a mean alone hides that.

* :func:`compare` judges "``better`` scores above ``worse``": **Reproduced** when ``better``'s interval lies
  wholly above ``worse``'s, **Refuted** when wholly below, **Saturated** when both intervals sit at the ceiling or
  both at chance (the setting cannot tell the arms apart), **Inconclusive** when the intervals overlap or either
  arm has fewer than :data:`MIN_SEEDS` seeds.
* :func:`reaches` judges "``arm`` scores at least ``threshold``" (attention solves every setting).
* :func:`combine` turns the verdicts of one claim over several settings into one: Saturated when every setting
  is; otherwise Reproduced (or Refuted) when every setting that can tell is, and Inconclusive when they disagree.
* :func:`conjoin` judges a claim made of parts that must all hold (helps, and with diminishing returns): Refuted
  when any part is.
"""

from __future__ import annotations

import dataclasses
import enum
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000
SOLVED = 0.9
"""Accuracy at which a seed counts as having solved the task (reported as ``k/n seeds >= 0.9``)."""
CEILING = 0.99
"""Interval bound at or above which an arm sits at the ceiling (Zoology stops training at 0.99)."""
MIN_SEEDS = 3
"""Seeds each arm needs before a verdict: with fewer the bootstrap interval (zero-width for one seed) says nothing
about seed-to-seed spread, so :func:`compare` and :func:`reaches` answer Inconclusive."""


class Outcome(enum.StrEnum):
    REPRODUCED = "Reproduced"
    REFUTED = "Refuted"
    INCONCLUSIVE = "Inconclusive"
    SATURATED = "Saturated"
    NOT_MEASURED = "Not measured"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One arm's score over its seeds."""

    values: tuple[float, ...]
    mean: float
    low: float
    high: float
    solved: int
    """Seeds at or above :data:`SOLVED`."""

    @property
    def seeds(self) -> int:
        return len(self.values)

    def describe(self) -> str:
        """``0.912 [0.850, 0.970], 4/5 seeds >= 0.9``."""
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}], {self.solved}/{self.seeds} seeds >= {SOLVED:g}"


def bootstrap_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of ``values`` (seeded: the same values give the same
    interval). One value gives a zero-width interval at that value."""
    if not values:
        raise ValueError("an interval needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie between 0 and 1, got {confidence}")
    data = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), (resamples, len(data)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def estimate(values: Iterable[float], solved_at: float = SOLVED) -> Estimate:
    """Mean, bootstrap interval and solved seeds of one arm's per-seed scores."""
    values = tuple(float(value) for value in values)
    low, high = bootstrap_interval(values)
    return Estimate(values, statistics.fmean(values), low, high, sum(value >= solved_at for value in values))


def compare(better: Estimate, worse: Estimate, chance: float, ceiling: float = CEILING) -> Outcome:
    """The verdict on "``better`` scores above ``worse``".

    Args:
        better, worse: the two arms, as the claim orders them.
        chance: the score of a model that has not learned the task (for MQAR the no-recall guess, ``1/kv``);
            intervals wholly at or below it are at chance.
        ceiling: intervals wholly at or above it are at the ceiling.
    """
    if min(better.seeds, worse.seeds) < MIN_SEEDS:
        return Outcome.INCONCLUSIVE
    if (better.low >= ceiling and worse.low >= ceiling) or (better.high <= chance and worse.high <= chance):
        return Outcome.SATURATED
    if better.low > worse.high:
        return Outcome.REPRODUCED
    if better.high < worse.low:
        return Outcome.REFUTED
    return Outcome.INCONCLUSIVE


def reaches(arm: Estimate, threshold: float) -> Outcome:
    """The verdict on "``arm`` scores at least ``threshold``": Reproduced when its whole interval does,
    Refuted when its whole interval lies below, Inconclusive when the interval straddles it or the arm has fewer
    than :data:`MIN_SEEDS` seeds."""
    if arm.seeds < MIN_SEEDS:
        return Outcome.INCONCLUSIVE
    if arm.low >= threshold:
        return Outcome.REPRODUCED
    if arm.high < threshold:
        return Outcome.REFUTED
    return Outcome.INCONCLUSIVE


def combine(outcomes: Iterable[Outcome]) -> Outcome:
    """One verdict for a claim judged in several settings (see the module docstring); Not measured without any."""
    counts = Counter(outcome for outcome in outcomes if outcome is not Outcome.NOT_MEASURED)
    if not counts:
        return Outcome.NOT_MEASURED
    telling = {outcome: n for outcome, n in counts.items() if outcome is not Outcome.SATURATED}
    if not telling:
        return Outcome.SATURATED
    if set(telling) == {Outcome.REPRODUCED}:
        return Outcome.REPRODUCED
    if set(telling) == {Outcome.REFUTED}:
        return Outcome.REFUTED
    return Outcome.INCONCLUSIVE


def conjoin(outcomes: Iterable[Outcome]) -> Outcome:
    """One verdict for a claim made of parts that must all hold: Refuted when any part is, Reproduced when every
    part that can tell is (Saturated when none can), Inconclusive otherwise."""
    found = set(outcomes) - {Outcome.NOT_MEASURED}
    if not found:
        return Outcome.NOT_MEASURED
    if Outcome.REFUTED in found:
        return Outcome.REFUTED
    telling = found - {Outcome.SATURATED}
    if not telling:
        return Outcome.SATURATED
    return Outcome.REPRODUCED if telling == {Outcome.REPRODUCED} else Outcome.INCONCLUSIVE


def tally(outcomes: Iterable[Outcome]) -> str:
    """``3 Reproduced, 1 Inconclusive, 2 Saturated`` (in :class:`Outcome` order, zero counts left out)."""
    counts = Counter(outcomes)
    return ", ".join(f"{counts[outcome]} {outcome.value}" for outcome in Outcome if counts[outcome])


@dataclasses.dataclass
class Claim:
    """A claim as the literature states it, and its verdict in every setting that bears on it."""

    text: str
    source: str
    settings: list[tuple[str, str, Outcome]] = dataclasses.field(default_factory=list)
    needs: str = ""

    @property
    def outcome(self) -> Outcome:
        return combine(outcome for *_, outcome in self.settings)

    def paragraph(self) -> str:
        if not self.settings:
            return f"**{Outcome.NOT_MEASURED.value}.** {self.text} ({self.source}): needs {self.needs}."
        return (
            f"**{self.outcome.value}.** {self.text} ({self.source}): {tally(o for *_, o in self.settings)} of "
            f"{len(self.settings)} settings (details below)."
        )

    def table(self) -> str:
        lines = [f"**{self.text}** — {self.outcome.value}", "", "| setting | evidence | verdict |", "|---|---|---|"]
        lines += [f"| {setting} | {evidence} | {outcome.value} |" for setting, evidence, outcome in self.settings]
        return "\n".join(lines)
