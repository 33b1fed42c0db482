"""MQAR as Zoology defines it (Arora et al., 2023): structure, the query-gap law, no leaked answers (CPU, fast)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from hybridvl.lit.data.mqar import MQARDataset, no_recall_accuracy


def _leaky_copy(data: MQARDataset) -> MQARDataset:
    """The set as the old generator wrote it: each query's value in the position right after its key."""
    leaky = copy.copy(data)
    leaky.input_ids = data.input_ids.copy()
    rows = np.arange(len(data))[:, None]
    leaky.input_ids[rows, data.query_positions + 1] = data.targets
    return leaky


def _floor_by_loop(data: MQARDataset) -> float:
    """:func:`no_recall_accuracy` written as a plain loop over examples and queries (the reference)."""
    kv, scores = data.num_kv_pairs, []
    for row in range(len(data)):
        ids = data.input_ids[row].tolist()
        stored = {ids[2 * j]: ids[2 * j + 1] for j in range(kv)}
        for query, key_position in zip(data.query_positions[row].tolist(), data.key_positions[row].tolist()):
            revealed = {
                ids[p + 1] for p in range(2 * kv, query - 1) if ids[p] in stored and ids[p + 1] == stored[ids[p]]
            }
            candidates = set(stored.values()) - revealed
            scores.append(1 / len(candidates) if ids[key_position + 1] in candidates else 0.0)
    return float(np.mean(scores))


def _exact_slot_frequencies(p: np.ndarray, kv: int) -> np.ndarray:
    """How often each slot is drawn (normalised to sum 1) by ``kv`` sequential draws without replacement with
    probabilities ``p``, summed exactly over every ordered draw."""
    draws = np.meshgrid(*[np.arange(len(p))] * kv, indexing="ij")
    probability, used = np.ones(draws[0].shape), np.zeros(draws[0].shape)
    distinct = np.ones(draws[0].shape, dtype=bool)
    for depth, slot in enumerate(draws):
        for earlier in draws[:depth]:
            distinct &= slot != earlier
        with np.errstate(divide="ignore", invalid="ignore"):
            probability = probability * p[slot] / (1 - used)
        used = used + p[slot]
    probability = np.where(distinct, probability, 0.0)
    frequencies = sum(np.bincount(slot.ravel(), probability.ravel(), minlength=len(p)) for slot in draws)
    return frequencies / kv


def _total_variation(p: np.ndarray, q: np.ndarray) -> float:
    return 0.5 * float(np.abs(p / p.sum() - q / q.sum()).sum())


# --- the no-recall floor --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("seq_len", "kv"), [(64, 4), (128, 8), (256, 64)])
def test_a_model_that_binds_nothing_scores_one_over_kv(seq_len, kv):
    data = MQARDataset(vocab_size=8192, seq_len=seq_len, num_kv_pairs=kv, num_examples=3000, seed=0)
    assert no_recall_accuracy(data) == pytest.approx(1 / kv, abs=0.01)


def test_the_floor_catches_answers_written_into_the_sequence():
    data = MQARDataset(vocab_size=8192, seq_len=64, num_kv_pairs=4, num_examples=3000, seed=0)
    leaky = no_recall_accuracy(_leaky_copy(data))
    # each answered value is eliminated for the later queries: (1 + 1/2 + 1/3 + 1/4) / 4 = 0.52, not 0.25
    assert leaky > 0.45 and leaky == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4, abs=0.005)


def test_the_floor_matches_a_plain_loop_with_chance_reveals():
    # a small vocabulary makes random tokens reveal values by chance (a key, then its value) now and then
    data = MQARDataset(vocab_size=34, seq_len=32, num_kv_pairs=4, num_examples=1500, seed=5)
    assert no_recall_accuracy(data) == pytest.approx(_floor_by_loop(data), abs=1e-12)
    assert no_recall_accuracy(data) != 0.25  # some reveals happened, so the check above compared something
    leaky = _leaky_copy(data)
    assert no_recall_accuracy(leaky) == pytest.approx(_floor_by_loop(leaky), abs=1e-12)


