"""The multimodal studies' part of ``RESULTS.md`` (``mixer_type``, ``swa_ratio``, ``init``): tables, plots and one
verdict per InfiniteVL claim about the synthetic suite, from the cells the runner wrote."""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import mixers
from lit.ablation.runner import rows_table, summarize

TEXT_TASKS = ("ocr", "chart")


def swa_share(layout: str) -> float:
    kinds = mixers.parse_layout(layout)
    return sum(kind == "S" for kind in kinds) / len(kinds)


def window_only_depth(layouts: Iterable[str]) -> int:
    """Layers of the deepest window-only layout (every layer ``S``) among ``layouts``; 0 without one."""
    return max((len(mixers.parse_layout(layout)) for layout in layouts if swa_share(layout) == 1.0), default=0)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def per_task_accuracy(cells: list[dict], layout: str, tasks: tuple[str, ...]) -> tuple[float, float] | None:
    """Mean ± std over seeds of the mean exact match over ``tasks`` (best learning rate per seed group)."""
    by_seed: dict[int, list[float]] = defaultdict(list)
    for cell in cells:
        if cell["layout"] == layout and cell.get("per_task"):
            scores = [cell["per_task"][t] for t in tasks if t in cell["per_task"]]
            if scores:
                by_seed[cell["seed"]].append(statistics.fmean(scores))
    values = [max(scores) for scores in by_seed.values()]
    return _mean_std(values) if values else None


