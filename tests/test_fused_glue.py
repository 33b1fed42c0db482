"""The glue on fla's fused kernels, checked without a GPU: the mixers' gated RMSNorm and Gated DeltaNet's gates
(decay and write strength) handed to fla raw, the decoder layer's residual adds inside its RMSNorms and its SwiGLU;
which backend each call chooses and that every fallback is logged, the PyTorch forms against the formulas (float64),
and fla's kernels themselves run by Triton's interpreter at tiny shapes. Their accuracy on a GPU, forward and
backward, is tested in ``test_gpu_kernels.py``."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err

from hybridvl import mixers
from hybridvl.mixers import backends
from hybridvl.mixers.backends import BackendUnavailableError
from hybridvl.mixers.modules import GatedRMSNorm, RMSNorm
from hybridvl.mixers.ops import activations as activations_module
from hybridvl.mixers.ops import add_rms_norm, gated_delta_rule, gated_rms_norm, short_conv, swiglu
from hybridvl.mixers.ops import norm as norm_module
from hybridvl.models.config import HybridConfig
from hybridvl.models.hybrid import HybridVLM

# the modules, which the package's functions of the same names hide
gdr_module = importlib.import_module("hybridvl.mixers.ops.gated_delta_rule")
short_conv_module = importlib.import_module("hybridvl.mixers.ops.short_conv")
F64 = torch.float64
ROOT = Path(__file__).parent.parent


def norm_formula(x, gate, weight, eps, norm_before_gate, group_size):
    """The gated RMSNorm written out: ``x / sqrt(mean(x^2) + eps)`` per group, the weight, the SiLU gate."""
    silu = gate * torch.sigmoid(gate)
    if not norm_before_gate:
        x = x * silu
    groups = x.unflatten(-1, (-1, group_size))
    y = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight
    return y * silu if norm_before_gate else y


@pytest.fixture
def kernels_run_here(monkeypatch):
    """Every backend counts as runnable on the input's device (as on a GPU with fla installed); log lines start
    afresh."""
    monkeypatch.setattr(backends, "unavailable_reason", lambda backend, device: None)
    monkeypatch.setattr(backends, "_logged", set())


def backend_lines(caplog, owner):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{owner} on ")]


@pytest.mark.parametrize(("norm_before_gate", "group_size"), [(True, 16), (True, 4), (False, 16), (False, 8)])
def test_gated_rms_norm_matches_the_formula(norm_before_gate, group_size):
    x, gate = torch.randn(2, 5, 3, 16, dtype=F64), torch.randn(2, 5, 3, 16, dtype=F64)
    weight = torch.randn(16, dtype=F64)
    options = dict(eps=1e-6, norm_before_gate=norm_before_gate, group_size=group_size)
    y = gated_rms_norm(x, gate, weight, **options, backend="torch")
    assert rel_err(y, norm_formula(x, gate, weight, **options)) < 1e-12
    module = GatedRMSNorm(16, **options).double()
    module.weight.data.copy_(weight)
    assert torch.equal(module(x, gate), y)
    low = gated_rms_norm(x.bfloat16(), gate.bfloat16(), weight.float(), **options, backend="torch")
    assert low.dtype == torch.bfloat16  # computed in float32, returned in the input's dtype


def test_gated_rms_norm_rejects_bad_inputs():
    x, weight = torch.randn(2, 3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="gate must have x's shape"):
        gated_rms_norm(x, x[..., :4], weight)
    with pytest.raises(ValueError, match="weight must be"):
        gated_rms_norm(x, x, weight[:4])
    with pytest.raises(ValueError, match="group_size must divide"):
        gated_rms_norm(x, x, weight, group_size=3)
    with pytest.raises(BackendUnavailableError, match=r"needs? a CUDA device|not installed"):
        gated_rms_norm(x, x, weight, backend="fla")


def gdn_raw_inputs(B=2, T=21, H=3, K=8, V=16, dtype=F64):
    """``q``, ``k``, ``v``, the decay's pre-activation ``a``, the write strength's logits ``b``, ``A_log``,
    ``dt_bias`` and a state, all requiring grad."""
    tensors = (
        torch.randn(B, T, H, K, dtype=dtype),
        F.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1),
        torch.randn(B, T, H, V, dtype=dtype),
        torch.randn(B, T, H, dtype=dtype) * 2,
        torch.randn(B, T, H, dtype=dtype) * 2,
        torch.log(torch.empty(H, dtype=dtype).uniform_(1, 16)),
        torch.randn(H, dtype=dtype),
        torch.randn(B, H, K, V, dtype=dtype) * 0.1,
    )
    return [t.requires_grad_() for t in tensors]


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_gated_delta_rule_with_raw_gates_equals_the_explicit_gates(form):
    """``A_log``/``dt_bias``/``use_beta_sigmoid``: the PyTorch form computes ``g`` and ``beta`` from the raw inputs,
    giving the outputs, states and gradients (``A_log`` and ``dt_bias`` included) of the gates passed computed."""
    q, k, v, a, b, A_log, dt_bias, h0 = inputs = gdn_raw_inputs()
    common = dict(initial_state=h0, use_qk_l2norm=True, form=form, chunk_size=8, backend="torch")
    o, s = gated_delta_rule(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid=True, **common)
    g = -A_log.exp() * F.softplus(a + dt_bias)
    o_ref, s_ref = gated_delta_rule(q, k, v, g, b.sigmoid(), **common)
    assert rel_err(o, o_ref) < 1e-12 and rel_err(s, s_ref) < 1e-12
    cotangents = torch.randn_like(o), torch.randn_like(s)
    grads = torch.autograd.grad((o, s), inputs, cotangents)
    grads_ref = torch.autograd.grad((o_ref, s_ref), inputs, cotangents)
    for grad, grad_ref in zip(grads, grads_ref):
        assert rel_err(grad, grad_ref) < 1e-12


def test_gated_delta_rule_rejects_bad_gate_parameters():
    q, k, v, a, b, A_log, dt_bias, _ = gdn_raw_inputs(T=4)
    with pytest.raises(ValueError, match=r"A_log must be \[H\] = \[3\]"):
        gated_delta_rule(q, k, v, a, b, A_log=A_log[:2])
    with pytest.raises(ValueError, match=r"dt_bias must be \[H\]"):
        gated_delta_rule(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias[None])
    with pytest.raises(ValueError, match="pass A_log with it"):
        gated_delta_rule(q, k, v, a, b, dt_bias=dt_bias)


def test_gated_deltanet_equals_its_formula_with_the_gates_computed_apart():
    """``D`` hands the rule its raw projections ``a`` and ``b`` with ``A_log`` and ``dt_bias``: the same output and
    parameter gradients as computing ``g = -exp(A_log) softplus(a + dt_bias)`` and ``beta = sigmoid(b)`` first."""
    mixer = mixers.build_mixer("D", 32, num_heads=2, head_dim=8, backend="torch").double()
    x = torch.randn(2, 19, 32, dtype=F64)
    y, _ = mixer(x)
    q, k, v, a, b, gate = mixer._project(x)
    q, k, v, _ = mixer._conv_qkv(q, k, v, None, None, "torch")
    g = -mixer.A_log.exp() * F.softplus(a + mixer.dt_bias)
    o, _ = gated_delta_rule(q, k, v, g, b.sigmoid(), use_qk_l2norm=True, chunk_size=mixer.chunk_size, backend="torch")
    gate = gate.unflatten(-1, (mixer.num_heads, mixer.head_v_dim))
    normed = norm_formula(o, gate, mixer.o_norm.weight, mixer.o_norm.eps, True, mixer.head_v_dim)
    y_ref = mixer.o_proj(normed.flatten(-2))
    assert rel_err(y, y_ref) < 1e-12
    cotangent = torch.randn_like(y)
    params = [mixer.A_log, mixer.dt_bias, mixer.in_proj.weight]
    for grad, grad_ref in zip(torch.autograd.grad(y, params, cotangent), torch.autograd.grad(y_ref, params, cotangent)):
        assert rel_err(grad, grad_ref) < 1e-12


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_gated_delta_rule_hands_fla_the_raw_gates(kernels_run_here, monkeypatch, form):
    """On fla's backend the raw ``g`` and ``beta`` go to fla's kernel with ``use_gate_in_kernel``, ``A_log``,
    ``dt_bias`` and ``use_beta_sigmoid_in_kernel`` (misspelt, fla's chunked entry point would ignore them)."""
    fla_ops = pytest.importorskip("fla.ops.gated_delta_rule")
    calls = []

    def fake(q, k, v, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(v), torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3])

    name = "chunk_gated_delta_rule" if form == "chunk" else "fused_recurrent_gated_delta_rule"
    monkeypatch.setattr(fla_ops, name, fake)
    q, k, v, a, b, A_log, dt_bias, _ = (t.detach().bfloat16() for t in gdn_raw_inputs(T=4))
    gated_delta_rule(q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid=True, form=form)
    gated_delta_rule(q, k, v, a, b, form=form)
    fused, plain = calls
    assert fused["g"] is a and fused["beta"] is b and fused["A_log"] is A_log and fused["dt_bias"] is dt_bias
    assert fused["use_gate_in_kernel"] is True and fused["use_beta_sigmoid_in_kernel"] is True
    assert plain["use_gate_in_kernel"] is False and plain["use_beta_sigmoid_in_kernel"] is False
    assert plain["A_log"] is None and plain["dt_bias"] is None


