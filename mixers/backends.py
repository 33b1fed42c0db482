"""Which compute backend runs a mixer, and why.

Every mixer has a pure-PyTorch reference (``"torch"``) that runs anywhere. On CUDA the same module can
run optimised kernels from optional packages:

=============  ==========================  ===================================
backend        package (pip name)          used for
=============  ==========================  ===================================
``torch``      torch                       every mixer; the reference
``fla``        ``flash-linear-attention``  D, G, L, M (simple gated form), S, A
``flash_attn`` ``flash-attn``              S, A
``mamba_ssm``  ``mamba-ssm``               M
=============  ==========================  ===================================

``backend="auto"`` takes the first backend of a mixer's preference list that can run on the input's
device and logs the choice once per mixer kind. An explicitly requested backend that cannot run raises
:class:`BackendUnavailableError` naming what is missing; nothing falls back silently. ``auto`` also passes
over kernels that would miss the reference bound for the input's dtype (:func:`precision_auto_skips`: float32
and float64 inputs run the PyTorch reference), while an explicit request still runs them.

The glue around the recurrences (the gated RMSNorm, the residual add with its RMSNorm, SwiGLU, the short
convolution) follows one rule of its own, :func:`elementwise_auto_skips`: ``auto`` runs fla's fused kernel for
16-bit and float32 inputs (these kernels have no dot products and compute in float32, so they meet the float32
bound) and the PyTorch form for float64; and inside a forward traced by ``torch.compile`` it runs the PyTorch form
at any dtype. Compiling is asked for to have Inductor fuse this elementwise work with what surrounds it, which it
does with the PyTorch form, while a kernel library call splits the graph at every norm and activation (the kernels
are wrapped in ``torch.compiler.disable``, so ``backend="fla"`` still runs them, as they are, in a compiled
forward). The recurrences keep their kernels under ``torch.compile``: Inductor has nothing to fuse them into.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Sequence

import torch

logger = logging.getLogger("hybridvl.mixers")

BACKENDS = ("torch", "fla", "flash_attn", "mamba_ssm")

# backend -> (module probed by import, pip distribution name)
_KERNEL_PACKAGES = {
    "fla": ("fla.ops.gated_delta_rule", "flash-linear-attention"),
    "flash_attn": ("flash_attn", "flash-attn"),
    "mamba_ssm": ("mamba_ssm.ops.triton.ssd_combined", "mamba-ssm"),
}


class BackendUnavailableError(RuntimeError):
    """A backend was requested explicitly but cannot run here."""


@functools.cache
def package_error(backend: str) -> str | None:
    """Return why the package behind ``backend`` cannot be imported, or ``None`` if it can."""
    if backend == "torch":
        return None
    module, pip_name = _KERNEL_PACKAGES[backend]
    top_level = module.split(".")[0]
    if importlib.util.find_spec(top_level) is None:
        return f"the package {pip_name!r} is not installed (pip install {pip_name})"
    try:
        importlib.import_module(module)
    except Exception as error:  # a broken install must not crash backend selection
        return f"the package {pip_name!r} is installed but `import {module}` failed: {error}"
    return None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Return why ``backend`` cannot run on ``device``, or ``None`` if it can."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    if backend == "torch":
        return None
    if device.type != "cuda":
        return f"its kernels need a CUDA device and the input is on {device.type}"
    if backend == "flash_attn" and torch.cuda.get_device_capability(device)[0] < 8:
        return "flash-attn needs an Ampere or newer GPU"
    return package_error(backend)


_logged: set[str] = set()


def log_once(message: str) -> None:
    """Log ``message`` at INFO the first time it comes up in this process."""
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def select_backend(
    requested: str,
    device: torch.device,
    preference: Sequence[str],
    owner: str,
    limitations: dict[str, str] | None = None,
    auto_skips: dict[str, str] | None = None,
) -> str:
    """Resolve ``requested`` (a backend name or ``"auto"``) for an input on ``device``.

    Args:
        requested: ``"auto"`` or one of :data:`BACKENDS`.
        device: where the input lives.
        preference: the backends ``owner`` supports, fastest first; ``"torch"`` last.
        owner: a short name used in log lines and errors, e.g. ``"gated_delta_rule"``.
        limitations: backends that cannot serve this particular call, with the reason (e.g. a kernel
            whose backward pass is broken in the installed Triton).
        auto_skips: backends ``"auto"`` passes over for this call, with the reason, though they can run
            when asked for by name (e.g. a kernel less precise than the input's dtype,
            :func:`precision_auto_skips`).

    Raises:
        BackendUnavailableError: ``requested`` is explicit and cannot run.
        ValueError: ``requested`` is not a backend ``owner`` supports.
    """
    if requested == "auto":
        skipped = []
        for backend in preference:
            reason = (
                unavailable_reason(backend, device)
                or (limitations or {}).get(backend)
                or (auto_skips or {}).get(backend)
            )
            if reason is None:
                why = "fastest available" if not skipped else "; ".join(skipped)
                log_once(f"{owner} on {device.type} uses backend {backend!r} ({why})")
                return backend
            skipped.append(f"{backend} skipped: {reason}")
        raise BackendUnavailableError(f"{owner}: no backend can run on {device}")  # torch always can
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose 'auto' or one of {', '.join(BACKENDS)}")
    if requested not in preference:
        raise ValueError(
            f"{owner} does not support backend {requested!r}; supported: {', '.join(preference)} or 'auto'"
        )
    reason = unavailable_reason(requested, device) or (limitations or {}).get(requested)
    if reason is not None:
        raise BackendUnavailableError(f"{owner}: backend {requested!r} cannot run: {reason}")
    return requested


def triton_version() -> tuple[int, ...] | None:
    """The installed Triton's version as numbers (``(3, 6, 0)``), or ``None`` without Triton."""
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:3] if part.isdigit())


