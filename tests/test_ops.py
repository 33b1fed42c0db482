"""The ops against plainly written references (float64 on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from mixers.backends import BackendUnavailableError
from mixers.ops import (
    attention_over_positions,
    causal_attention,
    gated_delta_rule,
    gated_linear_attention,
    linear_attention,
    rotary_cos_sin,
    short_conv,
    simple_gated_linear_attention,
)
from mixers.ops.varlen import seqlens_to_cu_seqlens

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
    from mixers.ops.varlen import _length_groups, _LengthGroups, map_sequences

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
    from mixers.ops import attention_over_positions, decode_attention

    torch.manual_seed(0)
    q = torch.randn(2, 1, 8, 16, dtype=torch.float64)
    k, v = (torch.randn(2, slots, 2, 16, dtype=torch.float64) for _ in range(2))
    visible = torch.rand(2, slots) < 0.7
    positions = torch.where(visible, torch.arange(slots), -1)  # hidden slots look empty
    expected = attention_over_positions(q, k, v, torch.full((2, 1), slots), positions)
    assert torch.allclose(decode_attention(q, k, v, visible), expected, rtol=1e-12, atol=1e-12)
