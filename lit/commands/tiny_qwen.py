"""``hybridvl tiny-qwen``: write a tiny random-weight Qwen2.5-VL checkpoint with tokenizer and processor."""

from __future__ import annotations

from hybridvl.lit.cli import ArgumentParser
from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl


def main(argv: list[str]) -> int:
    """Run ``hybridvl tiny-qwen`` on ``argv``; ``--out`` must be new or empty unless ``--overwrite``."""
    parser = ArgumentParser(prog="hybridvl tiny-qwen", description=__doc__)
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--hidden-size", type=int, default=64, help="model width")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a folder that holds files (its model files are replaced)"
    )
    args = parser.parse_args(argv)
    for flag, value in (("--layers", args.layers), ("--hidden-size", args.hidden_size)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    path = make_tiny_qwen2_5_vl(
        args.out,
        seed=args.seed,
        num_hidden_layers=args.layers,
        hidden_size=args.hidden_size,
        overwrite=args.overwrite,
    )
    print(f"wrote a tiny Qwen2.5-VL ({args.layers} layers, hidden {args.hidden_size}) to {path}")
    return 0
