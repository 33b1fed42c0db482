"""Choosing which parameters train, by name patterns a YAML config can list.

A pattern is either a glob over parameter names (``"language_model.layers.*.mlp.*"``, ``"visual.merger.*"``)
or a mixer selector:

* ``"mixers:new"`` — the mixers of every layer that is not attention (``A``/``S``): what conversion created;
* ``"mixers:<letters>"`` — the mixers of layers of those kinds, e.g. ``"mixers:S"`` or ``"mixers:DM"``;
* ``"mixers:*"`` — every layer's mixer.

InfiniteVL trains ``["mixers:new"]`` when distilling and ``["mixers:new", "mixers:S"]`` in SFT.

Globs match parameter names, where fused input projections have one name for all their parts
(``self_attn.qkv_proj.weight``, ``self_attn.in_proj.weight``, ``mlp.gate_up_proj.weight``), not the parts' names
that checkpoints use (``q_proj.weight``, ...): a part trains with the rest of its fused weight, and a pattern
that names a part without its fused weight raises.
"""

from __future__ import annotations

import fnmatch
import logging

from torch import nn

from hybridvl.mixers.modules import fused_part_names
from hybridvl.models.hybrid import HybridVLM

logger = logging.getLogger("hybridvl.train")

DISTILL_DEFAULT = ("mixers:new",)
SFT_DEFAULT = ("mixers:new", "mixers:S")


def _mixer_prefixes(model: HybridVLM, selector: str) -> list[str]:
    kinds = model.kinds
    if selector == "*":
        wanted = set(kinds)
    elif selector == "new":
        wanted = {kind for kind in kinds if kind not in ("A", "S")}
    else:
        wanted = set(selector.upper())
    return [f"language_model.layers.{i}.self_attn." for i, kind in enumerate(kinds) if kind in wanted]


def select_parameters(model: HybridVLM, patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Names of the parameters ``patterns`` select; raises if a pattern selects nothing."""
    names = [name for name, _ in model.named_parameters()]
    parts = fused_part_names(model)
    selected: set[str] = set()
    for pattern in patterns:
        if pattern.startswith("mixers:"):
            prefixes = _mixer_prefixes(model, pattern.split(":", 1)[1])
            matched = {name for name in names if name.startswith(tuple(prefixes))} if prefixes else set()
        else:
            matched = set(fnmatch.filter(names, pattern))
            split = sorted(part for part in fnmatch.filter(parts, pattern) if parts[part] not in matched)
            if split:
                raise ValueError(
                    f"the trainable pattern {pattern!r} names parts of fused projections, which train whole: "
                    f"{split[0]} is part of {parts[split[0]]}"
                    + (f" (and {len(split) - 1} more)" if split[1:] else "")
                    + "; select the fused parameter (e.g. '*.qkv_proj.*', '*.in_proj.*', '*.gate_up_proj.*')"
                )
        if not matched:
            raise ValueError(
                f"the trainable pattern {pattern!r} matches no parameter of a model with layout "
                f"{model.config.layout!r}; use a glob over parameter names or 'mixers:new' / 'mixers:<letters>'"
            )
        selected |= matched
    return [name for name in names if name in selected]


def freeze_all_but(model: nn.Module, trainable: list[str]) -> int:
    """Set ``requires_grad`` on exactly the named parameters; return how many elements train."""
    wanted = set(trainable)
    count = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in wanted)
        count += parameter.numel() if name in wanted else 0
    return count
