"""Multi-query associative recall (MQAR), in Zoology's standard setting (Arora et al., 2023).

A sequence starts with ``num_kv_pairs`` key-value pairs (keys from the lower half of the vocabulary, values
from the upper half); later, each key is asked again at a position drawn from a power law over the gap
after the stored pairs (short gaps likelier), and the model must predict the value that followed it. Every
other position holds a random token. Only the positions right after a repeated key carry labels; accuracy is
the share of those values predicted.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from lit.data.types import Sample


class MQARDataset(Dataset):
    """``num_examples`` MQAR sequences of ``seq_len`` tokens, deterministic by ``seed`` and size.

    The whole set is drawn at construction, vectorised over examples as Zoology does (100K sequences of 512
    tokens take about a second and 100 MB), so reading a sample costs no generation on the training loop.

    Args:
        vocab_size: tokens in the vocabulary (8192 in Zoology); keys and values use disjoint halves.
        seq_len: sequence length.
        num_kv_pairs: pairs stored at the start and all queried later.
        num_examples: dataset size.
        seed: generator seed (use different seeds for training and test sets).
        power_a: exponent of the power law that places the queries (Zoology's 0.01).
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
        if 4 * num_kv_pairs > seq_len:
            raise ValueError(f"{num_kv_pairs} key-value pairs need seq_len >= {4 * num_kv_pairs}, got {seq_len}")
        if vocab_size < 4 * num_kv_pairs:
            raise ValueError(f"vocab_size {vocab_size} is too small for {num_kv_pairs} distinct keys and values")
        self.vocab_size, self.seq_len, self.num_kv_pairs = vocab_size, seq_len, num_kv_pairs
        self.num_examples, self.seed, self.power_a = num_examples, seed, power_a
        self.task = f"mqar_T{seq_len}_kv{num_kv_pairs}"
        self.input_ids, self.answer_positions = self._draw()

    def _draw(self) -> tuple[np.ndarray, np.ndarray]:
        """Token ids ``[N, T]`` and the positions of the asked values ``[N, kv]`` (ascending) of every example."""
        rng = np.random.default_rng(self.seed)
        n, kv, vocab = self.num_examples, self.num_kv_pairs, self.vocab_size
        half = vocab // 2
        keys = _distinct_integers(rng, n, kv, 1, half)
        values = _distinct_integers(rng, n, kv, half, vocab)
        ids = rng.integers(1, vocab, (n, self.seq_len), dtype=np.int16 if vocab <= 2**15 else np.int32)
        context = 2 * kv
        ids[:, 0:context:2], ids[:, 1:context:2] = keys, values
        # query slots: pairs (key, value) after the context, gaps power-law distributed as in Zoology, drawn
        # without replacement by the Gumbel top-k trick (the same law as sequential weighted draws)
        slots = np.arange(context, self.seq_len - 1, 2)
        log_weights = np.log(self.power_a) + (self.power_a - 1) * np.log(slots - context + 1.0)
        chosen = np.empty((n, kv), dtype=np.int64)
        for first in range(0, n, _CHUNK):
            scores = rng.gumbel(size=(min(_CHUNK, n - first), len(slots))) + log_weights
            chosen[first : first + _CHUNK] = slots[np.argpartition(-scores, kv - 1, axis=1)[:, :kv]]
        chosen.sort(axis=1)
        order = np.argsort(rng.random((n, kv)), axis=1)  # which pair each query asks for
        rows = np.arange(n)[:, None]
        ids[rows, chosen], ids[rows, chosen + 1] = keys[rows, order], values[rows, order]
        return ids, (chosen + 1).astype(np.int16 if self.seq_len <= 2**15 else np.int32)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        input_ids = torch.from_numpy(self.input_ids[index].astype(np.int64))
        answers = torch.from_numpy(self.answer_positions[index].astype(np.int64))
        labels = torch.full_like(input_ids, -100)
        labels[answers] = input_ids[answers]
        return Sample(
            input_ids,
            labels,
            self.seq_len,
            task=self.task,
            source=f"{self.task}:{self.seed}:{index}",
        )


_CHUNK = 8192
"""Examples whose query slots are drawn at once (bounds the temporary score matrix)."""


def _distinct_integers(rng: np.random.Generator, rows: int, count: int, low: int, high: int) -> np.ndarray:
    """``[rows, count]`` integers from ``[low, high)``, distinct within each row, uniformly drawn."""
    if high - low < 4 * count:  # dense: a permutation per row
        return np.stack([rng.choice(np.arange(low, high), count, replace=False) for _ in range(rows)])
    out = rng.integers(low, high, (rows, count))
    while True:  # sparse: redraw the rows that repeat a number (most rows have none)
        ordered = np.sort(out, axis=1)
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
        if not repeated.any():
            return out
        out[repeated] = rng.integers(low, high, (int(repeated.sum()), count))
