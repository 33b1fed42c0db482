"""Triton kernels on the CPU under Triton's interpreter, against their PyTorch references, at tiny shapes; used by
tests/test_interpreted_kernels.py.

``TRITON_INTERPRET=1`` must be set before a kernel is defined (Triton reads it when it decorates the function), so
each check runs in a process of its own: ``python interpreted_kernels.py CHECK``.
"""

from __future__ import annotations

import os
import sys

import torch
from helpers import rel_err

from hybridvl.mixers.ops import gated_delta_rule_step
from hybridvl.mixers.ops.decode_attention import decode_attention_step, decode_attention_step_reference
from hybridvl.mixers.ops.gated_delta_rule import _fla_step


def gated_delta_rule_step_fla() -> None:
    """fla's fused recurrent kernel with the gate, the sigmoid and the L2 norms inside equals the reference, from a
    state, in float32 and bf16, with gate inputs across softplus's range (its linear branch above 20 included)."""
    B, T, H, K, V = 2, 3, 2, 16, 32
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, H, V)
    a = torch.randn(B, T, H) * 8
    a[0, 0, 0] = 25.0  # softplus(x) = x past the threshold
    b = torch.randn(B, T, H) * 3
    A_log, dt_bias = torch.randn(H), torch.randn(H)
    h0 = torch.randn(B, H, K, V) * 0.1
    for dtype, bound in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        args = [t.to(dtype) for t in (q, k, v, a, b, A_log, dt_bias)]
        o, state = _fla_step(*args, None, h0, None, True)
        o_ref, state_ref = gated_delta_rule_step(
            *(t.float() for t in args), initial_state=h0, use_qk_l2norm=True, backend="torch"
        )
        assert o.dtype == dtype and state.dtype == torch.float32
        assert rel_err(o, o_ref) < bound and rel_err(state, state_ref) < bound, (dtype, rel_err(o, o_ref))


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


CHECKS = {
    "gated_delta_rule_step_fla": gated_delta_rule_step_fla,
    "decode_attention_step_triton": decode_attention_step_triton,
}

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    torch.manual_seed(0)
    CHECKS[sys.argv[1]]()
