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


CHECKS = {"gated_delta_rule_step_fla": gated_delta_rule_step_fla}

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1")
    torch.manual_seed(0)
    CHECKS[sys.argv[1]]()
