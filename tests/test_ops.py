"""The ops against plainly written references (float64 on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from hybridvl.mixers.backends import BackendUnavailableError
from hybridvl.mixers.ops import (
    attention_over_positions,
    causal_attention,
    gated_delta_rule,
    gated_linear_attention,
    linear_attention,
    rotary_cos_sin,
    short_conv,
    simple_gated_linear_attention,
)
from hybridvl.mixers.ops.varlen import seqlens_to_cu_seqlens

F64 = torch.float64


def gdn_inputs(B=2, T=45, H=3, K=8, V=16, dtype=F64):
    q = torch.randn(B, T, H, K, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, dtype=dtype)
    g = F.logsigmoid(torch.randn(B, T, H, dtype=dtype) + 2)
    beta = torch.rand(B, T, H, dtype=dtype)
    h0 = torch.randn(B, H, K, V, dtype=dtype)
    return q, k, v, g, beta, h0


def gated_delta_rule_formula(q, k, v, g, beta, h0, scale):
    """The notes' recurrence verbatim, state S as [V, K]:
    S_t = S_{t-1} a_t (I - b_t k_t k_t^T) + b_t v_t k_t^T,  o_t = S_t q_t."""
    B, T, H, K = q.shape
    S = h0.transpose(-1, -2).clone()  # [B, H, V, K]
    eye = torch.eye(K, dtype=q.dtype)
    out = torch.empty(B, T, H, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                kt, vt, a, bt = k[b, t, h], v[b, t, h], g[b, t, h].exp(), beta[b, t, h]
                S[b, h] = S[b, h] @ (a * (eye - bt * torch.outer(kt, kt))) + bt * torch.outer(vt, kt)
                out[b, t, h] = S[b, h] @ (q[b, t, h] * scale)
    return out, S.transpose(-1, -2)


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_gated_delta_rule_matches_formula(form):
    q, k, v, g, beta, h0 = gdn_inputs(B=1, T=21, H=2, K=4, V=6)
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=h0, form=form, chunk_size=8, backend="torch")
    o_ref, state_ref = gated_delta_rule_formula(q, k, v, g, beta, h0, scale=4**-0.5)
    assert rel_err(o, o_ref) < 1e-12
    assert rel_err(state, state_ref) < 1e-12


def test_gated_delta_rule_matches_qwen3_next():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    reference = torch_chunk_gated_delta_rule.__wrapped__  # the undecorated PyTorch form
    q, k, v, g, beta, h0 = gdn_inputs(T=100)
    o, state = gated_delta_rule(q, k, v, g, beta, initial_state=h0, use_qk_l2norm=True, backend="torch")
    o_ref, state_ref = reference(
        q, k, v, g, beta, chunk_size=32, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    # transformers computes in float32
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(state, state_ref) < 1e-5


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64])
def test_gated_delta_rule_chunk_equals_recurrent(chunk_size):
    q, k, v, g, beta, h0 = gdn_inputs(T=50)
    o_c, s_c = gated_delta_rule(q, k, v, g, beta, initial_state=h0, chunk_size=chunk_size, backend="torch")
    o_r, s_r = gated_delta_rule(q, k, v, g, beta, initial_state=h0, form="recurrent", backend="torch")
    assert rel_err(o_c, o_r) < 1e-12 and rel_err(s_c, s_r) < 1e-12


def test_gated_delta_rule_gradients_agree_between_forms():
    inputs = [t.requires_grad_() for t in gdn_inputs(T=19, H=2, K=4, V=5)]
    grads = {}
    for form in ("chunk", "recurrent"):
        o, s = gated_delta_rule(*inputs[:5], initial_state=inputs[5], form=form, chunk_size=8, backend="torch")
        grads[form] = torch.autograd.grad((o.sin().sum() + s.cos().sum()), inputs)
    for a, b in zip(grads["chunk"], grads["recurrent"]):
        assert rel_err(a, b) < 1e-10


def test_gated_delta_rule_varlen_equals_separate():
    lengths = [9, 9, 30, 1, 17, 9, 1]  # equal lengths run batched, neighbours as one view
    q, k, v, g, beta, _ = gdn_inputs(B=1, T=sum(lengths))
    h0 = torch.randn(len(lengths), 3, 8, 16, dtype=F64)
    cu = seqlens_to_cu_seqlens(lengths)
    o, states = gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu, backend="torch")
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, st_n = gated_delta_rule(
            *(t[:, s:e] for t in (q, k, v, g, beta)), initial_state=h0[n : n + 1], backend="torch"
        )
        assert torch.allclose(o[:, s:e], o_n) and torch.allclose(states[n : n + 1], st_n)


@pytest.mark.parametrize("lengths", [[9, 9, 30, 1, 17, 9, 1], [5, 5, 5], [3, 3, 8, 8, 8, 2]])
def test_sequences_grouped_by_length_give_each_sequence_its_own_result_and_gradient(lengths):
    from hybridvl.mixers.ops.varlen import _length_groups, _LengthGroups, map_sequences

    cu = seqlens_to_cu_seqlens(lengths)
    x = torch.randn(1, sum(lengths), 3, dtype=F64, requires_grad=True)
    h0 = torch.randn(len(lengths), 3, dtype=F64, requires_grad=True)

    def run(x, initial_state):  # rows independent; the state carries into every step
        return (x.cumsum(1) + initial_state[:, None]).sin(), x.sum(1) * initial_state

    out, states = map_sequences(run, cu, (x,), h0)
    weights = torch.randn_like(out), torch.randn_like(states)
    grads = torch.autograd.grad((out * weights[0]).sum() + (states * weights[1]).sum(), (x, h0))
    expected_out, expected_states = zip(
        *(run(x[:, s:e], h0[n : n + 1]) for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())))
    )
    expected_out, expected_states = torch.cat(expected_out, 1), torch.cat(expected_states)
    expected_grads = torch.autograd.grad(
        (expected_out * weights[0]).sum() + (expected_states * weights[1]).sum(), (x, h0)
    )
    assert torch.equal(out, expected_out) and torch.equal(states, expected_states)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert rel_err(grad, expected) < 1e-14
    in_runs = lengths == sorted(lengths, key=lengths.index)  # each length's sequences side by side
    bounds = tuple(zip(cu[:-1].tolist(), cu[1:].tolist()))
    assert (_LengthGroups(bounds, x.device).gather is None) == in_runs
    assert _length_groups(bounds, x.device) is _length_groups(bounds, x.device)  # kept for the next layer


def naive_linear(q, k, v, log_decay, h0, scale):
    """``S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``, one token at a time."""
    B, T, H, K = q.shape
    S, out = h0.clone(), []
    for t in range(T):
        if log_decay is not None:
            decay = log_decay[:, t] if log_decay.dim() == 4 else log_decay[:, t, :, None].expand(B, H, K)
            S = S * decay.exp()[..., None]
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * scale)
    return torch.stack(out, 1), S


@pytest.mark.parametrize("variant", ["gla", "simple_gla", "linear"])
@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_linear_attention_family_matches_naive(variant, form):
    B, T, H, K, V = 2, 37, 2, 6, 5
    q, k, v = torch.randn(B, T, H, K, dtype=F64), torch.randn(B, T, H, K, dtype=F64), torch.randn(B, T, H, V, dtype=F64)
    h0 = torch.randn(B, H, K, V, dtype=F64)
    decay = {
        "gla": F.logsigmoid(torch.randn(B, T, H, K, dtype=F64)),
        "simple_gla": F.logsigmoid(torch.randn(B, T, H, dtype=F64)),
        "linear": None,
    }[variant]
    kwargs = dict(initial_state=h0, form=form, chunk_size=8, backend="torch")
    if variant == "gla":
        o, s = gated_linear_attention(q, k, v, decay, **kwargs)
    elif variant == "simple_gla":
        o, s = simple_gated_linear_attention(q, k, v, decay, **kwargs)
    else:
        o, s = linear_attention(q, k, v, **kwargs)
    o_ref, s_ref = naive_linear(q, k, v, decay, h0, K**-0.5)
    assert rel_err(o, o_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12


def test_gla_chunk_stable_with_strong_decay():
    """Per-key decays near zero (log decay -20 per token) must not overflow the chunked form."""
    B, T, H, K, V = 1, 40, 1, 4, 3
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    gk = torch.full((B, T, H, K), -20.0)
    o, s = gated_linear_attention(q, k, v, gk, chunk_size=16, backend="torch")
    o_ref, s_ref = gated_linear_attention(q, k, v, gk, form="recurrent", backend="torch")
    assert torch.isfinite(o).all() and rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


def naive_attention(q, k, v, window):
    _, T, Hq, D = q.shape
    k, v = (t.repeat_interleave(Hq // k.shape[2], dim=2) for t in (k, v))
    out = torch.empty_like(q)
    for i in range(T):
        lo = 0 if window is None else max(0, i - window + 1)
        scores = torch.einsum("bhd,bjhd->bhj", q[:, i], k[:, lo : i + 1]) * D**-0.5
        out[:, i] = torch.einsum("bhj,bjhd->bhd", scores.softmax(-1), v[:, lo : i + 1])
    return out


@pytest.mark.parametrize("window", [None, 1, 5, 100])
def test_causal_attention_matches_naive(window):
    q, k, v = (
        torch.randn(2, 23, 4, 8, dtype=F64),
        torch.randn(2, 23, 2, 8, dtype=F64),
        torch.randn(2, 23, 2, 8, dtype=F64),
    )
    assert rel_err(causal_attention(q, k, v, window=window, backend="torch"), naive_attention(q, k, v, window)) < 1e-12


def test_causal_attention_varlen_keeps_sequences_apart():
    lengths = [4, 11, 6, 11, 4]  # equal lengths run batched together
    cu = seqlens_to_cu_seqlens(lengths)
    q, k, v = (
        torch.randn(1, sum(lengths), 2, 8, dtype=F64),
        torch.randn(1, sum(lengths), 1, 8, dtype=F64),
        torch.randn(1, sum(lengths), 1, 8, dtype=F64),
    )
    out = causal_attention(q, k, v, window=5, cu_seqlens=cu, backend="torch")
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert torch.allclose(out[:, s:e], naive_attention(q[:, s:e], k[:, s:e], v[:, s:e], 5))


def test_attention_over_positions_handles_ring_order():
    """Keys in arbitrary slot order plus empty slots give the same result as ordered keys."""
    q, k, v = (
        torch.randn(1, 10, 2, 4, dtype=F64),
        torch.randn(1, 10, 2, 4, dtype=F64),
        torch.randn(1, 10, 2, 4, dtype=F64),
    )
    expected = naive_attention(q, k, v, window=4)[:, -3:]
    perm = torch.randperm(10)
    empty = torch.zeros(1, 3, 2, 4, dtype=F64)
    keys, values = torch.cat([k[:, perm], empty], 1), torch.cat([v[:, perm], empty], 1)
    positions = torch.cat([perm[None], torch.full((1, 3), -1)], 1)
    out = attention_over_positions(q[:, -3:], keys, values, torch.arange(7, 10)[None], positions, window=4)
    assert rel_err(out, expected) < 1e-12


def test_mrope_matches_transformers():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=128,
            num_attention_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
        )
    ).text_config
    position_ids = torch.randint(0, 50, (3, 2, 9))
    cos_ref, sin_ref = Qwen2_5_VLRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), position_ids)
    cos, sin = rotary_cos_sin(position_ids, 64, 1e6, [8, 12, 12])
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)


def test_short_conv_matches_naive_and_continues():
    B, T, C, W = 2, 13, 5, 4
    x, w, b = torch.randn(B, T, C, dtype=F64), torch.randn(C, W, dtype=F64), torch.randn(C, dtype=F64)
    y, state = short_conv(x, w, b, backend="torch")
    padded = F.pad(x, (0, 0, W - 1, 0))
    expected = F.silu(torch.stack([(padded[:, t : t + W] * w.T).sum(1) for t in range(T)], 1) + b)
    assert rel_err(y, expected) < 1e-12
    assert torch.equal(state, x[:, -W:].transpose(1, 2))
    y1, s1 = short_conv(x[:, :6], w, b, backend="torch")
    y2, s2 = short_conv(x[:, 6:], w, b, initial_state=s1, backend="torch")
    assert torch.allclose(torch.cat([y1, y2], 1), y) and torch.equal(s2, state)


@pytest.mark.parametrize("with_state", [False, True])
def test_packed_short_conv_equals_its_sequences_run_apart(with_state):
    """Lengths shorter than, equal to and longer than the kernel, in a packing order that is not by length."""
    lengths, C, W = [5, 1, 3, 9, 4], 6, 4
    x = torch.randn(1, sum(lengths), C, dtype=F64, requires_grad=True)
    w, b = torch.randn(C, W, dtype=F64, requires_grad=True), torch.randn(C, dtype=F64)
    h0 = torch.randn(len(lengths), C, W, dtype=F64, requires_grad=True) if with_state else None
    y, state = short_conv(x, w, b, initial_state=h0, cu_seqlens=seqlens_to_cu_seqlens(lengths), backend="torch")
    apart = [
        short_conv(piece, w, b, initial_state=None if h0 is None else h0[n : n + 1], backend="torch")
        for n, piece in enumerate(x.split(lengths, dim=1))
    ]
    assert rel_err(y, torch.cat([out for out, _ in apart], 1)) < 1e-12
    assert torch.equal(state, torch.cat([final for _, final in apart]))
    leaves = [x, w] + ([h0] if with_state else [])
    packed_grads = torch.autograd.grad((y.sin().sum() + state.cos().sum()), leaves)
    apart_loss = sum(out.sin().sum() + final.cos().sum() for out, final in apart)
    for packed, expected in zip(packed_grads, torch.autograd.grad(apart_loss, leaves), strict=True):
        assert rel_err(packed, expected) < 1e-12


def test_packed_short_conv_compiles_to_one_graph_for_every_packing():
    """Under torch.compile the PyTorch form reads nothing back to the host: one graph, and a new packing of the
    same number of sequences runs it again without recompiling."""
    C, W = 4, 4
    w = torch.randn(C, W)
    conv = torch.compile(
        lambda x, cu: short_conv(x, w, cu_seqlens=cu, backend="torch"), backend="aot_eager", fullgraph=True
    )
    x = torch.randn(1, 12, C)
    torch._dynamo.reset()
    for lengths in ([5, 4, 3], [1, 10, 1], [4, 4, 4]):
        cu = seqlens_to_cu_seqlens(lengths)
        expected, _ = short_conv(x, w, cu_seqlens=cu, backend="torch")
        with torch._dynamo.config.patch(error_on_recompile=lengths != [5, 4, 3]):
            y, _ = conv(x, cu)
        assert torch.allclose(y, expected, atol=1e-6)
    torch._dynamo.reset()


def test_ops_reject_bad_shapes_and_backends():
    q, k, v, g, beta, h0 = gdn_inputs(T=5)
    with pytest.raises(ValueError, match="beta must be"):
        gated_delta_rule(q, k, v, g, beta[:, :, :1])
    with pytest.raises(ValueError, match="initial_state must be"):
        gated_delta_rule(q, k, v, g, beta, initial_state=h0[:1])
    with pytest.raises(ValueError, match="batch size 1"):
        gated_delta_rule(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="rise strictly"):
        gated_delta_rule(q[:1], k[:1], v[:1], g[:1], beta[:1], cu_seqlens=torch.tensor([0, 3, 3, 5]))
    with pytest.raises(BackendUnavailableError, match=r"needs? a CUDA device|not installed"):
        gated_delta_rule(q, k, v, g, beta, backend="fla")
    with pytest.raises(ValueError, match="unknown backend"):
        gated_delta_rule(q, k, v, g, beta, backend="cuda")


@pytest.mark.parametrize("slots", [48, 2048])  # 2048: the weighted sum runs in blocks
def test_decode_attention_equals_attention_over_the_visible_slots(slots):
    from hybridvl.mixers.ops import attention_over_positions, decode_attention

    torch.manual_seed(0)
    q = torch.randn(2, 1, 8, 16, dtype=torch.float64)
    k, v = (torch.randn(2, slots, 2, 16, dtype=torch.float64) for _ in range(2))
    visible = torch.rand(2, slots) < 0.7
    positions = torch.where(visible, torch.arange(slots), -1)  # hidden slots look empty
    expected = attention_over_positions(q, k, v, torch.full((2, 1), slots), positions)
    assert torch.allclose(decode_attention(q, k, v, visible), expected, rtol=1e-12, atol=1e-12)


# The chunked forms against the recurrent form on fla's kind of hard cases. The reference is the recurrent form
# in float64 on the same values (drawn float32-representable) under the same random cotangents; the quantities
# are the output, the final state and the gradient of every input, each held to ``||x - ref|| / ||ref||``:
# float64 1e-9, float32 1e-5 (float32 arithmetic lands near 2e-7 here, the recurrent form run in float32 too).
BOUND = {torch.float64: 1e-9, torch.float32: 1e-5}
HUGE_DECAY = -1e4  # a log decay that wipes the state, followed by weak ones in the same chunk
HARD_CASES = ["strong_decay", "huge_then_weak", "beta_near_0", "beta_near_1", "one_token", "varlen"]


def hard_case_inputs(case, *, decay_shape="head", delta=True, T=37, chunk_size=16, B=2, H=2, K=8, V=5):
    """Inputs for ``case`` with K != V and (but for ``one_token``) T not a multiple of ``chunk_size``:
    ``(leaves, cu_seqlens)``, ``leaves`` a dict of float64 tensors holding float32 values, named as the op's
    arguments (``decay_shape``: ``"head"`` for ``g [B, T, H]``, ``"key"`` for GLA's ``gk [B, T, H, K]``)."""
    lengths = [1, 20, 16] if case == "varlen" else None  # a length-1 sequence, a full chunk, a ragged one
    B, T = (1, sum(lengths)) if lengths else (B, 1 if case == "one_token" else T)
    n = len(lengths) if lengths else B
    q, k = torch.randn(B, T, H, K, dtype=F64), F.normalize(torch.randn(B, T, H, K, dtype=F64), dim=-1)
    v, h0 = torch.randn(B, T, H, V, dtype=F64), torch.randn(n, H, K, V, dtype=F64)
    g = F.logsigmoid(torch.randn(B, T, H, *((K,) if decay_shape == "key" else ()), dtype=F64) + 2)
    if case == "strong_decay":  # every log decay below -30
        g = torch.empty_like(g).uniform_(-60.0, -30.0)
    elif case in ("huge_then_weak", "varlen"):
        g = F.logsigmoid(torch.randn_like(g) + 4)  # about -0.02
        g[:, 1::chunk_size] = HUGE_DECAY
    leaves = dict(q=q, k=k, v=v, **{"gk" if decay_shape == "key" else "g": g}, initial_state=h0)
    if delta:
        beta = torch.rand(B, T, H, dtype=F64)
        leaves["beta"] = {"beta_near_0": 1e-6 * beta, "beta_near_1": 1 - 1e-6 * beta}.get(case, beta)
    leaves = {name: t.float().double() for name, t in leaves.items()}
    return leaves, None if lengths is None else seqlens_to_cu_seqlens(lengths)


def chunk_errors(op, leaves, dtype, **kwargs):
    """Relative errors of ``op``'s chunked form in ``dtype`` against its recurrent form in float64: output,
    final state and the gradient of every leaf (``d<name>``), under the same random cotangents."""
    results = {}
    for form, dt in (("chunk", dtype), ("recurrent", F64)):
        inputs = {name: t.to(dt).requires_grad_() for name, t in leaves.items()}
        o, state = op(**inputs, form=form, backend="torch", **kwargs)
        generator = torch.Generator().manual_seed(1)
        do, dstate = (torch.randn(t.shape, generator=generator, dtype=F64).to(dt) for t in (o, state))
        grads = torch.autograd.grad((o * do).sum() + (state * dstate).sum(), list(inputs.values()))
        results[form] = dict(o=o, state=state, **{f"d{name}": grad for name, grad in zip(inputs, grads)})
    return {name: rel_err(results["chunk"][name], results["recurrent"][name]) for name in results["chunk"]}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", HARD_CASES)
def test_gated_delta_rule_chunk_matches_recurrent_on_hard_cases(case, dtype):
    """Strong decay once left ``dg`` 5e-3 (float64) and 1.0 (float32) off, and a huge decay before weak ones
    left every float32 quantity ~3e-4 off: the chunked form subtracted cumulative sums of the log decay."""
    leaves, cu_seqlens = hard_case_inputs(case)
    errors = chunk_errors(gated_delta_rule, leaves, dtype, cu_seqlens=cu_seqlens, chunk_size=16)
    assert set(errors) == {"o", "state", "dq", "dk", "dv", "dg", "dbeta", "dinitial_state"}
    assert max(errors.values()) < BOUND[dtype], errors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", ["strong_decay", "huge_then_weak", "one_token", "varlen"])
@pytest.mark.parametrize("variant", ["gla", "simple_gla"])
def test_gated_linear_attention_chunk_matches_recurrent_on_hard_cases(variant, case, dtype):
    """GLA (decay per key) and the scalar-decay form (Mamba2's SSD) under the same hard decays."""
    op, decay_shape = {
        "gla": (gated_linear_attention, "key"),
        "simple_gla": (simple_gated_linear_attention, "head"),
    }[variant]
    leaves, cu_seqlens = hard_case_inputs(case, decay_shape=decay_shape, delta=False)
    errors = chunk_errors(op, leaves, dtype, cu_seqlens=cu_seqlens, chunk_size=16)
    assert max(errors.values()) < BOUND[dtype], errors


def test_segment_sums_are_direct_and_their_gradient_stays_finite():
    from hybridvl.mixers.ops.utils import segment_sums

    g = torch.tensor([-1e4, -0.3, -0.7, -2.1], dtype=F64, requires_grad=True)
    sums = segment_sums(g)
    expected = torch.full((4, 4), float("-inf"), dtype=F64)
    for i in range(4):
        for j in range(i + 1):
            expected[i, j] = g[j + 1 : i + 1].sum()
    assert torch.equal(sums, expected)  # the segments after the huge decay keep every bit
    (grad,) = torch.autograd.grad((sums.exp() * torch.randn(4, 4, dtype=F64)).sum(), g)
    assert torch.isfinite(grad).all()


@pytest.fixture
def hopper_without_gpu(monkeypatch):
    """A CUDA device that looks like a Hopper GPU with Triton 3.6 and fla and flash-attn installed; returns a
    function that sets whether tilelang is installed."""
    import importlib.util

    from hybridvl.mixers import backends

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(backends, "triton_version", lambda: (3, 6, 0))
    monkeypatch.setattr(backends, "package_error", lambda backend: None)
    monkeypatch.setattr(backends, "_logged", set())
    monkeypatch.delenv("FLA_TILELANG", raising=False)

    def with_tilelang(installed):
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: (object() if installed else None) if name == "tilelang" else real_find_spec(name, *a),
        )

    return with_tilelang