def tilelang_enabled() -> bool:
    """Whether fla may route kernels through tilelang: installed, and not switched off with ``FLA_TILELANG=0``."""
    return importlib.util.find_spec("tilelang") is not None and os.environ.get("FLA_TILELANG", "1") != "0"


def fla_gated_backward_issue(device: torch.device, kernel: str = "gated_delta_rule") -> str | None:
    """Why fla cannot run the backward pass of its gated chunk ``kernel`` here, or ``None``.

    fla refuses (rather than return wrong gradients) the backward of its gated chunk kernels on Hopper GPUs
    with Triton 3.4 to 3.7.0 (fla issue #640). With tilelang installed fla swaps in a tilelang kernel for the
    gated delta rule (``kernel="gated_delta_rule"``); the simple gated form (``"simple_gla"``, Mamba2's SSD)
    still raises there.
    """
    if kernel not in ("gated_delta_rule", "simple_gla"):
        raise ValueError(f"kernel must be 'gated_delta_rule' or 'simple_gla', got {kernel!r}")
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return None
    version = triton_version()
    if version is None:
        return None
    if kernel == "gated_delta_rule" and tilelang_enabled():
        return None
    if (3, 4, 0) <= version < (3, 7, 1):
        remedy = "install tilelang or Triton >= 3.7.1" if kernel == "gated_delta_rule" else "install Triton >= 3.7.1"
        return (
            f"fla's gated chunk backward ({kernel}) gives wrong gradients on Hopper with Triton "
            f"{'.'.join(map(str, version))} (fla issue #640); {remedy} to train with fla kernels"
        )
    return None


