"""The call contract, for every built-in mixer (float64 on CPU)."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import rel_err

import mixers
from mixers.ops.varlen import seqlens_to_cu_seqlens

HIDDEN = 32
OPTIONS = {
    "D": dict(num_heads=2, head_dim=8),
    "S": dict(num_heads=4, num_kv_heads=2, window=6),
    "A": dict(num_heads=4, num_kv_heads=2),
    "M": dict(d_state=8, headdim=16),
    "G": dict(num_heads=2),
    "L": dict(num_heads=2, head_dim=8),
}
KINDS = list(OPTIONS)


def make(kind: str, **overrides) -> torch.nn.Module:
    return mixers.build_mixer(kind, HIDDEN, **{**OPTIONS[kind], **overrides}).double()


def x_of(*shape) -> torch.Tensor:
    return torch.randn(*shape, HIDDEN, dtype=torch.float64)


def states_equal(a, b, tol=1e-11) -> bool:
    if isinstance(a, mixers.KVCache):
        # slots may be ordered differently after different write patterns; compare visible tokens
        pa, pb = a.slot_positions(), b.slot_positions()
        if not torch.equal(a.length, b.length):
            return False
        for n in range(a.batch_size):
            visible_a, visible_b = pa[n] >= 0, pb[n] >= 0
            order_a, order_b = pa[n][visible_a].argsort(), pb[n][visible_b].argsort()
            if not torch.equal(pa[n][visible_a][order_a], pb[n][visible_b][order_b]):
                return False
            for field in ("key", "value"):
                ta, tb = getattr(a, field)[n][visible_a][order_a], getattr(b, field)[n][visible_b][order_b]
                if not torch.allclose(ta, tb, atol=tol, rtol=0):
                    return False
        return True
    tensors_a = [a.recurrent, *a.conv.values()]
    tensors_b = [b.recurrent, *b.conv.values()]
    return a.conv.keys() == b.conv.keys() and all(
        torch.allclose(x, y, atol=tol, rtol=0) for x, y in zip(tensors_a, tensors_b)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_recurrent_and_token_by_token_agree(kind):
    mixer, x = make(kind), x_of(2, 29)
    y, state = mixer(x)
    for mode in ("chunk", "recurrent") if isinstance(mixer, mixers.RecurrentMixer) else ():
        mixer.mode = mode
        y_mode, state_mode = mixer(x)
        assert rel_err(y_mode, y) < 1e-12 and states_equal(state_mode, state)
    mixer_state = mixer.init_state(2, dtype=torch.float64)
    outputs = []
    for t in range(x.shape[1]):
        y_t, mixer_state = mixer(x[:, t : t + 1], mixer_state)
        outputs.append(y_t)
    assert rel_err(torch.cat(outputs, 1), y) < 1e-12
    assert states_equal(mixer_state, state)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_at_random_points_continues_exactly(kind, seed):
    rng = random.Random(seed)
    mixer, x = make(kind), x_of(2, 41)
    y, final = mixer(x)
    cuts = sorted(rng.sample(range(1, 41), 4))
    state, outputs = None, []
    for start, end in zip([0, *cuts], [*cuts, 41]):
        y_part, state = mixer(x[:, start:end], state)
        outputs.append(y_part)
    assert rel_err(torch.cat(outputs, 1), y) < 1e-12
    assert states_equal(state, final)


@pytest.mark.parametrize("kind", KINDS)
def test_packed_varlen_equals_separate(kind):
    mixer = make(kind)
    lengths = [7, 7, 1, 19, 10, 7]  # equal lengths run batched, neighbours as one view
    xs = [x_of(1, n) for n in lengths]
    cu = seqlens_to_cu_seqlens(lengths)
    y, state = mixer(torch.cat(xs, 1), cu_seqlens=cu)
    separate = [mixer(x) for x in xs]
    assert rel_err(y, torch.cat([out for out, _ in separate], 1)) < 1e-12
    for n, (_, state_n) in enumerate(separate):
        assert states_equal(_select(state, n), state_n)
    # continuing packed sequences from their states equals continuing each alone
    more = [3, 3, 8, 1, 2, 8]
    xs2 = [x_of(1, n) for n in more]
    y2, _ = mixer(torch.cat(xs2, 1), state, cu_seqlens=seqlens_to_cu_seqlens(more))
    expected = [mixer(x, st.clone())[0] for x, (_, st) in zip(xs2, separate)]
    assert rel_err(y2, torch.cat(expected, 1)) < 1e-12


@pytest.mark.parametrize("kind", ["S", "A"])
def test_a_packed_forward_costs_the_same_operations_for_any_number_of_sequences(kind):
    """Training packs hundreds of short sequences a step: the attention mixers write their caches for all of
    them at once, not in a loop of kernel launches per sequence."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += 1
            return func(*args, **(kwargs or {}))

    mixer, counts = make(kind), []
    for sequences in (4, 32):
        cu = seqlens_to_cu_seqlens([8] * sequences)
        with CountOps() as ops:
            mixer(x_of(1, 8 * sequences), cu_seqlens=cu)
        counts.append(ops.count)
    assert counts[0] == counts[1]


