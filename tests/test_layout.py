"""Layout strings: properties (hypothesis) and every malformed case with its message and caret."""

from __future__ import annotations

import re
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridvl import mixers
from hybridvl.mixers import LayoutError, format_layout, parse_layout, spread_layout

LETTERS = ["D", "S", "A", "M", "G", "L"]
NAMES = {"D": "gdn", "S": "swa", "A": "attn", "M": "mamba2", "G": "gla", "L": "linear"}


def test_infinitevl_layout():
    kinds = parse_layout("S,D,D,D x9")
    assert len(kinds) == 36 and kinds.count("S") == 9 and kinds.count("D") == 27
    assert [i for i, k in enumerate(kinds) if k == "S"] == list(range(0, 36, 4))
    assert parse_layout("(S,D,D,D)x9") == kinds == parse_layout("swa, gdn, gdn, gdn X 9") == parse_layout("s,d,d,d*9")


def test_mixtures_and_nesting():
    assert parse_layout("A,(S,D)x4,A") == ["A"] + ["S", "D"] * 4 + ["A"]
    assert parse_layout("((S,D)x2,M)x2") == ["S", "D", "S", "D", "M"] * 2
    assert parse_layout(" gated_deltanet , sliding_window_attention ") == ["D", "S"]


# A random layout as a tree: ("kind", letter, spelling) | ("group", [children], repeat)
def _kinds(tree) -> list[str]:
    if tree[0] == "kind":
        return [tree[1]]
    return [k for child in tree[1] for k in _kinds(child)] * tree[2]


def _render(tree, draw_spaces) -> str:
    if tree[0] == "kind":
        return tree[2]
    inner = ("," + draw_spaces).join(_render(child, draw_spaces) for child in tree[1])
    return f"({inner})" + (f"{draw_spaces}x{tree[2]}" if tree[2] > 1 else "")


kind_trees = st.sampled_from(LETTERS).flatmap(
    lambda letter: st.sampled_from([letter, letter.lower(), NAMES[letter], NAMES[letter].upper()]).map(
        lambda spelling: ("kind", letter, spelling)
    )
)
trees = st.recursive(
    kind_trees,
    lambda children: st.tuples(st.just("group"), st.lists(children, min_size=1, max_size=4), st.integers(1, 3)),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(tree=trees, spaces=st.sampled_from(["", " ", "  "]))
def test_parse_expands_any_well_formed_layout(tree, spaces):
    assert parse_layout(_render(tree, spaces)) == _kinds(tree)


@settings(max_examples=200, deadline=None)
@given(kinds=st.lists(st.sampled_from(LETTERS), min_size=1, max_size=40))
def test_format_round_trips_to_a_canonical_form(kinds):
    text = format_layout(kinds)
    assert parse_layout(text) == kinds
    assert format_layout(parse_layout(text)) == text
    assert re.fullmatch(r"[A-Z](,[A-Z])*( x\d+)?", text)


@settings(max_examples=100, deadline=None)
@given(unit=st.lists(st.sampled_from(LETTERS), min_size=1, max_size=5), repeat=st.integers(1, 9))
def test_repeated_units_format_compactly(unit, repeat):
    text = format_layout(unit * repeat)
    printed_unit = text.split(" x")[0].split(",")
    assert len(printed_unit) <= len(unit)
    assert parse_layout(text) == unit * repeat


def test_num_layers_must_match():
    assert len(parse_layout("S,D,D,D x9", num_layers=36)) == 36
    with pytest.raises(LayoutError, match="the layout gives 32 layers but the model declares 36"):
        parse_layout("S,D,D,D x8", num_layers=36)


@pytest.mark.parametrize(
    "layout, message, caret",
    [
        ("S,D,,D", "empty item", 4),
        (",S", "empty item", 0),
        ("S,D,", "trailing comma", 3),
        ("(S,D,)x2", "trailing comma", 4),
        ("S,Q,D", "unknown mixer kind 'Q'", 2),
        ("S,foo", "unknown mixer kind 'foo'", 2),
        ("S,D x0", "repeat count must be at least 1", 4),
        ("(S,D)x0", "repeat count must be at least 1", 5),
        ("(S,D", "'(' is never closed", 0),
        ("S,(D,(A)", "'(' is never closed", 2),
        ("S,D)", "')' without a matching '('", 3),
        ("()", "empty group", 1),
        ("", "empty layout", 0),
        ("   ", "empty layout", 3),
        ("S D", "expected ',' or the end of the layout", 2),
        ("x3", "a repeat needs a mixer or a group before it", 0),
        ("S,x3", "empty item", 2),
        ("S;D", "unexpected character ';'", 1),
        ("S,D x2 x3", "expected ',' or the end", 7),
    ],
)
def test_malformed_layouts_point_at_the_problem(layout, message, caret):
    with pytest.raises(LayoutError) as info:
        parse_layout(layout)
    error = info.value
    assert message in str(error)
    assert error.position == caret
    lines = str(error).splitlines()
    assert lines[-2] == f"  {layout}" and lines[-1] == "  " + " " * caret + "^"


def test_spread_layout_ratios():
    assert format_layout(spread_layout(36, "1/4")) == "S,D,D,D x9"
    assert format_layout(spread_layout(36, 0.5)) == "S,D x18"
    eighth = spread_layout(36, "1/8")
    assert eighth.count("S") == 5 and eighth[0] == "S"
    positions = [i for i, k in enumerate(eighth) if k == "S"]
    gaps = [b - a for a, b in pairwise(positions)]
    assert max(gaps) - min(gaps) <= 1
    assert spread_layout(8, 0) == ["D"] * 8 and spread_layout(8, 1) == ["S"] * 8
    assert spread_layout(12, "1/3", attention="A", linear="M") == ["A", "M", "M"] * 4
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        spread_layout(36, 1.5)


def test_register_mixer_joins_layouts():
    @mixers.register_mixer("R", "retention_test")
    class Retention(mixers.GatedLinearAttention):
        pass

    try:
        assert parse_layout("S,R,R,R x2") == ["S", "R", "R", "R"] * 2
        assert parse_layout("retention_test") == ["R"]
        assert isinstance(mixers.build_mixer("retention_test", 64), Retention)
        assert "R" in [row["letter"] for row in mixers.available()]
        with pytest.raises(ValueError, match="already registered"):
            mixers.register_mixer("R", "other_name")
        with pytest.raises(ValueError, match="one upper-case letter"):
            mixers.register_mixer("RR", "double")
        with pytest.raises(ValueError, match="repeat like 'x9'"):
            mixers.register_mixer("Y", "x9")
    finally:
        from hybridvl.mixers import registry

        registry._BY_LETTER.pop("R")
        registry._BY_NAME.pop("retention_test")


def test_unknown_kinds_and_options():
    with pytest.raises(mixers.UnknownMixerError, match=r"unknown mixer kind 'transformer'.*D \(gdn\)"):
        mixers.build_mixer("transformer", 64)
    with pytest.raises(TypeError, match="building mixer D \\(gdn\\) with options \\['heads'\\]"):
        mixers.build_mixer("D", 64, heads=4)


def test_available_lists_every_builtin():
    table = mixers.available()
    assert [row["letter"] for row in table][:6] == ["D", "S", "A", "M", "G", "L"]
    assert all("torch" in row["runnable"] for row in table)
    text = str(table)
    assert text.splitlines()[0].startswith("kind") and "gdn" in text and "mamba2" in text
