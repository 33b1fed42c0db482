"""The configuration of a hybrid model: Qwen2.5-VL text dimensions, a layout, per-kind mixer options and
the Qwen2.5-VL vision tower's configuration."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import json
import logging
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from hybridvl import mixers
from hybridvl.models.files import write_text
from hybridvl.models.positions import TRANSFORMERS5, check_video_position_rule

logger = logging.getLogger("hybridvl.models")

CONFIG_NAME = "config.json"
MODEL_TYPE = "hybridvl"
# fields a saved config may lack (they came after the first configs were saved), with the value such a config meant
OPTIONAL_FIELDS: dict[str, Any] = {"video_position_rule": TRANSFORMERS5, "mixer_modules": {}}
DEFAULT_MROPE_SECTION = (16, 24, 24)
DEFAULT_MIXER_OPTIONS: dict[str, dict[str, Any]] = {"D": {"num_heads": 16, "head_dim": 128, "expand_v": 2.0}}


class ConfigError(ValueError):
    """A saved config that does not describe a hybridvl model completely."""


class HybridConfig(PretrainedConfig):
    """A hybrid decoder (and, with ``vision_config``, a VLM). Defaults are Qwen2.5-VL-3B as InfiniteVL.

    A transformers ``PretrainedConfig`` (``model_type = "hybridvl"``, registered with ``AutoConfig`` by
    ``import hybridvl``), built by keyword. Its ``config.json`` lists every field below (not only those that
    differ from the defaults, as transformers' configs do), because a missing field — the layout above all —
    would load as a default that changes what the weights compute; see :meth:`from_dict`.

    Attributes:
        layout: one mixer per layer, e.g. ``"S,D,D,D x9"`` (see :mod:`hybridvl.mixers.layout`).
        vocab_size, hidden_size, intermediate_size, num_hidden_layers, rms_norm_eps, tie_word_embeddings:
            the Qwen2.5-VL text dimensions. ``intermediate_size=0``: decoder layers without an MLP (and without
            its norm), each only ``x + mixer(norm(x))``, as Zoology's recall models.
        num_attention_heads, num_key_value_heads, head_dim, attention_bias, rope_theta, mrope_section:
            attention layers (``A`` and ``S``): GQA heads, q/k/v biases, RoPE base and M-RoPE split
            (``None``: 1-D RoPE).
        sliding_window: keys per query of ``S`` layers.
        mixer_options: extra options per mixer letter, e.g. ``{"D": {"num_heads": 16, "head_dim": 128}}``;
            they override the attention options above for ``A``/``S``.
        vision_config: the Qwen2.5-VL vision tower's configuration (a dict of
            ``Qwen2_5_VLVisionConfig`` fields), or ``None`` for a text-only model.
        image_token_id, video_token_id, vision_start_token_id, vision_end_token_id: placeholder tokens.
        bos_token_id, eos_token_id, pad_token_id: special tokens (``eos_token_id`` may be a list).
        initializer_range: std of the normal init of new weights.
        video_position_rule: how videos become M-RoPE positions: ``"transformers5"`` (transformers 5.x) or
            ``"transformers4"`` (transformers 4.x and InfiniteVL, whose imported checkpoints keep it); see
            :mod:`hybridvl.models.positions`. A model must run with the rule it was trained under.
        mixer_modules: the module that registers each mixer of the layout from outside this package, e.g.
            ``{"E": "my_pkg.mixers"}``; filled in from the registry (the registered class's ``__module__``) and
            imported before the layout is read, so a saved model rebuilds in a fresh process.

    Raises:
        ConfigError: a mixer module cannot be imported or does not register its letter.
        hybridvl.mixers.LayoutError: the layout does not parse or does not fit ``num_hidden_layers``.
        ValueError: a dimension or special token is out of range (the message names the field and the fix).
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        layout: str = "S,D,D,D x9",
        vocab_size: int = 151936,
        hidden_size: int = 2048,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 36,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = True,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 2,
        head_dim: int | None = None,
        attention_bias: bool = True,
        rope_theta: float = 1_000_000.0,
        mrope_section: list[int] | None = DEFAULT_MROPE_SECTION,
        sliding_window: int = 8192,
        mixer_options: dict[str, dict[str, Any]] = DEFAULT_MIXER_OPTIONS,
        vision_config: dict[str, Any] | None = None,
        image_token_id: int = 151655,
        video_token_id: int = 151656,
        vision_start_token_id: int = 151652,
        vision_end_token_id: int = 151653,
        bos_token_id: int | None = 151643,
        eos_token_id: int | list[int] | None = 151645,
        pad_token_id: int | None = 151643,
        initializer_range: float = 0.02,
        video_position_rule: str = TRANSFORMERS5,
        mixer_modules: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        import_mixer_modules(mixer_modules or {})
        self.layout = layout
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.rms_norm_eps = rms_norm_eps
        self.tie_word_embeddings = tie_word_embeddings
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.attention_bias = attention_bias
        self.rope_theta = rope_theta
        self.mrope_section = None if mrope_section is None else list(mrope_section)
        self.sliding_window = sliding_window
        self.mixer_options = {mixers.resolve_kind(kind): dict(opts) for kind, opts in mixer_options.items()}
        self.vision_config = copy.deepcopy(vision_config)
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else eos_token_id
        self.pad_token_id = pad_token_id
        self.initializer_range = initializer_range
        self.video_position_rule = video_position_rule
        self.mixer_modules = {
            spec.letter: spec.module for spec in map(mixers.get_spec, dict.fromkeys(self.kinds)) if not spec.built_in
        }
        self._validate()

    def _validate(self) -> None:
        check_video_position_rule(self.video_position_rule)
        if self.intermediate_size < 0:
            raise ValueError(
                f"intermediate_size must be positive (the MLP width) or 0 (no MLP), got {self.intermediate_size}"
            )
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}; "
                "set head_dim"
            )
        for name in self._token_fields():
            value = getattr(self, name)
            for token in value if isinstance(value, list) else [value]:
                if token is not None and not 0 <= token < self.vocab_size:
                    raise ValueError(
                        f"{name}={value} lies outside the vocabulary (vocab_size {self.vocab_size}); set it to a "
                        f"token id below {self.vocab_size} (or None)"
                    )

    def _token_fields(self) -> list[str]:
        """The special-token ids the model looks up: the vision placeholders only with a vision tower."""
        fields = ["bos_token_id", "eos_token_id", "pad_token_id"]
        if self.vision_config is not None:
            fields += ["image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"]
        return fields

    @property
    def kinds(self) -> list[str]:
        """The mixer letter of every layer (raises :class:`hybridvl.mixers.LayoutError` on a bad layout)."""
        return mixers.parse_layout(self.layout, num_layers=self.num_hidden_layers)

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def mixer_kwargs(self, kind: str) -> dict[str, Any]:
        """Options to build the mixer of ``kind`` (a letter) at this model's width."""
        letter = mixers.resolve_kind(kind)
        options: dict[str, Any] = {}
        if letter in ("A", "S"):
            options = dict(
                num_heads=self.num_attention_heads,
                num_kv_heads=self.num_key_value_heads,
                head_dim=self.attention_head_dim,
                qkv_bias=self.attention_bias,
                rope_theta=self.rope_theta,
                mrope_section=self.mrope_section,
            )
            if letter == "S":
                options["window"] = self.sliding_window
        return {**options, **self.mixer_options.get(letter, {})}

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def check_mixer_modules(self) -> None:
        """Raise unless every mixer of the layout can be imported by name in a fresh process.

        Raises:
            ConfigError: a mixer comes from a module that cannot be imported by name (a script's ``__main__``),
                so a saved model could not be loaded.
        """
        for letter, module in self.mixer_modules.items():
            if module == "__main__" or importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"cannot save a model with mixer {letter} ({mixers.get_spec(letter).name}): it is defined in "
                    f"module {module!r}, which a loading process cannot import by name; move the mixer class into an "
                    "importable module (a file on PYTHONPATH or in an installed package) and register it there"
                )

    def fields(self) -> dict[str, Any]:
        """The hybridvl fields (the constructor's keywords) and their values, without transformers' bookkeeping:
        ``HybridConfig(**config.fields())`` is an equal config."""
        return {name: copy.deepcopy(getattr(self, name)) for name in FIELDS}

    def to_diff_dict(self) -> dict[str, Any]:
        """What ``config.json`` holds: ``model_type``, every hybridvl field (defaults included, see the class
        docstring) and the transformers bookkeeping that differs from a bare ``PretrainedConfig``."""
        base = {k: v for k, v in super().to_diff_dict().items() if k not in FIELDS}
        return {"model_type": MODEL_TYPE, **self.fields(), **base}

    def save(self, directory: str | Path) -> Path:
        """Write ``config.json`` into ``directory`` (atomically); see :meth:`check_mixer_modules` for what it
        refuses."""
        self.check_mixer_modules()
        return write_text(Path(directory) / CONFIG_NAME, self.to_json_string(use_diff=True))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], source: str = "the config", **kwargs: Any) -> Any:
        """Build from a saved config (``config.json`` or a stage checkpoint's ``hybrid_config``); ``AutoConfig``
        calls this too, with transformers' keyword arguments (``return_unused_kwargs`` and the like).

        Every field must be present: a saved config lists them all, and a missing one (``layout`` above all)
        would otherwise load as a default that changes what the weights compute. Only the fields of
        :data:`OPTIONAL_FIELDS`, which came later, may be missing; each then takes the value configs without it
        meant, with a log line. transformers' own keys (``transformers_version``, ``architectures``, ...) pass.

        Raises:
            ConfigError: a field is missing or unknown, or ``model_type`` is not hybridvl; ``source`` names where
                the config came from.
        """
        data = dict(config_dict)
        model_type = data.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"{source} is not a hybridvl config: model_type is {model_type!r}, expected {MODEL_TYPE!r}"
            )
        unknown = sorted(set(data) - set(FIELDS) - TRANSFORMERS_KEYS)
        if unknown:
            raise ConfigError(f"{source} has unknown hybridvl config fields: {', '.join(unknown)}")
        missing = sorted(set(FIELDS) - set(data) - set(OPTIONAL_FIELDS))
        if missing:
            raise ConfigError(
                f"{source} lacks the required field(s) {', '.join(missing)}: a hybridvl config lists every field, and "
                "a default would silently change the model (a missing layout would load every layer as "
                f"{FIELDS['layout']!r}); restore the field(s) from the run or conversion that wrote these weights (the "
                "layout is also recorded in the safetensors metadata of model.safetensors)"
            )
        for name, value in OPTIONAL_FIELDS.items():
            if name not in data:
                logger.info("%s has no %s (saved before the field existed); using %r", source, name, value)
                data[name] = copy.deepcopy(value)
        return super().from_dict(data, **kwargs)