def _select(state, n):
    if isinstance(state, mixers.KVCache):
        return mixers.KVCache(state.key[n : n + 1], state.value[n : n + 1], state.length[n : n + 1], state.window)
    return mixers.RecurrentState(state.recurrent[n : n + 1], {k: v[n : n + 1] for k, v in state.conv.items()})


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_agree_between_torch_forms(kind):
    """Gradients of parallel vs streamed computation (and chunk vs recurrent forms) agree."""
    mixer, x = make(kind), x_of(2, 17).requires_grad_()

    def grads(run):
        mixer.zero_grad()
        x.grad = None
        run().pow(2).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in mixer.parameters()]

    reference = grads(lambda: mixer(x)[0])

    def streamed():
        y1, st = mixer(x[:, :9])
        y2, _ = mixer(x[:, 9:], st)
        return torch.cat([y1, y2], 1)

    for a, b in zip(grads(streamed), reference):
        assert rel_err(a, b) < 1e-10
    if isinstance(mixer, mixers.RecurrentMixer):
        mixer.mode = "recurrent"
        for a, b in zip(grads(lambda: mixer(x)[0]), reference):
            assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("window", [29, 40])
def test_window_at_least_length_equals_full_attention(window):
    full = make("A")
    sliding = make("S", window=window)
    sliding.load_state_dict(full.state_dict())
    x = x_of(2, 29)
    assert rel_err(sliding(x)[0], full(x)[0]) < 1e-13


def test_sliding_window_differs_once_input_exceeds_window():
    full, sliding = make("A"), make("S", window=6)
    sliding.load_state_dict(full.state_dict())
    x = x_of(1, 20)
    y_full, y_sliding = full(x)[0], sliding(x)[0]
    assert torch.allclose(y_full[:, :6], y_sliding[:, :6])
    assert not torch.allclose(y_full[:, 6:], y_sliding[:, 6:])


@pytest.mark.parametrize("kind", KINDS)
def test_state_size_fixed_except_full_attention(kind):
    mixer = make(kind)
    state = mixer.init_state(3, dtype=torch.float64)
    empty_bytes = state.nbytes
    with torch.no_grad():
        for chunk in (5, 17, 1, 40):
            _, state = mixer(x_of(3, chunk), state)
    if kind == "A":
        assert state.nbytes > empty_bytes and int(state.length[0]) == 63
    else:
        assert state.nbytes == empty_bytes
        assert mixer.state_bytes(3, dtype=torch.float64) == empty_bytes


def test_state_bytes_reports_growth_for_full_attention():
    mixer = make("A")
    assert mixer.state_bytes(2, seq_len=1000) == 2 * (2 * 1000 * 2 * 8 * 8 + 8)
    assert mixer.state_bytes(1, seq_len=2000) > mixer.state_bytes(1, seq_len=1000)


@pytest.mark.parametrize("kind", KINDS)
def test_clone_forks_a_state(kind):
    mixer = make(kind)
    _, state = mixer(x_of(1, 12))
    fork = state.clone()
    with torch.no_grad():
        mixer(x_of(1, 3), fork)  # may write into `fork`'s buffers
    x_next = x_of(1, 4)
    y_a, _ = mixer(x_next, state.clone())
    y_b, _ = mixer(x_next, state.clone())
    assert torch.equal(y_a, y_b)


def test_a_reserved_full_attention_cache_takes_a_shorter_one_in_place():
    mixer = make("A")
    with torch.no_grad():
        _, short = mixer(x_of(1, 5))
        _, longer = mixer(x_of(1, 9))
    target = mixer.init_state(1, dtype=torch.float64)
    target.reserve(8)
    key = target.key
    target.key.fill_(1.0)
    target.copy_(short)
    assert target.key is key and int(target.length) == 5
    assert torch.equal(target.key[:, :5], short.key) and not target.key[:, 5:].any()
    with pytest.raises(ValueError, match="does not fit"):
        target.copy_(longer)


def test_sliding_window_ring_buffer_wraps_around():
    mixer = make("S", window=4)
    x = x_of(1, 30)
    y, _ = mixer(x)
    state, outputs = mixer.init_state(1, dtype=torch.float64), []
    for t in range(30):
        y_t, state = mixer(x[:, t : t + 1], state)
        outputs.append(y_t)
    assert state.key.shape[1] == 4 and int(state.length) == 30
    assert sorted(state.slot_positions()[0].tolist()) == [26, 27, 28, 29]
    assert rel_err(torch.cat(outputs, 1), y) < 1e-12


