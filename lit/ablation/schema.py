"""The typed form of a study YAML, checked key by key: an unknown or ill-typed key anywhere raises a
:class:`StudyError` naming where it sits (``tasks[2].grid: unknown key 'depth'``) and what is allowed.

.. code-block:: yaml

    name: recall
    description: one paragraph on what the study asks
    plugins: [my_lab.mixers]            # modules imported first: mixers they register can be named in arms
    arms:                               # the models compared
      - "S,D,D,D"                       # a layout alone: an arm named by the layout as written, one size
      - name: D                         # shown in tables and figures
        layout: "D x2"
        mlp_ratio: 0                    # no MLP (default: train.mlp_ratio)
        mixer_options: {D: {num_heads: 2}}
        sizes:                          # one model per entry: options merged over mixer_options (the state axis)
          - {D: {head_dim: 16, expand_v: 4}}
          - {D: {head_dim: 64, expand_v: 1}}
    grid: {d_model: [128], seed: [0, 1, 2, 3, 4], learning_rate: [3.0e-4, 1.0e-3, 3.0e-3]}
    tuning: {seeds: [0, 1],             # learning rates are swept on these seeds; the others train at the best
             bimodal_seeds: [5, 6]}     # and these too where the grid's seeds split (solved and far from it)
    tasks:
      - {type: mqar, seq_len: 256, num_kv_pairs: 64,
         grid: {arm: [D]},              # this task's own grid entries (any of arm, d_model, seed, learning_rate)
         train: {max_steps: 3000}}      # and its own training settings
    match_parameters: "A x4"            # scale MLP widths so every arm has this layout's parameter count
    train: {max_steps: 2000, max_tokens: 16384}
    smoke: {...}                        # merged over the study with --smoke (a CPU check)
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from hybridvl import mixers


class StudyError(ValueError):
    """A study file that cannot run, with where the problem sits and how to fix it."""


def _fail(where: str, message: str) -> StudyError:
    return StudyError(f"{where}: {message}" if where else message)


def _is_instance(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a simple annotation (int, float, str, bool, None, unions, lists, dicts)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence):
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        return isinstance(value, list | tuple) and all(_is_instance(v, item) for v in value)
    if origin in (dict, Mapping):
        return isinstance(value, dict)
    if annotation is Any:
        return True
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _mapping(value: Any, where: str, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(where, f"{what} must be a mapping of keys to values, got {value!r}")
    return value


def _check_keys(data: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise _fail(
            where,
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; known: {', '.join(known)}",
        )


def _typed(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """``cls(**data)`` for a dataclass, with every key known and every value of its field's type."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    _check_keys(data, fields, where)
    for key, value in data.items():
        if not _is_instance(value, hints[key]):
            raise _fail(f"{where}.{key}" if where else key, f"expected {_type_name(hints[key])}, got {value!r}")
    return cls(**data)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How every cell trains (a task's ``train`` replaces some of these for its cells).

    Attributes:
        max_steps: optimizer steps.
        max_tokens: tokens per batch (MQAR: ``max_tokens // seq_len`` sequences).
        window: the sliding window of ``S`` layers, in tokens.
        warmup_ratio: share of the steps spent warming up linearly before the cosine decay.
        min_lr_ratio: the cosine decays to ``learning_rate * min_lr_ratio``.
        weight_decay: AdamW weight decay of matrices (MQAR cells; Zoology's 0.1).
        precision: ``"32-true"`` or ``"bf16-mixed"``.
        train_examples, val_examples, test_examples: MQAR set sizes: the learning rate is chosen on the
            validation set, tables report the test set (each drawn with its own seed).
        eval_every: MQAR cells measure validation accuracy every this many steps (the learning curve); 0 only at
            the end.
        early_stop: MQAR cells stop once validation accuracy reaches this (Zoology's 0.99); ``None`` never.
        val_size: validation samples per synthetic task (the learning rate is chosen on them).
        test_size: test samples per synthetic task and per eval set (the tables report them).
        mlp_ratio: MLP width over ``d_model`` (0: layers without an MLP), unless an arm sets its own.
        pipeline_scale: steps of the distillation pipeline's stages relative to the tiny configs.
        backends: mixer letter -> backend for every cell (default: each mixer's ``"auto"``).
        cuda_graphs: MQAR cells on a GPU capture their training step as one CUDA graph.
        compile: MQAR cells on a GPU compile the step's forward and loss with ``torch.compile`` (Inductor's
            deterministic mode; kernel libraries such as fla run as they are) before capturing it: fuses the
            elementwise work of PyTorch backends and of the loss, at a compile per worker process and shape.
    """

    max_steps: int = 1000
    max_tokens: int = 8192
    window: int = 32
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    precision: str = "32-true"
    train_examples: int = 20000
    val_examples: int = 1000
    test_examples: int = 1000
    eval_every: int = 0
    early_stop: float | None = None
    val_size: int = 50
    test_size: int = 500
    mlp_ratio: float = 2
    pipeline_scale: float = 1.0
    backends: dict[str, str] = dataclasses.field(default_factory=dict)
    cuda_graphs: bool = True
    compile: bool = False

    def check(self, where: str) -> None:
        positive = (
            "max_steps",
            "max_tokens",
            "window",
            "train_examples",
            "val_examples",
            "test_examples",
            "val_size",
            "test_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise _fail(f"{where}.{name}", f"must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise _fail(f"{where}.{name}", f"must lie in [0, 1], got {getattr(self, name)}")
        if self.weight_decay < 0 or self.mlp_ratio < 0 or self.eval_every < 0 or self.pipeline_scale <= 0:
            raise _fail(where, "weight_decay, mlp_ratio and eval_every must be >= 0, pipeline_scale > 0")
        if self.precision not in ("32-true", "bf16-mixed"):
            raise _fail(f"{where}.precision", f"must be '32-true' or 'bf16-mixed', got {self.precision!r}")
        if self.early_stop is not None and not 0 < self.early_stop <= 1:
            raise _fail(f"{where}.early_stop", f"must lie in (0, 1] or be null, got {self.early_stop}")
        for kind, backend in self.backends.items():
            try:
                mixers.resolve_kind(kind)
            except (KeyError, ValueError) as error:
                raise _fail(f"{where}.backends", str(error)) from None
            if not isinstance(backend, str):
                raise _fail(f"{where}.backends.{kind}", f"must name a backend, got {backend!r}")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One model the study compares: a layout, its mixers' options and the sizes it is trained at.

    Attributes:
        name: shown in tables and figures, and part of cell ids.
        layout: the layout string (:func:`hybridvl.mixers.parse_layout`).
        mixer_options: mixer letter -> options for every size.
        sizes: one entry per model size, each ``letter -> options`` merged over ``mixer_options``; empty for one
            size.
        mlp_ratio: this arm's MLP width over ``d_model`` (0: no MLP); ``None`` takes the study's.
    """

    name: str
    layout: str
    mixer_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    sizes: list[dict[str, dict[str, Any]]] = dataclasses.field(default_factory=list)
    mlp_ratio: float | None = None

    @property
    def size_count(self) -> int:
        return max(1, len(self.sizes))

    def options(self, size: int) -> dict[str, dict[str, Any]]:
        """Mixer options of the arm at ``size`` (an index into :attr:`sizes`)."""
        merged = {kind: dict(options) for kind, options in self.mixer_options.items()}
        for kind, options in (self.sizes[size] if self.sizes else {}).items():
            merged.setdefault(kind, {}).update(options)
        return merged


GRID_KEYS = ("arm", "d_model", "seed", "learning_rate")
TASK_TYPES = ("mqar", "synthetic", "distill")


def _freeze(value: Any) -> Any:
    """A YAML value made hashable: mappings become sorted ``(key, value)`` tuples, lists tuples."""
    if isinstance(value, dict):
        return tuple(sorted((key, _freeze(item)) for key, item in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a study: its type, its options (frozen), and the grid entries and training settings it
    replaces for its cells."""

    type: str
    options: tuple[tuple[str, Any], ...]
    grid: tuple[tuple[str, tuple], ...] = ()
    train: tuple[tuple[str, Any], ...] = ()

    @property
    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)

    def get(self, key: str, default: Any = None) -> Any:
        return self.option_dict.get(key, default)

    @property
    def eval_sets(self) -> dict[str, dict[str, Any]]:
        """A synthetic task's ``eval_sets``: name -> suite options replacing the task's own, each a held-out set
        every cell is scored on (e.g. video cues inside one window, and beyond what stacked windows reach)."""
        return {name: dict(options) for name, options in self.get("eval_sets", ())}

    @property
    def suite_options(self) -> dict[str, Any]:
        """A synthetic task's options for :class:`~hybridvl.lit.data.synthetic.SyntheticSuite` (without
        ``eval_sets``)."""
        return {key: value for key, value in self.options if key != "eval_sets"}

    @property
    def name(self) -> str:
        """``mqar_T256_kv64``, ``synthetic_ocr-chart``, ``distill_mimic``: part of cell ids."""
        if self.type == "mqar":
            return f"mqar_T{self.get('seq_len', 64)}_kv{self.get('num_kv_pairs', 4)}"
        if self.type == "distill":
            steps = self.get("stage1_steps")
            return f"distill_{self.get('init')}" + (f"_s{steps}" if steps is not None else "")
        extra = "".join(f"_{k}{v}" for k, v in sorted(self.options) if k in ("video_frames", "min_distance"))
        return "synthetic_" + "-".join(self.get("tasks", ["all"])) + extra

    def record(self) -> dict[str, Any]:
        """The task as cells record it (``task_config``): its options, and its own train entries if any."""
        options = {**self.option_dict, **({"eval_sets": self.eval_sets} if self.eval_sets else {})}
        return {"type": self.type, **options, **({"train": dict(self.train)} if self.train else {})}


def _task_option_names(kind: str) -> tuple[str, ...]:
    if kind == "mqar":
        from hybridvl.lit.data.mqar import MQARDataset

        skip = {"self", "num_examples", "seed"}
        return tuple(name for name in inspect.signature(MQARDataset).parameters if name not in skip)
    if kind == "synthetic":
        from hybridvl.lit.data.synthetic import SyntheticSuite

        skip = {"self", "seed", "split"}
        return (*(name for name in inspect.signature(SyntheticSuite).parameters if name not in skip), "eval_sets")
    return ("init", "stage1_steps")


@dataclasses.dataclass(frozen=True)
class Study:
    """A study file, typed and checked (see the module docstring)."""

    name: str
    arms: tuple[Arm, ...]
    tasks: tuple[Task, ...]
    d_model: tuple[int, ...]
    seed: tuple[int, ...]
    learning_rate: tuple[float, ...]
    train: TrainSettings
    description: str = ""
    tuning_seeds: tuple[int, ...] | None = None
    bimodal_seeds: tuple[int, ...] = ()
    match_parameters: str | None = None
    plugins: tuple[str, ...] = ()

    def arm(self, name: str) -> Arm:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(f"study {self.name!r} has no arm {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    def grid(self, task: Task) -> dict[str, tuple]:
        """The task's grid: the study's entries with the task's own in their place."""
        grid = {"arm": tuple(arm.name for arm in self.arms), "d_model": self.d_model, "seed": self.seed}
        grid["learning_rate"] = self.learning_rate
        return {**grid, **dict(task.grid)}

    def train_for(self, task: Task) -> TrainSettings:
        """The training settings of the task's cells: the study's ``train`` with the task's entries in place."""
        return dataclasses.replace(self.train, **dict(task.train))


STUDY_KEYS = (
    "name", "description", "plugins", "arms", "grid", "tuning", "tasks", "train", "match_parameters", "smoke",
)  # fmt: skip


def load_study(path: str | Path, smoke: bool = False) -> Study:
    """Read and check a study YAML; with ``smoke`` its ``smoke`` section is merged in first.

    Raises:
        FileNotFoundError: no such file.
        StudyError: anything in it that cannot run, with where it sits.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study config {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise StudyError(f"{path} is not valid YAML: {error}") from None
    from hybridvl.lit.ablation.cells import check_models

    try:
        study = parse_study(raw, smoke)
        check_models(study)
    except StudyError as error:
        raise StudyError(f"{path}: {error}") from None
    return study


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merge(merged[key], value) if both else value
    return merged


def parse_study(raw: Any, smoke: bool = False) -> Study:
    """A :class:`Study` from the YAML's data (see :func:`load_study`)."""
    raw = _mapping(raw, "", "a study")
    _check_keys(raw, STUDY_KEYS, "study")
    if smoke:
        raw = _merge(raw, _mapping(raw.get("smoke"), "smoke", "smoke"))
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise _fail("name", f"a study needs a name (a non-empty string), got {raw.get('name')!r}")
    plugins = raw.get("plugins") or []
    if not _is_instance(plugins, list[str]):
        raise _fail("plugins", f"must be a list of module names, got {plugins!r}")
    import_plugins(plugins)
    train = _typed(TrainSettings, _mapping(raw.get("train"), "train", "train"), "train")
    train.check("train")
    arms = _arms(raw.get("arms"))
    grid = _mapping(raw.get("grid"), "grid", "grid")
    _check_keys(grid, GRID_KEYS[1:], "grid")
    values = {key: _grid_values(grid.get(key), f"grid.{key}", key) for key in GRID_KEYS[1:]}
    for key, found in values.items():
        if not found:
            raise _fail(f"grid.{key}", "needs a non-empty list")
    tasks = tuple(_task(task, f"tasks[{number}]", arms, train) for number, task in enumerate(raw.get("tasks") or []))
    if not tasks:
        raise _fail("tasks", "a study needs at least one task")
    tuning = _mapping(raw.get("tuning"), "tuning", "tuning")
    _check_keys(tuning, ("seeds", "bimodal_seeds"), "tuning")
    tuning_seeds = _grid_values(tuning.get("seeds"), "tuning.seeds", "seed") if tuning else None
    if tuning and not tuning_seeds:
        raise _fail("tuning.seeds", "needs a non-empty list of seeds")
    bimodal_seeds = _grid_values(tuning.get("bimodal_seeds"), "tuning.bimodal_seeds", "seed") or ()
    if set(bimodal_seeds) & set(values["seed"]):
        raise _fail("tuning.bimodal_seeds", f"are added to the grid's seeds, so none may be one: {bimodal_seeds}")
    match = raw.get("match_parameters")
    if match is not None:
        if not isinstance(match, str):
            raise _fail("match_parameters", f"must be a layout string, got {match!r}")
        _layout(match, "match_parameters")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _fail("description", f"must be a string, got {description!r}")
    return Study(
        name=raw["name"],
        arms=arms,
        tasks=tasks,
        d_model=values["d_model"],
        seed=values["seed"],
        learning_rate=values["learning_rate"],
        train=train,
        description=description.strip(),
        tuning_seeds=tuning_seeds,
        bimodal_seeds=bimodal_seeds,
        match_parameters=match,
        plugins=tuple(plugins),
    )


def import_plugins(modules: Sequence[str]) -> None:
    """Import each module (which registers its mixers), naming a missing one."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise _fail("plugins", f"cannot import {module!r}: {error}; install it or put it on PYTHONPATH") from None


def _layout(layout: str, where: str) -> list[str]:
    try:
        return mixers.parse_layout(layout)
    except mixers.LayoutError as error:
        raise _fail(where, str(error)) from None


def _arms(raw: Any) -> tuple[Arm, ...]:
    if not isinstance(raw, list) or not raw:
        raise _fail("arms", f"a study needs a non-empty list of arms (layouts or mappings), got {raw!r}")
    arms = []
    for number, entry in enumerate(raw):
        where = f"arms[{number}]"
        if isinstance(entry, str):
            entry = {"name": entry.strip(), "layout": entry}
        entry = _mapping(entry, where, "an arm")
        if "layout" not in entry:
            raise _fail(where, "an arm needs a layout")
        entry.setdefault("name", mixers.format_layout(_layout(entry.get("layout", ""), f"{where}.layout")))
        arm = _typed(Arm, entry, where)
        kinds = set(_layout(arm.layout, f"{where}.layout"))
        for key, options in [("mixer_options", arm.mixer_options)] + [
            (f"sizes[{i}]", size) for i, size in enumerate(arm.sizes)
        ]:
            _mixer_options(options, kinds, f"{where}.{key}")
        if arm.mlp_ratio is not None and arm.mlp_ratio < 0:
            raise _fail(f"{where}.mlp_ratio", f"must be >= 0, got {arm.mlp_ratio}")
        if not arm.name or any(a.name == arm.name for a in arms):
            raise _fail(f"{where}.name", f"arm names must be non-empty and unique, got {arm.name!r} twice")
        arms.append(arm)
    return tuple(arms)


def _mixer_options(options: Any, kinds: set[str], where: str) -> None:
    """``letter -> options`` for letters of the arm's layout, each checked by building that mixer small."""
    options = _mapping(options, where, "mixer options")
    for kind, values in options.items():
        try:
            letter = mixers.resolve_kind(kind)
        except (KeyError, ValueError) as error:
            raise _fail(where, str(error)) from None
        if letter not in kinds:
            raise _fail(
                where, f"options for {kind!r}, which the arm's layout does not use ({', '.join(sorted(kinds))})"
            )
        _mapping(values, f"{where}.{kind}", "a mixer's options")


def _grid_values(values: Any, where: str, key: str) -> tuple:
    if values is None:
        return ()
    if not isinstance(values, list):
        raise _fail(where, f"must be a list, got {values!r}")
    expected = {"arm": str, "d_model": int, "seed": int, "learning_rate": float}[key]
    for value in values:
        if (
            not _is_instance(value, expected)
            or (key == "d_model" and value < 1)
            or (key == "learning_rate" and value < 0)
        ):
            raise _fail(
                where, f"expected {'positive ' if key == 'd_model' else ''}{expected.__name__} values, got {value!r}"
            )
    if len(set(values)) != len(values):
        raise _fail(where, f"lists a value twice: {values}")
    return tuple(float(v) if key == "learning_rate" else v for v in values)


def _task(raw: Any, where: str, arms: tuple[Arm, ...], train: TrainSettings) -> Task:
    raw = dict(_mapping(raw, where, "a task"))
    kind = raw.pop("type", None)
    if kind not in TASK_TYPES:
        raise _fail(f"{where}.type", f"must be one of {', '.join(TASK_TYPES)}, got {kind!r}")
    grid = _mapping(raw.pop("grid", None), f"{where}.grid", "a task's grid")
    _check_keys(grid, GRID_KEYS, f"{where}.grid")
    grid_values = {key: _grid_values(value, f"{where}.grid.{key}", key) for key, value in grid.items()}
    for key, found in grid_values.items():
        if not found:
            raise _fail(f"{where}.grid.{key}", "needs a non-empty list")
    names = {arm.name for arm in arms}
    for name in grid_values.get("arm", ()):
        if name not in names:
            raise _fail(f"{where}.grid.arm", f"no arm named {name!r}; arms: {', '.join(sorted(names))}")
    task_train = _mapping(raw.pop("train", None), f"{where}.train", "a task's train")
    _check_keys(task_train, [f.name for f in dataclasses.fields(TrainSettings)], f"{where}.train")
    try:
        settings = dataclasses.replace(train, **task_train)
    except TypeError as error:
        raise _fail(f"{where}.train", str(error)) from None
    _typed(TrainSettings, dataclasses.asdict(settings), f"{where}.train").check(f"{where}.train")
    _check_keys(raw, _task_option_names(kind), where)
    _check_task_options(kind, raw, where)
    freeze = lambda items: tuple(sorted(items))  # noqa: E731
    return Task(
        kind,
        _freeze(raw),
        freeze(grid_values.items()),
        freeze(task_train.items()),
    )


def _check_task_options(kind: str, options: dict[str, Any], where: str) -> None:
    """Build the task's data once, small, so a bad option fails here rather than in a cell."""
    if kind == "mqar":
        from hybridvl.lit.data.mqar import MQARDataset

        try:
            MQARDataset(**options, num_examples=1, seed=0)
        except (TypeError, ValueError) as error:
            raise _fail(where, str(error)) from None
    elif kind == "distill":
        if options.get("init") not in ("mimic", "transfer"):
            raise _fail(f"{where}.init", f"a distill task needs init: mimic or transfer, got {options.get('init')!r}")
        steps = options.get("stage1_steps")
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise _fail(f"{where}.stage1_steps", f"Stage I's steps are a positive integer, got {steps!r}")
    else:
        from hybridvl.lit.data.synthetic import SyntheticSuite

        suite = {key: value for key, value in options.items() if key != "eval_sets"}
        try:
            SyntheticSuite(**suite)
        except (TypeError, ValueError) as error:
            raise _fail(where, str(error)) from None
        sets = _mapping(options.get("eval_sets"), f"{where}.eval_sets", "eval_sets (name -> suite options)")
        for name, overrides in sets.items():
            at = f"{where}.eval_sets.{name}"
            if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
                raise _fail(at, "an eval set's name is letters, digits, '_' or '-' (it names a table column)")
            overrides = _mapping(overrides, at, "an eval set's suite options")
            _check_keys(overrides, [name for name in _task_option_names(kind) if name != "eval_sets"], at)
            try:
                SyntheticSuite(**{**suite, **overrides})
            except (TypeError, ValueError) as error:
                raise _fail(at, str(error)) from None
