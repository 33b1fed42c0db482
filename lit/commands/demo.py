"""``hybridvl demo``: every registered mixer on CPU — parallel vs streamed agreement, state size, speed.

For each kind the demo runs one parallel pass over a sequence, then the same tokens as a prefill
followed by token-by-token decoding from the returned state, and checks that both give the same
outputs. It reports the state bytes after 1K and 64K tokens (constant for all kinds but ``A``) and the
throughput of both paths.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from hybridvl import mixers
from hybridvl.lit.cli import ArgumentParser
from hybridvl.lit.commands.layout import format_bytes

# small, CPU-friendly shapes; every kind keeps its structure
DEMO_OPTIONS = {
    "D": dict(num_heads=4, head_dim=32),
    "S": dict(num_heads=4, num_kv_heads=2, window=128),
    "A": dict(num_heads=4, num_kv_heads=2),
    "M": dict(d_state=32, headdim=32),
    "G": dict(num_heads=4),
    "L": dict(num_heads=4, head_dim=32),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="hybridvl demo", description=__doc__)
    parser.add_argument("--hidden-size", type=int, default=256, help="model width of every mixer")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens in the parallel pass")
    parser.add_argument("--decode", type=int, default=32, help="of which the last N are decoded one at a time")
    parser.add_argument("--layout", default="S,D,D,D x2", help="a layout whose kinds are demonstrated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    args = parser.parse_args(argv)
    if args.seq_len < 2:
        parser.error(f"--seq-len must be at least 2 (a prefill and a decoded token), got {args.seq_len}")
    if not 1 <= args.decode < args.seq_len:
        parser.error(f"--decode must lie in [1, --seq-len - 1] = [1, {args.seq_len - 1}], got {args.decode}")
    with torch.device("meta"):  # every mixer takes the width before any is timed
        for spec in mixers.registered():
            mixers.build_mixer(spec.letter, args.hidden_size, **DEMO_OPTIONS.get(spec.letter, {}))
    return args


def run_kind(kind: str, hidden_size: int, seq_len: int, decode: int) -> dict:
    mixer = mixers.build_mixer(kind, hidden_size, **DEMO_OPTIONS.get(kind, {})).eval()
    x = torch.randn(1, seq_len, hidden_size)
    with torch.inference_mode():
        start = time.perf_counter()
        y_parallel, _ = mixer(x)
        parallel_s = time.perf_counter() - start

        prefill = seq_len - decode
        y_prefill, state = mixer(x[:, :prefill])
        outputs = [y_prefill]
        start = time.perf_counter()
        for t in range(prefill, seq_len):
            y_t, state = mixer(x[:, t : t + 1], state)
            outputs.append(y_t)
        decode_s = time.perf_counter() - start
    y_streamed = torch.cat(outputs, dim=1)
    rel_err = ((y_streamed - y_parallel).norm() / y_parallel.norm()).item()
    return {
        "kind": kind,
        "name": mixers.get_spec(kind).name,
        "params": sum(p.numel() for p in mixer.parameters()),
        "rel_err": rel_err,
        "state_1k": mixer.state_bytes(1, seq_len=1024),
        "state_64k": mixer.state_bytes(1, seq_len=65536),
        "parallel_tok_s": seq_len / parallel_s,
        "decode_ms": 1000 * decode_s / decode,
    }


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    kinds = mixers.parse_layout(args.layout)
    print(f"layout {mixers.format_layout(kinds)}: {len(kinds)} layers, {mixers.count_kinds(kinds)}")
    results = [
        run_kind(spec.letter, args.hidden_size, args.seq_len, args.decode)
        for spec in tqdm(mixers.registered(), desc="mixers", unit="kind")
    ]
    header = (
        "kind",
        "name",
        "params",
        "streamed vs parallel",
        "state @1K",
        "state @64K",
        "parallel tok/s",
        "decode ms/tok",
    )
    rows = [header] + [
        (
            r["kind"],
            r["name"],
            f"{r['params']:,}",
            f"{r['rel_err']:.1e}",
            format_bytes(r["state_1k"]),
            format_bytes(r["state_64k"]),
            f"{r['parallel_tok_s']:,.0f}",
            f"{r['decode_ms']:.2f}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    print()
    for row in rows:
        print("  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    worst = max(r["rel_err"] for r in results)
    ok = worst < 1e-4
    print(f"\nstreamed == parallel for every mixer: {'yes' if ok else 'NO'} (worst relative error {worst:.1e}, fp32)")
    return 0 if ok else 1
