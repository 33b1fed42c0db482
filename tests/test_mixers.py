"""The call contract, for every registered mixer and some option variants (float64 on CPU)."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from hybridvl import mixers
from hybridvl.mixers import testing as mixer_testing
from hybridvl.mixers.modules import ShortConv
from hybridvl.mixers.ops.varlen import seqlens_to_cu_seqlens

HIDDEN = 32
# small sizes, so the tests run fast; a registered kind without an entry is tested with its defaults
OPTIONS = {
    "D": dict(num_heads=2, head_dim=8),
    "S": dict(num_heads=4, num_kv_heads=2, window=6),
    "A": dict(num_heads=4, num_kv_heads=2),
    "M": dict(d_state=8, headdim=16),
    "G": dict(num_heads=2),
    "L": dict(num_heads=2, head_dim=8),
    # option variants, "<letter>-<variant>": the letter's mixer built with these options
    "L-textbook": dict(num_heads=2, head_dim=8, **mixers.LinearAttention.TEXTBOOK),
    "L-noconv": dict(num_heads=2, head_dim=8, conv_size=0),
    "L-normalized": dict(num_heads=2, head_dim=8, feature_map="elu1", normalize=True),  # with convs and L2 q/k
    "D-noconv": dict(num_heads=2, head_dim=8, conv_size=0),
    "G-conv": dict(num_heads=2, conv_size=4),
}
KINDS = list(dict.fromkeys([spec.letter for spec in mixers.registered()] + list(OPTIONS)))


def letter(kind: str) -> str:
    """The mixer letter of an ``OPTIONS`` key (``"L-textbook"`` -> ``"L"``)."""
    return kind.split("-")[0]


def make(kind: str, **overrides) -> torch.nn.Module:
    return mixers.build_mixer(letter(kind), HIDDEN, **{**OPTIONS.get(kind, {}), **overrides}).double()


def x_of(*shape) -> torch.Tensor:
    return torch.randn(*shape, HIDDEN, dtype=torch.float64)


@pytest.mark.parametrize("check", [check.__name__ for check in mixer_testing.CHECKS])
@pytest.mark.parametrize("kind", KINDS)
def test_call_contract(kind, check):
    """Chunked = recurrent = token by token, split continuation, packed = separate, state size (mixers.testing)."""
    getattr(mixer_testing, check)(make(kind))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", [1, 2])
def test_split_at_other_random_points_continues_exactly(kind, seed):
    mixer_testing.check_split_continues(make(kind), seed=seed)


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


def test_state_bytes_reports_growth_for_full_attention():
    mixer = make("A")
    assert mixer.state_bytes(2, seq_len=1000) == 2 * (2 * 1000 * 2 * 8 * 8 + 8)
    assert mixer.state_bytes(1, seq_len=2000) > mixer.state_bytes(1, seq_len=1000)


def project(mixer: torch.nn.Module, part: str, x: torch.Tensor) -> torch.Tensor:
    """Projection ``part`` (e.g. ``"q_proj"``) of ``x``, as the mixer computes it: its columns of the fused
    ``in_proj``'s output."""
    return mixer.in_proj(x).split(mixer.in_proj.sizes, dim=-1)[list(mixer.in_proj.parts).index(part)]


