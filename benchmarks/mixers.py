"""Forward and forward+backward time of every mixer at InfiniteVL's shape, against SDPA flash attention.

Batch x sequence length stays constant (``--tokens``), so a mixer whose cost per token does not grow with
the sequence shows a flat line. Every case runs in bf16 on one CUDA device, with the mixer's default
(``auto``) backend; ``A (SDPA)`` is full attention through PyTorch's scaled_dot_product_attention (flash
kernel) — the baseline every speed-up in the tables is measured against, in the same run. The ``op``
rows time the bare recurrences (``gated_delta_rule`` through fla against SDPA), without projections.

    python -m benchmarks.mixers                  # on a CUDA machine; writes results/mixers.{json,md,png}
    python -m benchmarks.mixers --plot-only      # redraw the markdown and PNG from the JSON
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import (
    RESULTS,
    at_least,
    cuda_time_ms,
    environment,
    environment_lines,
    markdown_table,
    report,
    write_json,
)
from hybridvl import mixers
from hybridvl.mixers.ops import gated_delta_rule

HIDDEN = 2048
# (label, kind, options): InfiniteVL's SWA and GDN shapes; the other mixers at their default shapes for 2048
CASES = [
    ("D (GDN)", "D", dict(num_heads=16, head_dim=128, expand_v=2.0)),
    ("S (SWA 8192)", "S", dict(num_heads=16, num_kv_heads=2, window=8192, mrope_section=[16, 24, 24])),
    ("A (fla)", "A", dict(num_heads=16, num_kv_heads=2, mrope_section=[16, 24, 24], backend="fla")),
    ("A (SDPA)", "A", dict(num_heads=16, num_kv_heads=2, mrope_section=[16, 24, 24], backend="torch")),
    ("M (Mamba2)", "M", dict(d_state=128, headdim=64)),
    ("L (linear)", "L", dict(num_heads=16, head_dim=128, expand_v=2.0)),
    ("G (GLA)", "G", dict()),  # last: fla's GLA kernels take longest to compile and autotune
]
BASELINE = "A (SDPA)"


def time_module(mixer: torch.nn.Module, batch: int, seq_len: int) -> dict:
    """Forward (no grad) and forward + backward times. Training keeps the backend the forward resolved
    to, so a kernel that cannot train here is reported instead of timing a slower fallback."""
    x = torch.randn(batch, seq_len, HIDDEN, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        forward = cuda_time_ms(lambda: mixer(x))
    x.requires_grad_()
    dy = torch.randn_like(x)

    def step():
        y, _ = mixer(x)
        y.backward(dy)

    requested, mixer.backend = mixer.backend, mixer._resolve_backend(x)
    torch.cuda.reset_peak_memory_stats()
    try:
        result = {"forward_ms": forward, "train_ms": cuda_time_ms(step)}
    except mixers.BackendUnavailableError as error:
        result = {"forward_ms": forward, "train_ms": None, "error": str(error)}
    finally:
        mixer.backend = requested
    return {**result, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def time_ops(batch: int, seq_len: int) -> dict:
    """Bare recurrences: fla gated delta rule vs SDPA flash attention (16 heads x 128, GQA 2 KV heads)."""
    shape = (batch, seq_len, 16)
    q = F.normalize(torch.randn(*shape, 128, device="cuda"), dim=-1).bfloat16().requires_grad_()
    k = F.normalize(torch.randn(*shape, 128, device="cuda"), dim=-1).bfloat16().requires_grad_()
    v = torch.randn(*shape, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = F.logsigmoid(torch.randn(*shape, device="cuda") + 4).requires_grad_()
    beta = torch.rand(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_()
    qa = torch.randn(batch, 16, seq_len, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ka = torch.randn(batch, 2, seq_len, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    va = torch.randn(batch, 2, seq_len, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def gdn():
        return gated_delta_rule(q, k, v, g, beta, backend="fla")[0]

    def sdpa():
        return F.scaled_dot_product_attention(qa, ka, va, is_causal=True, enable_gqa=True)

    result = {}
    for name, fn in (("gated_delta_rule (fla)", gdn), ("SDPA flash attention", sdpa)):
        with torch.no_grad():
            forward = cuda_time_ms(fn)
        out = fn()
        dout = torch.randn_like(out)
        try:
            result[name] = {
                "forward_ms": forward,
                "train_ms": cuda_time_ms(lambda fn=fn, dout=dout: fn().backward(dout)),
            }
        except mixers.BackendUnavailableError as error:
            result[name] = {"forward_ms": forward, "train_ms": None, "error": str(error)}
    return result


def run(seq_lens: list[int], tokens: int, out: Path) -> dict:
    """Time every case; the JSON at ``out`` is rewritten after each one, so a cut-off run keeps its results."""
    results = {"environment": environment(), "tokens_per_batch": tokens, "hidden_size": HIDDEN, "cases": []}
    for seq_len in seq_lens:
        batch = max(1, tokens // seq_len)
        for name, timing in time_ops(batch, seq_len).items():
            results["cases"].append(
                {"mixer": f"op: {name}", "backend": "", "seq_len": seq_len, "batch": batch, **timing}
            )
            write_json(out, results)
            print(f"op {name:24s} T={seq_len:6d} {timing}", flush=True)
    for label, kind, options in CASES:
        mixer = mixers.build_mixer(kind, HIDDEN, **options).to("cuda", torch.bfloat16)
        backend = mixer._resolve_backend(torch.zeros(1, 1, HIDDEN, device="cuda", dtype=torch.bfloat16))
        for seq_len in seq_lens:
            batch = max(1, tokens // seq_len)
            try:
                timing = time_module(mixer, batch, seq_len)
            except torch.OutOfMemoryError:
                timing = {"forward_ms": None, "train_ms": None, "peak_gib": None, "error": "out of memory"}
            torch.cuda.empty_cache()
            results["cases"].append({"mixer": label, "backend": backend, "seq_len": seq_len, "batch": batch, **timing})
            write_json(out, results)
            print(f"{label:14s} T={seq_len:6d} B={batch:3d} {timing}", flush=True)
        del mixer
    return results


def markdown(results: dict) -> str:
    cases = results["cases"]
    seq_lens = sorted({c["seq_len"] for c in cases})
    labels = list(dict.fromkeys(c["mixer"] for c in cases))
    by = {(c["mixer"], c["seq_len"]): c for c in cases}

    def cell(label, seq_len, field, baseline):
        case, base = by.get((label, seq_len)), by.get((baseline, seq_len))
        if case is None or case.get(field) is None:
            return "not run" if case and case.get("error") else "-"
        speedup = f" ({base[field] / case[field]:.2f}x)" if base and base.get(field) else ""
        return f"{case[field]:.2f}{speedup}"

    parts = [
        "# Mixer speed",
        "",
        environment_lines(results["environment"]),
        "",
        f"Hidden size {results['hidden_size']}, bf16, batch x sequence = {results['tokens_per_batch']:,} tokens. "
        "Milliseconds (median of 10 after 3 warm-ups, CUDA events); in parentheses the speed-up over the "
        "baseline measured in the same run: `A (SDPA)` for mixers, SDPA flash attention for ops. "
        "Regenerate with `python -m benchmarks.mixers` on a CUDA machine.",
    ]
    for field, title in (("forward_ms", "Forward"), ("train_ms", "Forward + backward")):
        header = ["mixer", "backend"] + [f"T={t // 1024}K" for t in seq_lens]
        rows = []
        for label in labels:
            baseline = "op: SDPA flash attention" if label.startswith("op:") else BASELINE
            backend = next(c["backend"] for c in cases if c["mixer"] == label)
            rows.append([label, backend or "-"] + [cell(label, t, field, baseline) for t in seq_lens])
        parts += ["", f"## {title} (ms)", "", markdown_table(header, rows)]
    peak_rows = [
        [label] + [f"{by[(label, t)]['peak_gib']:.1f}" if by[(label, t)].get("train_ms") else "-" for t in seq_lens]
        for label in labels
        if not label.startswith("op:")
    ]
    parts += [
        "",
        "## Peak memory, forward + backward (GiB)",
        "",
        markdown_table(["mixer"] + [f"T={t // 1024}K" for t in seq_lens], peak_rows),
    ]
    parts += ["", "## Where GDN is not faster than attention", "", *gdn_vs_attention(results)]
    errors = sorted({f"- `{c['mixer']}`: {c['error']}" for c in cases if c.get("error")})
    expected = [label for label, _, _ in CASES] + ["op: gated_delta_rule (fla)", "op: SDPA flash attention"]
    absent = [
        f"- `{label}`: missing from the results (the run ended before it)" for label in expected if label not in labels
    ]
    if errors or absent:
        parts += ["", "## Not run", "", *errors, *absent]
    return "\n".join(parts) + "\n"


def gdn_vs_attention(results: dict) -> list[str]:
    """One line per comparison: the lengths where GDN is slower than attention, or not measured."""
    by = {(c["mixer"], c["seq_len"]): c for c in results["cases"]}
    seq_lens = sorted({c["seq_len"] for c in results["cases"]})
    lines = []
    for mine, theirs in (("D (GDN)", BASELINE), ("op: gated_delta_rule (fla)", "op: SDPA flash attention")):
        for field, what in (("forward_ms", "forward"), ("train_ms", "forward + backward")):
            slower, missing = [], []
            for t in seq_lens:
                a, b = by.get((mine, t), {}).get(field), by.get((theirs, t), {}).get(field)
                if a is None or b is None:
                    missing.append(f"T={t // 1024}K")
                elif a >= b:
                    slower.append(f"T={t // 1024}K ({a:.2f} vs {b:.2f} ms)")
            if len(missing) == len(seq_lens):
                verdict = "not measured"
            else:
                verdict = "slower at " + ", ".join(slower) if slower else "faster at every measured length"
                if missing:
                    verdict += "; not measured at " + ", ".join(missing)
            lines.append(f"- `{mine}` vs `{theirs}`, {what}: {verdict}")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(dict.fromkeys(c["mixer"] for c in results["cases"] if not c["mixer"].startswith("op:")))
    for ax, field, title in zip(axes, ("forward_ms", "train_ms"), ("forward", "forward + backward")):
        for i, label in enumerate(labels):
            points = [(c["seq_len"], c[field]) for c in results["cases"] if c["mixer"] == label and c.get(field)]
            if points:
                style = "--" if "SDPA" in label else "-"
                ax.plot(*zip(*points), marker="o", label=label, linestyle=style, color=f"C{i}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (batch x length constant)")
        ax.set_ylabel("ms")
        ax.set_title(f"{title}, {results['tokens_per_batch']:,} tokens per batch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"mixers at hidden {results['hidden_size']}, bf16, {results['environment']['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="benchmarks.mixers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq-lens", type=at_least(1), nargs="+", default=[2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--tokens", type=at_least(1), default=65536, help="batch x sequence length")
    parser.add_argument("--out", type=Path, default=RESULTS / "mixers")
    parser.add_argument("--plot-only", action="store_true", help="redraw the markdown and PNG from the JSON")
    args = parser.parse_args()
    report("mixers", args.out, args.plot_only, lambda path: run(args.seq_lens, args.tokens, path), markdown, plot)


if __name__ == "__main__":
    main()
