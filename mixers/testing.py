"""The call contract of :mod:`hybridvl.mixers.base` as checks any registered mixer can run, built-in or your own.

.. code-block:: python

    from hybridvl.mixers.testing import check_mixer

    check_mixer("E", hidden_size=32, num_heads=2)   # raises AssertionError naming the property that fails

Each check takes a mixer in float64 on the CPU (so exact properties hold to rounding) and raises
:class:`AssertionError` with the mixer, the property and the error found:

* :func:`check_forms_agree`: one parallel call = the chunked and recurrent forms (mixers with a ``mode``) = one
  token at a time from :meth:`~hybridvl.mixers.base.Mixer.init_state`, outputs and final states;
* :func:`check_split_continues`: the sequence cut at random points and continued from each returned state;
* :func:`check_packed_equals_separate`: sequences packed with ``cu_seqlens`` = each run alone, and continuing the
  packed states = continuing each alone;
* :func:`check_state_size`: the state keeps its size over calls (``fixed_size_state``) or grows, and
  :meth:`~hybridvl.mixers.base.Mixer.state_bytes` reports the size of :meth:`~hybridvl.mixers.base.Mixer.init_state`'s
  state;
* :func:`check_state_dict_round_trip`: the state dict loads strictly into a mixer built with another seed, which
  then computes the same outputs (fused projections included, under their parts' names).

:data:`CHECKS` lists them, for ``pytest.mark.parametrize`` over them and over :func:`hybridvl.mixers.registered`.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hybridvl.mixers.base import RecurrentMixer
from hybridvl.mixers.ops.varlen import seqlens_to_cu_seqlens
from hybridvl.mixers.registry import build_mixer, get_spec
from hybridvl.mixers.state import KVCache, MixerState, _tensors

TOLERANCE = 1e-10  # relative error in float64 of results that are equal up to rounding


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64; NaN never passes a bound."""
    actual, expected = actual.double(), expected.double()
    err = ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()
    return float("inf") if err != err else err


def _owner(mixer: nn.Module) -> str:
    return f"mixer {getattr(mixer, 'letter', '?')} ({type(mixer).__name__})"


def _inputs(mixer: nn.Module, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, mixer.hidden_size, dtype=torch.float64)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, tol: float = TOLERANCE) -> None:
    """Raise :class:`AssertionError` naming ``what`` unless the relative error is at most ``tol``."""
    err = rel_err(actual, expected)
    if not err <= tol:
        raise AssertionError(f"{what}: relative error {err:.3g} exceeds {tol:g}")


def assert_states_equal(actual: MixerState, expected: MixerState, what: str, tol: float = TOLERANCE) -> None:
    """Raise :class:`AssertionError` naming ``what`` unless the states hold the same values.

    A :class:`~hybridvl.mixers.state.KVCache` is compared by the tokens it holds (its slots may be ordered differently
    after different write patterns); any other state tensor by tensor.
    """
    if type(actual) is not type(expected):
        raise AssertionError(f"{what}: a {type(actual).__name__} against a {type(expected).__name__}")
    if isinstance(actual, KVCache):
        if not torch.equal(actual.length, expected.length):
            raise AssertionError(f"{what}: lengths {actual.length.tolist()} != {expected.length.tolist()}")
        pa, pb = actual.slot_positions(), expected.slot_positions()
        for n in range(actual.batch_size):
            visible_a, visible_b = pa[n] >= 0, pb[n] >= 0
            order_a, order_b = pa[n][visible_a].argsort(), pb[n][visible_b].argsort()
            if not torch.equal(pa[n][visible_a][order_a], pb[n][visible_b][order_b]):
                raise AssertionError(f"{what}: sequence {n} holds other token positions")
            for field in ("key", "value"):
                a = getattr(actual, field)[n][visible_a][order_a]
                b = getattr(expected, field)[n][visible_b][order_b]
                assert_close(a, b, f"{what}: sequence {n}'s {field}s", tol)
        return
    for field in dataclasses.fields(actual):
        a, b = getattr(actual, field.name), getattr(expected, field.name)
        if isinstance(a, dict) and a.keys() != b.keys():
            raise AssertionError(f"{what}: {field.name} has keys {sorted(a)} against {sorted(b)}")
        for x, y in zip(_tensors(a), _tensors(b)):
            if x.shape != y.shape:
                raise AssertionError(f"{what}: {field.name} shaped {tuple(x.shape)} against {tuple(y.shape)}")
            assert_close(x, y, f"{what}: {field.name}", tol)


