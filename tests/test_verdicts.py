"""Verdicts from bootstrap intervals: every outcome can come out, and each comes out where it should."""

from __future__ import annotations

import pytest

from hybridvl.lit.ablation.verdicts import Outcome, bootstrap_interval, combine, compare, estimate, reaches, tally

CHANCE = 1 / 64


def test_the_interval_covers_the_mean_and_is_repeatable():
    values = [0.2, 0.9, 0.95, 0.3, 0.99]
    low, high = bootstrap_interval(values)
    assert low < sum(values) / len(values) < high
    assert (low, high) == bootstrap_interval(values)  # seeded
    assert bootstrap_interval([0.7]) == (0.7, 0.7)
    assert bootstrap_interval([0.5] * 5) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="at least one value"):
        bootstrap_interval([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval([0.1], confidence=1.5)


def test_an_estimate_counts_the_seeds_that_solved_the_task():
    score = estimate([1.0, 0.98, 0.52, 0.91, 0.3])
    assert score.seeds == 5 and score.solved == 3
    assert score.describe().endswith("3/5 seeds >= 0.9")


@pytest.mark.parametrize(
    ("better", "worse", "outcome"),
    [
        ([0.95, 0.97, 0.96, 0.94, 0.98], [0.40, 0.45, 0.42, 0.41, 0.44], Outcome.REPRODUCED),
        ([0.40, 0.45, 0.42, 0.41, 0.44], [0.95, 0.97, 0.96, 0.94, 0.98], Outcome.REFUTED),
        ([1.0, 0.3, 1.0, 0.3, 1.0], [0.9, 0.4, 0.8, 0.5, 0.7], Outcome.INCONCLUSIVE),  # bimodal: wide interval
        ([0.999, 1.0, 0.998, 1.0, 0.999], [0.995, 0.997, 1.0, 0.999, 0.996], Outcome.SATURATED),  # both solved
        ([0.0, 0.01, 0.0, 0.002, 0.0], [0.0, 0.0, 0.012, 0.0, 0.0], Outcome.SATURATED),  # both at chance
    ],
)
def test_a_comparison_comes_out_each_way(better, worse, outcome):
    assert compare(estimate(better), estimate(worse), chance=CHANCE) is outcome


def test_one_arm_at_the_ceiling_and_one_below_is_not_saturated():
    assert compare(estimate([1.0] * 5), estimate([0.9, 0.92, 0.91, 0.9, 0.93]), chance=CHANCE) is Outcome.REPRODUCED


def test_arms_of_fewer_than_three_seeds_get_no_verdict():
    """One seed has a zero-width interval and two hardly more: far apart or not, the answer is Inconclusive."""
    assert compare(estimate([0.98]), estimate([0.01]), chance=CHANCE) is Outcome.INCONCLUSIVE
    assert compare(estimate([0.98, 0.97]), estimate([0.01, 0.02, 0.01]), chance=CHANCE) is Outcome.INCONCLUSIVE
    assert compare(estimate([0.98, 0.97, 0.99]), estimate([0.01, 0.02, 0.01]), chance=CHANCE) is Outcome.REPRODUCED
    assert reaches(estimate([1.0, 1.0]), 0.9) is Outcome.INCONCLUSIVE
    assert reaches(estimate([0.1, 0.2]), 0.9) is Outcome.INCONCLUSIVE


@pytest.mark.parametrize(
    ("values", "outcome"),
    [
        ([1.0, 0.99, 1.0, 0.98, 1.0], Outcome.REPRODUCED),
        ([0.5, 0.6, 0.55, 0.52, 0.58], Outcome.REFUTED),
        ([1.0, 0.5, 1.0, 1.0, 0.5], Outcome.INCONCLUSIVE),
    ],
)
def test_reaching_a_threshold_comes_out_each_way(values, outcome):
    assert reaches(estimate(values), 0.9) is outcome


def test_a_claim_over_several_settings_takes_every_telling_setting():
    r, f, i, s = Outcome.REPRODUCED, Outcome.REFUTED, Outcome.INCONCLUSIVE, Outcome.SATURATED
    assert combine([r, r, s]) is r
    assert combine([f, s]) is f
    assert combine([r, f]) is i
    assert combine([r, i]) is i
    assert combine([s, s]) is s
    assert combine([]) is Outcome.NOT_MEASURED
    assert tally([r, s, r, i]) == "2 Reproduced, 1 Inconclusive, 1 Saturated"


def test_conjoin_is_refuted_by_any_part_and_reproduced_only_by_all():
    from hybridvl.lit.ablation.verdicts import conjoin

    yes, no, open_, flat = Outcome.REPRODUCED, Outcome.REFUTED, Outcome.INCONCLUSIVE, Outcome.SATURATED
    assert conjoin([yes, yes, flat]) is yes
    assert conjoin([yes, no, yes]) is no and conjoin([open_, no]) is no
    assert conjoin([yes, open_]) is open_
    assert conjoin([flat, flat]) is flat
    assert conjoin([Outcome.NOT_MEASURED]) is Outcome.NOT_MEASURED and conjoin([]) is Outcome.NOT_MEASURED