# --- the query-gap law ----------------------------------------------------------------------------------------


def test_query_slots_follow_zoologys_power_law():
    seq_len, kv, a = 64, 4, 0.01
    space = (seq_len - 2 * kv) // 2  # 28 query slots
    data = MQARDataset(vocab_size=8192, seq_len=seq_len, num_kv_pairs=kv, num_examples=20_000, seed=1, power_a=a)
    slots = (data.query_positions.astype(int) - 2 * kv) // 2
    ours = np.bincount(slots.ravel(), minlength=space).astype(float)

    # Zoology's draw: kv distinct slots by np.random.choice with p(i) ∝ a (i + 1)^(a - 1)
    p = a * np.arange(1, space + 1) ** (a - 1)
    p = p / p.sum()
    legacy = np.random.RandomState(0)
    reference = np.concatenate([legacy.choice(np.arange(space), replace=False, p=p, size=kv) for _ in range(20_000)])
    zoology = np.bincount(reference, minlength=space).astype(float)
    assert _total_variation(ours, zoology) < 0.02

    exact = _exact_slot_frequencies(p, kv)
    assert _total_variation(ours, exact) < 0.015 and _total_variation(zoology, exact) < 0.015
    # the old weighting, (2i + 1)^(a - 1), favours the first slot too much: it is 0.052 away, well outside the
    # tolerance, so the check above tells the two laws apart
    old = (2 * np.arange(space) + 1.0) ** (a - 1)
    assert _total_variation(_exact_slot_frequencies(old / old.sum(), kv), exact) > 0.04


def test_which_pair_a_query_asks_is_uniform():
    data = MQARDataset(vocab_size=8192, seq_len=64, num_kv_pairs=4, num_examples=20_000, seed=2)
    for query in range(4):
        counts = np.bincount(data.key_positions[:, query] // 2, minlength=4)
        assert np.all(np.abs(counts - 5000) < 5 * np.sqrt(20_000 * 0.25 * 0.75))


# --- structure ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vocab_size", "seq_len", "kv"),
    [(8192, 64, 4), (512, 64, 8), (72, 64, 16), (40_000, 64, 4)],  # (72, 64, 16): 16 of 35 keys, drawn densely
)
def test_sequences_store_pairs_and_ask_each_key_once(vocab_size, seq_len, kv):
    data = MQARDataset(vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=kv, num_examples=300, seed=3)
    ids, rows = data.input_ids.astype(np.int64), np.arange(300)[:, None]
    assert data.input_ids.dtype == (np.int16 if vocab_size <= 2**15 else np.int32)
    assert data.task == f"mqar_T{seq_len}_kv{kv}" and len(data) == 300
    keys, values = ids[:, 0 : 2 * kv : 2], ids[:, 1 : 2 * kv : 2]
    half = vocab_size // 2
    assert keys.min() >= 1 and keys.max() < half <= values.min() and values.max() < vocab_size
    assert (np.diff(np.sort(keys, axis=1), axis=1) > 0).all() and (np.diff(np.sort(values, axis=1), axis=1) > 0).all()

    queries, stored = data.query_positions.astype(np.int64), data.key_positions.astype(np.int64)
    assert (np.diff(queries, axis=1) > 0).all() and queries.min() >= 2 * kv and queries.max() <= seq_len - 2
    assert (queries % 2 == 0).all()
    assert (np.sort(stored, axis=1) == np.arange(0, 2 * kv, 2)).all()  # every key asked exactly once
    assert (ids[rows, queries] == ids[rows, stored]).all()  # the query holds the key ...
    assert (data.targets == ids[rows, stored + 1]).all()  # ... and asks for the value stored after it
    assert (data.distances == queries - stored).all() and (data.distances > 0).all()
    assert (data.answer_positions == queries + 1).all()

    for index in (0, 299):
        sample = data[index]
        assert sample.input_ids.dtype == torch.int64 and sample.input_ids.tolist() == ids[index].tolist()
        assert len(sample) == seq_len and sample.task == data.task and sample.source == f"{data.task}:3:{index}"
        expected = torch.full((seq_len,), -100)
        expected[queries[index] + 1] = torch.from_numpy(data.targets[index].astype(np.int64))
        assert sample.labels.equal(expected)  # the logits at the query key predict the value (shifted loss)
    with pytest.raises(IndexError):
        data[300]


