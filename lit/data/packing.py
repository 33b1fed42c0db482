"""Packing samples into one row, and batching them by token count.

A training batch is one packed row: :func:`pack` (also :data:`collate`, a ``DataLoader`` ``collate_fn``)
concatenates samples along time with their ``cu_seqlens`` boundaries. :class:`LengthGroupedBatchSampler`
chooses which samples go together: samples of similar length, at most ``max_tokens`` tokens in all, split across
distributed ranks, deterministic per epoch and resumable mid-epoch. It needs every sample's length up front;
:func:`lengths` gets them for a :class:`ConversationDataset` from the text and the media file headers, without
encoding or decoding pixels.

A sample longer than ``max_tokens`` is never dropped: it gets a batch of its own (over the budget) and a warning
is logged on the ``"hybridvl.data"`` logger. Bound sample lengths with ``encode(..., max_length=...)`` to keep
every batch within the budget.

Typical use::

    samples = [encode(conversation, processor, max_length=4096) for conversation in dataset]  # or lazily
    sampler = LengthGroupedBatchSampler(lengths(dataset, processor), max_tokens=16384, num_replicas=world,
                                        rank=rank)
    loader = DataLoader(samples, batch_sampler=sampler, collate_fn=collate)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:  # PackedBatch
            ...
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from hybridvl.lit.data.conversations import ConversationDataset
from hybridvl.lit.data.encoding import IGNORE_INDEX, count_tokens
from hybridvl.lit.data.types import PackedBatch, Sample
from hybridvl.models.chat import VISION_KEYS

__all__ = ["LengthGroupedBatchSampler", "collate", "greedy_pack", "lengths", "pack"]

logger = logging.getLogger("hybridvl.data")


def pack(samples: Sequence[Sample]) -> PackedBatch:
    """Concatenate ``samples`` into one row.

    Returns:
        A :class:`PackedBatch`: ``input_ids`` and ``labels`` ``[1, total]`` (labels ``-100`` on each sample's first
        token), int64 ``cu_seqlens`` ``[N + 1]``, each vision tensor concatenated over the samples that have it, in
        order, and the samples themselves.

    Raises:
        ValueError: ``samples`` is empty or holds an empty sample.
    """
    if not samples:
        raise ValueError("pack needs at least one sample")
    seqlens = torch.tensor([len(sample) for sample in samples], dtype=torch.int64)
    if (seqlens == 0).any():
        empty = next(sample.source for sample, length in zip(samples, seqlens) if length == 0)
        raise ValueError(f"cannot pack an empty sample ({empty!r})")
    cu_seqlens = torch.zeros(len(samples) + 1, dtype=torch.int64)
    cu_seqlens[1:] = seqlens.cumsum(0)
    input_ids = torch.cat([sample.input_ids for sample in samples])
    labels = torch.cat([sample.labels for sample in samples])
    labels[cu_seqlens[:-1]] = IGNORE_INDEX
    vision = {
        key: torch.cat([sample.vision[key] for sample in samples if key in sample.vision])
        for key in VISION_KEYS
        if any(key in sample.vision for sample in samples)
    }
    return PackedBatch(
        input_ids=input_ids.unsqueeze(0),
        labels=labels.unsqueeze(0),
        cu_seqlens=cu_seqlens,
        vision=vision,
        samples=list(samples),
    )


collate = pack
"""``DataLoader`` ``collate_fn`` for a dataset of :class:`Sample` batched by :class:`LengthGroupedBatchSampler`."""


def _check_lengths(lengths: Sequence[int], max_tokens: int) -> np.ndarray:
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    array = np.asarray(lengths, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"lengths must be a sequence of integers, got shape {array.shape}")
    if len(array) and array.min() < 1:
        raise ValueError(f"every length must be at least 1, got {int(array.min())}")
    return array


def _next_fit(order: Sequence[int], lengths: np.ndarray, max_tokens: int) -> list[list[int]]:
    """Fill batches with the samples of ``order`` in turn, starting a new one when the next does not fit."""
    batches: list[list[int]] = []
    batch: list[int] = []
    total = 0
    for index in order:
        length = int(lengths[index])
        if batch and total + length > max_tokens:
            batches.append(batch)
            batch, total = [], 0
        batch.append(int(index))
        total += length
    if batch:
        batches.append(batch)
    return batches


def _warn_oversize(lengths: np.ndarray, max_tokens: int) -> None:
    oversize = np.flatnonzero(lengths > max_tokens)
    if len(oversize):
        logger.warning(
            "%d sample(s) are longer than max_tokens %d and get a batch of their own (indices %s%s)",
            len(oversize),
            max_tokens,
            oversize[:10].tolist(),
            ", ..." if len(oversize) > 10 else "",
        )


def greedy_pack(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group sample indices, in order, into batches of at most ``max_tokens`` tokens.

    Next-fit: each sample joins the current batch if it fits and starts a new batch otherwise, so the order is
    kept (sort the samples first to group similar lengths). A sample longer than ``max_tokens`` gets a batch of
    its own, with a warning logged.

    Args:
        lengths: every sample's token count (at least 1).
        max_tokens: the token budget of a batch.

    Returns:
        Batches of indices into ``lengths``; every index appears exactly once.
    """
    array = _check_lengths(lengths, max_tokens)
    _warn_oversize(array, max_tokens)
    return _next_fit(range(len(array)), array, max_tokens)


