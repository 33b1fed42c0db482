"""The multimodal studies' part of ``RESULTS.md``: per-task tables and figures of the synthetic-suite studies, and
InfiniteVL's architecture claims judged with :mod:`hybridvl.lit.ablation.verdicts` (Reproduced / Refuted / Inconclusive
/ Saturated on 95% bootstrap intervals over seeds, at each arm's learning rate chosen on validation, scored on the test
split).

Arms are read by their layouts, whatever they are called: a *hybrid* stacks ``S`` layers with one other mixer
kind (``S,D,D,D``), a *pure* stack one kind alone (``D x4``), a *window-only* stack ``S`` alone. Claims:

* Gated DeltaNet beats Mamba2 and GLA on the text-rich task (``document``) at matched state, and its margin is
  largest there (the per-seed margin on ``document`` against the margin on each other task).
* A hybrid beats the same mixer without attention (pure stack of the same depth).
* More SWA helps with diminishing returns (layouts of ``S`` and ``D`` of one depth at several SWA shares below 1):
  the first share above 0 beats share 0, no further gain lies wholly below zero, and the first gain lies above
  the last, all three (:func:`~hybridvl.lit.ablation.verdicts.conjoin`).
* Window-only stacks answer a video cue inside one window and within what their stacked windows reach, but not
  beyond that reach, where models with recurrent layers still answer (``eval_sets`` named
  :data:`INSIDE_WINDOW`, :data:`WITHIN_REACH`, :data:`BEYOND_REACH`).
* Initialisation (the ``init`` study): mimic against transfer after Stage I at each step budget, on each measure,
  paired by seed (one teacher per seed).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridvl import mixers
from hybridvl.lit.ablation.plots import plot_estimates, pyplot
from hybridvl.lit.ablation.runner import format_bytes, rows_table, summarize
from hybridvl.lit.ablation.verdicts import CEILING, Claim, Estimate, Outcome, compare, conjoin, estimate

TEXT_RICH = "document"
"""The synthetic task whose evidence lies beyond a sliding window
(:class:`~hybridvl.lit.data.synthetic.DocumentTask`)."""
INSIDE_WINDOW, WITHIN_REACH, BEYOND_REACH = "inside_window", "within_reach", "beyond_reach"
"""Names of the video-memory eval sets of the three regimes: the cue inside one window; between one window and what the
window-only stack's layers reach together; beyond that reach."""
NO_SATURATION = {"chance": -math.inf, "ceiling": math.inf}
"""Margins and gains are differences: no chance or ceiling applies to them."""

Score = Callable[[dict[str, Any]], float | None]


def swa_share(layout: str) -> float:
    kinds = mixers.parse_layout(layout)
    return sum(kind == "S" for kind in kinds) / len(kinds)


def mixer_family(layout: str) -> str | None:
    """The one kind a layout stacks besides ``S`` (``"D"`` for ``S,D,D,D`` and ``D x4``), ``"S"`` for a
    window-only stack, ``None`` for a layout of several other kinds."""
    others = set(mixers.parse_layout(layout)) - {"S"}
    return others.pop() if len(others) == 1 else ("S" if not others else None)


def task_score(task: str) -> Score:
    return lambda cell: cell.get("per_task", {}).get(task)


def mean_score(cell: dict[str, Any]) -> float | None:
    return cell.get("accuracy")


def set_score(name: str) -> Score:
    return lambda cell: cell.get("eval_sets", {}).get(name, {}).get("accuracy")


def chance_of(cell: dict[str, Any], task: str | None = None, eval_set: str | None = None) -> float:
    """The score without looking at the media of ``task`` (of the mean over tasks without one), on the test split
    or on ``eval_set``."""
    chances = (cell.get("eval_sets", {}).get(eval_set, {}) if eval_set else cell).get("chance", {})
    if task:
        return chances.get(task, 0.0)
    return statistics.fmean(chances.values()) if chances else 0.0