def test_gradients_of_the_gate_parameters_count_for_fla_640(kernels_run_here, monkeypatch, caplog):
    """Where fla's gated backward cannot run (fla #640), a call whose only trained inputs are ``A_log`` or
    ``dt_bias`` falls back to PyTorch under ``auto`` (logged) and refuses ``backend="fla"``."""
    issue = "fla's gated chunk backward gives wrong gradients here (fla issue #640)"

    def limitations(device, *tensors):
        return {"fla": issue} if any(t is not None and t.requires_grad for t in tensors) else None

    monkeypatch.setattr(gdr_module, "gated_backward_limitations", limitations)
    monkeypatch.setattr(gdr_module, "_fla", lambda *args, **kwargs: pytest.fail("fla ran"))
    q, k, v, a, b, A_log, dt_bias, _ = (t.detach().bfloat16() for t in gdn_raw_inputs(T=4))
    for trained in ("A_log", "dt_bias"):
        parameters = {"A_log": A_log.clone(), "dt_bias": dt_bias.clone()}
        parameters[trained].requires_grad_()
        monkeypatch.setattr(backends, "_logged", set())
        with caplog.at_level("INFO", logger="hybridvl.mixers"):
            o, _ = gated_delta_rule(q, k, v, a, b, **parameters, use_beta_sigmoid=True)
        assert o.requires_grad
        assert f"uses backend 'torch' (fla skipped: {issue})" in backend_lines(caplog, "gated_delta_rule")[-1]
        with pytest.raises(BackendUnavailableError, match="#640"):
            gated_delta_rule(q, k, v, a, b, **parameters, use_beta_sigmoid=True, backend="fla")


