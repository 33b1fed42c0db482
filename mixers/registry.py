"""The mixer registry: one letter and one name per kind, so layouts can name any mixer.

.. code-block:: python

    from hybridvl import mixers
    from hybridvl.mixers.base import Mixer

    @mixers.register_mixer("R", "retention")    # sets Retention.letter and .name
    class Retention(Mixer):
        def __init__(self, hidden_size, **options): ...
        def forward(self, x, state=None, *, position_ids=None, cu_seqlens=None): ...
        def init_state(self, batch_size, device=None, dtype=None): ...
        # optional: state_bytes (Mixer's default measures init_state), mimic_init, transfer_init

    mixers.parse_layout("S,R,R,R x2")          # the new letter joins layouts
    mixers.build_mixer("retention", 512)

A model saved with a mixer from outside this package records the mixer's module (``mixer_modules`` in its
config) and imports it when loaded, so define mixers in an importable module, not in ``__main__``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from hybridvl.mixers.backends import runnable_backends
from hybridvl.mixers.base import Mixer

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])


class UnknownMixerError(KeyError):
    """A mixer kind that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class MixerSpec:
    """A registered mixer kind."""

    letter: str
    name: str
    factory: Callable[..., nn.Module]
    aliases: tuple[str, ...] = ()

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(getattr(self.factory, "backends", ("torch",)))

    @property
    def fixed_size_state(self) -> bool:
        return bool(getattr(self.factory, "fixed_size_state", True))

    @property
    def module(self) -> str:
        """The module that defines the mixer, which a saved model imports to rebuild it."""
        return self.factory.__module__

    @property
    def built_in(self) -> bool:
        """Whether the mixer comes with this package (importing :mod:`mixers` registers it)."""
        return self.module.split(".")[0] == __name__.split(".")[0]


_BY_LETTER: dict[str, MixerSpec] = {}
_BY_NAME: dict[str, str] = {}
# the methods a mixer must implement, with the placeholders that do not count as implementing them
REQUIRED_METHODS = ("forward", "init_state", "state_bytes")
_PLACEHOLDERS = (nn.Module.forward, Mixer.forward, Mixer.init_state)


def check_mixer_class(cls: type, owner: str) -> None:
    """Raise unless ``cls`` is an ``nn.Module`` that implements :data:`REQUIRED_METHODS`.

    Raises:
        TypeError: naming ``owner``, what is missing and the base class to subclass.
    """
    if not issubclass(cls, nn.Module):
        raise TypeError(
            f"{owner}: {cls.__qualname__} is not a torch.nn.Module; subclass hybridvl.mixers.base.Mixer, "
            "the base class of every mixer"
        )
    missing = [
        name
        for name in REQUIRED_METHODS
        if not callable(getattr(cls, name, None)) or getattr(cls, name) in _PLACEHOLDERS
    ]
    if missing:
        raise TypeError(
            f"{owner}: {cls.__qualname__} lacks {', '.join(missing)}; a mixer implements forward, init_state and "
            "state_bytes: subclass hybridvl.mixers.base.Mixer (it documents the contract and provides state_bytes) and "
            "implement the missing method(s)"
        )