@dataclasses.dataclass
class ArmResult:
    """One arm of a study: its cells at the learning rate chosen on validation, one per seed."""

    arm: str
    layout: str
    cells: list[dict[str, Any]]

    @property
    def family(self) -> str | None:
        return mixer_family(self.layout)

    @property
    def depth(self) -> int:
        return len(mixers.parse_layout(self.layout))

    @property
    def share(self) -> float:
        return swa_share(self.layout)

    @property
    def state_level(self) -> int | None:
        """The recurrent state per sequence as a power of two (equal state: equal level)."""
        state = self.cells[0].get("state_bytes_per_sequence")
        return round(math.log2(state)) if state else None

    def by_seed(self, score: Score) -> dict[int, float]:
        return {cell["seed"]: value for cell in self.cells if (value := score(cell)) is not None}

    def estimate(self, score: Score) -> Estimate | None:
        values = self.by_seed(score)
        return estimate(values.values()) if values else None


def chosen_arms(cells: list[dict[str, Any]]) -> dict[str, ArmResult]:
    """Every arm of a study's synthetic cells at its chosen learning rate
    (:func:`hybridvl.lit.ablation.runner.summarize`)."""
    cells = [cell for cell in cells if "per_task" in cell]
    best = {(row["task"], row["arm"]): row["best_learning_rate"] for row in summarize(cells)}
    arms: dict[str, ArmResult] = {}
    for cell in cells:
        if cell["learning_rate"] == best[(cell["task"], cell.get("arm", cell["layout"]))]:
            name = cell.get("arm", cell["layout"])
            arms.setdefault(name, ArmResult(name, cell["layout"], [])).cells.append(cell)
    return arms


def paired_difference(first: ArmResult, second: ArmResult, score: Score) -> Estimate | None:
    """``first - second`` seed by seed over the seeds both measured (same data order and teacher), as an
    estimate; ``None`` without a common seed."""
    a, b = first.by_seed(score), second.by_seed(score)
    seeds = sorted(a.keys() & b.keys())
    return estimate(a[seed] - b[seed] for seed in seeds) if seeds else None


def describe_difference(difference: Estimate) -> str:
    return f"{difference.mean:+.3f} [{difference.low:+.3f}, {difference.high:+.3f}] over {difference.seeds} seeds"


def not_below_zero(gain: Estimate) -> Outcome:
    """The one-sided verdict on "this gain is not negative": Refuted when its interval lies wholly below zero,
    Reproduced otherwise (a gain that may be zero does not contradict it)."""
    return Outcome.REFUTED if gain.high < 0 else Outcome.REPRODUCED


def tasks_of(arms: dict[str, ArmResult]) -> list[str]:
    return sorted({task for arm in arms.values() for cell in arm.cells for task in cell.get("per_task", {})})


# --- claims ---------------------------------------------------------------------------------------------


def mixer_claims(arms: dict[str, ArmResult]) -> list[Claim]:
    """Gated DeltaNet against Mamba2 and GLA in hybrids of equal depth and state: on the text-rich task, and
    whether its margin is largest there."""
    beats = Claim(
        "Gated DeltaNet beats Mamba2 and GLA on the text-rich task at matched state",
        "InfiniteVL's choice of mixer",
        needs=f"S,D,..., S,M,... and S,G,... hybrids of one depth and state scored on '{TEXT_RICH}'",
    )
    largest = Claim(
        "Gated DeltaNet's margin over Mamba2 and GLA is largest on the text-rich task",
        "InfiniteVL: GDN's gains concentrate on text-rich understanding",
        needs=f"the same hybrids scored on '{TEXT_RICH}' and at least one other task",
    )
    hybrids = [arm for arm in arms.values() if 0 < arm.share < 1]
    others = [task for task in tasks_of(arms) if task != TEXT_RICH]
    for d in (arm for arm in hybrids if arm.family == "D"):
        for x in (arm for arm in hybrids if arm.family in ("M", "G") and arm.depth == d.depth):
            if d.state_level != x.state_level:
                continue
            a, b = d.estimate(task_score(TEXT_RICH)), x.estimate(task_score(TEXT_RICH))
            if not (a and b):
                continue
            state = format_bytes(2**d.state_level) if d.state_level is not None else "state not recorded"
            chance = chance_of(d.cells[0], TEXT_RICH)
            beats.settings.append(
                (f"{d.arm} vs {x.arm}, {state}", f"{a.describe()} vs {b.describe()}", compare(a, b, chance))
            )
            margin = paired_difference(d, x, task_score(TEXT_RICH))
            for task in others:
                elsewhere = paired_difference(d, x, task_score(task))
                if margin and elsewhere:
                    evidence = f"{TEXT_RICH} {describe_difference(margin)} vs {task} {describe_difference(elsewhere)}"
                    outcome = compare(margin, elsewhere, **NO_SATURATION)
                    largest.settings.append((f"{d.arm} - {x.arm}: {TEXT_RICH} vs {task}", evidence, outcome))
    return [beats, largest]