def test_answers_never_follow_their_queries_beyond_chance():
    data = MQARDataset(vocab_size=8192, seq_len=128, num_kv_pairs=8, num_examples=3000, seed=4)
    rows = np.arange(3000)[:, None]
    shown = data.input_ids[rows, data.query_positions + 1] == data.targets
    assert shown.sum() < 0.005 * shown.size  # chance is 1/8192 of 24000 queries: about 3


def test_positions_after_the_context_are_uniform_tokens():
    vocab_size, seq_len, kv = 8192, 256, 16
    data = MQARDataset(vocab_size=vocab_size, seq_len=seq_len, num_kv_pairs=kv, num_examples=2000, seed=6)
    free = np.ones(data.input_ids.shape, dtype=bool)
    free[:, : 2 * kv] = False
    free[np.arange(2000)[:, None], data.query_positions] = False
    tokens = data.input_ids[free].astype(np.int64)
    assert tokens.size == 2000 * (seq_len - 3 * kv)
    assert (tokens == 0).any() and tokens.max() == vocab_size - 1  # any token of [0, V), 0 included
    assert tokens.mean() == pytest.approx((vocab_size - 1) / 2, rel=0.01)
    counts = np.bincount(tokens // (vocab_size // 16), minlength=16)  # 16 equal bins: a chi-square check
    expected = tokens.size / 16
    assert ((counts - expected) ** 2 / expected).sum() < 50  # 15 degrees of freedom: 99.999% quantile ~ 49
    # the tokens that were the values' places in the old generator are just as random
    after = data.input_ids[np.arange(2000)[:, None], data.query_positions + 1].astype(np.int64)
    assert (after < vocab_size // 2).mean() == pytest.approx(0.5, abs=0.02)


def test_sets_are_deterministic_by_seed():
    first, again = (MQARDataset(8192, 64, 4, 200, seed=7) for _ in range(2))
    other = MQARDataset(8192, 64, 4, 200, seed=8)
    for name in ("input_ids", "query_positions", "targets", "key_positions"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.input_ids, other.input_ids)
    assert not np.array_equal(first.query_positions, other.query_positions)
    assert first[5].input_ids.equal(again[5].input_ids) and not first[5].input_ids.equal(other[5].input_ids)


# --- arguments ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"seq_len": 63}, "seq_len must be even"),
        ({"seq_len": 32, "num_kv_pairs": 16}, r"need seq_len >= 64 .*lower num_kv_pairs to 8"),
        ({"vocab_size": 64, "seq_len": 64}, r"vocab_size must exceed seq_len.*use vocab_size >= 65"),
        ({"vocab_size": 8, "seq_len": 16, "num_kv_pairs": 4}, r"too small for 4 distinct keys.*vocab_size >= 17"),
        ({"num_kv_pairs": 0}, "num_kv_pairs must be at least 1"),
        ({"num_examples": 0}, "num_examples must be at least 1"),
        ({"power_a": 0.0}, "power_a must be a positive"),
        ({"power_a": -0.5}, "power_a must be a positive"),
        ({"power_a": float("nan")}, "power_a must be a positive"),
        ({"seq_len": 64.0}, "seq_len must be an integer"),
        ({"num_kv_pairs": True}, "num_kv_pairs must be an integer"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(arguments, message):
    with pytest.raises(ValueError, match=message):
        MQARDataset(**{"num_examples": 10, **arguments})