def register_mixer(
    letter: str, name: str, *, aliases: tuple[str, ...] = (), override: bool = False
) -> Callable[[Factory], Factory]:
    """Register a mixer class or factory ``factory(hidden_size, **options) -> nn.Module`` (a decorator).

    A class gets ``letter`` and ``name`` as class attributes and must implement ``forward``, ``init_state`` and
    ``state_bytes`` (see :mod:`hybridvl.mixers.base`; subclass :class:`hybridvl.mixers.base.Mixer`); the module a
    factory builds is checked the same way by :func:`build_mixer`.

    Args:
        letter: one upper-case letter used in layout strings.
        name: a lower-case identifier accepted wherever a letter is (``"gdn"``).
        aliases: more accepted names.
        override: replace an existing registration of ``letter`` instead of raising.

    Raises:
        ValueError: a malformed or taken letter or name.
        TypeError: a class that is not a mixer (the message names the missing methods).
    """
    if not re.fullmatch(r"[A-Z]", letter):
        raise ValueError(f"a mixer letter must be one upper-case letter A-Z, got {letter!r}")
    names = (name, *aliases)
    for item in names:
        if not re.fullmatch(r"[a-z][a-z0-9_]+", item) or re.fullmatch(r"x\d+", item):
            raise ValueError(
                f"a mixer name must be a lower-case identifier of 2+ characters that does not read as a "
                f"repeat like 'x9', got {item!r}"
            )
    if letter in _BY_LETTER and not override:
        raise ValueError(
            f"mixer letter {letter!r} is already registered as {_BY_LETTER[letter].name!r}; "
            "pass override=True to replace it"
        )
    taken = [n for n in names if n in _BY_NAME and _BY_NAME[n] != letter]
    if taken:
        raise ValueError(f"mixer name(s) {taken} already belong to other letters")

    def decorator(factory: Factory) -> Factory:
        if isinstance(factory, type):
            check_mixer_class(factory, f"cannot register mixer {letter} ({name})")
            factory.letter, factory.name = letter, name
        if letter in _BY_LETTER:
            old = _BY_LETTER[letter]
            for item in (old.name, *old.aliases):
                _BY_NAME.pop(item, None)
        _BY_LETTER[letter] = MixerSpec(letter, name, factory, tuple(aliases))
        for item in names:
            _BY_NAME[item] = letter
        return factory

    return decorator


def resolve_kind(kind: str) -> str:
    """The letter of ``kind``, given as a letter (any case) or a registered name."""
    key = kind.strip()
    if len(key) == 1 and key.upper() in _BY_LETTER:
        return key.upper()
    if key.lower() in _BY_NAME:
        return _BY_NAME[key.lower()]
    known = ", ".join(f"{spec.letter} ({spec.name})" for spec in _BY_LETTER.values())
    raise UnknownMixerError(f"unknown mixer kind {kind!r}; registered kinds: {known}. Add one with register_mixer()")


def get_spec(kind: str) -> MixerSpec:
    """The :class:`MixerSpec` of a letter or name."""
    return _BY_LETTER[resolve_kind(kind)]


def build_mixer(kind: str, hidden_size: int, **options) -> nn.Module:
    """Build a mixer by letter (``"D"``) or name (``"gdn"``) with its options.

    >>> mixer = build_mixer("D", 256, num_heads=2)
    """
    spec = get_spec(kind)
    try:
        mixer = spec.factory(hidden_size, **options)
    except TypeError as error:
        raise TypeError(
            f"building mixer {spec.letter} ({spec.name}) with options {sorted(options)}: {error}"
        ) from error
    if not isinstance(spec.factory, type):
        check_mixer_class(
            type(mixer), f"the factory of mixer {spec.letter} ({spec.name}) built a {type(mixer).__name__}"
        )
    return mixer


def registered() -> list[MixerSpec]:
    """Every registered kind, in registration order."""
    return list(_BY_LETTER.values())


class MixerTable(list):
    """The result of :func:`available`: a list of dicts that prints as a table."""

    def __str__(self) -> str:
        rows = [("kind", "name", "state", "backends that run here", "supported backends")]
        rows += [
            (
                r["letter"],
                r["name"],
                "fixed" if r["fixed_size_state"] else "grows",
                ", ".join(r["runnable"]),
                ", ".join(r["backends"]),
            )
            for r in self
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def available() -> MixerTable:
    """List the registered kinds, their names, and which of their backends can run on this machine."""
    return MixerTable(
        {
            "letter": spec.letter,
            "name": spec.name,
            "aliases": list(spec.aliases),
            "fixed_size_state": spec.fixed_size_state,
            "backends": list(spec.backends),
            "runnable": runnable_backends(spec.backends),
        }
        for spec in registered()
    )