def hybrid_claim(arms: dict[str, ArmResult]) -> Claim:
    """Every hybrid against the pure stack of its mixer at the same depth, on the mean over tasks and on the
    text-rich task."""
    claim = Claim(
        "A hybrid with sliding-window layers beats the same mixer without attention",
        "InfiniteVL: hybrid over pure linear layouts",
        needs="a hybrid (S,X,...) and the pure stack of X at the same depth",
    )
    for hybrid in (arm for arm in arms.values() if 0 < arm.share < 1 and arm.family):
        for pure in arms.values():
            if pure.share == 0 and pure.family == hybrid.family and pure.depth == hybrid.depth:
                for label, score, task in (("mean over tasks", mean_score, None), (TEXT_RICH, None, TEXT_RICH)):
                    score = score or task_score(task)
                    a, b = hybrid.estimate(score), pure.estimate(score)
                    if a and b:
                        outcome = compare(a, b, chance_of(hybrid.cells[0], task))
                        claim.settings.append(
                            (f"{hybrid.arm} vs {pure.arm}, {label}", f"{a.describe()} vs {b.describe()}", outcome)
                        )
    return claim


def swa_share_claim(arms: dict[str, ArmResult]) -> Claim:
    """More SWA helps with diminishing returns, among the ``S`` + ``D`` layouts of the deepest such depth with
    shares below 1 (the window-only stack is the window claims')."""
    claim = Claim(
        "More SWA layers help, with diminishing returns",
        "InfiniteVL's SWA-share ablation",
        needs="S and D layouts of one depth at three or more SWA shares below 1",
    )
    stacks = [arm for arm in arms.values() if set(mixers.parse_layout(arm.layout)) <= {"S", "D"} and arm.share < 1]
    depth = max((arm.depth for arm in stacks), default=0)
    ladder = sorted((arm for arm in stacks if arm.depth == depth), key=lambda arm: arm.share)
    if len(ladder) < 3:
        return claim
    for label, score, task in (("mean over tasks", mean_score, None), (TEXT_RICH, task_score(TEXT_RICH), TEXT_RICH)):
        gains = [paired_difference(b, a, score) for a, b in itertools.pairwise(ladder)]
        first, low = ladder[1].estimate(score), ladder[0].estimate(score)
        if not (first and low and all(gains)):
            continue
        steps = [f"{a.share:.3g}->{b.share:.3g}" for a, b in itertools.pairwise(ladder)]
        parts = [
            (
                f"share {ladder[1].share:.3g} over {ladder[0].share:.3g}: {first.describe()} vs {low.describe()}",
                compare(first, low, chance_of(ladder[0].cells[0], task)),
            )
        ]
        parts += [
            (f"gain {step} not negative: {describe_difference(gain)}", not_below_zero(gain))
            for step, gain in zip(steps[1:], gains[1:])
        ]
        parts.append(
            (
                f"gain {steps[0]} {describe_difference(gains[0])} above gain {steps[-1]} "
                f"{describe_difference(gains[-1])}",
                compare(gains[0], gains[-1], **NO_SATURATION),
            )
        )
        evidence = "; ".join(f"{text}: {outcome.value}" for text, outcome in parts)
        claim.settings.append((label, evidence, conjoin(outcome for _, outcome in parts)))
    return claim


