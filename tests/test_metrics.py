"""Validation metrics against hand-computed values; state handling without processes."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hybridvl.lit.metrics import (
    ANLS,
    ExactMatch,
    RelaxedAccuracy,
    TokenAccuracy,
    VQAAccuracy,
    anls_score,
    levenshtein,
    normalize_answer,
    relaxed_match,
    vqa_accuracy,
    vqa_normalize,
)

ANSWER_METRICS = (ExactMatch, VQAAccuracy, ANLS, RelaxedAccuracy)


def _value(metric_class, predictions, references, **kwargs) -> float:
    metric = metric_class(**kwargs)
    metric.update(predictions, references)
    return metric.compute().item()


@pytest.mark.parametrize(
    ("text", "expected"),
    [(" The  Cat. ", "the cat"), ("Paris!?", "paris"), ("3.5", "3.5"), ("e.g. this", "e.g. this"), ("", "")],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    predictions = ["Paris.", " the  Cat ", "dog", "puppy!"]
    references = ["paris", "The cat", ["cat", "wolf"], ["cat", "Puppy"]]
    assert _value(ExactMatch, predictions, references) == pytest.approx(3 / 4)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", "2"),
        ("a dog", "dog"),
        ("The Dog!", "dog"),
        ("an apple", "apple"),
        ("none", "0"),
        ("Ten", "10"),
        ("twenty", "twenty"),
        ("dont", "don't"),
        ("don't", "don't"),
        ("isnt it", "isn't it"),
        ("1,000", "1000"),
        ("hot-dog", "hot dog"),
        ("yes, sir", "yes sir"),
        ("3.5", "3.5"),
        ("the end.", "end"),
        ("U.S.", "us"),
        ("(left)", "left"),
        ("  multi\tline\nanswer ", "multi line answer"),
    ],
)
def test_vqa_normalize(text, expected):
    assert vqa_normalize(text) == expected


@pytest.mark.parametrize(("matching", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_over_ten_answers(matching, expected):
    # each of the 10 leave-one-out subsets scores min(#matches / 3, 1): with 3 humans, 7 subsets give 1, 3 give 2/3
    humans = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_accuracy("two", humans) == pytest.approx(expected)


def test_vqa_accuracy_metric():
    predictions = ["Two", "a dog", "cat", "yes"]
    references = ["2", "Dog", ["dog"] * 10, ["yes"] * 2 + ["no"] * 8]
    # single references are exact matches; "yes" said by 2 of 10 humans scores 0.6
    assert _value(VQAAccuracy, predictions, references) == pytest.approx((1 + 1 + 0 + 0.6) / 4)


@pytest.mark.parametrize(
    ("a", "b", "distance"), [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("same", "same", 0)]
)
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == levenshtein(b, a) == distance


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("hallo", ["hello"], 0.8),  # 1 edit / 5 characters
        ("Hello ", ["hello"], 1.0),  # lower-cased and stripped
        ("abxye", ["abcde"], 0.6),  # NL 0.4 < 0.5
        ("abxy", ["abcd"], 0.0),  # NL 0.5: at the threshold, scores 0
        ("abc", ["xyz"], 0.0),
        ("abcd", ["abxy", "abcx"], 0.75),  # the best reference
        ("", [""], 1.0),
        ("", ["a"], 0.0),
    ],
)
def test_anls_score(prediction, references, expected):
    assert anls_score(prediction, references) == pytest.approx(expected)


def test_anls_metric_and_threshold():
    predictions, references = ["hallo", "abc", "abcd"], ["hello", "xyz", ["abxy", "abcx"]]
    assert _value(ANLS, predictions, references) == pytest.approx((0.8 + 0 + 0.75) / 3)
    assert _value(ANLS, ["abxy"], ["abcd"], threshold=0.6) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="threshold"):
        ANLS(threshold=0)


@pytest.mark.parametrize(
    ("prediction", "reference", "correct"),
    [
        ("104.9", "100", True),  # 4.9 % off
        ("105.1", "100", False),  # 5.1 % off
        ("95.1", "100", True),
        ("94.9", "100", False),
        ("-10.4", "-10", True),
        ("5%", "0.05", True),
        ("0.051", "5%", True),
        ("0.0", "0", False),  # a zero reference needs the exact string, as in ChartQA
        ("Yes", "yes", True),
        ("red ", "Red", True),
        ("reds", "red", False),
        ("nan", "nan", True),  # not numbers: compared as text
    ],
)
def test_relaxed_match(prediction, reference, correct):
    assert relaxed_match(prediction, reference) is correct


def test_relaxed_accuracy_metric():
    predictions = ["104.9", "105.1", "blue", "7"]
    references = ["100", "100", ["Red", "Blue"], ["6.9", "10"]]
    assert _value(RelaxedAccuracy, predictions, references) == pytest.approx(3 / 4)
    assert _value(RelaxedAccuracy, ["105.1"], ["100"], max_relative_change=0.06) == 1.0
    with pytest.raises(ValueError, match="max_relative_change"):
        RelaxedAccuracy(max_relative_change=-0.1)


@pytest.mark.parametrize("metric_class", ANSWER_METRICS)
def test_answer_metrics_accumulate_reset_and_merge(metric_class):
    predictions, references = ["p", "q", "r", "s"], ["p", "x", "r", ["s"] * 4]
    metric = metric_class()
    assert metric(predictions[:2], references[:2]).item() == pytest.approx(0.5)  # forward: the batch's value
    metric.update(predictions[2:], references[2:])
    assert metric.compute().item() == pytest.approx(3 / 4)
    metric.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns that compute precedes update
        assert math.isnan(metric.compute().item())
    metric.update(["a"], ["b"])
    assert metric.compute().item() == 0.0
    # what each process would hold, summed the way a distributed sync sums them
    first, second = metric_class(), metric_class()
    first.update(predictions[:1], references[:1])
    second.update(predictions[1:], references[1:])
    first.merge_state(second)
    assert first.compute().item() == pytest.approx(3 / 4)
    assert all(reduction.__name__ == "dim_zero_sum" for reduction in first._reductions.values())


@pytest.mark.parametrize("metric_class", ANSWER_METRICS)
def test_answer_metrics_reject_bad_batches(metric_class):
    metric = metric_class()
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        metric.update(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="single strings"):
        metric.update("a", ["a"])
    with pytest.raises(ValueError, match="non-empty list"):
        metric.update(["a"], [[]])
    with pytest.raises(ValueError, match="non-empty list"):
        metric.update(["a"], [None])
    with pytest.raises(ValueError, match="strings"):
        metric.update([1], ["a"])


def test_token_accuracy():
    metric = TokenAccuracy()
    metric.update(torch.tensor([1, 0, 5, 0]), torch.tensor([1, 2, -100, 0]))
    assert metric.compute().item() == pytest.approx(2 / 3)
    logits = torch.zeros(2, 3, 6)
    logits[..., 4] = 1.0  # predicts 4 everywhere
    labels = torch.tensor([[4, 4, -100], [3, -100, -100]])
    metric.update(logits, labels)
    assert metric.compute().item() == pytest.approx((2 + 2) / (3 + 3))
    assert metric.correct.item() == 4 and metric.total.item() == 6
    metric.reset()
    metric.update(torch.tensor([7, 7]), torch.tensor([7, 0]), ignore_index=0)
    assert metric.compute().item() == 1.0
    assert TokenAccuracy(ignore_index=0)(torch.tensor([3, 3]), torch.tensor([3, 0])).item() == 1.0


def test_token_accuracy_rejects_bad_shapes():
    metric = TokenAccuracy()
    with pytest.raises(ValueError, match="logits"):
        metric.update(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="not floats"):
        metric.update(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.zeros(4, dtype=torch.long), torch.zeros(4))


_TEXT = st.text(alphabet="abc ", max_size=8)


@given(_TEXT, _TEXT, _TEXT)
def test_levenshtein_is_a_metric(a, b, c):
    assert levenshtein(a, b) == levenshtein(b, a)
    assert (levenshtein(a, b) == 0) == (a == b)
    assert levenshtein(a, c) <= levenshtein(a, b) + levenshtein(b, c)
    assert abs(len(a) - len(b)) <= levenshtein(a, b) <= max(len(a), len(b))


@given(_TEXT, st.lists(_TEXT, min_size=1, max_size=3))
def test_anls_bounds(prediction, references):
    score = anls_score(prediction, references)
    assert score == 0 or 0.5 < score <= 1
    if normalize_answer(prediction) in {normalize_answer(reference) for reference in references}:
        assert score == 1.0
