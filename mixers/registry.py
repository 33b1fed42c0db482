"""The mixer registry: one letter and one name per kind, so layouts can name any mixer.

.. code-block:: python

    import mixers

    @mixers.register_mixer("R", "retention")
    class Retention(torch.nn.Module):
        def __init__(self, hidden_size, **options): ...
        def forward(self, x, state=None, *, position_ids=None, cu_seqlens=None): ...

    mixers.parse_layout("S,R,R,R x2")          # the new letter joins layouts
    mixers.build_mixer("retention", 512)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from mixers.backends import runnable_backends

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


_BY_LETTER: dict[str, MixerSpec] = {}
_BY_NAME: dict[str, str] = {}


def register_mixer(
    letter: str, name: str, *, aliases: tuple[str, ...] = (), override: bool = False
) -> Callable[[Factory], Factory]:
    """Register a mixer class or factory ``factory(hidden_size, **options) -> nn.Module`` (a decorator).

    Args:
        letter: one upper-case letter used in layout strings.
        name: a lower-case identifier accepted wherever a letter is (``"gdn"``).
        aliases: more accepted names.
        override: replace an existing registration of ``letter`` instead of raising.
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
        return spec.factory(hidden_size, **options)
    except TypeError as error:
        raise TypeError(
            f"building mixer {spec.letter} ({spec.name}) with options {sorted(options)}: {error}"
        ) from error


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