def window_claims(arms: dict[str, ArmResult]) -> list[Claim]:
    """Window-only stacks in the three video-memory regimes, and the recurrent models beyond their reach."""
    reach = Claim(
        "A window-only stack answers a cue inside one window but not beyond what its stacked windows reach",
        "InfiniteVL: window-only models lose information beyond the window",
        needs=f"a window-only arm scored on the eval sets '{INSIDE_WINDOW}' and '{BEYOND_REACH}'",
    )
    stacked = Claim(
        "Stacked windows carry a cue beyond one window, up to their reach",
        "the receptive field of stacked sliding windows (layers x window)",
        needs=f"a window-only arm scored on '{WITHIN_REACH}' and '{BEYOND_REACH}'",
    )
    memory = Claim(
        "Beyond the stacked reach, models with recurrent layers keep the cue that window-only models lose",
        "InfiniteVL: the linear layers carry long-range memory",
        needs=f"window-only and hybrid or pure arms of one depth scored on '{BEYOND_REACH}'",
    )
    only = [arm for arm in arms.values() if arm.share == 1]
    for arm in only:
        chance = chance_of(arm.cells[0], eval_set=BEYOND_REACH)
        near, within, past = (arm.estimate(set_score(name)) for name in (INSIDE_WINDOW, WITHIN_REACH, BEYOND_REACH))
        if near and past:
            evidence = f"inside: {near.describe()}; beyond: {past.describe()}"
            reach.settings.append((arm.arm, evidence, compare(near, past, chance)))
        if within and past:
            evidence = f"within reach: {within.describe()}; beyond: {past.describe()}"
            stacked.settings.append((arm.arm, evidence, compare(within, past, chance)))
        for other in (o for o in arms.values() if o.share < 1 and o.depth == arm.depth):
            theirs, ours = other.estimate(set_score(BEYOND_REACH)), past
            if theirs and ours:
                evidence = f"{other.arm} {theirs.describe()} vs {arm.arm} {ours.describe()}"
                memory.settings.append((f"{other.arm} vs {arm.arm}", evidence, compare(theirs, ours, chance)))
    return [reach, stacked, memory]


INIT_METRICS = {"layer_mse": "lower", "kl": "lower", "accuracy": "higher"}
"""What the init cells measure after Stage I, and which way is better."""


def _init_groups(cells: list[dict[str, Any]]) -> dict[tuple[str, int], dict[int, dict[str, Any]]]:
    """``(init, stage1_steps) -> seed -> cell`` for the cells measured after Stage I."""
    groups: dict[tuple[str, int], dict[int, dict[str, Any]]] = defaultdict(dict)
    for cell in cells:
        if "stage1" in cell:
            groups[(cell["init"], cell["stage1_steps"])][cell["seed"]] = cell
    return groups


def init_claim(cells: list[dict[str, Any]]) -> Claim:
    """Mimic against transfer after Stage I at every step budget, on every metric, paired by seed (the two
    students of a seed share its teacher and data): Reproduced when mimic's advantage has an interval wholly
    above zero, Refuted when wholly below."""
    claim = Claim(
        "Mimic initialisation distils better than transferring the attention weights (after Stage I)",
        "InfiniteVL's code initialises new mixers by mimicry",
        needs="init cells of both initialisations after Stage I on common seeds",
    )
    groups = _init_groups(cells)
    for steps in sorted({steps for _, steps in groups}):
        mimic, transfer = groups.get(("mimic", steps), {}), groups.get(("transfer", steps), {})
        seeds = sorted(mimic.keys() & transfer.keys())
        if not seeds:
            continue
        for metric, better in INIT_METRICS.items():
            sign = -1 if better == "lower" else 1
            advantage = estimate(
                sign * (mimic[seed]["stage1"][metric] - transfer[seed]["stage1"][metric]) for seed in seeds
            )
            outcome = compare_to_zero(advantage)
            setting = f"{steps} Stage I steps, {metric} (mimic's advantage, {better} is better)"
            claim.settings.append((setting, describe_difference(advantage), outcome))
    return claim


def compare_to_zero(difference: Estimate) -> Outcome:
    """Reproduced when a difference's interval lies wholly above zero, Refuted when wholly below."""
    if difference.low > 0:
        return Outcome.REPRODUCED
    return Outcome.REFUTED if difference.high < 0 else Outcome.INCONCLUSIVE


def teacher_lines(cells: list[dict[str, Any]]) -> list[str]:
    """The teachers' test accuracy per task over seeds against chance: the init comparison needs teachers that
    learned every task."""
    teachers = {cell["seed"]: cell for cell in cells if "teacher_per_task" in cell}
    if not teachers:
        return []
    first = next(iter(teachers.values()))
    parts = []
    for task, chance in sorted(first.get("chance", {}).items()):
        score = estimate(cell["teacher_per_task"][task] for cell in teachers.values())
        learned = "learned" if score.low > chance + 0.1 else "NOT clearly above chance"
        parts.append(f"{task} {score.describe()} (chance {chance:.3f}: {learned})")
    return [f"Teachers ({len(teachers)} seeds), test accuracy per task: " + "; ".join(parts) + "."]


