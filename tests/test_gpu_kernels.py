"""Kernel backends against the PyTorch reference on CUDA (bf16 inputs, fp32 reference on the same values).

Bounds follow the usual float rules: bf16 operands land between 1e-3 and 1e-2 relative error; fresh random
inputs for every case; NaN never passes.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from hybridvl import mixers
from hybridvl.mixers.backends import (
    BackendUnavailableError,
    fla_float32_attention_issue,
    fla_gated_backward_issue,
    triton_version,
)
from hybridvl.mixers.gated_deltanet import init_dt_bias
from hybridvl.mixers.ops import activations as activations_module
from hybridvl.mixers.ops import (
    add_rms_norm,
    causal_attention,
    gated_delta_rule,
    gated_linear_attention,
    gated_rms_norm,
    linear_attention,
    short_conv,
    simple_gated_linear_attention,
    swiglu,
)
from hybridvl.mixers.ops import norm as norm_module
from hybridvl.mixers.ops.varlen import seqlens_to_cu_seqlens
from hybridvl.models.config import HybridConfig
from hybridvl.models.hybrid import HybridVLM

pytestmark = pytest.mark.gpu
CUDA = "cuda"
BF16 = torch.bfloat16
OUT_TOL, GRAD_TOL = 1e-2, 2e-2
# gradients of per-head scalars (A_log, dt_bias, D) sum bf16 terms over every token of the batch
HEAD_SCALAR_GRAD_TOL = 3e-2


def skip_gla_where_its_compilation_stalls():
    """fla's chunked GLA kernels did not finish compiling and autotuning within 200 s on an H100 with Triton
    3.6 (two runs, 2026-11-25 and 2026-11-26); skip rather than hang the suite there."""
    version = triton_version()
    if torch.cuda.get_device_capability()[0] == 9 and version < (3, 7, 1):
        pytest.skip(f"fla chunk_gla compilation stalls on Hopper with Triton {'.'.join(map(str, version))}")


def leaves(*tensors):
    """bf16 copies for the kernel and fp32 copies of the same values for the reference, all requiring grad."""
    low = [t.to(BF16).detach().requires_grad_() for t in tensors]
    high = [t.detach().float().requires_grad_() for t in low]
    return low, high


def compare(fn, low, high, kernel_backend, gated=None):
    """Run fn on both, backprop the same random cotangents, return the max relative errors.

    With ``gated`` (fla's gated chunk kernel the function runs), where fla cannot run that kernel's backward
    here, check the forward, check that asking for the backward raises the documented error, and skip the
    gradient comparison.
    """
    issue = fla_gated_backward_issue(torch.device(CUDA), gated) if gated else None
    if issue:
        with torch.no_grad():
            out_k, out_r = fn(*low, backend=kernel_backend), fn(*high, backend="torch")
        out_k, out_r = (o if isinstance(o, tuple) else (o,) for o in (out_k, out_r))
        assert max(rel_err(a, b) for a, b in zip(out_k, out_r)) < OUT_TOL
        with pytest.raises(mixers.BackendUnavailableError, match="#640"):
            fn(*low, backend=kernel_backend)
        pytest.skip(f"forward checked; backward not run: {issue}")
    out_k = fn(*low, backend=kernel_backend)
    out_r = fn(*high, backend="torch")
    out_k, out_r = (o if isinstance(o, tuple) else (o,) for o in (out_k, out_r))
    cotangents = [torch.randn_like(r) for r in out_r]
    torch.autograd.backward([o.float() for o in out_k], cotangents)
    torch.autograd.backward(list(out_r), cotangents)
    out_err = max(rel_err(a, b) for a, b in zip(out_k, out_r))
    grad_err = max(rel_err(a.grad, b.grad) for a, b in zip(low, high) if b.grad is not None)
    return out_err, grad_err


def gdn_tensors(B, T, H=4, K=64, V=128, N=None):
    N = B if N is None else N
    q = torch.randn(B, T, H, K, device=CUDA)
    k = F.normalize(torch.randn(B, T, H, K, device=CUDA), dim=-1)
    v = torch.randn(B, T, H, V, device=CUDA)
    g = F.logsigmoid(torch.randn(B, T, H, device=CUDA) + 3)
    beta = torch.rand(B, T, H, device=CUDA)
    h0 = torch.randn(N, H, K, V, device=CUDA) * 0.1
    return q, k, v, g, beta, h0


@pytest.mark.parametrize("T", [1000, 16384])
def test_gated_delta_rule_fla_matches_torch(T):
    low, high = leaves(*gdn_tensors(1 if T > 4096 else 2, T))

    def fn(q, k, v, g, beta, h0, backend):
        # fla takes the log decay and the state in fp32
        return gated_delta_rule(q, k, v, g.float(), beta, initial_state=h0.float(), backend=backend)

    out_err, grad_err = compare(fn, low, high, "fla", gated="gated_delta_rule")
    assert out_err < OUT_TOL and grad_err < GRAD_TOL, (out_err, grad_err)


def test_gated_delta_rule_fla_varlen_and_recurrent_form():
    lengths = [100, 1, 777, 64, 2000]
    q, k, v, g, beta, h0 = gdn_tensors(1, sum(lengths), N=len(lengths))
    cu = seqlens_to_cu_seqlens(lengths, device=CUDA)
    args = [t.to(BF16) for t in (q, k, v)] + [g, beta.to(BF16)]
    o_k, s_k = gated_delta_rule(*args, initial_state=h0, cu_seqlens=cu, use_qk_l2norm=True, backend="fla")
    o_r, s_r = gated_delta_rule(
        *(t.float() for t in args), initial_state=h0, cu_seqlens=cu, use_qk_l2norm=True, backend="torch"
    )
    assert rel_err(o_k, o_r) < OUT_TOL and rel_err(s_k, s_r) < OUT_TOL
    short = [t[:, :16] for t in args]
    o_k, s_k = gated_delta_rule(*short, initial_state=h0[:1], form="recurrent", backend="fla")
    o_r, s_r = gated_delta_rule(*(t.float() for t in short), initial_state=h0[:1], backend="torch")
    assert rel_err(o_k, o_r) < OUT_TOL and rel_err(s_k, s_r) < OUT_TOL


def gdn_raw_gates(B, T, H=4):
    """Gated DeltaNet's raw gates: the decay's pre-activation ``a``, the write strength's logits ``b``, and the
    per-head ``A_log`` and ``dt_bias`` (D's initialisation ranges)."""
    a, b = torch.randn(B, T, H, device=CUDA) * 2, torch.randn(B, T, H, device=CUDA) * 2
    A_log = torch.log(torch.empty(H, device=CUDA).uniform_(1, 16))
    dt_bias = init_dt_bias(H).to(CUDA)
    return a, b, A_log, dt_bias


@pytest.mark.parametrize("varlen", [False, True])
def test_gated_delta_rule_fla_gates_in_kernel_match_torch(varlen):
    """The decay ``-exp(A_log) softplus(a + dt_bias)`` and ``beta = sigmoid(b)`` computed inside fla's chunked
    kernels from bf16 projections (``A_log`` and ``dt_bias`` float32 parameters, as under bf16 autocast), against
    the PyTorch form in fp32 on the same values: outputs, final states, and the gradients of every input,
    ``A_log`` and ``dt_bias`` included."""
    lengths = [700, 1, 64, 1235] if varlen else [2000]
    cu = seqlens_to_cu_seqlens(lengths, device=CUDA) if varlen else None
    q, k, v, _, _, h0 = gdn_tensors(1, sum(lengths), N=len(lengths))
    a, b, A_log, dt_bias = gdn_raw_gates(1, sum(lengths))
    low = [t.to(BF16).requires_grad_() for t in (q, k, v, a, b)]
    low += [t.clone().requires_grad_() for t in (A_log, dt_bias)]  # float32 parameters
    high = [t.detach().float().requires_grad_() for t in low]
    issue = fla_gated_backward_issue(torch.device(CUDA), "gated_delta_rule")

    def run(q, k, v, a, b, A_log, dt_bias, backend):
        gates = dict(A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid=True)
        return gated_delta_rule(
            q, k, v, a, b, initial_state=h0, cu_seqlens=cu, use_qk_l2norm=True, **gates, backend=backend
        )

    if issue:
        with torch.no_grad():
            (o_k, s_k), (o_r, s_r) = run(*low, "fla"), run(*high, "torch")
        assert rel_err(o_k, o_r) < OUT_TOL and rel_err(s_k, s_r) < OUT_TOL
        pytest.skip(f"forward checked; backward not run: {issue}")
    (o_k, s_k), (o_r, s_r) = run(*low, "fla"), run(*high, "torch")
    assert rel_err(o_k, o_r) < OUT_TOL and rel_err(s_k, s_r) < OUT_TOL, (rel_err(o_k, o_r), rel_err(s_k, s_r))
    cotangents = torch.randn_like(o_r), torch.randn_like(s_r)
    torch.autograd.backward([o_k.float(), s_k], cotangents)
    torch.autograd.backward([o_r, s_r], cotangents)
    for name, t_k, t_r in zip(["q", "k", "v", "a", "b", "A_log", "dt_bias"], low, high):
        bound = HEAD_SCALAR_GRAD_TOL if name in ("A_log", "dt_bias") else GRAD_TOL
        assert rel_err(t_k.grad, t_r.grad) < bound, (name, rel_err(t_k.grad, t_r.grad))


def test_gated_delta_rule_fla_recurrent_gates_in_kernel_match_torch():
    """fla's token loop with the decay and ``beta`` computed per step in the kernel (decoding; no backward),
    packed sequences continuing from states."""
    lengths = [5, 1, 17]
    cu = seqlens_to_cu_seqlens(lengths, device=CUDA)
    q, k, v, _, _, h0 = gdn_tensors(1, sum(lengths), N=len(lengths))
    a, b, A_log, dt_bias = gdn_raw_gates(1, sum(lengths))
    gates = dict(A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid=True)
    common = dict(initial_state=h0, cu_seqlens=cu, use_qk_l2norm=True, form="recurrent", **gates)
    low = [t.to(BF16) for t in (q, k, v, a, b)]
    o_k, s_k = gated_delta_rule(*low, **common, backend="fla")
    o_r, s_r = gated_delta_rule(*(t.float() for t in low), **common, backend="torch")
    assert rel_err(o_k, o_r) < OUT_TOL and rel_err(s_k, s_r) < OUT_TOL


@pytest.mark.parametrize(
    ("shape", "norm_before_gate", "group_size"),
    [
        ((2, 1000, 8, 256), True, None),  # D: per head, head_v_dim 256 (fla's multi-row kernel, D <= 512)
        ((1, 3000, 4, 64), True, None),  # G: per head, 64
        ((2, 1000, 1024), True, None),  # one wide row (fla's one-row kernel, D > 512)
        ((2, 1000, 2048), False, 1024),  # M: gate first, two groups
        ((1, 3000, 512), False, 512),  # M: gate first, one group
    ],
)
def test_gated_rms_norm_fla_matches_torch(shape, norm_before_gate, group_size):
    """fla's fused gated RMSNorm (bf16 input and gate, float32 weight as under bf16 autocast) against the
    PyTorch form in fp32 on the same values, forward and the gradients of input, gate and weight."""
    x, gate = torch.randn(shape, device=CUDA), torch.randn(shape, device=CUDA) * 2
    weight = torch.rand(shape[-1], device=CUDA) + 0.5
    low = [x.to(BF16).requires_grad_(), gate.to(BF16).requires_grad_(), weight.clone().requires_grad_()]
    high = [t.detach().float().requires_grad_() for t in low]
    options = dict(eps=1e-6, norm_before_gate=norm_before_gate, group_size=group_size)
    y_k = gated_rms_norm(*low, **options, backend="fla")
    y_r = gated_rms_norm(*high, **options, backend="torch")
    assert y_k.dtype == BF16 and rel_err(y_k, y_r) < OUT_TOL
    cotangent = torch.randn_like(y_r)
    y_k.float().backward(cotangent)
    y_r.backward(cotangent)
    for name, t_k, t_r in zip(["x", "gate", "weight"], low, high):
        assert t_k.grad.dtype == t_k.dtype, name
        assert rel_err(t_k.grad, t_r.grad) < GRAD_TOL, (name, rel_err(t_k.grad, t_r.grad))


def test_gated_rms_norm_fla_float32_matches_torch():
    """float32 in: fla's kernel computes in float32 throughout (no dot products), so it meets the float32 bound
    and ``auto`` runs it."""
    x, gate = torch.randn(2, 500, 4, 128, device=CUDA), torch.randn(2, 500, 4, 128, device=CUDA)
    weight = torch.rand(128, device=CUDA) + 0.5
    for options in (dict(norm_before_gate=True), dict(norm_before_gate=False, group_size=64)):
        ref = gated_rms_norm(x, gate, weight, **options, backend="torch")
        assert rel_err(gated_rms_norm(x, gate, weight, **options, backend="fla"), ref) < 1e-5, options


@pytest.mark.parametrize("D", [2048, 256])  # the 3B hidden size (fla's one-row kernel, D > 512); rows in blocks
@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_add_rms_norm_fla_matches_torch(D, precision):
    """fla's fused residual add + RMSNorm against the PyTorch form in fp32 on the same values: the norm, and the
    gradients of the block output, the stream and the weight through both outputs. ``bf16``: everything bf16
    (inference); ``autocast``: a bf16 block output onto a float32 stream with a float32 weight (bf16-mixed
    training). Dtypes are the unfused form's, and the new stream equals its add bit for bit."""
    x, residual = torch.randn(4, 1000, D, device=CUDA), torch.randn(4, 1000, D, device=CUDA) * 4
    weight = torch.rand(D, device=CUDA) + 0.5
    stream = BF16 if precision == "bf16" else torch.float32
    low = [x.to(BF16).requires_grad_(), residual.to(stream).requires_grad_(), weight.to(stream).requires_grad_()]
    high = [t.detach().float().requires_grad_() for t in low]
    y_k, h_k = add_rms_norm(*low, backend="fla")
    with torch.no_grad():
        y_t, h_t = add_rms_norm(*low, backend="torch")
    assert (y_k.dtype, h_k.dtype) == (y_t.dtype, h_t.dtype) == (stream, stream)
    assert torch.equal(h_k, h_t)
    y_r, h_r = add_rms_norm(*high, backend="torch")
    assert rel_err(y_k, y_r) < OUT_TOL
    cotangents = torch.randn_like(y_r), torch.randn_like(h_r)
    torch.autograd.backward([y_k.float(), h_k.float()], cotangents)
    torch.autograd.backward([y_r, h_r], cotangents)
    for name, t_k, t_r in zip(["x", "residual", "weight"], low, high):
        assert t_k.grad.dtype == t_k.dtype, name
        assert rel_err(t_k.grad, t_r.grad) < GRAD_TOL, (name, rel_err(t_k.grad, t_r.grad))


@pytest.mark.parametrize("width", [11008, 1376])  # the 3B MLP width; a small one
def test_swiglu_fla_matches_torch(width):
    """fla's fused SwiGLU on the two bf16 halves of one gate/up projection (read in place) against the PyTorch form
    in fp32 on the same values, forward and the projection's gradient."""
    gate_up = torch.randn(2, 2000, 2 * width, device=CUDA) * 3
    low, high = gate_up.to(BF16).requires_grad_(), gate_up.to(BF16).float().requires_grad_()
    z_k = swiglu(*low.chunk(2, dim=-1), backend="fla")
    z_r = swiglu(*high.chunk(2, dim=-1), backend="torch")
    assert z_k.dtype == BF16 and rel_err(z_k, z_r) < OUT_TOL
    cotangent = torch.randn_like(z_r)
    z_k.float().backward(cotangent)
    z_r.backward(cotangent)
    assert low.grad.dtype == BF16 and rel_err(low.grad, high.grad) < GRAD_TOL


def test_layer_glue_fla_float32_matches_torch():
    """float32 in: fla's add + RMSNorm and SwiGLU compute in float32 throughout (no dot products), so they meet
    the float32 bound and ``auto`` runs them."""
    x, residual = torch.randn(2, 500, 2048, device=CUDA), torch.randn(2, 500, 2048, device=CUDA)
    weight = torch.rand(2048, device=CUDA) + 0.5
    fused = add_rms_norm(x, residual, weight, backend="fla")
    for a, b in zip(fused, add_rms_norm(x, residual, weight, backend="torch")):
        assert rel_err(a, b) < 1e-5
    gate, up = torch.randn(2, 500, 2 * 11008, device=CUDA).chunk(2, dim=-1)
    assert rel_err(swiglu(gate, up, backend="fla"), swiglu(gate, up, backend="torch")) < 1e-5


def glue_train_step(model: HybridVLM, ids: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and all parameter gradients (flattened, float32) of a next-token cross-entropy step."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(CUDA, dtype=BF16, enabled=autocast):
        logits = model(ids).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    return logits.float(), torch.cat([p.grad.float().flatten() for p in model.parameters()])


def test_decoder_glue_on_fla_trains_as_in_pytorch(monkeypatch):
    """A decoder whose residual adds, norms and SwiGLUs run fla's kernels (``auto``) against the same decoder with
    that glue in PyTorch, over a training step with selective checkpointing. float32: the two agree to float32
    rounding. bf16 weights, and float32 weights under bf16 autocast (bf16-mixed training): the whole model's bf16
    error against the float32 run is the same with either glue (the fused glue rounds less), so the fused run is
    held to the unfused run's distance."""
    torch.manual_seed(0)
    config = HybridConfig(
        layout="S,D,S,D",
        vocab_size=1000,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        mrope_section=None,
        sliding_window=256,
        mixer_options={"D": dict(num_heads=4, head_dim=64)},
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = HybridVLM(config).to(CUDA).train()
    model.language_model.gradient_checkpointing = "mlp,S"
    models = {"float32": model, "autocast": model, "bf16": copy.deepcopy(model).to(BF16)}
    ids = torch.randint(1, 1000, (2, 700), device=CUDA)
    fla_calls = []
    fla_add_rms_norm = norm_module._fla_add_rms_norm
    monkeypatch.setattr(norm_module, "_fla_add_rms_norm", lambda *args: fla_calls.append(1) or fla_add_rms_norm(*args))
    skip = {"fla": "the PyTorch form, for reference"}
    runs = {}
    for precision, glue in itertools.product(models, ["fla", "torch"]):
        with monkeypatch.context() as patch:
            if glue == "torch":
                patch.setattr(norm_module, "elementwise_auto_skips", lambda dtype: skip)
                patch.setattr(activations_module, "elementwise_auto_skips", lambda dtype: skip)
            fla_calls.clear()
            runs[precision, glue] = glue_train_step(models[precision], ids, autocast=precision == "autocast")
            assert bool(fla_calls) == (glue == "fla"), (precision, glue)
    reference = runs["float32", "torch"]
    for fused, plain in zip(runs["float32", "fla"], reference):
        assert rel_err(fused, plain) < 1e-4
    for precision in ("bf16", "autocast"):
        for fused, plain, exact in zip(runs[precision, "fla"], runs[precision, "torch"], reference):
            assert rel_err(fused, exact) < 1.1 * rel_err(plain, exact), (precision, rel_err(fused, exact))


def test_gated_deltanet_decodes_through_the_fused_step(monkeypatch):
    """A D layer's single-token calls on fla run the token loop with the gates inside fla's kernel (one kernel),
    its prompts the chunked kernel; the decoded outputs match the PyTorch backend."""
    from hybridvl.mixers import gated_deltanet

    calls, rule = [], gated_deltanet.gated_delta_rule

    def counted(*args, **kwargs):
        if kwargs["form"] == "recurrent" and kwargs["A_log"] is not None:
            calls.append(1)
        return rule(*args, **kwargs)

    monkeypatch.setattr(gated_deltanet, "gated_delta_rule", counted)
    kernel = mixers.build_mixer("D", 512, head_dim=128).to(CUDA)
    reference = mixers.build_mixer("D", 512, head_dim=128, backend="torch").to(CUDA)
    reference.load_state_dict(kernel.state_dict())
    kernel.to(BF16)
    x = torch.randn(2, 300, 512, device=CUDA)
    with torch.no_grad():
        _, state_k = kernel(x.to(BF16))
        _, state_r = reference(x)
        assert not calls
        for _ in range(16):
            x_t = torch.randn(2, 1, 512, device=CUDA)
            y_k, state_k = kernel(x_t.to(BF16), state_k)
            y_r, state_r = reference(x_t, state_r)
            assert rel_err(y_k, y_r) < OUT_TOL
    assert len(calls) == 16 and kernel.last_backend == "fla"
    assert rel_err(state_k.recurrent, state_r.recurrent) < OUT_TOL


def decode_token(N: int):
    """Random bf16 q, k, v of one token per sequence at Qwen2.5-VL-3B's attention shape (16 query heads on 2 KV
    heads, head dim 128)."""
    return torch.randn(N, 1, 16, 128, device=CUDA).to(BF16), *(
        torch.randn(N, 1, 2, 128, device=CUDA).to(BF16) for _ in range(2)
    )


def decode_cache(N: int, slots: int):
    """A random bf16 key and value cache for :func:`decode_token`'s shape."""
    return (torch.randn(N, slots, 2, 128, device=CUDA).to(BF16) for _ in range(2))


@pytest.mark.parametrize(
    ("slots", "lengths"),
    [(8192, [0, 5000, 8191, 8192, 50_001]), (1 << 17, [100_000, 3])],  # ring buffers (wrapped); a growing cache
)
def test_decode_attention_step_matches_reference(slots, lengths):
    """The Triton write + split-K attention against the PyTorch step, bf16 at the 3B shape (16 query heads on 2
    KV heads, head dim 128): output, every cache slot and the advanced lengths."""
    from hybridvl.mixers.ops.decode_attention import decode_attention_step, decode_attention_step_reference

    (q, k, v), (key, value) = decode_token(len(lengths)), decode_cache(len(lengths), slots)
    length = torch.tensor(lengths, device=CUDA)
    key_ref, value_ref, length_ref = key.float(), value.float(), length.clone()
    o = decode_attention_step(q, k, v, key, value, length)
    o_ref = decode_attention_step_reference(q.float(), k.float(), v.float(), key_ref, value_ref, length_ref)
    assert o.dtype == BF16 and rel_err(o, o_ref) < OUT_TOL
    assert torch.equal(key.float(), key_ref) and torch.equal(value.float(), value_ref)
    assert torch.equal(length, length_ref)


def test_decode_attention_step_graph_equals_eager_over_1000_steps():
    """The step captured in a CUDA graph and replayed 1,000 times over a ring buffer of 256 slots (it wraps
    about four times) gives the eager kernel's outputs and cache exactly, and the reference's to bf16 bounds."""
    from hybridvl.mixers.ops.decode_attention import decode_attention_step, decode_attention_step_reference

    steps, slots = 1000, 256
    (q, k, v), (key, value) = decode_token(2), decode_cache(2, slots)
    length = torch.zeros(2, dtype=torch.long, device=CUDA)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention_step(q, k, v, key, value, length)  # compiles the kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_step(q, k, v, key, value, length)
    length.copy_(torch.tensor([0, 37], device=CUDA))  # the second sequence wraps first
    eager = [key.clone(), value.clone(), length.clone()]
    reference = [key.float(), value.float(), length.clone()]
    for step in range(steps):
        inputs = decode_token(2)
        for static, new in zip((q, k, v), inputs):
            static.copy_(new)
        graph.replay()
        o_eager = decode_attention_step(*inputs, *eager)
        o_ref = decode_attention_step_reference(*(t.float() for t in inputs), *reference)
        assert torch.equal(out, o_eager), step
        assert rel_err(out, o_ref) < OUT_TOL, step
    assert torch.equal(key, eager[0]) and torch.equal(value, eager[1]) and torch.equal(length, eager[2])
    assert torch.equal(length, torch.tensor([steps, steps + 37], device=CUDA))


@pytest.mark.parametrize("variant", ["gla", "simple_gla", "linear"])
@pytest.mark.parametrize("T", [2048, 16384])
def test_linear_attention_family_fla_matches_torch(variant, T):
    if variant == "gla":
        skip_gla_where_its_compilation_stalls()
    B, H, K, V = 1, 4, 64, 64
    q, k, v = (torch.randn(B, T, H, d, device=CUDA) * 0.5 for d in (K, K, V))
    if variant == "linear":  # no decay: keep the state bounded with normalised keys
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1) * 0.1
    h0 = torch.randn(B, H, K, V, device=CUDA) * 0.1
    low, high = leaves(q, k, v)
    if variant == "gla":
        g = F.logsigmoid(torch.randn(B, T, H, K, device=CUDA)) / 16

        def fn(q, k, v, backend):
            return gated_linear_attention(q, k, v, g, initial_state=h0, backend=backend)
    elif variant == "simple_gla":
        g = F.logsigmoid(torch.randn(B, T, H, device=CUDA) + 3)

        def fn(q, k, v, backend):
            return simple_gated_linear_attention(q, k, v, g, initial_state=h0, backend=backend)
    else:

        def fn(q, k, v, backend):
            return linear_attention(q, k, v, initial_state=h0, backend=backend)

    out_err, grad_err = compare(fn, low, high, "fla", gated="simple_gla" if variant == "simple_gla" else None)
    assert out_err < OUT_TOL and grad_err < GRAD_TOL, (out_err, grad_err)


@pytest.mark.parametrize(("variant", "form"), [("linear", "chunk"), ("linear", "recurrent"), ("gla", "chunk")])
def test_linear_attention_fla_odd_widths(variant, form):
    """Odd key and value widths (L's normaliser column makes its value width odd), packed, with a state: fla's
    chunked backward takes only even widths in bf16, so they run padded with a zero column."""
    if variant == "gla":
        skip_gla_where_its_compilation_stalls()
    lengths = [300, 1, 700]
    cu = seqlens_to_cu_seqlens(lengths, device=CUDA)
    T, H, K, V = sum(lengths), 4, 63, 129
    q, k = (
        F.normalize(torch.randn(1, T, H, K, device=CUDA), dim=-1),
        F.normalize(torch.randn(1, T, H, K, device=CUDA), dim=-1) * 0.1,
    )
    v = torch.randn(1, T, H, V, device=CUDA) * 0.5
    h0 = torch.randn(len(lengths), H, K, V, device=CUDA) * 0.1
    g = F.logsigmoid(torch.randn(1, T, H, K, device=CUDA)) / 16
    low, high = leaves(q, k, v)

    def fn(q, k, v, backend):
        common = dict(initial_state=h0, cu_seqlens=cu, form=form, backend=backend)
        if variant == "gla":
            return gated_linear_attention(q, k, v, g, **common)
        return linear_attention(q, k, v, **common)

    out_err, grad_err = compare(fn, low, high, "fla")
    assert out_err < OUT_TOL and grad_err < GRAD_TOL, (out_err, grad_err)


@pytest.mark.parametrize("window", [None, 256])
@pytest.mark.parametrize("T", [128, 4096])
def test_causal_attention_fla_matches_torch(window, T):
    q = torch.randn(2, T, 8, 128, device=CUDA)
    k, v = torch.randn(2, T, 2, 128, device=CUDA), torch.randn(2, T, 2, 128, device=CUDA)
    low, high = leaves(q, k, v)

    def fn(q, k, v, backend):
        return causal_attention(q, k, v, window=window, backend=backend)

    out_err, grad_err = compare(fn, low, high, "fla")
    assert out_err < OUT_TOL and grad_err < GRAD_TOL, (out_err, grad_err)


def test_causal_attention_float32_on_fla():
    """float32 attention: ``auto`` runs PyTorch's (fla's kernel computes float32 in TF32, 1.1e-3 off where 1e-4
    is the bound); ``backend="fla"`` runs fla where it can take float32, and where it cannot (tilelang's kernel
    on Hopper) names the problem."""
    from hybridvl.mixers.ops.attention import select_attention_backend

    q, k, v = (torch.randn(1, 300, h, 64, device=CUDA) for h in (4, 2, 2))
    ref = causal_attention(q, k, v, window=32, backend="torch")
    assert select_attention_backend("auto", q.device, q.dtype, 32) == "torch"
    assert rel_err(causal_attention(q, k, v, window=32), ref) < 1e-4
    if fla_float32_attention_issue(q.device, q.dtype):
        with pytest.raises(BackendUnavailableError, match="float32"):
            causal_attention(q, k, v, window=32, backend="fla")
    else:
        assert rel_err(causal_attention(q, k, v, window=32, backend="fla"), ref) < 5e-3  # Triton dots in TF32


def test_causal_attention_fla_varlen():
    lengths = [300, 5, 1200]
    cu = seqlens_to_cu_seqlens(lengths, device=CUDA)
    q, k, v = (torch.randn(1, sum(lengths), h, 64, device=CUDA, dtype=BF16) for h in (4, 2, 2))
    out = causal_attention(q, k, v, window=128, cu_seqlens=cu, backend="fla")
    ref = causal_attention(q.float(), k.float(), v.float(), window=128, cu_seqlens=cu, backend="torch")
    assert rel_err(out, ref) < OUT_TOL


def test_short_conv_fla_matches_torch_with_state_and_varlen():
    lengths = [50, 3, 400]
    cu = seqlens_to_cu_seqlens(lengths, device=CUDA)
    x = torch.randn(1, sum(lengths), 256, device=CUDA, dtype=BF16)
    w = torch.randn(256, 4, device=CUDA, dtype=BF16) * 0.5
    state = torch.randn(3, 256, 4, device=CUDA, dtype=BF16)
    y_k, s_k = short_conv(x, w, initial_state=state, cu_seqlens=cu, backend="fla")
    y_r, s_r = short_conv(x.float(), w.float(), initial_state=state.float(), cu_seqlens=cu, backend="torch")
    assert rel_err(y_k, y_r) < OUT_TOL and rel_err(s_k, s_r) < OUT_TOL


MIXER_OPTIONS = {
    "D": dict(num_heads=4, head_dim=64),
    "S": dict(num_heads=8, num_kv_heads=2, window=512),
    "A": dict(num_heads=8, num_kv_heads=2),
    "M": dict(d_state=64, headdim=64),
    "G": dict(num_heads=4),
    "L": dict(num_heads=4, head_dim=64),
    # option variants, "<letter>-<variant>" (as in test_mixers.py)
    "L-textbook": dict(num_heads=4, head_dim=64, **mixers.LinearAttention.TEXTBOOK),
    "G-conv": dict(num_heads=4, conv_size=4),
}


def build(kind: str, hidden: int, **options) -> torch.nn.Module:
    """The mixer of a ``MIXER_OPTIONS`` key (``"L-textbook"`` builds ``L`` with its options)."""
    return mixers.build_mixer(kind.split("-")[0], hidden, **MIXER_OPTIONS[kind], **options)


@pytest.mark.parametrize("kind", ["S", "A"])
def test_attention_mixers_run_float32_on_cuda(kind):
    """An fp32 model on CUDA (e.g. evaluated at full precision) runs its attention layers under ``auto`` wherever
    fla's kernel cannot take float32, packed, matching the PyTorch backend."""
    hidden = 256
    module = build(kind, hidden).to(CUDA)
    reference = build(kind, hidden, backend="torch").to(CUDA)
    reference.load_state_dict(module.state_dict())
    cu = seqlens_to_cu_seqlens([300, 700], device=CUDA)
    x = torch.randn(1, 1000, hidden, device=CUDA)
    with torch.no_grad():
        assert rel_err(module(x, cu_seqlens=cu)[0], reference(x, cu_seqlens=cu)[0]) < 5e-3  # TF32 dots


@pytest.mark.parametrize("kind", list(MIXER_OPTIONS))
def test_mixer_kernel_path_matches_torch(kind):
    """The whole module with the default (auto) backend in bf16 against the PyTorch backend in fp32 on the
    same weights: packed forward and states, training gradients, then continuing token by token."""
    letter = kind.split("-")[0]
    if letter == "G":
        skip_gla_where_its_compilation_stalls()
    hidden = 512
    kernel = build(kind, hidden).to(CUDA)
    reference = build(kind, hidden, backend="torch").to(CUDA)
    reference.load_state_dict(kernel.state_dict())
    kernel.to(BF16)
    lengths = [700, 33, 1500]
    cu = seqlens_to_cu_seqlens(lengths, device=CUDA)
    x = torch.randn(1, sum(lengths), hidden, device=CUDA).to(BF16)
    with torch.no_grad():
        y_k, state_k = kernel(x, cu_seqlens=cu)
        y_r, state_r = reference(x.float(), cu_seqlens=cu)
    assert rel_err(y_k, y_r) < OUT_TOL
    assert kernel.last_backend in kernel.backends and reference.last_backend == "torch"
    tensors_k = [state_k.key, state_k.value] if letter in "SA" else [state_k.recurrent, *state_k.conv.values()]
    tensors_r = [state_r.key, state_r.value] if letter in "SA" else [state_r.recurrent, *state_r.conv.values()]
    for a, b in zip(tensors_k, tensors_r):
        assert rel_err(a, b) < OUT_TOL

    x_low, x_high = x.clone().requires_grad_(), x.float().requires_grad_()
    y_k, _ = kernel(x_low, cu_seqlens=cu)
    y_r, _ = reference(x_high, cu_seqlens=cu)
    cotangent = torch.randn_like(y_r)
    y_k.float().backward(cotangent)
    y_r.backward(cotangent)
    assert rel_err(x_low.grad, x_high.grad) < GRAD_TOL
    for (name, p_k), p_r in zip(kernel.named_parameters(), reference.parameters()):
        bound = HEAD_SCALAR_GRAD_TOL if p_k.dim() == 1 and p_k.numel() <= 64 else GRAD_TOL
        assert rel_err(p_k.grad, p_r.grad) < bound, name

    with torch.no_grad():
        steps = torch.randn(3, 8, hidden, device=CUDA)
        outs_k, outs_r = [], []
        for t in range(8):
            y_t, state_k = kernel(steps[:, t : t + 1].to(BF16), state_k)
            outs_k.append(y_t)
            y_t, state_r = reference(steps[:, t : t + 1], state_r)
            outs_r.append(y_t)
    assert rel_err(torch.cat(outs_k, 1), torch.cat(outs_r, 1)) < OUT_TOL


def test_mamba2_mamba_ssm_backend_matches_torch():
    pytest.importorskip("mamba_ssm.ops.triton.ssd_combined")
    options = MIXER_OPTIONS["M"]
    kernel = mixers.build_mixer("M", 512, backend="mamba_ssm", **options).to(CUDA)
    reference = mixers.build_mixer("M", 512, backend="torch", **options).to(CUDA)
    reference.load_state_dict(kernel.state_dict())
    x = torch.randn(2, 1000, 512, device=CUDA)
    y_k, s_k = kernel(x)
    y_r, s_r = reference(x)
    assert rel_err(y_k, y_r) < 1e-2 and rel_err(s_k.recurrent, s_r.recurrent) < 1e-2