def test_explicit_position_ids_and_mrope():
    mixer = make("S", mrope_section=[1, 1, 2])
    x = x_of(1, 9)
    text_positions = torch.arange(9)[None]
    y_default, _ = mixer(x)
    y_1d, _ = mixer(x, position_ids=text_positions)
    y_3d, _ = mixer(x, position_ids=text_positions[None].expand(3, 1, 9))
    assert torch.equal(y_default, y_1d) and torch.equal(y_1d, y_3d)
    vision_like = torch.stack([torch.zeros(9, dtype=torch.long), torch.arange(9) // 3, torch.arange(9) % 3])[:, None]
    assert not torch.allclose(mixer(x, position_ids=vision_like)[0], y_default)


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_raise_clear_errors(kind):
    mixer = make(kind)
    with pytest.raises(ValueError, match=rf"x must be \[B, T, {HIDDEN}\]"):
        mixer(torch.randn(2, 5, HIDDEN + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="state holds 2 sequences but the input has 3"):
        mixer(x_of(3, 4), mixer.init_state(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch size 1"):
        mixer(x_of(2, 4), cu_seqlens=torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="supports backends"):
        mixers.build_mixer(kind, HIDDEN, backend="nonexistent", **OPTIONS[kind])


@pytest.mark.parametrize("kind", ["D", "S"])
def test_explicit_kernel_backend_without_cuda_names_the_problem(kind):
    mixer = mixers.build_mixer(kind, HIDDEN, backend="fla", **OPTIONS[kind])
    with pytest.raises(
        mixers.BackendUnavailableError, match="backend 'fla' cannot run: its kernels need a CUDA device"
    ):
        mixer(torch.randn(1, 4, HIDDEN))


def test_auto_backend_logs_its_choice_once(caplog):
    import mixers.backends as backends

    backends._logged.clear()
    mixer = make("D")
    with caplog.at_level("INFO", logger="hybridvl.mixers"):
        mixer(x_of(1, 3))
        mixer(x_of(1, 3))
    lines = [r.getMessage() for r in caplog.records if "uses backend" in r.getMessage()]
    expected = "mixer D (gdn) on cpu uses backend 'torch' (fla skipped: its kernels need a CUDA device"
    assert len(lines) == 1 and lines[0].startswith(expected)


@pytest.mark.parametrize(
    ("kernel", "tilelang", "switch", "triton", "refused"),
    [
        ("gated_delta_rule", False, None, (3, 6, 0), True),
        ("gated_delta_rule", True, None, (3, 6, 0), False),  # fla swaps in tilelang's backward
        ("gated_delta_rule", True, "0", (3, 6, 0), True),  # FLA_TILELANG=0 switches that off
        ("simple_gla", True, None, (3, 6, 0), True),  # tilelang does not cover the simple gated form
        ("simple_gla", False, None, (3, 7, 1), False),
        ("gated_delta_rule", False, None, (3, 3, 0), False),
    ],
)
def test_fla_gated_backward_issue_on_hopper(monkeypatch, kernel, tilelang, switch, triton, refused):
    """Which Hopper + Triton combinations fla refuses to differentiate (fla issue #640), decided without a GPU."""
    import importlib.util

    from mixers import backends

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(backends, "triton_version", lambda: triton)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if tilelang else None) if name == "tilelang" else real_find_spec(name, *a),
    )
    if switch is None:
        monkeypatch.delenv("FLA_TILELANG", raising=False)
    else:
        monkeypatch.setenv("FLA_TILELANG", switch)
    issue = backends.fla_gated_backward_issue(torch.device("cuda"), kernel)
    assert (issue is not None) == refused
    if refused:
        assert "#640" in issue and "Triton >= 3.7.1" in issue


@pytest.mark.parametrize(
    ("dtype", "capability", "tilelang", "triton", "refused"),
    [
        (torch.float32, (9, 0), True, (3, 6, 0), True),  # tilelang's attention forward: no float32
        (torch.bfloat16, (9, 0), True, (3, 6, 0), False),
        (torch.float32, (9, 0), False, (3, 6, 0), False),  # fla's Triton kernel takes float32
        (torch.float32, (8, 0), True, (3, 6, 0), False),  # tilelang's attention is Hopper only
        (torch.float32, (9, 0), True, (3, 3, 0), False),
    ],
)
def test_fla_float32_attention_issue_on_hopper(monkeypatch, dtype, capability, tilelang, triton, refused):
    """fla's attention on Hopper runs tilelang's kernel, which does not compile for float32: decided without a GPU."""
    import importlib.util

    from mixers import backends

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(backends, "triton_version", lambda: triton)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (object() if tilelang else None) if name == "tilelang" else real_find_spec(name, *a),
    )
    monkeypatch.delenv("FLA_TILELANG", raising=False)
    issue = backends.fla_float32_attention_issue(torch.device("cuda"), dtype)
    assert (issue is not None) == refused
    if refused:
        assert "float32" in issue and "backend='torch'" in issue
    assert backends.float32_attention_limitations(torch.device("cuda"), dtype) == ({"fla": issue} if refused else None)
    assert backends.fla_float32_attention_issue(torch.device("cpu"), dtype) is None