def lengths(dataset: ConversationDataset, processor: Any) -> list[int]:
    """The token count :func:`~hybridvl.lit.data.encoding.encode` gives each conversation of ``dataset`` (before
    truncation).

    No encoding and no pixel decoding: the text of each record is rendered and tokenized, and each image or video
    adds the tokens its size gives (:meth:`ConversationDataset.outline`,
    :func:`~hybridvl.lit.data.encoding.count_tokens`), which costs one header read per media file. Exact for images and
    constant-frame-rate videos. Cache the result for large datasets.
    """
    return [count_tokens(dataset.outline(index), processor) for index in range(len(dataset))]


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Token-bounded batches of samples of similar length; deterministic per epoch, distributed, resumable.

    Each epoch: the indices are shuffled (with ``shuffle``; generator seeded by ``(seed, epoch)``) and cut into
    mega-batches of about ``mega_batch_factor * max_tokens`` tokens; each mega-batch is sorted by length, longest
    first, and packed greedily (:func:`greedy_pack`'s rule) into batches of at most ``max_tokens`` tokens; the
    order of all the batches is shuffled (with ``shuffle``). Without ``shuffle`` the dataset order is grouped the
    same way and the batches keep their order. The epoch's batches are then dealt round-robin to the
    ``num_replicas`` ranks, each rank getting the same number: with ``drop_last`` the last batches that would not
    divide evenly are dropped, otherwise batches from the start are repeated to fill up (as
    ``torch.utils.data.DistributedSampler`` does with samples).

    Call :meth:`set_epoch` before each epoch. To resume, save :meth:`state_dict` with the training checkpoint and
    :meth:`load_state_dict` it into a sampler built with the same arguments: the next iteration yields exactly
    the batches the interrupted epoch had left, in the same order. ``batches_yielded`` counts batches handed out
    by the iterator; a ``DataLoader`` with workers prefetches ahead of training, so save the number of batches
    actually trained on as ``batches_yielded`` in that case.

    Args:
        lengths: each sample's token count (see :func:`lengths`).
        max_tokens: the token budget of one batch (one packed row) on one rank.
        shuffle: shuffle samples and batches each epoch.
        seed: the shuffling seed; the same on every rank.
        drop_last: drop the batches that do not divide evenly over the ranks instead of repeating batches.
        num_replicas: the number of distributed ranks.
        rank: this rank, ``0 <= rank < num_replicas``.
        mega_batch_factor: mega-batches hold about this many batches' worth of tokens; larger groups lengths
            more tightly but shuffles less. 0 turns length grouping off: samples are packed in (shuffled) order,
            so every batch is a run of neighbours.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        mega_batch_factor: int = 50,
    ) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if mega_batch_factor < 0:
            raise ValueError(f"mega_batch_factor must be 0 (no length grouping) or more, got {mega_batch_factor}")
        self.lengths = _check_lengths(lengths, max_tokens)
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.mega_batch_factor = mega_batch_factor
        self._epoch = 0
        self._resume_from = 0  # batches to skip at the start of the next iteration
        self._yielded = 0  # batches of the epoch handed out so far
        self._cached: tuple[int, list[list[int]]] | None = None
        _warn_oversize(self.lengths, max_tokens)

    @property
    def epoch(self) -> int:
        """The epoch the next iteration yields."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield ``epoch``'s batches.

        From the start, unless ``epoch`` is the epoch already set (by a loaded state, for example): then a resume
        position loaded with :meth:`load_state_dict` is kept.
        """
        if epoch != self._epoch:
            self._epoch = epoch
            self._resume_from = 0
            self._yielded = 0

    def __len__(self) -> int:
        """The number of batches this rank gets in the current epoch (all of them, even when resuming)."""
        return len(self._rank_batches(self._epoch))

    def __iter__(self) -> Iterator[list[int]]:
        # a generator: the resume position is taken when the first batch is asked for, not at iter(). A DataLoader
        # with workers calls iter() on its sampler twice before its first batch (in _BaseDataLoaderIter.__init__
        # and again in _MultiProcessingDataLoaderIter._reset): taken at the first call, the position would be
        # gone by the second, and the resumed epoch would start over
        batches = self._rank_batches(self._epoch)
        start, self._resume_from = self._resume_from, 0
        self._yielded = start
        for batch in batches[start:]:
            self._yielded += 1
            yield list(batch)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches_yielded"}``: the epoch and how many of its batches this rank has handed out."""
        return {"epoch": self._epoch, "batches_yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a :meth:`state_dict`: the next iteration continues ``epoch`` after ``batches_yielded`` batches."""
        epoch, done = int(state["epoch"]), int(state["batches_yielded"])
        total = len(self._rank_batches(epoch))
        if not 0 <= done <= total:
            raise ValueError(f"batches_yielded {done} is out of range: epoch {epoch} has {total} batches on this rank")
        self._epoch, self._resume_from, self._yielded = epoch, done, done

    def _rank_batches(self, epoch: int) -> list[list[int]]:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = epoch, self._split(self._epoch_batches(epoch))
        return self._cached[1]

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch``, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        count = len(self.lengths)
        order = rng.permutation(count) if self.shuffle else np.arange(count)
        if self.mega_batch_factor == 0:
            return _next_fit(order, self.lengths, self.max_tokens)
        ordered = self.lengths[order]
        # a sample belongs to the mega-batch in which its first token falls
        mega = (np.cumsum(ordered) - ordered) // (self.mega_batch_factor * self.max_tokens)
        # mega is non-decreasing along order, so sorting by (mega, -length) keeps each mega-batch in its place
        order = order[np.lexsort((-ordered, mega))]
        batches = []
        for group in np.split(order, np.flatnonzero(np.diff(mega)) + 1):
            batches += _next_fit(group, self.lengths, self.max_tokens)
        if self.shuffle:
            batches = [batches[index] for index in rng.permutation(len(batches))]
        return batches

    def _split(self, batches: list[list[int]]) -> list[list[int]]:
        """This rank's share of ``batches``: every ``num_replicas``-th, after evening out the count."""
        if self.drop_last:
            batches = batches[: len(batches) // self.num_replicas * self.num_replicas]
        elif batches:
            total = math.ceil(len(batches) / self.num_replicas) * self.num_replicas
            batches = [batches[index % len(batches)] for index in range(total)]
        return batches[self.rank :: self.num_replicas]