def fla_float32_attention_issue(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why fla's ``parallel_attn`` cannot take inputs of ``dtype`` here, or ``None``.

    On Hopper GPUs with Triton 3.4 or newer fla runs its attention forward through tilelang when tilelang is
    installed, and that kernel does not compile for float32 inputs (tilelang's layout inference rejects the
    float32 probability tile: "Layout infer conflict between b_s and b_p"). bf16 and fp16 inputs run.
    """
    if dtype != torch.float32 or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return None
    version = triton_version()
    if version is None or version < (3, 4, 0) or not tilelang_enabled():
        return None
    return (
        "fla's attention forward on Hopper is tilelang's kernel, which does not compile for float32 inputs; "
        "pass bfloat16/float16 inputs (e.g. bf16-mixed precision) or backend='torch'"
    )


def float32_attention_limitations(device: torch.device, dtype: torch.dtype) -> dict[str, str] | None:
    """``{"fla": reason}`` when fla's attention cannot take inputs of ``dtype`` here
    (:func:`fla_float32_attention_issue`), else ``None``."""
    issue = fla_float32_attention_issue(device, dtype)
    return {"fla": issue} if issue else None


def precision_auto_skips(device: torch.device, dtype: torch.dtype, preference: Sequence[str]) -> dict[str, str] | None:
    """The kernels of ``preference`` that ``backend="auto"`` passes over for ``dtype`` inputs on ``device``, because
    they miss the reference bound for that dtype (float32: ~1e-5 relative; float64: ~1e-12), with the reason;
    ``None`` when there are none.

    With these skips ``auto`` gives kernels only 16-bit inputs. fla's Triton kernels compute a float32 input's
    dots in TF32, Triton's default for a float32 dot (fla's ``parallel_attn`` lands at 1.1e-3 relative error
    against float32 SDPA, where 1e-4 is the bound), and a float64 input in float32 at best; flash-attn takes
    only float16 and bfloat16. No kernel here is known to meet the float32 bound, so float32 and float64 run
    the PyTorch reference; asking for a kernel by name still runs it (fla: to TF32 accuracy).
    """
    if device.type != "cuda" or dtype not in (torch.float32, torch.float64):
        return None
    name = str(dtype).removeprefix("torch.")
    reasons = {
        "fla": (
            f"its Triton kernels compute {name} inputs "
            + ("with TF32 dots" if dtype == torch.float32 else "in float32 at best")
            + f", short of {name} accuracy; pass backend='fla' to accept that"
        ),
        "flash_attn": f"flash-attn takes only float16/bfloat16 inputs, not {name}",
    }
    skips = {backend: reasons[backend] for backend in preference if backend in reasons}
    return skips or None


def elementwise_auto_skips(dtype: torch.dtype) -> dict[str, str] | None:
    """What ``backend="auto"`` passes fla's glue kernels over for (the gated RMSNorm, a residual add with its
    RMSNorm, SwiGLU, the short convolution), for inputs of ``dtype``, with the reason; ``None`` when nothing.

    The glue's rule (see the module docstring): a forward traced by torch.compile runs the PyTorch form, which
    Inductor fuses itself, where a kernel library call would break the graph; float64 inputs run it too, fla
    computing them in float32. float32 inputs run fla: these kernels have no dot products and compute in float32
    throughout.
    """
    if torch.compiler.is_compiling():
        return {"fla": "under torch.compile Inductor fuses the PyTorch form, and a kernel call would break the graph"}
    if dtype == torch.float64:
        return {"fla": "its kernel computes float64 inputs in float32; pass backend='fla' to accept that"}
    return None


def gated_backward_limitations(
    device: torch.device, *tensors: torch.Tensor | None, kernel: str = "gated_delta_rule"
) -> dict[str, str] | None:
    """``{"fla": reason}`` when autograd will differentiate through fla's gated chunk ``kernel`` on ``tensors``
    and that backward cannot run here (:func:`fla_gated_backward_issue`), else ``None``."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return None
    issue = fla_gated_backward_issue(device, kernel)
    return {"fla": issue} if issue else None


def runnable_backends(preference: Sequence[str]) -> list[str]:
    """The backends of ``preference`` that can run on this machine's default device (CUDA if present)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return [backend for backend in preference if unavailable_reason(backend, device) is None]
