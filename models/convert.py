"""Convert a Qwen2.5-VL checkpoint into a hybrid student.

Embeddings, MLPs, norms, the vision tower and every ``A``/``S`` layer keep the teacher's weights; the
other layers get new mixers, initialised either

* ``mimic`` (InfiniteVL's public code): projections random; slow decay and half-strength writes so the
  memory starts close to identity — Gated DeltaNet: ``A_log = 0``, ``a_proj`` and ``b_proj`` zero
  (``beta = 0.5``), ``dt = 1e-3`` (``alpha ~ 0.999``), short convolutions the identity; Mamba2 alike; GLA with
  its decay projection at ``log alpha ~ -1e-3``; or
* ``transfer``: as ``mimic``, but queries, keys, values and the output projection come from the attention
  layer being replaced, KV heads expanded to the mixer's heads (query head ``h`` reads KV head
  ``h // (heads / kv_heads)``, as grouped-query attention does). For Mamba2 ``Q -> C``, ``K -> B``,
  ``V -> x`` (Mamba-in-the-Llama), which needs ``expand`` and heads that match the attention's shapes.

Each mixer initialises itself: ``mimic`` calls its :meth:`~hybridvl.mixers.base.Mixer.mimic_init` (a mixer without one
keeps its constructor's initialisation), ``transfer`` then its :meth:`~hybridvl.mixers.base.Mixer.transfer_init` with
the attention's projections (a mixer without one cannot be transfer-initialised: :class:`ConversionError`).

The conversion report lists every tensor as inherited, transferred, fresh or dropped.

The output folder may not be the teacher's and must be new or empty unless ``overwrite`` (then its stale weight
files go); every file is written atomically.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hybridvl import mixers
from hybridvl.mixers.base import AttentionWeights
from hybridvl.models.config import HybridConfig
from hybridvl.models.files import EXPORT_RECORD, check_output, copy_file, write_json
from hybridvl.models.hybrid import HybridVLM
from hybridvl.models.qwen import ConversionError

INITS = ("mimic", "transfer")
REPORT_NAME = "conversion_report.json"


@dataclasses.dataclass
class ConversionReport:
    """What happened to every tensor of the student and the teacher."""

    teacher: str
    layout: str
    init: str
    inherited: list[str] = dataclasses.field(default_factory=list)
    transferred: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # student tensor -> teacher tensors
    fresh: list[str] = dataclasses.field(default_factory=list)
    dropped: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        """A short human-readable account: counts, then what each layer kind received."""
        lines = [
            f"converted {self.teacher} -> layout {self.layout} (init {self.init})",
            f"  inherited   {len(self.inherited):5d} tensors (embeddings, norms, MLPs, vision tower, A/S layers)",
            f"  transferred {len(self.transferred):5d} tensors (from the replaced attention layers)",
            f"  fresh       {len(self.fresh):5d} tensors (new mixer parameters)",
            f"  dropped     {len(self.dropped):5d} teacher tensors (attention of replaced layers not carried over)",
        ]
        kinds = mixers.parse_layout(self.layout)
        for letter in dict.fromkeys(kinds):
            layer = kinds.index(letter)
            prefix = f"language_model.layers.{layer}.self_attn."
            got = {
                "inherited": [n for n in self.inherited if n.startswith(prefix)],
                "transferred": [n for n in self.transferred if n.startswith(prefix)],
                "fresh": [n for n in self.fresh if n.startswith(prefix)],
            }
            parts = ", ".join(f"{k}: {', '.join(n[len(prefix) :] for n in v)}" for k, v in got.items() if v)
            lines.append(f"  {letter} layers (e.g. layer {layer}) mixer tensors -> {parts}")
        return "\n".join(lines)

    def save(self, directory: str | Path) -> Path:
        """Write ``conversion_report.json`` into ``directory`` (atomically)."""
        return write_json(Path(directory) / REPORT_NAME, dataclasses.asdict(self))


def convert_model(
    teacher: HybridVLM,
    layout: str,
    init: str = "mimic",
    sliding_window: int | None = None,
    mixer_options: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    teacher_name: str = "teacher",
) -> tuple[HybridVLM, ConversionReport]:
    """Build a student with ``layout`` from ``teacher`` (same dimensions).

    A student layer whose kind the teacher's layer shares (or attention for attention: ``A`` and ``S`` have the
    same weights) inherits the layer; any other layer gets a new mixer, ``mimic``- or ``transfer``-initialised
    from the teacher's attention at that index.
    """
    if init not in INITS:
        raise ConversionError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    fields = teacher.config.fields()
    fields["layout"] = layout
    if sliding_window is not None:
        fields["sliding_window"] = sliding_window
    if mixer_options is not None:
        fields["mixer_options"] = mixer_options
    try:
        config = HybridConfig(**fields)
    except mixers.LayoutError as error:
        raise ConversionError(
            f"the layout does not fit the teacher's {teacher.config.num_hidden_layers} layers:\n{error}"
        ) from error
    torch.manual_seed(seed)
    student = HybridVLM(config)
    student.generation_config = copy.deepcopy(teacher.generation_config)  # decode as the teacher was tuned to
    report = ConversionReport(teacher_name, mixers.format_layout(config.kinds), init)
    teacher_weights = teacher.state_dict()
    new_layers = [i for i, (a, b) in enumerate(zip(config.kinds, teacher.kinds)) if not _same_weights(a, b)]
    used: set[str] = set()
    with torch.no_grad():
        for name, tensor in student.state_dict().items():
            if (name == "lm_head.weight" and config.tie_word_embeddings) or _layer_of(name) in new_layers:
                continue
            source = teacher_weights.get(name)
            if source is None or source.shape != tensor.shape:
                found = "missing" if source is None else f"shaped {tuple(source.shape)}"
                raise ConversionError(
                    f"{name}: the teacher's tensor is {found}, the student needs {tuple(tensor.shape)}"
                )
            tensor.copy_(source)
            used.add(name)
            report.inherited.append(name)
        for index in new_layers:
            mixer = student.language_model.layers[index].self_attn
            prefix = f"language_model.layers.{index}.self_attn."
            if hasattr(mixer, "mimic_init"):
                mixer.mimic_init()
            if init == "transfer":
                if teacher.kinds[index] not in ("A", "S"):
                    raise ConversionError(f"transfer init needs attention in the teacher's layer {index}")
                attention = {k[len(prefix) :]: v for k, v in teacher_weights.items() if k.startswith(prefix)}
                for target, sources in transfer_init_(mixer, attention, config).items():
                    report.transferred[prefix + target] = [prefix + s for s in sources]
                    used.update(prefix + s for s in sources)
            report.fresh += [prefix + n for n in mixer.state_dict() if prefix + n not in report.transferred]
    tied = {"lm_head.weight"} if teacher.config.tie_word_embeddings else set()
    report.dropped = sorted(set(teacher_weights) - used - tied)
    return student, report


def convert_checkpoint(
    teacher: str | Path,
    layout: str,
    init: str = "mimic",
    sliding_window: int | None = None,
    mixer_options: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
) -> tuple[HybridVLM, ConversionReport]:
    """Build the student for ``layout`` from the checkpoint in ``teacher`` (Qwen2.5-VL, hybridvl or InfiniteVL, as
    :meth:`HybridVLM.from_pretrained` reads them)."""
    model = HybridVLM.from_pretrained(teacher)
    return convert_model(model, layout, init, sliding_window, mixer_options, seed, str(teacher))


def _same_weights(student_kind: str, teacher_kind: str) -> bool:
    return student_kind == teacher_kind or {student_kind, teacher_kind} <= {"A", "S"}


def _layer_of(name: str) -> int | None:
    """The decoder layer a mixer tensor belongs to (``None`` for anything else)."""
    parts = name.split(".")
    if name.startswith("language_model.layers.") and parts[3] == "self_attn":
        return int(parts[2])
    return None


def _expand_heads(weight: torch.Tensor, kv_heads: int, heads: int) -> torch.Tensor:
    """Rows of ``kv_heads`` heads repeated so head ``h`` holds KV head ``h // (heads / kv_heads)``."""
    if heads % kv_heads:
        raise ConversionError(f"cannot expand {kv_heads} KV heads to {heads} heads")
    return weight.unflatten(0, (kv_heads, -1)).repeat_interleave(heads // kv_heads, dim=0).flatten(0, 1)


@torch.no_grad()
def transfer_init_(mixer: nn.Module, attention: dict[str, torch.Tensor], config: HybridConfig) -> dict[str, list[str]]:
    """Copy the replaced attention layer's projections into ``mixer`` (its ``transfer_init`` does, given the KV heads
    expanded); return ``target -> sources`` (attention tensor names)."""
    heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.attention_head_dim
    missing = {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"} - set(attention)
    if missing:
        raise ConversionError(f"transfer init needs the attention weights {sorted(missing)} in the teacher")
    if not hasattr(mixer, "transfer_init"):
        raise ConversionError(
            f"transfer init does not know how to map attention into {type(mixer).__name__}: it has no transfer_init; "
            "use init='mimic' or give it one (see hybridvl.mixers.base.Mixer.transfer_init)"
        )
    weights = AttentionWeights(
        q=attention["q_proj.weight"],
        k=_expand_heads(attention["k_proj.weight"], kv_heads, heads),
        v=_expand_heads(attention["v_proj.weight"], kv_heads, heads),
        o=attention["o_proj.weight"],
        num_heads=heads,
        head_dim=head_dim,
    )
    try:
        targets = mixer.transfer_init(weights)
    except (ValueError, NotImplementedError) as error:
        raise ConversionError(str(error)) from error
    return {target: [f"{source}_proj.weight" for source in sources] for target, sources in targets.items()}


def copy_processor_files(teacher: str | Path, out: str | Path) -> list[str]:
    """Copy the tokenizer, processor, chat template and generation config next to the student (each atomically;
    not the weights, the config or a stage's export record)."""
    copied = []
    for path in sorted(Path(teacher).iterdir()):
        if (
            path.is_file()
            and path.name not in ("config.json", EXPORT_RECORD)
            and not path.name.startswith(("model", "."))
            and path.suffix != ".safetensors"
        ):
            copy_file(path, Path(out) / path.name)
            copied.append(path.name)
    return copied


def convert_directory(
    teacher: str | Path,
    out: str | Path,
    layout: str,
    init: str = "mimic",
    sliding_window: int | None = None,
    mixer_options: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert ``teacher`` and write the student, its processor files and the report into ``out``.

    Raises:
        hybridvl.models.files.OutputIsInputError: ``out`` is the teacher's folder (checked before anything is read).
        hybridvl.models.files.OutputExistsError: ``out`` holds files and ``overwrite`` is false.
    """
    check_output(out, inputs=[teacher], overwrite=overwrite)
    student, report = convert_checkpoint(teacher, layout, init, sliding_window, mixer_options, seed)
    student.save_pretrained(out, overwrite=overwrite)
    copy_processor_files(teacher, out)
    report.save(out)
    return report