def distance_table(curves: dict[str, list[tuple[float, float, float]]]) -> str:
    """A markdown table of :func:`distance_curves`: one row per layout, one column per distance."""
    distances = sorted({point[0] for points in curves.values() for point in points})
    lines = [
        "| layout | " + " | ".join(f"{d:g} frames" for d in distances) + " |",
        "|---|" + "---|" * len(distances),
    ]
    for layout, points in sorted(curves.items(), key=lambda item: swa_share(item[0])):
        found = {d: (m, s) for d, m, s in points}
        cells = [f"{found[d][0]:.3f} ± {found[d][1]:.3f}" if d in found else "" for d in distances]
        lines.append(f"| `{layout}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_lines(
    path: Path,
    title: str,
    xlabel: str,
    series: dict[str, list[tuple[float, float, float]]],
    verticals: Sequence[tuple[float, str]] = (),
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in sorted(series.items()):
        points = sorted(points)
        ax.errorbar(
            [p[0] for p in points],
            [p[1] for p in points],
            yerr=[p[2] for p in points],
            marker="o",
            capsize=3,
            label=label,
        )
    for (x, label), style in zip(verticals, ("--", ":")):
        ax.axvline(x, color="grey", linestyle=style, linewidth=1, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def layout_style(layout: str) -> dict[str, Any]:
    """Matplotlib style of a layout in the mixer plots: one colour per linear mixer, solid for the hybrid
    (``S,X,X,X``) and dashed for the pure (``X x4``) stack; all-S and all-A in grey and black."""
    kinds = mixers.parse_layout(layout)
    others = sorted(set(kinds) - {"S"})
    if not others:
        return {"color": "grey", "linestyle": ":", "marker": "v"}
    if others == ["A"]:
        return {"color": "black", "linestyle": ":", "marker": "^"}
    colours = {"D": "tab:red", "M": "tab:blue", "G": "tab:green", "L": "tab:purple"}
    hybrid = "S" in kinds
    return {
        "color": colours.get(others[0], "tab:brown"),
        "linestyle": "-" if hybrid else "--",
        "marker": "o" if hybrid else "s",
    }


def plot_widths(path: Path, rows: list[dict[str, Any]]) -> None:
    """Accuracy vs ``d_model`` per layout, one panel per task (the mixer-type study's figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({row["task"] for row in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks) + 1.5, 4), squeeze=False, sharey=True)
    for ax, task in zip(axes[0], tasks, strict=True):
        by_layout: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            if row["task"] == task:
                by_layout[row["layout"]].append(row)
        for number, (layout, points) in enumerate(sorted(by_layout.items())):
            points.sort(key=lambda row: row["d_model"])
            dodge = 2 ** (0.04 * (number - (len(by_layout) - 1) / 2))  # side by side, so error bars stay apart
            ax.errorbar(
                [row["d_model"] * dodge for row in points],
                [row["mean"] for row in points],
                yerr=[[row["mean"] - row["low"] for row in points], [row["high"] - row["mean"] for row in points]],
                capsize=3,
                label=layout,
                **layout_style(layout),
            )
        widths = sorted({row["d_model"] for row in rows if row["task"] == task})
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(width) for width in widths])
        ax.set_xlim(widths[0] / 1.5, widths[-1] * 1.5)
        ax.set_title(task)
        ax.set_xlabel("d_model")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (mean, 95% CI over seeds)")
    axes[0][0].set_ylim(0, 1.05)
    handles = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def distance_curves(cells: list[dict]) -> dict[str, list[tuple[float, float, float]]]:
    """Per layout: (frames between cue and question, mean, std over seeds) of the held-out video-memory
    accuracy (cells' ``distance_accuracy``)."""
    by_layout: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for cell in cells:
        for distance, accuracy in cell.get("distance_accuracy", {}).items():
            by_layout[cell["layout"]][int(distance)].append(accuracy)
    return {
        layout: [(distance, *_mean_std(values)) for distance, values in sorted(points.items())]
        for layout, points in by_layout.items()
    }


def window_memory(cells: list[dict]) -> str:
    """The window claim from the distance curves: window-only models answer inside the window and lose the answer
    once the cue lies beyond what their stacked windows reach (each SWA layer passes information one window further
    back, so ``layers x window``), where models with Gated DeltaNet layers keep it ("not measured" without the
    cells or distances to tell)."""
    claim = "Window-only models lose answers beyond the window"
    missing = verdict(
        None,
        f"{claim}: needs video-memory accuracy by distance, inside one window and beyond the window-only stack's "
        "reach, of window-only and Gated DeltaNet layouts (swa_ratio cells missing).",
    )
    curves = distance_curves(cells)
    windows = {cell["window_frames"] for cell in cells if "window_frames" in cell}
    only = [layout for layout in curves if swa_share(layout) == 1.0]
    others = [layout for layout in curves if swa_share(layout) < 1.0]
    if not curves or len(windows) != 1 or not only or not others:
        return missing
    window = windows.pop()
    depth = window_only_depth(only)
    reach = depth * window

    def mean(layouts: list[str], keep: Callable[[float], bool]) -> float | None:
        values = [m for layout in layouts for d, m, _ in curves[layout] if keep(d)]
        return statistics.fmean(values) if values else None

    only_in = mean(only, lambda d: d < window)
    only_out, others_out = mean(only, lambda d: d >= reach), mean(others, lambda d: d >= reach)
    if only_out is None or others_out is None:
        farthest = max(d for points in curves.values() for d, *_ in points)
        beyond_one = mean(only, lambda d: d >= window)
        scores = "" if beyond_one is None else f", where it scores {beyond_one:.3f} beyond one window"
        return verdict(
            None,
            f"{claim}: the farthest cue measured, {farthest} frames back, lies within what the {depth} stacked "
            f"windows of `{only[0]}` reach ({depth} x {window:g} = {reach:g} frames){scores}; needs distances "
            f"beyond {reach:g} frames.",
        )
    holds = only_in is not None and only_out < only_in and only_out < others_out
    return verdict(
        holds,
        f"{claim} ({window:g} frames, reaching {reach:g} frames through {depth} layers): held-out video-memory "
        f"accuracy of {', '.join(f'`{layout}`' for layout in only)} is {only_in:.3f} within one window and "
        f"{only_out:.3f} beyond the reach, where the layouts with Gated DeltaNet layers score {others_out:.3f}.",
    )


def _window_marks(windows: list[float], cells: list[dict]) -> list[tuple[float, str]]:
    """The distance plot's marks: one SWA window, and what the deepest window-only stack reaches through it."""
    if len(windows) != 1:
        return []
    depth = window_only_depth(cell["layout"] for cell in cells)
    window = (windows[0], "SWA window")
    return [window, (depth * windows[0], f"{depth} stacked windows")] if depth > 1 else [window]


def verdict(holds: bool | None, text: str) -> str:
    label = {True: "**Reproduced.**", False: "**Not reproduced.**", None: "**Not measured.**"}[holds]
    return f"{label} {text}"


def multimodal_claims(studies: dict[str, list[dict]]) -> list[str]:
    """One paragraph per InfiniteVL claim about the synthetic suite, from the numbers (the recall claims are
    :mod:`lit.ablation.recall_report`'s)."""
    paragraphs = []
    mixer = studies.get("mixer_type", [])
    scores = {x: per_task_accuracy(mixer, f"S,{x},{x},{x}", TEXT_TASKS) for x in "DMGL"}
    if all(scores[x] for x in "DMG"):
        d, m, g = scores["D"], scores["M"], scores["G"]
        holds = d[0] > m[0] and d[0] > g[0]
        paragraphs.append(
            verdict(
                holds,
                f"Gated DeltaNet beats Mamba2 and GLA on text-rich tasks (OCR, chart): "
                f"S,D,D,D {d[0]:.3f} ± {d[1]:.3f}, S,M,M,M {m[0]:.3f} ± {m[1]:.3f}, "
                f"S,G,G,G {g[0]:.3f} ± {g[1]:.3f}.",
            )
        )
    else:
        paragraphs.append(verdict(None, "Gated DeltaNet vs Mamba2 and GLA on text-rich tasks: cells missing."))
    ratio = studies.get("swa_ratio", [])
    by_share: dict[float, list[float]] = defaultdict(list)
    for cell in ratio:
        if cell.get("per_task") and any(t in cell["per_task"] for t in TEXT_TASKS):
            by_share[swa_share(cell["layout"])].append(
                statistics.fmean(cell["per_task"][t] for t in TEXT_TASKS if t in cell["per_task"])
            )
    if len(by_share) >= 3:
        means = {share: statistics.fmean(v) for share, v in sorted(by_share.items())}
        shares = [s for s in sorted(means) if s < 1]  # window-only models are the window claim's
        gains = [means[b] - means[a] for a, b in itertools.pairwise(shares)]
        holds = gains[0] > 0 and all(gain <= gains[0] for gain in gains[1:]) if len(gains) >= 2 else None
        listing = ", ".join(f"{share:.3g}: {value:.3f}" for share, value in means.items())
        paragraphs.append(
            verdict(holds, f"More SWA helps text-rich tasks with diminishing returns (share: accuracy) {listing}.")
        )
    else:
        paragraphs.append(
            verdict(
                None,
                f"More SWA helps text-rich tasks with diminishing returns: needs cells at 3 or more SWA shares "
                f"(swa_ratio has {len(by_share)}).",
            )
        )
    paragraphs.append(window_memory(ratio))
    init = studies.get("init", [])
    mimic = [c["accuracy"] for c in init if c.get("init") == "mimic"]
    transfer = [c["accuracy"] for c in init if c.get("init") == "transfer"]
    teachers = {c["seed"]: c["teacher_accuracy"] for c in init if "teacher_accuracy" in c}  # one teacher a seed
    if mimic and transfer:
        (a, sa), (b, sb) = _mean_std(mimic), _mean_std(transfer)
        teacher = ""
        if teachers:
            t, st = _mean_std(list(teachers.values()))
            teacher = f"; their Transformer teachers score {t:.3f} ± {st:.3f}"
        paragraphs.append(
            f"Initialisation (no InfiniteVL claim; its code uses mimic): mimic {a:.3f} ± {sa:.3f}, "
            f"transfer {b:.3f} ± {sb:.3f} after distillation and fine-tuning{teacher}."
        )
    else:
        paragraphs.append("Initialisation (no InfiniteVL claim; its code uses mimic): init cells missing.")
    return paragraphs


def multimodal_section(name: str, cells: list[dict], figures: Path) -> list[str]:
    """A multimodal study's table and figures as markdown lines (figures written into ``figures``)."""
    parts = [rows_table(summarize(cells))]
    figure = figures / f"{name}.png"
    if name == "mixer_type" and cells:
        plot_widths(figure, summarize(cells))
        parts += ["", f"![{name}](figures/{figure.name})"]
    elif name == "swa_ratio":
        series: dict[str, list] = defaultdict(list)
        for task in sorted({task for cell in cells for task in cell.get("per_task", {})}):
            for layout in sorted({cell["layout"] for cell in cells}):
                score = per_task_accuracy(cells, layout, (task,))
                if score:
                    series[task].append((swa_share(layout), *score))
        if series:
            plot_lines(figure, name, "share of SWA layers", series)
            parts += ["", f"![{name}](figures/{figure.name})"]
    curves = distance_curves(cells)
    if curves:
        windows = sorted({cell["window_frames"] for cell in cells if "window_frames" in cell})
        figure = figures / f"{name}_video_memory_distance.png"
        plot_lines(
            figure,
            f"{name}: held-out video memory by distance",
            "frames between the cue and the question",
            curves,
            verticals=_window_marks(windows, cells),
        )
        parts += ["", distance_table(curves), "", f"![video memory by distance](figures/{figure.name})"]
    return parts
