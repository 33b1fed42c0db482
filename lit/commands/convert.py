"""``hybridvl convert``: turn a local Qwen2.5-VL checkpoint into a hybrid student.

    hybridvl convert --teacher Qwen2.5-VL-3B-Instruct --layout "S,D,D,D x9" --init mimic --out student

Embeddings, MLPs, norms, the vision tower and the A/S layers keep the teacher's weights; the other layers
get new mixers (``--init mimic`` or ``transfer``). The report of inherited, transferred, fresh and dropped
tensors is printed and saved as ``conversion_report.json`` beside the student.

``--out`` may not be the teacher's folder, and must be new or empty unless ``--overwrite`` is given (then its
model files are replaced and stale weight shards removed).
"""

from __future__ import annotations

from hybridvl import mixers
from hybridvl.lit.cli import ArgumentParser
from hybridvl.lit.commands.layout import mixer_options_argument
from hybridvl.models.convert import INITS, convert_directory


def main(argv: list[str]) -> int:
    """Run ``hybridvl convert`` on ``argv`` (see the module docstring)."""
    parser = ArgumentParser(prog="hybridvl convert", description=__doc__)
    parser.add_argument("--teacher", required=True, help="local Qwen2.5-VL checkpoint directory")
    parser.add_argument("--layout", required=True, help='one mixer per teacher layer, e.g. "S,D,D,D x9"')
    parser.add_argument("--init", choices=INITS, default="mimic", help="how new mixers start")
    parser.add_argument("--out", required=True, help="directory for the student")
    parser.add_argument("--sliding-window", type=int, default=None, help="window of S layers (unset: 8192)")
    parser.add_argument(
        "--mixer-options",
        type=mixer_options_argument,
        default=None,
        help='JSON options per kind, e.g. \'{"D": {"num_heads": 16}}\'',
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh weights")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a folder that holds files (its model files are replaced)"
    )
    args = parser.parse_args(argv)
    if args.sliding_window is not None and "S" not in mixers.parse_layout(args.layout):
        parser.error(f"--sliding-window sets the window of S layers; the layout {args.layout!r} has none: drop it")
    report = convert_directory(
        args.teacher,
        args.out,
        args.layout,
        args.init,
        args.sliding_window,
        args.mixer_options,
        args.seed,
        overwrite=args.overwrite,
    )
    print(report.summary())
    print(f"wrote the student and conversion_report.json to {args.out}")
    return 0
