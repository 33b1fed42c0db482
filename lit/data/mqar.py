"""Multi-query associative recall (MQAR), as Zoology defines it (Arora et al., 2023).

An example of ``T`` tokens over a vocabulary of ``V`` starts with a context of ``kv`` key-value pairs
``k1 v1 k2 v2 ...`` (key ``j`` at position ``2j``, its value at ``2j + 1``): keys are distinct tokens of
``[1, V/2)``, values distinct tokens of ``[V/2, V)``. The rest of the sequence offers ``(T - 2kv) // 2`` query
slots, slot ``i`` at position ``2kv + 2i``; ``kv`` distinct slots are drawn without replacement with
probabilities proportional to ``a (i + 1)^(a - 1)`` (a power law, ``a = power_a = 0.01``: short gaps likelier),
and each holds one context key, every key asked exactly once, in a uniformly random assignment. Every other
position after the context, the one right after a query key included, holds a uniformly random token of
``[0, V)``: an answer is never shown again, so each query must be answered by recalling the value bound to its
key in the context.

The label of a query is its value, one position after the query key (``labels`` are aligned with
``input_ids`` and shifted inside the loss, so the logits *at* the query key predict it); accuracy is the share
of those values predicted. A model that binds no key to its value, but knows the context's values and that
each is asked once, scores ``1 / kv`` (:func:`no_recall_accuracy` measures that floor on a set).
"""

from __future__ import annotations

import numbers

import numpy as np
import torch
from torch.utils.data import Dataset

from hybridvl.lit.data.types import Sample