@pytest.mark.parametrize(
    ("dtype", "window", "tilelang", "chosen"),
    [
        (torch.float32, 32, False, "torch"),  # fla's float32 attention computes in TF32: 1.1e-3 against 1e-4
        (torch.float32, 32, True, "torch"),  # tilelang's kernel does not compile for float32
        (torch.float32, None, False, "torch"),  # flash-attn takes no float32
        (torch.float64, 32, False, "torch"),
        (torch.bfloat16, 32, False, "flash_attn"),
        (torch.bfloat16, None, True, "flash_attn"),
    ],
)
def test_auto_attention_backend_meets_the_dtype_bound(hopper_without_gpu, caplog, dtype, window, tilelang, chosen):
    """``auto`` never hands float32 or float64 attention to a kernel short of their precision, and logs why;
    a kernel asked for by name still runs where it can take the dtype (decided without a GPU)."""
    from hybridvl.mixers.ops.attention import select_attention_backend

    hopper_without_gpu(tilelang)
    cuda = torch.device("cuda")
    with caplog.at_level("INFO", logger="hybridvl.mixers"):
        assert select_attention_backend("auto", cuda, dtype, window) == chosen
    (line,) = [r.getMessage() for r in caplog.records if "uses backend" in r.getMessage()]
    assert line.startswith(f"causal_attention on cuda uses backend {chosen!r}")
    if chosen == "torch":
        assert "flash_attn skipped: flash-attn takes only float16/bfloat16" in line
        assert "fla skipped:" in line or window is None  # full attention prefers SDPA to fla anyway
    if dtype == torch.float32 and window is not None:
        assert ("TF32" in line) != tilelang  # with tilelang, the refusal names the kernel that cannot compile
    if dtype == torch.float32 and tilelang:
        with pytest.raises(BackendUnavailableError, match="float32"):
            select_attention_backend("fla", cuda, dtype, window)
    else:
        assert select_attention_backend("fla", cuda, dtype, window) == "fla"
    assert select_attention_backend("auto", torch.device("cpu"), dtype, window) == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_auto_linear_backend_meets_the_dtype_bound(hopper_without_gpu, dtype):
    """The linear-attention family's ``auto``: fla only for 16-bit inputs; by name fla runs any dtype."""
    from hybridvl.mixers.backends import precision_auto_skips, select_backend

    hopper_without_gpu(True)
    cuda = torch.device("cuda")
    skips = precision_auto_skips(cuda, dtype, ("fla", "torch"))
    sixteen_bit = dtype in (torch.bfloat16, torch.float16)
    assert (skips is None) == sixteen_bit
    assert select_backend("auto", cuda, ("fla", "torch"), "gated_delta_rule", None, skips) == (
        "fla" if sixteen_bit else "torch"
    )
    assert select_backend("fla", cuda, ("fla", "torch"), "gated_delta_rule", None, skips) == "fla"
    assert precision_auto_skips(torch.device("cpu"), dtype, ("fla", "torch")) is None


def test_mixers_choose_kernels_by_the_dtype_the_kernels_see():
    """A float32 residual stream under bf16 autocast reaches the kernels as bfloat16 (the projections cast it),
    so ``auto`` judges precision by autocast's dtype there and by the input's own elsewhere."""
    from hybridvl.mixers.base import kernel_dtype

    x = torch.zeros(1, 4, 8)
    assert kernel_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernel_dtype(x) == torch.bfloat16
    assert kernel_dtype(x.double()) == torch.float64