def _sequence(state: MixerState, n: int) -> MixerState:
    """Sequence ``n`` of a state of several."""
    return state._map(lambda t: t[n : n + 1])


@torch.no_grad()
def check_forms_agree(mixer: nn.Module, seed: int = 0, tol: float = TOLERANCE) -> None:
    """One parallel call = each ``mode`` of a :class:`~hybridvl.mixers.base.RecurrentMixer` = one token at a time."""
    torch.manual_seed(seed)
    x, owner = _inputs(mixer, 2, 29), _owner(mixer)
    y, state = mixer(x)
    if isinstance(mixer, RecurrentMixer):
        mode = mixer.mode
        try:
            for form in ("chunk", "recurrent"):
                mixer.mode = form
                y_form, state_form = mixer(x)
                assert_close(y_form, y, f"{owner}: mode={form!r} outputs against the default mode's", tol)
                assert_states_equal(state_form, state, f"{owner}: mode={form!r} final state", tol)
        finally:
            mixer.mode = mode
    token_state, outputs = mixer.init_state(2, dtype=torch.float64), []
    for t in range(x.shape[1]):
        y_t, token_state = mixer(x[:, t : t + 1], token_state)
        outputs.append(y_t)
    assert_close(torch.cat(outputs, 1), y, f"{owner}: token-by-token outputs (from init_state) against one call", tol)
    assert_states_equal(token_state, state, f"{owner}: token-by-token final state against one call's", tol)


@torch.no_grad()
def check_split_continues(mixer: nn.Module, seed: int = 0, tol: float = TOLERANCE) -> None:
    """The sequence cut at 4 random points, each part continuing from the state the last returned, = one call."""
    torch.manual_seed(seed)
    x, owner = _inputs(mixer, 2, 41), _owner(mixer)
    y, final = mixer(x)
    cuts = sorted(random.Random(seed).sample(range(1, 41), 4))
    state, outputs = None, []
    for start, end in zip([0, *cuts], [*cuts, 41]):
        y_part, state = mixer(x[:, start:end], state)
        outputs.append(y_part)
    assert_close(torch.cat(outputs, 1), y, f"{owner}: outputs of the sequence split at {cuts} against one call", tol)
    assert_states_equal(state, final, f"{owner}: final state of the sequence split at {cuts}", tol)


@torch.no_grad()
def check_packed_equals_separate(mixer: nn.Module, seed: int = 0, tol: float = TOLERANCE) -> None:
    """Sequences packed into one row with ``cu_seqlens`` = each alone; continuing them packed = each alone."""
    torch.manual_seed(seed)
    owner = _owner(mixer)
    lengths = [7, 7, 1, 19, 10, 7]  # equal lengths side by side, a single token, one longer than the rest
    xs = [_inputs(mixer, 1, n) for n in lengths]
    y, state = mixer(torch.cat(xs, 1), cu_seqlens=seqlens_to_cu_seqlens(lengths))
    separate = [mixer(x) for x in xs]
    assert_close(y, torch.cat([out for out, _ in separate], 1), f"{owner}: packed outputs against each alone", tol)
    for n, (_, state_n) in enumerate(separate):
        assert_states_equal(_sequence(state, n), state_n, f"{owner}: packed state of sequence {n}", tol)
    more = [3, 3, 8, 1, 2, 8]
    xs = [_inputs(mixer, 1, n) for n in more]
    y, _ = mixer(torch.cat(xs, 1), state, cu_seqlens=seqlens_to_cu_seqlens(more))
    expected = torch.cat([mixer(x, state_n.clone())[0] for x, (_, state_n) in zip(xs, separate)], 1)
    assert_close(y, expected, f"{owner}: packed continuation against continuing each alone", tol)