class MQARDataset(Dataset):
    """``num_examples`` MQAR sequences of ``seq_len`` tokens, deterministic by ``seed`` and the arguments.

    The whole set is drawn at construction from one ``np.random.default_rng(seed)``, vectorised over examples,
    so reading a sample costs no generation on the training loop: 100K sequences of 512 tokens build in
    0.5-0.8 s (kv 8) to 1.4-1.9 s (kv 128) in a fresh process and take 100 MB of tokens (measured on one core
    of a shared 2-core CPU, numpy 2.4).

    Args:
        vocab_size: tokens in the vocabulary (8192 in Zoology); keys come from ``[1, V/2)``, values from
            ``[V/2, V)``; must exceed ``seq_len``.
        seq_len: sequence length, even and at least ``4 * num_kv_pairs``.
        num_kv_pairs: pairs stored at the start and each queried once later.
        num_examples: dataset size.
        seed: generator seed (use different seeds for training and test sets).
        power_a: exponent ``a`` of the power law ``a (i + 1)^(a - 1)`` over the query slots (Zoology's 0.01).

    Attributes:
        input_ids: ``[N, T]`` tokens (int16 when ``vocab_size <= 2**15``, else int32).
        query_positions: ``[N, kv]`` positions of the query keys, ascending per row; the logits at these
            positions predict the values.
        targets: ``[N, kv]`` the value asked at each query position.
        key_positions: ``[N, kv]`` where the key asked at each query position sits in the context (``2j``).
        task: ``"mqar_T{seq_len}_kv{num_kv_pairs}"``.

    Raises:
        ValueError: on an argument outside the definition (the message names it and the fix).
    """

    def __init__(
        self,
        vocab_size: int = 8192,
        seq_len: int = 64,
        num_kv_pairs: int = 4,
        num_examples: int = 1000,
        seed: int = 0,
        power_a: float = 0.01,
    ) -> None:
        _check_arguments(vocab_size, seq_len, num_kv_pairs, num_examples, seed, power_a)
        self.vocab_size, self.seq_len, self.num_kv_pairs = int(vocab_size), int(seq_len), int(num_kv_pairs)
        self.num_examples, self.seed, self.power_a = int(num_examples), int(seed), float(power_a)
        self.task = f"mqar_T{seq_len}_kv{num_kv_pairs}"
        self.input_ids, self.query_positions, self.targets, self.key_positions = self._draw()

    @property
    def distances(self) -> np.ndarray:
        """``[N, kv]`` tokens from the key in the context to its query (``query_positions - key_positions``)."""
        return self.query_positions - self.key_positions

    @property
    def answer_positions(self) -> np.ndarray:
        """``[N, kv]`` positions whose labels hold the values (``query_positions + 1``); the tokens there are
        random, never the value."""
        return self.query_positions + 1

    def _draw(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Tokens, query positions, targets and key positions of every example (see the class attributes),
        drawn ``_CHUNK`` examples at a time (small temporaries: several times quicker than all at once)."""
        rng = np.random.default_rng(self.seed)
        n, kv, vocab, length = self.num_examples, self.num_kv_pairs, self.vocab_size, self.seq_len
        token_type = _token_type(vocab)
        position_type = np.int16 if length <= 2**15 else np.int32
        ids = np.empty((n, length), dtype=token_type)
        query_positions = np.empty((n, kv), dtype=position_type)
        targets = np.empty((n, kv), dtype=token_type)
        key_positions = np.empty((n, kv), dtype=position_type)
        for first in range(0, n, _CHUNK):
            part = slice(first, min(n, first + _CHUNK))
            ids[part], query_positions[part], targets[part], key_positions[part] = self._draw_chunk(
                rng, part.stop - part.start
            )
        return ids, query_positions, targets, key_positions

    def _draw_chunk(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
        """:meth:`_draw`'s arrays for ``n`` more examples."""
        kv, vocab, length = self.num_kv_pairs, self.vocab_size, self.seq_len
        half, context = vocab // 2, 2 * kv
        keys = _distinct_integers(rng, n, kv, 1, half)
        values = _distinct_integers(rng, n, kv, half, vocab)
        # every position is first a uniform token of [0, V); the context and the query keys overwrite theirs
        ids = rng.integers(0, vocab, (n, length), dtype=_token_type(vocab))
        ids[:, 0:context:2], ids[:, 1:context:2] = keys, values
        # kv of the `space` query slots, drawn without replacement with p(i) ∝ a (i + 1)^(a - 1), as a race: slot i
        # arrives at an exponential time of rate p(i), and the kv first arrivals are distributed as kv sequential
        # weighted draws without replacement (the Gumbel top-k trick, with exponentials, which are quicker to draw)
        space = (length - context) // 2
        rates = self.power_a * np.arange(1, space + 1, dtype=np.float64) ** (self.power_a - 1)
        arrivals = rng.standard_exponential((n, space)) / rates
        slots = np.sort(np.argpartition(arrivals, kv - 1, axis=1)[:, :kv], axis=1)
        # which pair each slot asks, a uniformly random assignment: each key asked exactly once
        pairs = rng.permuted(np.broadcast_to(np.arange(kv), (n, kv)), axis=1)
        rows = np.arange(n)[:, None]
        query_positions = context + 2 * slots
        ids[rows, query_positions] = keys[rows, pairs]
        return ids, query_positions, values[rows, pairs], 2 * pairs

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        input_ids = torch.from_numpy(self.input_ids[index].astype(np.int64))
        labels = torch.full_like(input_ids, -100)
        answers = torch.from_numpy(self.query_positions[index].astype(np.int64) + 1)
        labels[answers] = torch.from_numpy(self.targets[index].astype(np.int64))
        return Sample(
            input_ids,
            labels,
            self.seq_len,
            task=self.task,
            source=f"{self.task}:{self.seed}:{index}",
        )


def no_recall_accuracy(dataset: MQARDataset) -> float:
    """Expected accuracy of guessing every answer by elimination, binding no key to its value.

    The guesser knows the context's values and that each key is asked once; at each query it picks uniformly
    among the context values not *revealed* before it. A value counts as revealed before a query when, at an
    earlier position after the context, the token right after an occurrence of its key is that value (which is
    how a generator that writes answers into the sequence leaks them). A query scores ``1 / |candidates|`` when
    its value is still a candidate, 0 otherwise; the result averages over all queries of all examples. On a
    correct MQAR set it is ``1 / kv`` (up to reveals by chance, about ``1 / V`` per position); on one that
    shows each answer after its query it is ``(1 + 1/2 + ... + 1/kv) / kv`` (0.52 at kv 4).

    Args:
        dataset: the set, read through ``input_ids``, ``query_positions``, ``key_positions`` and
            ``num_kv_pairs``.

    Returns:
        The mean elimination accuracy, in ``[0, 1]``.
    """
    total = 0.0
    for first in range(0, dataset.input_ids.shape[0], 512):  # 512 examples at a time bound the temporaries
        part = slice(first, first + 512)
        total += _elimination_scores(
            np.asarray(dataset.input_ids[part], dtype=np.int64),
            np.asarray(dataset.query_positions[part], dtype=np.int64),
            np.asarray(dataset.key_positions[part], dtype=np.int64) // 2,
            dataset.num_kv_pairs,
        ).sum()
    return float(total / dataset.query_positions.size)


def _elimination_scores(ids: np.ndarray, queries: np.ndarray, asked: np.ndarray, kv: int) -> np.ndarray:
    """``[n, kv]`` expected accuracy of the elimination guess at each query (see :func:`no_recall_accuracy`),
    given the tokens ``[n, T]``, the query positions and the index of the pair each query asks (``[n, kv]``)."""
    n, length = ids.shape
    context = 2 * kv
    keys, values = ids[:, 0:context:2], ids[:, 1:context:2]
    # which context pair (if any) the token at each position after the context is the key of, found in one
    # sorted search over all rows at once (row r's tokens are shifted by r * span to keep the rows apart)
    span = int(ids.max()) + 1
    offsets = np.arange(n, dtype=np.int64)[:, None] * span
    order = np.argsort(keys, axis=1)
    sorted_keys = (np.take_along_axis(keys, order, axis=1) + offsets).ravel()
    tokens = ids[:, context : length - 1] + offsets
    found = np.minimum(np.searchsorted(sorted_keys, tokens), sorted_keys.size - 1)
    rows, columns = np.nonzero(sorted_keys[found] == tokens)
    pair = order[rows, found[rows, columns] - rows * kv]
    shown = ids[rows, context + columns + 1] == values[rows, pair]  # the token after the key is its value
    # the first position at which each pair's value is revealed (length: never)
    revealed_at = np.full((n, kv), length, dtype=np.int64)
    np.minimum.at(revealed_at, (rows[shown], pair[shown]), context + columns[shown] + 1)
    # candidates at a query: the values not revealed before it (a reveal at the query key itself is impossible:
    # keys and values come from disjoint halves of the vocabulary)
    candidates = (revealed_at[:, None, :] >= queries[:, :, None]).sum(axis=2)
    still_open = np.take_along_axis(revealed_at, asked, axis=1) >= queries
    return np.where(still_open, 1.0 / np.maximum(candidates, 1), 0.0)


_CHUNK = 8192
"""Examples drawn at once (small temporaries: several times quicker than all examples at once)."""


def _token_type(vocab_size: int) -> type[np.signedinteger]:
    """The smallest of int16 and int32 that holds every token."""
    return np.int16 if vocab_size <= 2**15 else np.int32


def _check_arguments(
    vocab_size: int, seq_len: int, num_kv_pairs: int, num_examples: int, seed: int, power_a: float
) -> None:
    """Raise ValueError, naming the problem and the fix, on arguments outside the MQAR definition."""
    integers = {
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "num_kv_pairs": num_kv_pairs,
        "num_examples": num_examples,
        "seed": seed,
    }
    for name, value in integers.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if num_kv_pairs < 1:
        raise ValueError(f"num_kv_pairs must be at least 1, got {num_kv_pairs}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1, got {num_examples}")
    if isinstance(power_a, bool) or not isinstance(power_a, numbers.Real) or not 0 < power_a < float("inf"):
        raise ValueError(f"power_a must be a positive finite number (Zoology uses 0.01), got {power_a!r}")
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (query slots are pairs of positions), got {seq_len}; use {seq_len + 1}")
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(
            f"{num_kv_pairs} key-value pairs need seq_len >= {4 * num_kv_pairs} (4 * num_kv_pairs), got {seq_len}; "
            f"raise seq_len or lower num_kv_pairs to {seq_len // 4}"
        )
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for {num_kv_pairs} distinct keys in [1, {vocab_size // 2}) and "
            f"values in [{vocab_size // 2}, {vocab_size}); use vocab_size >= {seq_len + 1} (above seq_len)"
        )
    if vocab_size <= seq_len:
        raise ValueError(
            f"vocab_size must exceed seq_len, got vocab_size {vocab_size} <= seq_len {seq_len}; "
            f"use vocab_size >= {seq_len + 1}"
        )


def _distinct_integers(rng: np.random.Generator, rows: int, count: int, low: int, high: int) -> np.ndarray:
    """``[rows, count]`` integers from ``[low, high)``, distinct within each row: each row a uniformly random
    ordered draw without replacement.

    Each row is the first ``count`` distinct numbers of a stream of independent uniform draws, which is exactly
    sequential sampling without replacement (each new number is uniform over those not drawn yet). The streams
    are drawn a little longer than the expected ``count`` distinct numbers need; the rows whose stream falls
    short draw a fresh, twice longer one (which numbers come first does not depend on when they come, so this
    keeps the law). Sorting ``number * width + draw index`` finds each number's first draw (plain sorts of
    integers, several times quicker than ``argsort``).
    """
    span = high - low
    expected = sum(span / (span - i) for i in range(count))  # draws until `count` distinct numbers
    width = count + 2 * round(expected - count) + 8
    out = np.empty((rows, count), dtype=np.int64)
    todo = np.arange(rows)
    while todo.size:
        kind = np.int32 if high * width < 2**31 else np.int64  # int32 sorts quicker
        draws = rng.integers(low, high, (todo.size, width), dtype=kind)
        tagged = draws * kind(width) + np.arange(width, dtype=kind)
        tagged.sort(axis=1)  # by number, then by draw index
        drawn, index = np.divmod(tagged, kind(width))
        first = np.ones(tagged.shape, dtype=bool)
        first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
        firsts = np.where(first, index, kind(width))  # the draw indices of first draws (width elsewhere)
        firsts.sort(axis=1)
        enough = firsts[:, count - 1] < width
        out[todo[enough]] = np.take_along_axis(draws[enough], firsts[enough, :count], axis=1)
        todo, width = todo[~enough], 2 * width
    return out
