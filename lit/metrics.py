"""Metrics for generation-based validation, as torchmetrics :class:`~torchmetrics.Metric` subclasses.

The answer metrics are updated with ``update(predictions, references)``: ``predictions`` a list of generated
strings and ``references`` a list of the same length whose items are one reference string or a list of acceptable
references. Each prediction scores in [0, 1]; ``compute()`` gives the mean score over every prediction since the
last ``reset()`` as a scalar tensor (``nan`` before any update). States are sums (``dist_reduce_fx="sum"``), so the
means are exact across processes.

* :class:`ExactMatch`: 1 if the prediction equals any reference after :func:`normalize_answer`.
* :class:`VQAAccuracy`: the VQA accuracy on answers normalised by :func:`vqa_normalize`.
* :class:`ANLS`: DocVQA's average normalised Levenshtein similarity.
* :class:`RelaxedAccuracy`: ChartQA's relaxed accuracy (numbers within 5 %).

:class:`TokenAccuracy` is the teacher-forced token accuracy: ``update(logits_or_predictions, labels)``.
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Sequence

import torch
from torchmetrics import Metric

__all__ = [
    "ANLS",
    "ExactMatch",
    "RelaxedAccuracy",
    "TokenAccuracy",
    "VQAAccuracy",
    "anls_score",
    "levenshtein",
    "normalize_answer",
    "relaxed_match",
    "vqa_accuracy",
    "vqa_normalize",
]

_TRAILING_PUNCTUATION = re.compile(r"[\s.,;:!?]+$")

# The official VQA evaluation's answer normalisation (github.com/GT-Vision-Lab/VQA, vqaEval.py).
_VQA_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_VQA_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_VQA_PERIOD = re.compile(r"\.(?!\d)")  # vqaEval's "(?!<=\d)(\.)(?!\d)": every period not followed by a digit
_VQA_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = frozenset(("a", "an", "the"))
# vqaEval maps each of these contractions, written with any one of its apostrophes left out, to itself. (Its
# table's entries that can never apply to lower-cased words, like "Im", are left out, as are no-op entries.)
_VQA_CONTRACTED = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd he'd've
he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've needn't not've
o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's
someone'd someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's
what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've
wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've
""".split()  # noqa: SIM905 (a word list reads better than 90 quoted items)
_VQA_CONTRACTIONS = {
    word[:i] + word[i + 1 :]: word for word in _VQA_CONTRACTED for i, char in enumerate(word) if char == "'"
}
_VQA_CONTRACTIONS["somebody'd"] = "somebodyd"  # sic, as in vqaEval


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace and strip it and trailing ``.,;:!?`` (``" The  Cat. "`` -> ``"the cat"``)."""
    return _TRAILING_PUNCTUATION.sub("", " ".join(text.lower().split()))


def vqa_normalize(text: str) -> str:
    """The VQA evaluation's answer normalisation.

    Punctuation is dropped where it touches a space (or anywhere, if the text has a comma between digits) and
    becomes a space elsewhere; periods not followed by a digit go; then, word by word on the lower-cased text,
    number words up to ten become digits, articles go and contractions missing an apostrophe get it back:
    ``"Two"`` -> ``"2"``, ``"a dog"`` -> ``"dog"``, ``"dont"`` -> ``"don't"``, ``"1,000"`` -> ``"1000"``.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for mark in _VQA_PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or _VQA_COMMA_IN_NUMBER.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    words = (_VQA_NUMBERS.get(word, word) for word in _VQA_PERIOD.sub("", out).lower().split())
    return " ".join(_VQA_CONTRACTIONS.get(word, word) for word in words if word not in _VQA_ARTICLES)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers ``references``, all :func:`vqa_normalize`\\ d.

    With one reference it is exact match. With ``n >= 2`` (VQA has 10) it averages, over the ``n`` subsets
    that leave one answer out, ``min(#answers in the subset equal to the prediction / 3, 1)``.
    """
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference")
    prediction = vqa_normalize(prediction)
    matches = [vqa_normalize(reference) == prediction for reference in references]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min(1.0, (total - match) / 3) for match in matches) / len(matches)


def levenshtein(a: str, b: str) -> int:
    """The edit distance between ``a`` and ``b``: insertions, deletions and substitutions of one character."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls_score(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """DocVQA's ANLS of one prediction: the best over ``references`` of ``1 - NL`` where ``NL < threshold``, else 0.

    ``NL`` is the Levenshtein distance divided by the longer string's length, on lower-cased strings with
    whitespace collapsed and stripped (two empty strings have ``NL = 0``).
    """
    if not references:
        raise ValueError("anls_score needs at least one reference")
    prediction = " ".join(prediction.lower().split())
    best = 0.0
    for reference in references:
        reference = " ".join(reference.lower().split())
        length = max(len(prediction), len(reference))
        distance = levenshtein(prediction, reference) / length if length else 0.0
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


def _to_number(text: str) -> float | None:
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def relaxed_match(prediction: str, reference: str, max_relative_change: float = 0.05) -> bool:
    """ChartQA's relaxed correctness: a numeric (non-zero) reference is matched by a number within
    ``max_relative_change`` of it (``"12%"`` reads as 0.12); anything else needs a case-insensitive exact match
    (both stripped)."""
    prediction, reference = prediction.strip(), reference.strip()
    predicted, target = _to_number(prediction), _to_number(reference)
    if predicted is not None and target:
        return abs(predicted - target) / abs(target) <= max_relative_change
    return prediction.lower() == reference.lower()


def _reference_lists(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    if isinstance(predictions, str) or isinstance(references, str):
        raise ValueError("predictions and references are lists (one item per sample), not single strings")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if not all(isinstance(prediction, str) for prediction in predictions):
        raise ValueError("predictions must be strings")
    lists = []
    for item in references:
        if isinstance(item, str):
            lists.append([item])
        elif isinstance(item, Sequence) and item and all(isinstance(reference, str) for reference in item):
            lists.append(list(item))
        else:
            raise ValueError(f"each sample needs one reference string or a non-empty list of them, got {item!r}")
    return lists


class _AnswerMetric(Metric):
    """The mean over predictions of a per-prediction score in [0, 1] against its references."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    score: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("score", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    @abc.abstractmethod
    def _score(self, prediction: str, references: list[str]) -> float: ...

    def update(self, predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> None:
        """Score ``predictions`` against ``references`` (per sample: a string or a list of acceptable strings)."""
        lists = _reference_lists(predictions, references)
        self.score += sum(self._score(prediction, item) for prediction, item in zip(predictions, lists))
        self.total += len(lists)

    def compute(self) -> torch.Tensor:
        """The mean score (``nan`` before any update)."""
        return self.score / self.total


class ExactMatch(_AnswerMetric):
    """The fraction of predictions equal to any of their references after :func:`normalize_answer`."""

    def _score(self, prediction: str, references: list[str]) -> float:
        return float(normalize_answer(prediction) in {normalize_answer(reference) for reference in references})


class VQAAccuracy(_AnswerMetric):
    """The VQA accuracy (:func:`vqa_accuracy`): a sample's references are its human answers (VQA has 10); with a
    single reference it is exact match after :func:`vqa_normalize`."""

    def _score(self, prediction: str, references: list[str]) -> float:
        return vqa_accuracy(prediction, references)


class ANLS(_AnswerMetric):
    """DocVQA's average normalised Levenshtein similarity (:func:`anls_score`).

    Args:
        threshold: normalised distances at or above it score 0 (DocVQA: 0.5).
    """

    def __init__(self, threshold: float = 0.5, **kwargs) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"the ANLS threshold must be in (0, 1], got {threshold}")
        super().__init__(**kwargs)
        self.threshold = threshold

    def _score(self, prediction: str, references: list[str]) -> float:
        return anls_score(prediction, references, self.threshold)


class RelaxedAccuracy(_AnswerMetric):
    """ChartQA's relaxed accuracy: the fraction of predictions that :func:`relaxed_match` any reference.

    Args:
        max_relative_change: the relative tolerance for numeric answers (ChartQA: 0.05).
    """

    def __init__(self, max_relative_change: float = 0.05, **kwargs) -> None:
        if not max_relative_change >= 0:
            raise ValueError(f"max_relative_change must be non-negative, got {max_relative_change}")
        super().__init__(**kwargs)
        self.max_relative_change = max_relative_change

    def _score(self, prediction: str, references: list[str]) -> float:
        return float(any(relaxed_match(prediction, reference, self.max_relative_change) for reference in references))


class TokenAccuracy(Metric):
    """The fraction of labelled tokens predicted correctly (teacher forcing).

    ``update(predictions, labels)`` takes logits ``[..., V]`` (the prediction is their argmax) or predicted
    token ids of ``labels``' shape, and ``labels`` ``[...]`` already aligned with them (shift them for next-token
    prediction yourself); tokens labelled ``ignore_index`` do not count.

    Args:
        ignore_index: the label of tokens to skip; ``update`` may override it per call.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, ignore_index: int = -100, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, predictions: torch.Tensor, labels: torch.Tensor, ignore_index: int | None = None) -> None:
        """Count the tokens of ``labels`` (other than ``ignore_index``) that ``predictions`` gets right."""
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
        if predictions.ndim == labels.ndim + 1 and predictions.shape[:-1] == labels.shape:
            predictions = predictions.argmax(dim=-1)
        elif predictions.shape != labels.shape:
            raise ValueError(
                f"predictions {list(predictions.shape)} must be logits [..., V] or token ids shaped like the "
                f"labels {list(labels.shape)}"
            )
        elif predictions.is_floating_point():
            raise ValueError("predictions shaped like the labels must be token ids, not floats")
        keep = labels != (self.ignore_index if ignore_index is None else ignore_index)
        self.correct += (predictions[keep] == labels[keep]).sum()
        self.total += keep.sum()

    def compute(self) -> torch.Tensor:
        """The fraction of counted tokens predicted correctly (``nan`` before any token)."""
        return self.correct / self.total