def add_rms_norm_formula(x, residual, weight, eps):
    """The residual add and Qwen2's RMSNorm written out: ``h = residual + x``, then
    ``weight * h / sqrt(mean(h^2) + eps)``."""
    h = residual + x
    return weight * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps), h


def test_add_rms_norm_matches_the_formula_in_pytorch_dtypes():
    x, residual, weight = torch.randn(2, 5, 16, dtype=F64), torch.randn(2, 5, 16, dtype=F64), torch.randn(16, dtype=F64)
    y, h = add_rms_norm(x, residual, weight, eps=1e-6, backend="torch")
    y_ref, h_ref = add_rms_norm_formula(x, residual, weight, 1e-6)
    assert rel_err(y, y_ref) < 1e-12 and torch.equal(h, h_ref)
    module = RMSNorm(16, eps=1e-6).double()
    module.weight.data.copy_(weight)
    assert all(torch.equal(a, b) for a, b in zip(module(x, residual=residual), (y, h)))
    # as the unfused ``residual + x`` then ``weight * rms_norm``: bf16 + float32 adds in float32 (bf16-mixed training,
    # float32 stream and weights), all-bf16 stays bf16
    x16, res32, w32 = x.bfloat16(), residual.float(), weight.float()
    for res, w, dtypes in (
        (res32, w32, (torch.float32,) * 2),
        (res32.bfloat16(), w32.bfloat16(), (torch.bfloat16,) * 2),
    ):
        y, h = add_rms_norm(x16, res, w, backend="torch")
        assert (y.dtype, h.dtype) == dtypes
        assert torch.equal(h, res + x16) and torch.equal(y, w * F.rms_norm(res + x16, (16,), eps=1e-6))


def test_swiglu_matches_the_formula():
    gate, up = torch.randn(2, 5, 24, dtype=F64).chunk(2, dim=-1)
    assert rel_err(swiglu(gate, up, backend="torch"), gate * torch.sigmoid(gate) * up) < 1e-12
    assert swiglu(gate.bfloat16(), up.bfloat16()).dtype == torch.bfloat16


