"""Triton kernels on the CPU under Triton's interpreter, against their PyTorch references, at tiny shapes; used by
tests/test_interpreted_kernels.py.

``TRITON_INTERPRET=1`` must be set before a kernel is defined (Triton reads it when it decorates the function), so
the checks run in a process of their own, one after another: ``python interpreted_kernels.py CHECK [CHECK ...]``
prints, as its last line, a JSON object of the checks that failed with their tracebacks.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F
import triton.runtime.interpreter as interpreter
from helpers import rel_err

from hybridvl.mixers.ops import (
    causal_attention,
    gated_delta_rule,
    gated_linear_attention,
    linear_attention,
    simple_gated_linear_attention,
)
from hybridvl.mixers.ops.decode_attention import decode_attention_step, decode_attention_step_reference


def _run_fla_here() -> None:
    """Let fla's Triton kernels run here, interpreted, through the ops' ``backend="fla"`` paths: the backend selector
    takes them on the CPU, an autotuned kernel runs its first configuration (no GPU to time them on), and loop
    counters are tensors (:class:`_LoopCountersAsTensors`)."""
    import triton.runtime.autotuner as autotuner

    from hybridvl.mixers import backends

    autotuner.Autotuner._bench = lambda self, *args, config, **kwargs: [0.0, 0.0, 0.0]
    backends.unavailable_reason = lambda backend, device: None
    interpreter.FunctionRewriter.ast_transformer = _LoopCountersAsTensors()


class _LoopCountersAsTensors(interpreter.ASTTransformer):
    """The interpreter's rewrite of a kernel, in which the counter of a ``for ... in range(...)`` loop is a tensor,
    as in a compiled kernel (fla's chunked kernels call ``i_t.to(tl.int64)`` on theirs); the interpreter alone runs
    the loop over Python ints. ``tl.static_range`` counters stay ints, as when compiled."""

    def visit_For(self, node: ast.For) -> ast.For:  # noqa: N802  (ast.NodeTransformer's name)
        self.generic_visit(node)
        loops_over_range = isinstance(node.iter, ast.Call) and ast.unparse(node.iter.func) in ("range", "tl.range")
        if loops_over_range and isinstance(node.target, ast.Name):
            # `i = i` at the top of the body, which the interpreter's rewrite of assignments makes a tensor
            name = node.target.id
            counter = ast.Assign(targets=[ast.Name(name, ast.Store())], value=ast.Name(name, ast.Load()))
            node.body.insert(0, self.visit_Assign(counter))
        return node


def _fla_against_torch(run, inputs: list[torch.Tensor]) -> list[float]:
    """Relative errors of ``run("fla")`` against ``run("torch")``, each a tensor or a tuple of tensors computed from
    ``inputs``: the outputs, then the gradients of every input for the same random cotangents."""
    for t in inputs:
        t.requires_grad_()
    results, cotangents = [], None
    for backend in ("fla", "torch"):
        outputs = run(backend)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if cotangents is None:
            cotangents = [torch.randn_like(output) for output in outputs]
        results.append(outputs + torch.autograd.grad(outputs, inputs, cotangents))
    return [rel_err(a, b) for a, b in zip(*results)]


def fla_glue() -> None:
    """fla's fused gated RMSNorm (both forms, forward and backward), its token-loop gated delta rule with the decay
    and ``beta`` computed in the kernel (packed sequences continuing from states), the gate kernels of its chunked
    form (the decay summed in chunks; gradients for ``g``, ``A_log`` and ``dt_bias``) and its short convolution
    (packed sequences continuing from states, forward and backward) against the PyTorch forms in float32. On
    the CPU fla's softplus is the plain ``log(1 + exp(x))`` below 20; on NVIDIA GPUs it is inline PTX, which the gpu
    tests cover."""
    from fla.ops.gated_delta_rule.gate import gdn_gate_bwd, gdn_gate_chunk_cumsum

    from hybridvl.mixers.ops import gated_rms_norm, short_conv
    from hybridvl.mixers.ops.gated_delta_rule import gdn_decay

    _run_fla_here()
    for norm_before_gate, group_size in [(True, None), (False, 8)]:
        inputs = [torch.randn(2, 7, 3, 16).requires_grad_() for _ in range(2)] + [torch.randn(16).requires_grad_()]
        options = dict(eps=1e-6, norm_before_gate=norm_before_gate, group_size=group_size)
        y_fla = gated_rms_norm(*inputs, **options, backend="fla")
        y_ref = gated_rms_norm(*inputs, **options, backend="torch")
        cotangent = torch.randn_like(y_ref)
        grads_fla = torch.autograd.grad(y_fla, inputs, cotangent)
        grads_ref = torch.autograd.grad(y_ref, inputs, cotangent)
        errors = [rel_err(y_fla, y_ref)] + [rel_err(a, b) for a, b in zip(grads_fla, grads_ref)]
        assert max(errors) < 1e-5, (norm_before_gate, errors)

    # the token loop with the decay and beta computed in the kernel, packed sequences continuing from states
    H, K, V = 2, 16, 16
    cu_seqlens = torch.tensor([0, 3, 4, 9])
    q, k, v = torch.randn(1, 9, H, K), torch.randn(1, 9, H, K), torch.randn(1, 9, H, V)
    a, b = torch.randn(1, 9, H) * 3, torch.randn(1, 9, H) * 2
    A_log, dt_bias, h0 = torch.rand(H) * 2, torch.randn(H), torch.randn(3, H, K, V) * 0.1
    common = dict(
        initial_state=h0,
        cu_seqlens=cu_seqlens,
        use_qk_l2norm=True,
        A_log=A_log,
        dt_bias=dt_bias,
        use_beta_sigmoid=True,
        form="recurrent",
    )
    o_fla, s_fla = gated_delta_rule(q, k, v, a, b, **common, backend="fla")
    o_ref, s_ref = gated_delta_rule(q, k, v, a, b, **common, backend="torch")
    assert rel_err(o_fla, o_ref) < 1e-5 and rel_err(s_fla, s_ref) < 1e-5, (rel_err(o_fla, o_ref), rel_err(s_fla, s_ref))

    # the chunked kernel's gate: the decay summed within chunks forward, gradients for g, A_log and dt_bias backward
    g = (torch.randn(2, 40, H) * 3).requires_grad_()
    A_log.requires_grad_()
    dt_bias.requires_grad_()
    decay = gdn_decay(g, A_log, dt_bias)
    summed = gdn_gate_chunk_cumsum(g.detach(), A_log.detach(), 16, dt_bias=dt_bias.detach())
    chunks = torch.cat([part.cumsum(1) for part in decay.split(16, dim=1)], dim=1)
    assert rel_err(summed, chunks) < 1e-6, rel_err(summed, chunks)
    cotangent = torch.randn_like(decay)
    grads_ref = torch.autograd.grad(decay, (g, A_log, dt_bias), cotangent)
    grads_fla = gdn_gate_bwd(g.detach(), A_log.detach(), dt_bias.detach(), cotangent)
    errors = [rel_err(a, b) for a, b in zip(grads_fla, grads_ref)]
    assert max(errors) < 1e-5, errors

    # the short convolution in float32 (auto runs fla's kernel there: no dot products), packed sequences continuing
    # from states: outputs, final states, and the gradients of the input, the weight, the bias and the states
    conv_inputs = [torch.randn(1, 16, 24), torch.randn(24, 4), torch.randn(24), torch.randn(3, 24, 4)]
    x, weight, bias, state = (t.requires_grad_() for t in conv_inputs)
    conv = dict(initial_state=state, cu_seqlens=torch.tensor([0, 5, 7, 16]))
    y_fla, final_fla = short_conv(x, weight, bias, **conv, backend="fla")
    y_ref, final_ref = short_conv(x, weight, bias, **conv, backend="torch")
    cotangent = torch.randn_like(y_ref)
    grads_fla = torch.autograd.grad(y_fla, conv_inputs, cotangent)
    grads_ref = torch.autograd.grad(y_ref, conv_inputs, cotangent)
    errors = [rel_err(y_fla, y_ref), rel_err(final_fla, final_ref)] + [
        rel_err(a, b) for a, b in zip(grads_fla, grads_ref)
    ]
    assert max(errors) < 1e-5, errors


def fla_layer_glue() -> None:
    """fla's residual add + RMSNorm (both of its kernels: rows of up to 512 features in blocks, wider rows one by
    one; a float16 block output added to a float32 stream, as under mixed precision) and its SwiGLU on the two halves
    of one projection, forward and backward, against the PyTorch forms in float32."""
    from hybridvl.mixers.ops import add_rms_norm, swiglu

    _run_fla_here()
    for D, x_dtype in ((64, torch.float32), (640, torch.float32), (64, torch.float16)):
        x = torch.randn(2, 5, D).to(x_dtype).requires_grad_()
        residual, weight = torch.randn(2, 5, D).requires_grad_(), (torch.rand(D) + 0.5).requires_grad_()
        y_fla, h_fla = add_rms_norm(x, residual, weight, backend="fla")
        y_ref, h_ref = add_rms_norm(x, residual, weight, backend="torch")
        assert (y_fla.dtype, h_fla.dtype) == (y_ref.dtype, h_ref.dtype) == (torch.float32, torch.float32)
        cotangents = torch.randn_like(y_ref), torch.randn_like(h_ref)
        grads_fla = torch.autograd.grad((y_fla, h_fla), (x, residual, weight), cotangents)
        grads_ref = torch.autograd.grad((y_ref, h_ref), (x, residual, weight), cotangents)
        assert grads_fla[0].dtype == x_dtype
        errors = [rel_err(y_fla, y_ref), rel_err(h_fla, h_ref)] + [rel_err(a, b) for a, b in zip(grads_fla, grads_ref)]
        assert max(errors) < 1e-5, (D, x_dtype, errors)

    gate_up = torch.randn(2, 5, 2 * 48).requires_grad_()
    gate, up = gate_up.chunk(2, dim=-1)  # strided halves, read in place
    z_fla, z_ref = swiglu(gate, up, backend="fla"), swiglu(gate, up, backend="torch")
    cotangent = torch.randn_like(z_ref)
    (grad_fla,) = torch.autograd.grad(z_fla, gate_up, cotangent)
    (grad_ref,) = torch.autograd.grad(z_ref, gate_up, cotangent)
    errors = [rel_err(z_fla, z_ref), rel_err(grad_fla, grad_ref)]
    assert max(errors) < 1e-6, errors


def fla_losses() -> None:
    """The LM-head losses on fla's fused kernels against their PyTorch chunks in float32, as the stages call them:
    the summed next-token cross-entropy (a prompt without loss, ten tokens in three of the kernel's chunks) with the
    head trained and frozen, and the distillation KL at temperature 2 (the kernel takes the hidden states divided by
    it), the student's head trained and the teacher's frozen; the losses and the gradients of the hidden states and
    of the heads that train, for a cotangent other than 1 (the kernels scale the gradients they formed forward)."""
    from torch import nn

    from hybridvl.lit.losses import distillation_kl, next_token_cross_entropy

    _run_fla_here()
    H, V = 16, 50
    hidden, labels = torch.randn(2, 6, H), torch.randint(0, V, (2, 6))
    labels[:, :2] = -100
    for head_trains in (True, False):
        head = nn.Linear(H, V, bias=False).requires_grad_(head_trains)
        assert next_token_cross_entropy(hidden, head, labels, 4, backend="fla")[1] == 8
        errors = _fla_against_torch(
            lambda backend, head=head: next_token_cross_entropy(hidden, head, labels, 4, backend=backend)[0],
            [hidden, head.weight] if head_trains else [hidden],
        )
        assert max(errors) < 1e-5, (head_trains, errors)

    student_head, teacher_head = nn.Linear(H, V, bias=False), nn.Linear(H, V, bias=False).requires_grad_(False)
    student = torch.randn(2, 5, H)
    teacher = student + 0.3 * torch.randn_like(student)
    errors = _fla_against_torch(
        lambda backend: distillation_kl(student, teacher, student_head, teacher_head, 2.0, 4, backend=backend),
        [student, student_head.weight],
    )
    assert max(errors) < 1e-5, errors


def fla_chunk_gated_delta_rule() -> None:
    """fla's chunked gated delta rule as Gated DeltaNet calls it (the decay and ``beta`` computed in the kernels from
    the gate projections, q and k L2-normalised there) against the chunked PyTorch form in float32, forward and
    backward: packed sequences of 1, 69 and 5 tokens (one crossing fla's 64-token chunks) continuing from states, and
    a batch of two without states; the outputs, the final states and the gradients of q, k, v, both gate
    projections, the states, ``A_log`` and ``dt_bias``.

    fla takes the decay between two tokens of a chunk as ``exp(G_i - G_j)`` of the decay's sums from the chunk's
    start, which loses float32 precision as ``|G|`` grows (the PyTorch form sums the segments directly): the decays
    here are about -0.5 a token. ``A_log``'s and ``dt_bias``'s gradients sum that error over every token with
    cancellation (up to 2e-5 over draws of these inputs, 2.4e-4 with decays of several units a token; the float32
    PyTorch form stays within 3e-7 of float64), hence their bound of 1e-4."""
    _run_fla_here()
    H, K, V = 2, 16, 16

    def errors(B: int, T: int, cu_seqlens: torch.Tensor | None, with_states: bool) -> list[float]:
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
        a, b, A_log, dt_bias = torch.randn(B, T, H), torch.randn(B, T, H) * 2, torch.rand(H) - 1, torch.randn(H)
        states = [torch.randn(N, H, K, V) * 0.1] if with_states else []
        gates = dict(A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid=True, use_qk_l2norm=True)

        def run(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
            initial_state = states[0] if states else None
            return gated_delta_rule(
                q, k, v, a, b, initial_state=initial_state, cu_seqlens=cu_seqlens, **gates, backend=backend
            )

        return _fla_against_torch(run, [q, k, v, a, b, *states, A_log, dt_bias])

    for measured in (errors(1, 75, torch.tensor([0, 1, 70, 75]), with_states=True), errors(2, 70, None, False)):
        assert max(measured[:-2]) < 1e-5 and max(measured[-2:]) < 1e-4, measured


def fla_linear_attention() -> None:
    """fla's GLA (a decay per key, an odd key width: padded by one), its simple gated form (Mamba2's SSD: one decay
    per head, scale 1) and plain linear attention (L's, its normaliser column making the value width odd: padded)
    against the PyTorch forms in float32, forward and backward, chunked (packed sequences of 1, 69 and 5 tokens, one
    crossing fla's 64-token chunks) and recurrent (1, 6 and 5 tokens), continuing from states: the outputs, the
    final states and the gradients of q, k, v, the decay and the states."""
    _run_fla_here()
    H = 2

    def errors(op, K: int, V: int, form: str, T: int) -> list[float]:
        q, k, v, h0 = torch.randn(1, T, H, K), torch.randn(1, T, H, K), torch.randn(1, T, H, V), torch.randn(3, H, K, V)
        decay = {
            gated_linear_attention: [F.logsigmoid(torch.randn(1, T, H, K))],
            simple_gated_linear_attention: [-torch.rand(1, T, H)],
            linear_attention: [],
        }[op]
        options = dict(scale=1.0) if op is simple_gated_linear_attention else {}
        cu_seqlens = torch.tensor([0, 1, T - 5, T])

        def run(backend: str) -> tuple[torch.Tensor, torch.Tensor]:
            return op(q, k, v, *decay, initial_state=h0, cu_seqlens=cu_seqlens, form=form, **options, backend=backend)

        return _fla_against_torch(run, [q, k, v, *decay, h0])

    for op, K, V in (
        (gated_linear_attention, 15, 16),
        (simple_gated_linear_attention, 16, 16),
        (linear_attention, 16, 17),
    ):
        for form, T in (("chunk", 75), ("recurrent", 12)):
            measured = errors(op, K, V, form, T)
            assert max(measured) < 1e-5, (op.__name__, form, measured)


def fla_parallel_attention() -> None:
    """fla's ``parallel_attn`` against SDPA in float32, forward and backward: grouped heads, packed sequences of 1,
    69 and 5 tokens (the 69 over several of fla's key blocks), full causal and a window of 8 keys; the outputs and
    the gradients of q, k and v. (On a GPU fla computes float32 dots in TF32; the interpreter computes them in
    float32.)"""
    _run_fla_here()
    cu_seqlens = torch.tensor([0, 1, 70, 75])

    def errors(window: int | None) -> list[float]:
        q, k, v = torch.randn(1, 75, 4, 16), torch.randn(1, 75, 2, 16), torch.randn(1, 75, 2, 16)
        return _fla_against_torch(
            lambda backend: causal_attention(q, k, v, window=window, cu_seqlens=cu_seqlens, backend=backend), [q, k, v]
        )

    for window in (None, 8):
        measured = errors(window)
        assert max(measured) < 1e-5, (window, measured)


def decode_attention_step_triton() -> None:
    """The decode step's write and split-K attention against the reference, grouped heads over a head width that
    is not a power of two: ring buffers empty, filling, full and wrapped, a growing cache, more splits than
    blocks. float32 and float16: the interpreter's bf16 dots are wrong (bf16 is checked on the GPU)."""
    Hq, Hkv, D = 4, 2, 24
    cases = ((8, [0, 3, 7, 8, 21], 3), (40, [5, 39, 0, 17, 2], 4), (200, [150, 199], 1), (200, [130, 70], 7))
    for dtype, bound in ((torch.float32, 1e-5), (torch.float16, 1e-3)):
        for slots, lengths, splits in cases:
            N = len(lengths)
            key, value = torch.randn(N, slots, Hkv, D).to(dtype), torch.randn(N, slots, Hkv, D).to(dtype)
            q, k, v = torch.randn(N, 1, Hq, D), torch.randn(N, 1, Hkv, D), torch.randn(N, 1, Hkv, D)
            length = torch.tensor(lengths)
            key_ref, value_ref, length_ref = key.float(), value.float(), length.clone()
            o = decode_attention_step(*(t.to(dtype) for t in (q, k, v)), key, value, length, num_splits=splits)
            o_ref = decode_attention_step_reference(
                *(t.to(dtype).float() for t in (q, k, v)), key_ref, value_ref, length_ref
            )
            assert o.dtype == dtype and rel_err(o, o_ref) < bound, (dtype, slots, rel_err(o, o_ref))
            assert torch.equal(key.float(), key_ref) and torch.equal(value.float(), value_ref)
            assert torch.equal(length, length_ref) and torch.equal(length, torch.tensor(lengths) + 1)


def fla_layers_as_oracles() -> None:
    """fla's own layers as oracles for the mixers that follow them: fla's ``GatedDeltaNet``, ``GatedLinearAttention``
    and ``Mamba2`` (their own code: projections, short convolutions, gates, scans, gated norm; the kernels
    interpreted) given our ``D``, ``G`` and ``M`` mixers' weights (``load_state_dict(strict=True)``, under fla's names:
    :func:`_fla_names`),
    against our mixers on the PyTorch backend in float32: outputs, and gradients of the input and of every weight
    for the same random cotangent, on 70 tokens (more than one of fla's 64-token chunks)."""
    _run_fla_here()
    from fla.layers import GatedDeltaNet, GatedLinearAttention, Mamba2

    from hybridvl import mixers

    hidden = 64
    pairs = [
        (
            mixers.build_mixer("D", hidden, num_heads=2, head_dim=16, expand_v=2.0, norm_eps=1e-5, backend="torch"),
            GatedDeltaNet(hidden_size=hidden, expand_v=2, head_dim=16, num_heads=2, mode="chunk", norm_eps=1e-5),
        ),
        (
            mixers.build_mixer("G", hidden, num_heads=2, norm_eps=1e-5, backend="torch"),
            GatedLinearAttention(hidden_size=hidden, num_heads=2, mode="chunk", norm_eps=1e-5),
        ),
        (
            mixers.build_mixer("G", hidden, num_heads=2, norm_eps=1e-5, conv_size=4, backend="torch"),
            GatedLinearAttention(hidden_size=hidden, num_heads=2, mode="chunk", norm_eps=1e-5, use_short_conv=True),
        ),
        (  # without mamba-ssm fla's Mamba2 runs its PyTorch chunked scan, in chunks of 16 tokens here
            mixers.build_mixer("M", hidden, backend="torch"),
            Mamba2(num_heads=2, head_dim=64, hidden_size=hidden, state_size=128, norm_eps=1e-6, chunk_size=16),
        ),
    ]
    for ours, theirs in pairs:
        theirs.load_state_dict(_fla_names(ours.state_dict(), theirs), strict=True)
        x = torch.randn(2, 70, hidden)
        cotangent = torch.randn(2, 70, hidden)
        results = []
        for module in (ours, theirs):
            x_ = x.clone().requires_grad_()
            module.zero_grad()
            module(x_)[0].backward(cotangent)
            results.append((module(x)[0].detach(), x_.grad, _fla_names(_gradients_by_saved_name(module), theirs)))
        (out, x_grad, grads), (out_fla, x_grad_fla, grads_fla) = results
        errors = {"output": rel_err(out_fla, out), "x": rel_err(x_grad_fla, x_grad)}
        errors |= {name: rel_err(grads_fla[name], grad) for name, grad in grads.items()}
        print(type(ours).__name__, {name: f"{error:.1e}" for name, error in errors.items()})
        assert grads.keys() == grads_fla.keys() and max(errors.values()) < 1e-5, errors


def _fla_names(state: dict[str, torch.Tensor], layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A mixer's state dict under the names of fla's ``layer``: fla's GLA calls its gated output norm
    ``g_norm_swish_gate`` where every mixer here says ``o_norm``; all other names are fla's already."""
    if not hasattr(layer, "g_norm_swish_gate"):
        return state
    return {("g_norm_swish_gate.weight" if name == "o_norm.weight" else name): t for name, t in state.items()}


def _gradients_by_saved_name(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights' gradients under the names ``state_dict`` saves them by (a fused projection's parts apart): the
    state dict of the module with each weight's values swapped for its gradient."""
    parameters = list(module.parameters())
    with torch.no_grad():
        for p in parameters:
            p.data, p.grad = p.grad, p.data
        grads = {name: t.clone() for name, t in module.state_dict().items()}
        for p in parameters:
            p.data, p.grad = p.grad, p.data
    return grads


CHECKS = {
    "fla_glue": fla_glue,
    "fla_layer_glue": fla_layer_glue,
    "fla_losses": fla_losses,
    "fla_chunk_gated_delta_rule": fla_chunk_gated_delta_rule,
    "fla_linear_attention": fla_linear_attention,
    "fla_parallel_attention": fla_parallel_attention,
    "decode_attention_step_triton": decode_attention_step_triton,
    "fla_layers_as_oracles": fla_layers_as_oracles,
}

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    failed = {}
    for name in sys.argv[1:]:
        torch.manual_seed(0)
        try:
            CHECKS[name]()
        except Exception:
            failed[name] = traceback.format_exc()
    print(json.dumps(failed))