def elu1(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.elu(t) + 1


def test_textbook_linear_attention_is_katharopoulos():
    """``y_t = o_proj(sum_s phi(q_t).phi(k_s) v_s / sum_s phi(q_t).phi(k_s))`` with ``phi(x) = elu(x) + 1``
    (Katharopoulos et al., 2020), written as causal quadratic attention."""
    mixer, x = make("L-textbook"), x_of(2, 13)
    q, k = (elu1(project(mixer, part, x).unflatten(-1, (2, 8))) for part in ("q_proj", "k_proj"))
    v = project(mixer, "v_proj", x).unflatten(-1, (2, 16))
    scores = torch.einsum("bihd,bjhd->bhij", q, k).tril()
    o = torch.einsum("bhij,bjhv->bihv", scores / scores.sum(-1, keepdim=True), v)
    assert rel_err(mixer(x)[0], mixer.o_proj(o.flatten(-2))) < 1e-12


def test_textbook_linear_attention_state_has_no_conv_tails_and_a_key_sum_column():
    mixer = make("L-textbook")
    assert not any(isinstance(m, ShortConv) for m in mixer.modules())
    assert not hasattr(mixer, "o_norm")
    state = mixer.init_state(3, dtype=torch.float64)
    assert state.conv == {} and state.recurrent.shape == (3, 2, 8, 16 + 1)  # head_v_dim 16 and the key sum
    assert mixer.state_bytes(3, dtype=torch.float64) == 3 * 2 * 8 * 17 * 8
    x = x_of(3, 11)
    with torch.no_grad():
        _, state = mixer(x)
        key_sum = elu1(project(mixer, "k_proj", x).unflatten(-1, (2, 8))).sum(1)
    assert state.conv == {} and torch.allclose(state.recurrent[..., -1], key_sum, atol=1e-12, rtol=0)


def test_no_short_convolution_leaves_no_conv_modules_or_tails():
    for with_conv, without in (("L", "L-noconv"), ("D", "D-noconv"), ("G-conv", "G")):
        a, b = make(with_conv), make(without)
        assert isinstance(a.q_conv1d, ShortConv) and a.q_conv1d.kernel_size == (4,)
        assert not any(hasattr(b, name) for name in ("q_conv1d", "k_conv1d", "v_conv1d"))
        tails = a.init_state(2, dtype=torch.float64).conv
        assert b.init_state(2, dtype=torch.float64).conv == {} and set(tails) == {"q", "k", "v"}
        tail_bytes = sum(t.nbytes for t in tails.values())
        assert a.state_bytes(2, dtype=torch.float64) == b.state_bytes(2, dtype=torch.float64) + tail_bytes


def test_gla_short_convolutions_use_fla_names_and_state_layout():
    plain, conv = make("G"), make("G-conv")
    shapes = {name: tuple(t.shape) for name, t in conv.init_state(2, dtype=torch.float64).conv.items()}
    assert shapes == {"q": (2, 16, 4), "k": (2, 16, 4), "v": (2, 32, 4)}  # key dim 16, value dim 32
    missing, unexpected = conv.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == ["k_conv1d.weight", "q_conv1d.weight", "v_conv1d.weight"] and not unexpected
    x = x_of(2, 9)
    _, state = conv(x)
    assert torch.equal(state.conv["v"], project(conv, "v_proj", x).transpose(1, 2)[..., -4:])  # the last 4 inputs
    assert not torch.allclose(conv(x)[0], plain(x)[0])


@pytest.mark.parametrize(
    ("kind", "option", "value", "message"),
    [
        ("L", "feature_map", "relu", "feature_map must be one of 'identity', 'elu1', got feature_map='relu'"),
        ("L", "qk_norm", "rms", "qk_norm must be one of 'l2', 'none', got qk_norm='rms'"),
        ("L", "normalize", 1, "normalize must be one of False, True, got normalize=1"),
        ("L", "output_norm", "no", "output_norm must be one of True, False, got output_norm='no'"),
        (
            "L",
            "conv_size",
            -1,
            r"conv_size must be a non-negative integer \(0: no short convolution\), got conv_size=-1",
        ),
        ("D", "conv_size", -1, "conv_size must be a non-negative integer"),
        ("G", "conv_size", -4, "conv_size must be a non-negative integer"),
        ("G", "conv_size", 2.0, "got conv_size=2.0"),
    ],
)
def test_bad_mixer_options_name_the_option_the_value_and_the_choices(kind, option, value, message):
    with pytest.raises(ValueError, match=message):
        make(kind, **{option: value})


def test_normalized_linear_attention_needs_positive_features():
    with pytest.raises(ValueError, match="normalize=True needs positive features, feature_map='elu1'"):
        make("L", normalize=True)


@pytest.mark.parametrize("variant", ["linear", "gla"])
def test_odd_widths_reach_fla_padded_to_even(monkeypatch, variant):
    """fla's chunked backward takes only even K and V for 16-bit inputs, and L's normaliser column makes its value
    width odd: the fla path pads odd widths with a zero column and cuts it off again. Checked on CPU with
    stand-ins for fla's kernels that refuse odd widths and compute the PyTorch form."""
    import importlib

    import fla.ops.gla
    import fla.ops.simple_gla

    ops = importlib.import_module(
        "hybridvl.mixers.ops.linear_attention"
    )  # the module (mixers.ops exports the function)

    def stand_in(q, k, v, g=None, gk=None, *, scale, initial_state, output_final_state, cu_seqlens):
        assert q.shape[-1] % 2 == 0 and v.shape[-1] % 2 == 0 and initial_state.shape[-2:] == (8, 18)
        g = gk if g is None else g
        return ops._dispatch(variant, q, k, v, g, scale, initial_state, cu_seqlens, "chunk", 16, "torch")

    for module, names in (
        (fla.ops.simple_gla, ("chunk_simple_gla", "fused_recurrent_simple_gla")),
        (fla.ops.gla, ("chunk_gla", "fused_recurrent_gla")),
    ):
        for name in names:
            monkeypatch.setattr(module, name, stand_in)
    monkeypatch.setattr(ops, "select_backend", lambda backend, *args: backend if backend == "fla" else "torch")
    lengths = [5, 9, 1]
    cu = seqlens_to_cu_seqlens(lengths)
    q, k = (torch.randn(1, 15, 2, 7, dtype=torch.float64) for _ in range(2))
    v, h0 = torch.randn(1, 15, 2, 17, dtype=torch.float64), torch.randn(3, 2, 7, 17, dtype=torch.float64)
    gk = torch.nn.functional.logsigmoid(torch.randn(1, 15, 2, 7, dtype=torch.float64))
    fn = ops.linear_attention if variant == "linear" else lambda *a, **kw: ops.gated_linear_attention(*a, gk, **kw)
    for form in ("chunk", "recurrent"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, h0)]
        results = []
        for backend in ("fla", "torch"):
            o, state = fn(*leaves[:3], initial_state=leaves[3], cu_seqlens=cu, form=form, backend=backend)
            assert o.shape == v.shape and state.shape == h0.shape and state.is_contiguous()
            grads = torch.autograd.grad((o.square().sum() + state.square().sum()), leaves)
            results.append([o, state, *grads])
        for a, b in zip(*results):
            assert rel_err(a, b) < 1e-6  # the fla path hands fla its state in float32