def test_layer_glue_rejects_bad_inputs():
    x, weight = torch.randn(2, 3, 8), torch.ones(8)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        add_rms_norm(x, x[..., :4], weight)
    with pytest.raises(ValueError, match=r"weight must be \[D\] = \[8\]"):
        add_rms_norm(x, x, weight[:4])
    with pytest.raises(ValueError, match="up must have gate's shape"):
        swiglu(x, x[:1])
    with pytest.raises(BackendUnavailableError, match=r"needs? a CUDA device|not installed"):
        add_rms_norm(x, x, weight, backend="fla")
    with pytest.raises(BackendUnavailableError, match=r"needs? a CUDA device|not installed"):
        swiglu(x, x, backend="fla")


GLUE = ["gated_rms_norm", "add_rms_norm", "swiglu", "short_conv"]
# each glue op's fla kernel: the module and the name it is called by
GLUE_KERNELS = {
    "gated_rms_norm": (norm_module, "_fla"),
    "add_rms_norm": (norm_module, "_fla_add_rms_norm"),
    "swiglu": (activations_module, "_fla"),
    "short_conv": (short_conv_module, "_fla"),
}


def run_glue(owner: str, x: torch.Tensor, backend: str = "auto") -> None:
    """The glue op ``owner`` on ``x`` ``[2, 3, 8]`` (its other inputs made from ``x``)."""
    weight = torch.ones(8)
    if owner == "gated_rms_norm":
        gated_rms_norm(x, x, weight, norm_before_gate=False, group_size=4, backend=backend)
    elif owner == "add_rms_norm":
        add_rms_norm(x, x, weight, backend=backend)
    elif owner == "swiglu":
        swiglu(x, x, backend=backend)
    else:
        short_conv(x, torch.ones(8, 4), backend=backend)


@pytest.mark.parametrize("owner", GLUE)
def test_glue_logs_its_fallback_on_the_cpu(monkeypatch, caplog, owner):
    monkeypatch.setattr(backends, "_logged", set())
    with caplog.at_level("INFO", logger="hybridvl.mixers"):
        run_glue(owner, torch.randn(2, 3, 8))
    (line,) = backend_lines(caplog, owner)
    assert line.startswith(f"{owner} on cpu uses backend 'torch' (fla skipped:")


@pytest.mark.parametrize(
    ("dtype", "backend", "compiling", "chosen"),
    [
        (torch.bfloat16, "auto", False, "fla"),
        (torch.float32, "auto", False, "fla"),  # no dot products: float32 in, float32 arithmetic
        (torch.float64, "auto", False, "torch"),  # the kernels compute in float32
        (torch.float64, "fla", False, "fla"),  # asked for by name, they run
        (torch.bfloat16, "torch", False, "torch"),
        (torch.bfloat16, "auto", True, "torch"),  # traced by torch.compile: Inductor fuses the PyTorch form
        (torch.bfloat16, "fla", True, "fla"),  # asked for by name, the kernel runs as it is in a compiled forward
    ],
)
@pytest.mark.parametrize("owner", GLUE)
def test_glue_chooses_fla_by_one_rule(kernels_run_here, monkeypatch, caplog, owner, dtype, backend, compiling, chosen):
    """Every glue op follows :func:`~hybridvl.mixers.backends.elementwise_auto_skips`: fla for 16-bit and float32
    inputs, PyTorch for float64 and inside a torch.compile trace; by name each runs what it is asked for."""
    calls = []
    module, kernel = GLUE_KERNELS[owner]
    monkeypatch.setattr(module, kernel, lambda *args: calls.append(args))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
    with caplog.at_level("INFO", logger="hybridvl.mixers"):
        run_glue(owner, torch.randn(2, 3, 8, dtype=dtype), backend)
    assert len(calls) == (chosen == "fla")
    if owner == "gated_rms_norm" and chosen == "fla":
        assert calls[0][-2:] == (False, 4)  # norm_before_gate, group_size
    if backend == "auto":
        (line,) = backend_lines(caplog, owner)
        assert line.startswith(f"{owner} on cpu uses backend {chosen!r}")
        if chosen == "torch":
            reason = (
                "under torch.compile Inductor fuses" if compiling else "its kernel computes float64 inputs in float32"
            )
            assert f"fla skipped: {reason}" in line


