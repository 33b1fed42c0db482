"""``hybridvl layout``: expand a layout string; count layers and state bytes per kind."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import torch

from hybridvl import mixers
from hybridvl.lit.cli import ArgumentParser, dtype_argument

logger = logging.getLogger("hybridvl.layout")


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def mixer_options_argument(text: str) -> dict[str, dict[str, Any]]:
    """An argparse ``type`` for ``--mixer-options``: a JSON object of option objects per mixer kind."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(options, dict) or not all(isinstance(value, dict) for value in options.values()):
        raise argparse.ArgumentTypeError(
            f'must be a JSON object of objects per kind, e.g. {{"S": {{"window": 64}}}}, got {text!r}'
        )
    return options


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="hybridvl layout", description=__doc__)
    parser.add_argument("layout", help='layout string, e.g. "S,D,D,D x9"')
    parser.add_argument("--hidden-size", type=int, default=2048, help="model width (2048: Qwen2.5-VL-3B)")
    parser.add_argument("--num-layers", type=int, default=None, help="check the layout has this many layers")
    parser.add_argument(
        "--mixer-options",
        type=mixer_options_argument,
        default={},
        help='JSON options per kind, e.g. \'{"S": {"num_kv_heads": 2, "window": 8192}}\'',
    )
    parser.add_argument("--dtype", type=dtype_argument, default="bfloat16", help="activation dtype of caches")
    parser.add_argument("--context", type=int, default=65536, help="tokens of context for growing states")
    args = parser.parse_args(argv)
    if args.context < 0:
        parser.error(f"--context must be at least 0 tokens, got {args.context}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    kinds = mixers.parse_layout(args.layout, num_layers=args.num_layers)
    options = {mixers.resolve_kind(kind): value for kind, value in args.mixer_options.items()}
    for kind in sorted(options.keys() - set(kinds)):
        logger.warning("--mixer-options for %s are not used: the layout has no %s layer", kind, kind)

    rows = [("kind", "name", "layers", "state / sequence / layer", "state / sequence, all layers")]
    total = 0
    for letter, count in mixers.count_kinds(kinds).items():
        with torch.device("meta"):
            mixer = mixers.build_mixer(letter, args.hidden_size, **options.get(letter, {}))
        spec = mixers.get_spec(letter)
        if spec.fixed_size_state:
            per_layer = mixer.state_bytes(1, dtype=args.dtype)
            note = ""
        else:
            per_layer = mixer.state_bytes(1, seq_len=args.context, dtype=args.dtype)
            note = f" at {args.context:,} tokens (grows)"
        total += per_layer * count
        rows.append((letter, spec.name, str(count), format_bytes(per_layer) + note, format_bytes(per_layer * count)))
    rows.append(("total", "", str(len(kinds)), "", format_bytes(total)))

    print(f"layout    {mixers.format_layout(kinds)}  ({len(kinds)} layers)")
    per_row = 12
    for start in range(0, len(kinds), per_row):
        cells = [f"{i:>2}:{kind}" for i, kind in enumerate(kinds[start : start + per_row], start)]
        print(("expanded  " if start == 0 else "          ") + " ".join(cells))
    print()
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    dtype_name = str(args.dtype).removeprefix("torch.")
    print(f"\nhidden size {args.hidden_size}, caches in {dtype_name}, recurrent states in float32")
    return 0