@pytest.mark.parametrize("kind", KINDS)
def test_mixers_record_the_backend_they_ran(kind):
    mixer = make(kind)
    assert mixer.last_backend is None
    mixer(x_of(1, 5))
    assert mixer.last_backend == "torch"


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
        mixers.build_mixer(letter(kind), HIDDEN, backend="nonexistent", **OPTIONS.get(kind, {}))


@pytest.mark.parametrize("kind", ["D", "S"])
def test_explicit_kernel_backend_without_cuda_names_the_problem(kind):
    mixer = mixers.build_mixer(kind, HIDDEN, backend="fla", **OPTIONS[kind])
    with pytest.raises(
        mixers.BackendUnavailableError, match="backend 'fla' cannot run: its kernels need a CUDA device"
    ):
        mixer(torch.randn(1, 4, HIDDEN))


def test_auto_backend_logs_its_choice_once(caplog):
    import hybridvl.mixers.backends as backends

    backends._logged.clear()
    mixer = make("D")
    with caplog.at_level("INFO", logger="hybridvl.mixers"):
        mixer(x_of(1, 3))
        mixer(x_of(1, 3))
    lines = [r.getMessage() for r in caplog.records if "uses backend" in r.getMessage()]
    lines = [line for line in lines if line.startswith("mixer")]  # the short convolutions log their own choice
    expected = "mixer D (gdn) on cpu uses backend 'torch' (fla skipped: its kernels need a CUDA device"
    assert len(lines) == 1 and lines[0].startswith(expected)


@pytest.mark.parametrize("letter", ["D", "G", "L", "M"])
@pytest.mark.parametrize(("requested", "conv"), [("auto", "auto"), ("torch", "torch")])
def test_glue_chooses_its_own_backend(monkeypatch, letter, requested, conv):
    """The short convolutions and the gated output norm keep fla's kernels where only the recurrence falls back to
    PyTorch (``auto``); a mixer asked for PyTorch runs them in PyTorch too."""
    import hybridvl.mixers.modules as modules

    asked = {"short_conv": [], "gated_rms_norm": []}

    def spy(name):
        original = getattr(modules, name)

        def run(*args, backend, **kwargs):
            asked[name].append(backend)
            return original(*args, backend=backend, **kwargs)

        return run

    for name in asked:
        monkeypatch.setattr(modules, name, spy(name))
    options = {"G": dict(conv_size=4)}.get(letter, {})
    mixer = make(letter, backend=requested, **options)
    mixer(x_of(1, 5))
    assert asked["short_conv"] and set(asked["short_conv"]) == {conv}
    if letter != "L":  # L's output norm is a plain RMSNorm
        assert asked["gated_rms_norm"] == [conv]


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

    from hybridvl.mixers import backends

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

    from hybridvl.mixers import backends

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