@pytest.mark.parametrize(
    ("x_dtype", "residual_dtype", "weight_dtype", "given"),
    [
        # bf16-mixed training: bf16 block output, float32 stream and weight: fla adds and writes the norm in float32
        (torch.bfloat16, torch.float32, torch.float32, (torch.float32, torch.float32)),
        # all bf16 (inference): nothing cast
        (torch.bfloat16, torch.bfloat16, torch.bfloat16, (torch.bfloat16, torch.bfloat16)),
        # bf16 stream, float32 weight: the norm in float32, as ``weight * rms_norm(h)`` promotes
        (torch.bfloat16, torch.bfloat16, torch.float32, (torch.float32, torch.bfloat16)),
    ],
)
def test_add_rms_norm_hands_fla_pytorch_dtypes(
    kernels_run_here, monkeypatch, x_dtype, residual_dtype, weight_dtype, given
):
    """fla writes the sum in the residual's dtype and the norm in ``x``'s: the op casts them up (exactly) to the
    dtypes PyTorch's ``weight * rms_norm(residual + x)`` would give."""
    layernorm = pytest.importorskip("fla.modules.norm.layernorm")
    calls = []

    def fake(x, weight, bias, residual, eps, prenorm):
        calls.append((x.dtype, residual.dtype, bias, eps, prenorm))
        return x, residual

    monkeypatch.setattr(layernorm, "rms_norm", fake)
    x, residual = torch.randn(2, 3, 8, dtype=x_dtype), torch.randn(2, 3, 8, dtype=residual_dtype)
    add_rms_norm(x, residual, torch.ones(8, dtype=weight_dtype), eps=1e-5)
    assert calls == [(*given, None, 1e-5, True)]


def decoder_model(layout: str = "S,D,A", intermediate_size: int = 48) -> HybridVLM:
    torch.manual_seed(0)
    config = HybridConfig(
        layout=layout,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=len(layout.split(",")),
        num_attention_heads=2,
        num_key_value_heads=1,
        mrope_section=None,
        sliding_window=8,
        mixer_options={
            "S": {"backend": "torch"},
            "A": {"backend": "torch"},
            "D": {"num_heads": 2, "head_dim": 16, "backend": "torch"},
        },
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return HybridVLM(config)  # float32: the glue runs fla under auto (float64 would not)


def train_step(model: HybridVLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Logits, hidden states and parameter gradients of one step."""
    model.zero_grad(set_to_none=True)
    out = model(ids, output_hidden_states=True)
    out.logits.square().sum().backward()
    return [out.logits, *out.hidden_states, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("intermediate_size", [48, 0])
def test_every_residual_add_of_the_decoder_runs_in_a_fused_norm(monkeypatch, intermediate_size):
    """With the glue on fla, each of a layer's adds goes into the norm after it (the last one into the next layer's
    first norm, or the final norm) and each MLP through the fused SwiGLU: logits, hidden states and gradients as
    the unfused decoder's, under every kind of activation checkpointing."""
    model = decoder_model(intermediate_size=intermediate_size).train()
    ids = torch.randint(1, 64, (2, 11), generator=torch.Generator().manual_seed(1))
    selections = (False, True, "mlp,S,D") if intermediate_size else (False, True, "S")
    unfused = {}
    for selection in selections:  # on the CPU the glue runs its PyTorch forms
        model.language_model.gradient_checkpointing = selection
        unfused[selection] = train_step(model, ids)

    adds, products = [], []

    def fused_add_norm(x, residual, weight, eps):
        adds.append(x.shape)
        h = residual + x
        return weight * F.rms_norm(h, (h.shape[-1],), eps=eps), h

    monkeypatch.setattr(backends, "unavailable_reason", lambda backend, device: None)
    monkeypatch.setattr(norm_module, "_fla_add_rms_norm", fused_add_norm)
    monkeypatch.setattr(activations_module, "_fla", lambda gate, up: products.append(gate.shape) or F.silu(gate) * up)
    for selection in selections:
        model.language_model.gradient_checkpointing = selection
        assert all(torch.equal(a, b) for a, b in zip(train_step(model, ids), unfused[selection])), selection
    assert adds and (products or not intermediate_size)  # the steps above ran the fused forms
    adds.clear()
    products.clear()
    with torch.no_grad():
        model(ids)
    layers = len(model.language_model.layers)
    # every add but none into layer 0's first norm (the embeddings come alone)
    assert len(adds) == (2 * layers if intermediate_size else layers)
    assert len(products) == (layers if intermediate_size else 0)