# the hybridvl fields and their defaults, in the constructor's order
FIELDS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(HybridConfig.__init__).parameters.items()
    if name not in ("self", "kwargs")
}
# keys transformers writes into every config.json (or reads from one), accepted beside the hybridvl fields
TRANSFORMERS_KEYS = set(PretrainedConfig().to_dict()) | {"torch_dtype", "auto_map", "use_cache"}


def import_mixer_modules(modules: dict[str, str]) -> None:
    """Import the module of each mixer letter in ``modules`` (``{"E": "my_pkg.mixers"}``), which registers it.

    Raises:
        ConfigError: a module cannot be imported, or does not register its letter; the message names both.
    """
    for letter, module in modules.items():
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(
                f"mixer {letter} comes from module {module!r}, which cannot be imported ({error}); install it or add "
                "its folder to PYTHONPATH"
            ) from error
        try:
            mixers.resolve_kind(letter)
        except mixers.UnknownMixerError:
            raise ConfigError(
                f"module {module!r} was imported but registers no mixer {letter}; the model was saved with a mixer "
                f"{letter} from that module (register_mixer({letter!r}, ...))"
            ) from None


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory (hybridvl, Qwen2.5-VL or InfiniteVL).

    Raises:
        FileNotFoundError: the directory or its ``config.json`` does not exist.
        ValueError: the file is not valid JSON.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {directory} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: not a checkpoint directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