def init_table(cells: list[dict[str, Any]]) -> str:
    """Stage I measures per initialisation and step budget: mean [95% CI] over seeds."""
    groups = _init_groups(cells)
    lines = ["| init | Stage I steps | " + " | ".join(INIT_METRICS) + " |", "|---|---|" + "---|" * len(INIT_METRICS)]
    for (init, steps), by_seed in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        scores = [estimate(cell["stage1"][metric] for cell in by_seed.values()) for metric in INIT_METRICS]
        cells_text = " | ".join(f"{e.mean:.4g} [{e.low:.4g}, {e.high:.4g}]" for e in scores)
        lines.append(f"| {init} | {steps} | {cells_text} |")
    return "\n".join(lines)


def plot_init(path: Path, cells: list[dict[str, Any]]) -> bool:
    """One panel per Stage I measure against the step budget, mimic and transfer with 95% intervals."""
    groups = _init_groups(cells)
    if not groups:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(INIT_METRICS), figsize=(4.2 * len(INIT_METRICS), 3.6))
    for ax, (metric, better) in zip(axes, INIT_METRICS.items()):
        for init in sorted({init for init, _ in groups}):
            points = sorted(
                (steps, estimate(cell["stage1"][metric] for cell in by_seed.values()))
                for (name, steps), by_seed in groups.items()
                if name == init
            )
            plot_estimates(ax, [steps for steps, _ in points], [e for _, e in points], marker="o", label=init)
        ax.set_title(f"{metric} ({better} is better)")
        ax.set_xlabel("Stage I steps")
        ax.grid(alpha=0.3)
        if metric != "accuracy":
            ax.set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def multimodal_claims(studies: dict[str, list[dict[str, Any]]]) -> list[Claim]:
    """Every multimodal claim judged within each study's cells (arms of different studies train differently and
    are never compared); ``Not measured`` where no study holds the arms a claim needs."""
    skeletons = [*mixer_claims({}), hybrid_claim({}), swa_share_claim({}), *window_claims({})]
    claims = {claim.text: claim for claim in skeletons}
    for name, cells in sorted(studies.items()):
        if name == "init":
            continue
        arms = chosen_arms(cells)
        for claim in [*mixer_claims(arms), hybrid_claim(arms), swa_share_claim(arms), *window_claims(arms)]:
            claims[claim.text].settings += [(f"{name}: {setting}", *rest) for setting, *rest in claim.settings]
    return [*claims.values(), init_claim(studies.get("init", []))]


@dataclasses.dataclass(frozen=True)
class Column:
    """A score the tables and figures show: a task on the test split, or an eval set."""

    label: str
    score: Score
    task: str | None = None
    eval_set: str | None = None

    def chance(self, arm: ArmResult) -> float:
        return chance_of(arm.cells[0], self.task, self.eval_set)


def columns(arms: dict[str, ArmResult]) -> list[Column]:
    """Every task the arms were scored on, then every eval set."""
    sets = sorted({name for arm in arms.values() for cell in arm.cells for name in cell.get("eval_sets", {})})
    return [Column(task, task_score(task), task=task) for task in tasks_of(arms)] + [
        Column(name, set_score(name), eval_set=name) for name in sets
    ]


def ordered(arms: dict[str, ArmResult]) -> list[ArmResult]:
    """The arms by SWA share, then name: the order of table rows and bars."""
    return sorted(arms.values(), key=lambda arm: (arm.share, arm.arm))


def saturated_tasks(arms: dict[str, ArmResult]) -> list[str]:
    """Tasks (and eval sets) on which every arm sits at the ceiling, or every arm at chance: they cannot tell
    the arms apart."""
    lines = []
    for column in columns(arms):
        label = f"eval set {column.label}" if column.eval_set else column.label
        estimates = [(arm, e) for arm in arms.values() if (e := arm.estimate(column.score))]
        if not estimates:
            continue
        if all(e.low >= CEILING for _, e in estimates):
            lines.append(f"{label}: every arm at the ceiling ({CEILING:g})")
        elif all(e.high <= column.chance(arm) for arm, e in estimates):
            lines.append(f"{label}: every arm at chance")
    return lines


