"""Layout strings: which mixer each layer uses.

Grammar (whitespace is free, letters and names are case-insensitive)::

    layout := sequence
    sequence := item ("," item)* [repeat]
    item := kind | "(" sequence ")" [repeat]
    repeat := ("x" | "*") count          # count >= 1
    kind := a registered letter ("D") or name ("gdn")

A layout expands to at most :data:`MAX_LAYERS` layers.

A repeat at the end of a sequence repeats the whole sequence, so ``"S,D,D,D x9"`` and ``"(S,D,D,D)x9"``
both give 36 layers (9 ``S``, 27 ``D``), and ``"A,(S,D)x4,A"`` gives 10. :func:`format_layout` writes the
canonical form (letters, the shortest repeating unit), and ``parse_layout(format_layout(kinds)) == kinds``.
Malformed strings raise :class:`LayoutError` with a caret under the offending position.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction

from hybridvl.mixers.registry import UnknownMixerError, resolve_kind

MAX_LAYERS = 1024
"""The most layers a layout may expand to: far more than any model has, while a typo such as ``"S,D x999999999"``
is refused at once instead of expanding until memory runs out."""


class LayoutError(ValueError):
    """A malformed layout string; the message quotes the string with a caret under the problem."""

    def __init__(self, message: str, layout: str, position: int) -> None:
        self.layout, self.position, self.reason = layout, position, message
        super().__init__(f"{message}\n  {layout}\n  {' ' * position}^")


@dataclass
class _Token:
    kind: str  # "word", "repeat", "(", ")", ",", "end"
    text: str
    position: int


_TOKEN = re.compile(r"\s*(?:(?P<repeat>[xX*]\s*\d+)(?![A-Za-z0-9_])|(?P<word>[A-Za-z][A-Za-z0-9_]*)|(?P<punct>[(),]))")


def _tokenize(layout: str) -> list[_Token]:
    tokens, position = [], 0
    while True:
        while position < len(layout) and layout[position].isspace():
            position += 1
        if position == len(layout):
            tokens.append(_Token("end", "", position))
            return tokens
        match = _TOKEN.match(layout, position)
        if match is None:
            raise LayoutError(f"unexpected character {layout[position]!r}", layout, position)
        start = match.start(match.lastgroup)
        text = match.group(match.lastgroup)
        kind = match.lastgroup if match.lastgroup != "punct" else text
        tokens.append(_Token(kind, text, start))
        position = match.end()


class _Parser:
    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.tokens = _tokenize(layout)
        self.index = 0

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def error(self, message: str, token: _Token | None = None) -> LayoutError:
        return LayoutError(message, self.layout, (token or self.token).position)

    def parse(self) -> list[str]:
        if self.token.kind == "end":
            raise self.error("empty layout: name at least one mixer, e.g. 'S,D,D,D x9'")
        kinds = self.sequence()
        if self.token.kind == ")":
            raise self.error("unbalanced parenthesis: ')' without a matching '('")
        if self.token.kind != "end":
            raise self.error(f"expected ',' or the end of the layout, found {self.token.text!r}")
        return kinds

    def sequence(self) -> list[str]:
        kinds = self.item()
        while self.token.kind == ",":
            comma = self.token
            self.index += 1
            if self.token.kind in (")", "end"):
                raise self.error("trailing comma: a mixer is missing after this ','", comma)
            if self.token.kind in (",", "repeat"):
                raise self.error(f"empty item: a mixer is missing before this {self.token.text.strip()!r}")
            kinds += self.item()
            if len(kinds) > MAX_LAYERS:
                raise self.error(f"the layout expands to more than MAX_LAYERS = {MAX_LAYERS} layers", comma)
        if self.token.kind == "repeat":
            kinds = kinds * self.repeat(len(kinds))
        return kinds

    def item(self) -> list[str]:
        token = self.token
        if token.kind == "word":
            self.index += 1
            try:
                return [resolve_kind(token.text)]
            except UnknownMixerError as error:
                raise self.error(str(error), token) from None
        if token.kind == "(":
            self.index += 1
            if self.token.kind == ")":
                raise self.error("empty group '()'")
            if self.token.kind == "end":
                raise self.error("unbalanced parenthesis: '(' is never closed", token)
            kinds = self.sequence()
            if self.token.kind != ")":
                if self.token.kind == "end":
                    raise self.error("unbalanced parenthesis: '(' is never closed", token)
                raise self.error(f"expected ',' or ')', found {self.token.text!r}")
            self.index += 1
            if self.token.kind == "repeat":
                kinds = kinds * self.repeat(len(kinds))
            return kinds
        if token.kind == ",":
            raise self.error("empty item: a mixer is missing before this ','")
        if token.kind == "repeat":
            raise self.error("a repeat needs a mixer or a group before it")
        if token.kind == ")":
            raise self.error("unbalanced parenthesis: ')' without a matching '('")
        raise self.error("a mixer is missing here")

    def repeat(self, unit: int) -> int:
        """The count of the repeat token, which repeats ``unit`` layers."""
        token = self.token
        digits = re.sub(r"\D", "", token.text).lstrip("0")
        if not digits:
            raise self.error(f"repeat count must be at least 1, got {token.text.strip()!r}", token)
        # a count with more digits than MAX_LAYERS exceeds it (and is never converted: int() refuses huge strings)
        if len(digits) > len(str(MAX_LAYERS)) or unit * int(digits) > MAX_LAYERS:
            raise self.error(
                f"repeat {token.text.strip()!r} expands the layout to more than MAX_LAYERS = {MAX_LAYERS} layers", token
            )
        self.index += 1
        return int(digits)


def parse_layout(layout: str, num_layers: int | None = None) -> list[str]:
    """Expand a layout string into one mixer letter per layer.

    Args:
        layout: e.g. ``"S,D,D,D x9"``.
        num_layers: if given, the layer count the model declares; a different count raises.

    Raises:
        LayoutError: the string is malformed, expands to more than :data:`MAX_LAYERS` layers or its layer count
            does not match ``num_layers``.
    """
    if not isinstance(layout, str):
        raise TypeError(f"a layout must be a string, got {type(layout).__name__}")
    kinds = _Parser(layout).parse()
    if num_layers is not None and len(kinds) != num_layers:
        raise LayoutError(
            f"the layout gives {len(kinds)} layers but the model declares {num_layers}", layout, len(layout.rstrip())
        )
    return kinds


def format_layout(kinds: list[str] | tuple[str, ...]) -> str:
    """The canonical string of a list of kinds: letters and the shortest repeating unit (``"S,D,D,D x9"``)."""
    letters = [resolve_kind(kind) for kind in kinds]
    if not letters:
        raise ValueError("a layout needs at least one layer")
    n = len(letters)
    for period in range(1, n + 1):
        if n % period == 0 and letters == letters[:period] * (n // period):
            unit = ",".join(letters[:period])
            return unit if period == n else f"{unit} x{n // period}"
    raise AssertionError("unreachable: the full length is always a period")


def spread_layout(num_layers: int, ratio: float | Fraction | str, attention: str = "S", linear: str = "D") -> list[str]:
    """Spread ``round(ratio * num_layers)`` attention layers evenly, the first at layer 0.

    >>> format_layout(spread_layout(36, "1/4"))
    'S,D,D,D x9'
    """
    try:
        ratio = Fraction(ratio) if isinstance(ratio, str) else Fraction(ratio).limit_denominator(1000)
    except (ValueError, TypeError, OverflowError) as error:
        raise ValueError(f"the attention ratio must be a number or a fraction like '1/4', got {ratio!r}") from error
    if not 0 <= ratio <= 1:
        raise ValueError(f"the attention ratio must lie in [0, 1], got {ratio}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= MAX_LAYERS:
        raise ValueError(f"num_layers must be an integer in [1, MAX_LAYERS = {MAX_LAYERS}], got {num_layers!r}")
    attention, linear = resolve_kind(attention), resolve_kind(linear)
    count = math.floor(ratio * num_layers + Fraction(1, 2))
    kinds = [linear] * num_layers
    for i in range(count):
        kinds[i * num_layers // count] = attention
    return kinds


def count_kinds(kinds: list[str]) -> dict[str, int]:
    """Layers per kind, in order of first appearance."""
    return dict(Counter(kinds))
