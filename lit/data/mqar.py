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
    """``num_examples`` MQAR sequences of ``seq_len`` tokens, deterministic by ``seed``.

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

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self.num_examples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        half = self.vocab_size // 2
        keys = rng.choice(np.arange(1, half), self.num_kv_pairs, replace=False)
        values = rng.choice(np.arange(half, self.vocab_size), self.num_kv_pairs, replace=False)
        context = 2 * self.num_kv_pairs
        ids = rng.integers(1, self.vocab_size, self.seq_len)
        ids[0:context:2], ids[1:context:2] = keys, values
        # query slots: pairs (key, value) after the context, gaps power-law distributed as in Zoology
        slots = np.arange(context, self.seq_len - 1, 2)
        weights = self.power_a * (slots - context + 1.0) ** (self.power_a - 1)
        chosen = rng.choice(slots, self.num_kv_pairs, replace=False, p=weights / weights.sum())
        order = rng.permutation(self.num_kv_pairs)
        labels = np.full(self.seq_len, -100)
        for slot, pair in zip(sorted(chosen), order):
            ids[slot], ids[slot + 1] = keys[pair], values[pair]
            labels[slot + 1] = values[pair]
        input_ids = torch.as_tensor(ids, dtype=torch.long)
        return Sample(
            input_ids,
            torch.as_tensor(labels, dtype=torch.long),
            self.seq_len,
            task=self.task,
            source=f"{self.task}:{self.seed}:{index}",
        )