# --- tables and figures ---------------------------------------------------------------------------------


def task_table(arms: dict[str, ArmResult]) -> str:
    """Test accuracy per task and eval set (mean [95% CI], k/n seeds >= 0.9), one row per arm."""
    shown = columns(arms)
    lines = ["| arm | " + " | ".join(column.label for column in shown) + " |", "|---|" + "---|" * len(shown)]
    for arm in ordered(arms):
        values = [arm.estimate(column.score) for column in shown]
        lines.append(f"| `{arm.arm}` | " + " | ".join(e.describe() if e else "" for e in values) + " |")
    return "\n".join(lines)


def plot_tasks(path: Path, arms: dict[str, ArmResult]) -> None:
    """Grouped bars: test accuracy per task (and eval set) for every arm, 95% intervals, chance as a tick."""
    plt = pyplot()
    shown, rows = columns(arms), ordered(arms)
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(1.2 * len(shown) * max(1, len(rows)) ** 0.5 + 3, 4))
    for number, arm in enumerate(rows):
        xs, means, errors = [], [], [[], []]
        for position, column in enumerate(shown):
            if e := arm.estimate(column.score):
                xs.append(position + (number - (len(rows) - 1) / 2) * width)
                means.append(e.mean)
                errors[0].append(e.mean - e.low)
                errors[1].append(e.high - e.mean)
        ax.bar(xs, means, width, yerr=errors, capsize=2, label=arm.arm)
    for position, column in enumerate(shown):
        chance = column.chance(rows[0])
        ax.hlines(chance, position - 0.45, position + 0.45, colors="black", linestyles=":", linewidth=1)
    ax.set_xticks(range(len(shown)), [column.label for column in shown], rotation=20)
    ax.set_ylabel("test accuracy (mean, 95% CI over seeds)")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("dotted: chance (no look at the media)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_shares(path: Path, arms: dict[str, ArmResult]) -> bool:
    """Test accuracy against the share of SWA layers, one line per task, for layouts of ``S`` and ``D``."""
    ladder = sorted(
        (arm for arm in arms.values() if set(mixers.parse_layout(arm.layout)) <= {"S", "D"}),
        key=lambda arm: arm.share,
    )
    if len(ladder) < 2:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, score in [("mean over tasks", mean_score)] + [(task, task_score(task)) for task in tasks_of(arms)]:
        points = [(arm.share, e) for arm in ladder if (e := arm.estimate(score))]
        plot_estimates(
            ax,
            [share for share, _ in points],
            [e for _, e in points],
            marker="o",
            label=label,
            linewidth=2.5 if label == "mean over tasks" else 1,
        )
    ax.set_xlabel("share of SWA layers")
    ax.set_ylabel("test accuracy (mean, 95% CI over seeds)")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def multimodal_section(name: str, cells: list[dict[str, Any]], figures: Path) -> list[str]:
    """A multimodal study's tables and figures as markdown lines (figures written into ``figures``)."""
    parts = [rows_table(summarize(cells))]
    if name == "init":
        parts += ["", *teacher_lines(cells)]
        if _init_groups(cells):
            parts += ["", "After Stage I, on validation data (measures) and the test split (accuracy):", ""]
            parts.append(init_table(cells))
            figure = figures / "init_stage1.png"
            if plot_init(figure, cells):
                parts += ["", f"![init: Stage I measures against steps](figures/{figure.name})"]
        return parts
    arms = chosen_arms(cells)
    if not arms:
        return parts
    parts += ["", "Test accuracy per task and eval set at each arm's chosen learning rate:", "", task_table(arms)]
    if saturated := saturated_tasks(arms):
        parts += ["", "Cannot tell the arms apart: " + "; ".join(saturated) + "."]
    figure = figures / f"{name}_tasks.png"
    plot_tasks(figure, arms)
    parts += ["", f"![{name}: test accuracy per task](figures/{figure.name})"]
    shares = figures / f"{name}_swa_share.png"
    if len({arm.share for arm in arms.values()}) >= 3 and plot_shares(shares, arms):
        parts += ["", f"![{name}: accuracy against the share of SWA layers](figures/{shares.name})"]
    return parts
