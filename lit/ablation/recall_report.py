"""The recall study's part of ``RESULTS.md``: accuracy against recurrent state bytes, recall by query-to-key
distance for the windowed hybrids, learning curves, and the literature's recall claims judged with
:mod:`hybridvl.lit.ablation.verdicts`.

Arms are grouped into panels of the same task, depth and MLP setting. Within a panel an arm's *family* is the
mixer kind it stacks (``D``, ``M``, ``G``, ``L``, ``L-textbook`` for ``L`` with the textbook options, ``A`` for
all attention), whatever the arm is called, so the claims read any study built of these mixers; arms of other
mixers (a user's) appear in the figures and tables. Two arms are at *equal state* when their state bytes round to
the same power of two (the sizes of ``recall.yaml`` put every family on the same points, up to convolution tails).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hybridvl import mixers
from hybridvl.lit.ablation.plots import plot_estimates, pyplot
from hybridvl.lit.ablation.runner import format_bytes, summarize
from hybridvl.lit.ablation.verdicts import SOLVED, Claim, Estimate, compare, estimate, reaches

COLOURS = {"D": "tab:red", "M": "tab:blue", "G": "tab:green", "L": "tab:purple", "L-textbook": "tab:brown",
           "A": "black", "S": "grey"}  # fmt: skip


def family(cell: dict[str, Any]) -> str:
    """The mixer kind an arm stacks besides sliding-window layers (see the module docstring)."""
    kinds = set(mixers.parse_layout(cell["layout"]))
    if kinds == {"A"}:
        return "A"
    linear = sorted(kinds - {"S"})
    if not linear:
        return "S"
    if len(linear) > 1:
        return "+".join(linear)
    (kind,) = linear
    if kind == "L":
        from hybridvl.mixers.linear import LinearAttention

        options = cell.get("settings", {}).get("mixer_options", {}).get("L", {})
        if all(options.get(key) == value for key, value in LinearAttention.TEXTBOOK.items()):
            return "L-textbook"
    return kind


def panel(cell: dict[str, Any]) -> tuple[str, int, bool]:
    """(task, layers, with an MLP): arms in one panel are compared with each other."""
    return cell["task"], len(mixers.parse_layout(cell["layout"])), cell.get("intermediate_size", 1) > 0


def panel_title(key: tuple[str, int, bool]) -> str:
    task, layers, mlp = key
    return f"{task}, {layers} layers, {'MLP' if mlp else 'no MLP'}"


@dataclasses.dataclass
class ArmScore:
    """One arm at one size in one panel: its chosen cells (the learning rate picked on validation)."""

    arm: str
    family: str
    size: int
    state_bytes: int
    chance: float
    cells: list[dict[str, Any]]
    score: Estimate

    @property
    def level(self) -> int:
        """The state size as a power of two (equal state: equal level)."""
        return round(math.log2(self.state_bytes))


def arm_scores(cells: list[dict[str, Any]]) -> dict[tuple[str, int, bool], list[ArmScore]]:
    """Per panel, every arm at every size, at its chosen learning rate
    (:func:`hybridvl.lit.ablation.runner.summarize`)."""
    rows = {(row["task"], row["arm"], row["size"], row["d_model"]): row for row in summarize(cells)}
    grouped: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for cell in cells:
        key = (cell["task"], cell["arm"], cell["size"], cell["d_model"])
        if cell["learning_rate"] == rows[key]["best_learning_rate"]:
            grouped[key].append(cell)
    panels: dict[tuple[str, int, bool], list[ArmScore]] = defaultdict(list)
    for (_, arm, size, _), chosen in sorted(grouped.items()):
        first = chosen[0]
        score = estimate(cell["accuracy"] for cell in chosen)
        panels[panel(first)].append(
            ArmScore(arm, family(first), size, first["state_bytes"], first["no_recall_accuracy"], chosen, score)
        )
    return dict(panels)


def distance_score(arm: ArmScore, low: float, high: float) -> Estimate | None:
    """The arm's test accuracy on queries whose key lies ``low`` to ``high`` tokens back (per seed, then over
    seeds); ``None`` when no query falls there."""
    values = []
    for cell in arm.cells:
        asked = sum(n for d, n in enumerate(cell["distance_asked"]) if low <= d < high)
        answered = sum(n for d, n in enumerate(cell["distance_answered"]) if low <= d < high)
        if asked:
            values.append(answered / asked)
    return estimate(values) if values else None


# --- claims ---------------------------------------------------------------------------------------------


def _pairs(claim: Claim, panels: dict, better: Iterable[str], worse: Iterable[str]) -> Claim:
    """Judge ``better`` family above ``worse`` family at every state level of every panel holding both."""
    for key, arms in sorted(panels.items()):
        for high in better:
            for low in worse:
                for a in (arm for arm in arms if arm.family == high):
                    for b in (arm for arm in arms if arm.family == low and arm.level == a.level):
                        outcome = compare(a.score, b.score, chance=a.chance)
                        evidence = f"{a.arm} {a.score.describe()} vs {b.arm} {b.score.describe()}"
                        setting = f"{panel_title(key)}, state {format_bytes(a.state_bytes)}"
                        claim.settings.append((setting, evidence, outcome))
    return claim


def recall_claims(cells: list[dict[str, Any]]) -> list[Claim]:
    """The recall claims of InfiniteVL, Gated DeltaNet, Zoology and Based, judged on the cells."""
    panels = arm_scores(cells)
    flat = {key: [arm for arm in arms if key[1] == 2] for key, arms in panels.items()}
    claims = [
        _pairs(
            Claim(
                "Gated DeltaNet recalls more than Mamba2 and GLA at equal state",
                "InfiniteVL's choice of mixer; Gated DeltaNet, Yang et al. 2024",
                needs="2-layer D, M and G arms at equal state",
            ),
            flat,
            ["D"],
            ["M", "G"],
        ),
        _pairs(
            Claim(
                "Textbook linear attention recalls less than the gated and delta mixers at equal state",
                "Zoology, Arora et al. 2023; Based, Arora et al. 2024",
                needs="2-layer L-textbook arms beside D, M or G at equal state",
            ),
            flat,
            ["D", "M", "G"],
            ["L-textbook"],
        ),
    ]
    solves = Claim(f"Attention solves every setting (accuracy >= {SOLVED:g})", "Zoology", needs="all-attention arms")
    for key, arms in sorted(panels.items()):
        for arm in (arm for arm in arms if arm.family == "A"):
            solves.settings.append((panel_title(key), f"{arm.arm} {arm.score.describe()}", reaches(arm.score, SOLVED)))
    claims.append(solves)
    claims += _window_claims(panels)
    return claims


def _window_claims(panels: dict) -> list[Claim]:
    """Claims on the windowed hybrids, from test accuracy by query-to-key distance."""
    beyond = Claim(
        "In S,X,X,X hybrids Gated DeltaNet recalls keys beyond the window more than Mamba2 and GLA",
        "InfiniteVL's choice of mixer",
        needs="S,D,D,D, S,M,M,M and S,G,G,G arms with queries beyond their window",
    )
    reach = Claim(
        "A window-only stack loses recall beyond what its stacked windows reach (layers x window)",
        "InfiniteVL: window-only models degrade once the sequence exceeds the window",
        needs="an all-S arm with queries within one window and beyond its reach",
    )
    for key, arms in sorted(panels.items()):
        windowed = [arm for arm in arms if arm.cells[0].get("window")]
        if not windowed:
            continue
        window = windowed[0].cells[0]["window"]
        far = {arm.arm: distance_score(arm, window, math.inf) for arm in windowed}
        for low in ("M", "G"):
            for a in (arm for arm in windowed if arm.family == "D"):
                for b in (arm for arm in windowed if arm.family == low):
                    if far[a.arm] and far[b.arm]:
                        outcome = compare(far[a.arm], far[b.arm], chance=a.chance)
                        evidence = f"{a.arm} {far[a.arm].describe()} vs {b.arm} {far[b.arm].describe()}"
                        beyond.settings.append((f"{panel_title(key)}, distance >= {window}", evidence, outcome))
        for arm in (arm for arm in windowed if arm.family == "S"):
            depth = len(mixers.parse_layout(arm.cells[0]["layout"]))
            near, past = distance_score(arm, 0, window), distance_score(arm, depth * window, math.inf)
            if near and past:
                evidence = f"within {window}: {near.describe()}; beyond {depth * window}: {past.describe()}"
                reach.settings.append((f"{panel_title(key)}, {arm.arm}", evidence, compare(near, past, arm.chance)))
    return [beyond, reach]


# --- figures --------------------------------------------------------------------------------------------


def _finish(fig, axes, used: int, ylabel: str, path: Path, dpi: int = 110) -> None:
    """Hide the unused panels of a grid, label the shared accuracy axis, save and close the figure."""
    for ax in axes.flat[used:]:
        ax.axis("off")
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def plot_state_size(path: Path, panels: dict[tuple[str, int, bool], list[ArmScore]]) -> bool:
    """Accuracy (mean and 95% interval over seeds) against state bytes per sequence, one line per arm, one panel
    per (task, depth, MLP); the no-recall guess dotted. Returns whether there was anything to plot."""
    keys = sorted(panels)
    if not keys:
        return False
    plt = pyplot()
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns + 1.5, 4 * rows), squeeze=False, sharey=True)
    for ax, key in zip(axes.flat, keys):
        by_arm: dict[str, list[ArmScore]] = defaultdict(list)
        for arm in panels[key]:
            by_arm[arm.arm].append(arm)
        for number, (name, points) in enumerate(sorted(by_arm.items())):
            points.sort(key=lambda arm: arm.state_bytes)
            style = COLOURS.get(points[0].family)
            dodge = 2 ** (0.03 * (number - (len(by_arm) - 1) / 2))  # side by side, so intervals stay apart
            plot_estimates(
                ax,
                [arm.state_bytes * dodge for arm in points],
                [arm.score for arm in points],
                marker="o" if len(points) > 1 else "*",
                markersize=5 if len(points) > 1 else 10,
                color=style,
                linestyle="--" if points[0].family == "L-textbook" else "-",
                label=name,
            )
        ax.axhline(panels[key][0].chance, color="grey", linestyle=":", linewidth=1, label="no-recall guess (1/kv)")
        ax.set_xscale("log", base=2)
        ax.set_title(panel_title(key), fontsize=9)
        ax.set_xlabel("state bytes per sequence (all layers)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    _finish(fig, axes, len(keys), "test accuracy (mean, 95% CI over seeds)", path)
    plt.close(fig)
    return True


def distance_bins(length: int) -> list[tuple[int, int]]:
    """Query-to-key distances in powers of two: [1, 2), [2, 4), ... up to the sequence length."""
    edges = [2**k for k in range(int(math.log2(length)) + 1)] + [length + 1]
    return [(low, high) for low, high in itertools.pairwise(edges) if low < high]


def plot_distance(path: Path, panels: dict[tuple[str, int, bool], list[ArmScore]]) -> list[str]:
    """Per panel with windowed arms: test accuracy by query-to-key distance (binned), the window and each
    window-only stack's reach marked; returns the markdown tables of the same numbers."""
    keys = [key for key in sorted(panels) if any(arm.cells[0].get("window") for arm in panels[key])]
    if not keys:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys) + 1.5, 4), squeeze=False, sharey=True)
    tables = []
    for ax, key in zip(axes[0], keys):
        arms = panels[key]
        length = len(arms[0].cells[0]["distance_asked"]) - 1
        window = next(arm.cells[0]["window"] for arm in arms if arm.cells[0].get("window"))
        bins = distance_bins(length)
        header = "| arm | " + " | ".join(f"{low}-{high - 1}" for low, high in bins) + " |"
        lines = [f"{panel_title(key)}: test accuracy by query-to-key distance (tokens), window {window}", "",
                 header, "|---|" + "---|" * len(bins)]  # fmt: skip
        for arm in sorted(arms, key=lambda arm: arm.arm):
            scores = [distance_score(arm, low, high) for low, high in bins]
            centres = [math.sqrt(low * high) for (low, high), s in zip(bins, scores) if s]
            kept = [s for s in scores if s]
            plot_estimates(
                ax,
                centres,
                kept,
                marker="o",
                color=COLOURS.get(arm.family),
                label=arm.arm,
            )
            lines.append(f"| `{arm.arm}` | " + " | ".join(f"{s.mean:.3f}" if s else "" for s in scores) + " |")
        ax.axvline(window, color="grey", linestyle="--", linewidth=1, label=f"window ({window})")
        for arm in arms:
            if arm.family == "S":
                reach = window * len(mixers.parse_layout(arm.cells[0]["layout"]))
                ax.axvline(reach, color="grey", linestyle=":", linewidth=1, label=f"{arm.arm} reach ({reach})")
        ax.set_xscale("log", base=2)
        ax.set_title(panel_title(key), fontsize=9)
        ax.set_xlabel("query-to-key distance (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        tables.append("\n".join(lines))
    _finish(fig, axes, len(keys), "test accuracy (mean, 95% CI over seeds)", path)
    plt.close(fig)
    return tables


def plot_curves(path: Path, panel_key: tuple[str, int, bool], arms: list[ArmScore]) -> None:
    """Validation accuracy against training steps of every chosen cell of a panel: one subplot per arm, one
    colour per size, one line per seed."""
    plt = pyplot()
    names = sorted({arm.arm for arm in arms})
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 2.8 * rows), squeeze=False, sharey=True)
    colours = plt.get_cmap("viridis")
    for ax, name in zip(axes.flat, names):
        sizes = sorted((arm for arm in arms if arm.arm == name), key=lambda arm: arm.state_bytes)
        for number, arm in enumerate(sizes):
            colour = colours(number / max(1, len(sizes) - 1))
            for seed, cell in enumerate(arm.cells):
                curve = cell.get("curve", [])
                label = f"{format_bytes(arm.state_bytes)}, lr {cell['learning_rate']:g}" if seed == 0 else None
                ax.plot([p["step"] for p in curve], [p["val_accuracy"] for p in curve], color=colour, alpha=0.7,
                        linewidth=1, label=label)  # fmt: skip
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"learning curves: {panel_title(panel_key)}", fontsize=10)
    _finish(fig, axes, len(names), "validation accuracy", path, dpi=100)
    plt.close(fig)


def recall_section(name: str, cells: list[dict[str, Any]], figures: Path) -> list[str]:
    """The recall study's figures and tables as markdown lines (figures written into ``figures``)."""
    panels = arm_scores(cells)
    parts: list[str] = []
    state_figure = figures / f"{name}_state_size.png"
    if plot_state_size(state_figure, panels):
        parts += ["", f"![accuracy against state size](figures/{state_figure.name})"]
    distance_figure = figures / f"{name}_distance.png"
    tables = plot_distance(distance_figure, panels)
    if tables:
        parts += ["", f"![accuracy by query-to-key distance](figures/{distance_figure.name})"]
        for table in tables:
            parts += ["", table]
    parts += ["", "Learning curves (validation accuracy, chosen learning rate, every seed):"]
    for number, (key, arms) in enumerate(sorted(panels.items())):
        figure = figures / f"{name}_curves_{number}.png"
        plot_curves(figure, key, arms)
        parts += ["", f"![{panel_title(key)}](figures/{figure.name})"]
    backends = sorted({f"{cell['layout']}: {', '.join(cell.get('backends', []))}" for cell in cells})
    parts += ["", "Backends the layers ran: " + "; ".join(f"`{entry}`" for entry in backends) + "."]
    return parts