@torch.no_grad()
def check_state_size(mixer: nn.Module, seed: int = 0, tol: float = TOLERANCE) -> None:
    """``state_bytes`` is the size of ``init_state``'s state, which calls keep (``fixed_size_state``) or grow."""
    torch.manual_seed(seed)
    owner = _owner(mixer)
    state = mixer.init_state(3, dtype=torch.float64)
    empty = state.nbytes
    reported = mixer.state_bytes(3, dtype=torch.float64)
    if reported != empty:
        raise AssertionError(f"{owner}: state_bytes(3) reports {reported} bytes but init_state(3) holds {empty}")
    for chunk in (5, 17, 1, 40):
        state = mixer(_inputs(mixer, 3, chunk), state)[1]
    if getattr(mixer, "fixed_size_state", True):
        if state.nbytes != empty:
            raise AssertionError(
                f"{owner}: the state went from {empty} to {state.nbytes} bytes over 63 tokens, but the mixer declares "
                "fixed_size_state = True (set it False if the state grows, and report the growth in state_bytes)"
            )
    elif not state.nbytes > empty:
        raise AssertionError(f"{owner}: declares fixed_size_state = False but its state did not grow over 63 tokens")


@torch.no_grad()
def check_state_dict_round_trip(mixer: nn.Module, seed: int = 0, tol: float = TOLERANCE) -> None:
    """``mixer.state_dict()`` loads strictly into a copy with other weights, which then gives ``mixer``'s outputs
    and the same state dict, tensor for tensor."""
    torch.manual_seed(seed)
    owner = _owner(mixer)
    other = copy.deepcopy(mixer)
    for parameter in other.parameters():
        parameter.add_(torch.randn_like(parameter))
    saved = {name: tensor.clone() for name, tensor in mixer.state_dict().items()}
    other.load_state_dict(saved)  # strict: raises naming missing and unexpected keys
    reloaded = other.state_dict()
    if reloaded.keys() != saved.keys():
        raise AssertionError(f"{owner}: reloaded state dict has keys {sorted(reloaded)} against {sorted(saved)}")
    for name, tensor in saved.items():
        if not torch.equal(reloaded[name], tensor):
            raise AssertionError(f"{owner}: {name} changed through state_dict -> load_state_dict -> state_dict")
    x = _inputs(mixer, 2, 9)
    assert_close(other(x)[0], mixer(x)[0], f"{owner}: outputs after loading the state dict into another copy", tol)


CHECKS: tuple[Callable[..., None], ...] = (
    check_forms_agree,
    check_split_continues,
    check_packed_equals_separate,
    check_state_size,
    check_state_dict_round_trip,
)


def make_mixer(kind: str, hidden_size: int = 32, **options: Any) -> nn.Module:
    """The mixer of ``kind`` with ``options``, in float64 on the CPU, as the checks take it."""
    torch.manual_seed(0)
    return build_mixer(kind, hidden_size, **options).double()


def check_mixer(kind: str, hidden_size: int = 32, *, seed: int = 0, tol: float = TOLERANCE, **options: Any) -> None:
    """Run every check of :data:`CHECKS` on the registered mixer ``kind`` built with ``options``.

    Raises:
        AssertionError: the first property that fails, naming the mixer and the error found.
    """
    get_spec(kind)  # an unknown kind raises UnknownMixerError with the registered kinds
    for check in CHECKS:
        check(make_mixer(kind, hidden_size, **options), seed=seed, tol=tol)
