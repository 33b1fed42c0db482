"""A built-in synthetic multimodal suite: five small tasks a tiny vision-language model can learn on a CPU.

Nothing is downloaded: every sample is drawn with PIL from its own :class:`random.Random`, seeded from
``(seed, split, task, index)`` (the global random states are never touched), so the same ``(seed, split, index)``
gives the same :class:`~hybridvl.lit.data.types.Conversation`, with bit-identical pixels, in every process and worker
(for given Python and Pillow versions: neither promises its sampling methods or glyph rasterisation across versions).
Images are small squares (default 56 x 56: 2 x 2 merged tokens of Qwen2.5-VL's 14-pixel patches; document pages 224 x
224: 8 x 8 tokens), the glyphs and shapes big and plain, the answer spaces small and every answer one word or number.

Each conversation has one user turn (the image or video first, then the question) and one assistant turn (the
answer); ``task`` is the task's name, ``answer`` the answer string, ``source`` ``"synthetic:<task>:<split>:<i>"``
with ``i`` the suite index, and ``meta`` what the task records to group metrics by (:meth:`SyntheticTask.meta`:
the evidence lines of a document, the cue distance of a video; empty for the other tasks). The suite's default
tasks are :data:`DEFAULT_TASKS`, the four small ones; ``document`` is asked for by name. Tasks, with their answer
spaces and difficulty knobs:

``ocr`` (:class:`OCRTask`): "What is written in the image?" An image with one word or number drawn as large as
    the longest vocabulary entry allows, at a random position, in a random dark ink on a random light paper.
    Answers: the text exactly as drawn, one of ``vocabulary`` (default :data:`OCR_VOCABULARY`: six three-letter
    capitalised words and six 1-2 digit numbers). Knobs: ``vocabulary`` (more or longer entries: more classes,
    smaller glyphs), ``image_size``.
``chart`` (:class:`ChartTask`): "Which colour is the tallest bar?" A bar chart of ``min_bars``-``max_bars``
    bars in distinct colours standing on a black axis. Answers: a colour name of :data:`COLOURS` (the tallest
    bar's). Knobs: ``min_bars`` / ``max_bars``; ``min_margin``, the least height the tallest bar has over the
    runner-up as a fraction of the plot height (smaller: closer calls).
``counting`` (:class:`CountingTask`): "How many shapes are there?" 1 to ``max_count`` filled squares and circles
    of random colours and sizes, each inside its own cell of a grid, so they never touch. Answers: ``"1"`` to
    ``str(max_count)``. Knobs: ``max_count`` (more classes, and a finer grid of smaller shapes).
``video_memory`` (:class:`VideoMemoryTask`): "What colour was the circle?" A video of ``frames`` frames (``fps``
    2.0) of which two consecutive ones (one temporal patch; the first at an even index) show a coloured disc on
    white — the cue — and every other pair of frames a coloured square on black (colours drawn from all of
    :data:`COLOURS`, the cue's included, so the squares are distractors). Between ``min_distance`` and
    ``max_distance`` frames follow the cue (its *distance*, recorded as ``meta["distance"]``; the frames are
    handled in pairs, so the distance is even), which places the answer beyond a sliding window of
    ``min_distance`` frames and within one of ``max_distance + 2``: tasks with disjoint ranges put the cue inside
    one window, between one window and what stacked windows reach, or beyond that reach. Answers: a colour name
    of :data:`COLOURS`. Knobs: ``frames``, ``min_distance``, ``max_distance`` (default ``frames - 2``: any
    distance from ``min_distance`` on), ``frame_size``.
``document`` (:class:`DocumentTask`): a page of ``lines`` lines, each a key and its value ("FIG: 47"; distinct
    keys of :data:`DOCUMENT_NAMES` and distinct values of :data:`DOCUMENT_VALUES` per page, at fixed rows, in a
    random dark ink on a random light paper), and one of two questions about it: "What is the value of FIG?"
    (*read*: the value) or "Which is larger, FIG or OAK?" (*compare*: the key of the larger value). The page is
    large (default 224 x 224, 64 tokens) and the answer's line anywhere on it, so on most lines the evidence lies
    further back from the question than a 32-token window; ``meta`` records the question's ``kind`` (``"read"``
    or ``"compare"``) and its evidence ``lines`` (0 is the top line, the farthest from the question), and
    :meth:`DocumentTask.line_box` the pixel rows of each line. Answers: the values and the keys, so a balanced
    draw asks both kinds equally often (with as many values as keys). Knobs: ``lines``, ``page_size``, ``names``,
    ``values``.

Each task draws its answers in balanced proportions: the suite walks the answer space in consecutive blocks, each a
seeded permutation of all answers, so among the first n samples of a task, for any n, the answers' counts differ by
at most one.

Splits partition the content, not just the seeds: every sample's rendering parameters (text, positions, colours,
sizes, ...) hash into ``train`` (80 %), ``val`` (10 %) or ``test`` (10 %) of the content space, independently of
the seed, and each split only draws parameters that hash into it. So no train image or video is ever identical to a
val or test one, for any seeds; the held-out samples ask the same questions about the same answer spaces, with
unseen positions, colours and sizes (nearby ones, like a one-pixel shift, may still be in train).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import math
import operator
import random
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar, Final, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from hybridvl.lit.data.types import Conversation

__all__ = [
    "COLOURS",
    "DEFAULT_TASKS",
    "DOCUMENT_NAMES",
    "DOCUMENT_VALUES",
    "OCR_VOCABULARY",
    "PATCH_MULTIPLE",
    "SPLITS",
    "TASK_NAMES",
    "ChartTask",
    "CountingTask",
    "DocumentTask",
    "OCRTask",
    "SyntheticSuite",
    "SyntheticTask",
    "VideoMemoryTask",
    "build_task",
]

PATCH_MULTIPLE: Final = 28
"""Image and frame sides are multiples of this: Qwen2.5-VL's 14-pixel patches merged 2 x 2."""

COLOURS: Final[dict[str, tuple[int, int, int]]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "purple": (150, 60, 190),
}
"""The named colours of the chart, counting and video tasks (the chart and video answers)."""

OCR_VOCABULARY: Final = ("CAT", "DOG", "SUN", "CAR", "HAT", "BOX", "3", "7", "18", "25", "42", "96")
"""The default texts of the ``ocr`` task."""

DOCUMENT_NAMES: Final = ("ASH", "BAY", "ELM", "FIG", "IVY", "OAK", "RYE", "YEW")
"""The default keys of the ``document`` task (the compare answers)."""

DOCUMENT_VALUES: Final = ("12", "25", "31", "47", "56", "64", "78", "93")
"""The default values of the ``document`` task (the read answers)."""

SPLITS: Final = ("train", "val", "test")
TASK_NAMES: Final = ("ocr", "chart", "counting", "video_memory", "document")
DEFAULT_TASKS: Final = ("ocr", "chart", "counting", "video_memory")
"""The tasks of a suite that names none: all but ``document``, whose pages cost 16 times the tokens."""

_SPLIT_BUCKETS: Final = {"train": range(0, 80), "val": range(80, 90), "test": range(90, 100)}
_MIN_GLYPH_HEIGHT: Final = 10  # pixels of a document line's ink, to stay legible at 14-pixel patches
_MAX_DRAWS: Final = 1000  # parameter draws per sample before its split is declared empty (p(miss) ~ 0.9**1000)
_NAMESPACE: Final = "hybridvl.synthetic"

_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)
_INKS = ((0, 0, 0), (25, 35, 120), (120, 25, 25), (20, 85, 35))
_PAPERS = ((255, 255, 255), (245, 238, 210), (220, 232, 250), (232, 232, 232))


def _check_side(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or value < minimum or value % PATCH_MULTIPLE:
        raise ValueError(f"{name} must be a multiple of {PATCH_MULTIPLE} of at least {minimum} pixels, got {value!r}")


def _check_video(frames: int, min_distance: int, max_distance: int | None) -> None:
    if not isinstance(frames, int) or frames < 2 or frames % 2:
        raise ValueError(f"video frames must be an even number of at least 2 (temporal patch 2), got {frames!r}")
    if not isinstance(min_distance, int) or not 0 <= min_distance <= frames - 2:
        raise ValueError(
            f"min_distance must be between 0 and frames - 2 = {frames - 2} (the cue takes two frames), "
            f"got {min_distance!r}"
        )
    if max_distance is None:
        return
    if not isinstance(max_distance, int) or max_distance % 2:
        raise ValueError(
            f"max_distance must be an even number of frames (they come in pairs) or None, got {max_distance!r}"
        )
    if max_distance < min_distance:
        raise ValueError(
            f"max_distance {max_distance} is below min_distance {min_distance}: raise max_distance or lower "
            "min_distance"
        )
    if max_distance > frames - 2:
        raise ValueError(
            f"max_distance {max_distance} exceeds frames - 2 = {frames - 2} (the cue takes two frames): lower it or "
            f"use at least {max_distance + 2} video frames"
        )


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


class SyntheticTask(abc.ABC):
    """One task: a question, a finite answer space and a renderer of random content for a given answer.

    Subclasses set ``name`` and ``question`` (or override :meth:`question_for`, for questions that vary with the
    content) and implement :attr:`answers`, :meth:`sample` and :meth:`render`; :class:`SyntheticSuite` takes care
    of seeding, balancing answers and keeping splits apart.
    """

    name: ClassVar[str]
    question: ClassVar[str]

    def question_for(self, params: Hashable) -> str:
        """The question asked about ``params``: the task's fixed ``question`` unless the task varies it."""
        return self.question

    def meta(self, params: Hashable) -> dict[str, Any]:
        """What the conversation of ``params`` records to group metrics by (its ``meta``); nothing by default."""
        return {}

    @property
    @abc.abstractmethod
    def answers(self) -> tuple[str, ...]:
        """Every answer the task gives."""

    @property
    def chance(self) -> float:
        """The exact match of the best answer given without looking at the image or video: the suite balances
        the answers, so one in ``len(answers)``. A model at this score has learned nothing from the media."""
        return 1 / len(self.answers)

    @abc.abstractmethod
    def sample(self, rng: random.Random, answer: str) -> Hashable:
        """Random content whose answer is ``answer``: parameters (with a deterministic ``repr``) that fully
        determine :meth:`render`'s output."""

    @abc.abstractmethod
    def render(self, params: Hashable) -> dict:
        """The user turn's media item (``{"type": "image", ...}`` or ``{"type": "video", ...}``) for ``params``."""


class _Text(NamedTuple):
    text: str
    x: int  # left edge of the ink
    y: int  # top edge of the ink
    ink: tuple[int, int, int]
    paper: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class OCRTask(SyntheticTask):
    """Read one word or number drawn large in PIL's default font (see the module docstring)."""

    image_size: int = 56
    vocabulary: tuple[str, ...] = OCR_VOCABULARY

    name: ClassVar[str] = "ocr"
    question: ClassVar[str] = "What is written in the image?"
    margin: ClassVar[int] = 2
    """Pixels kept clear along every edge (so the corners show the paper)."""

    def __post_init__(self) -> None:
        _check_side("image_size", self.image_size, 2 * PATCH_MULTIPLE)
        object.__setattr__(self, "vocabulary", tuple(self.vocabulary))
        if not self.vocabulary or len(set(self.vocabulary)) != len(self.vocabulary):
            raise ValueError(f"the OCR vocabulary must be non-empty and without duplicates, got {self.vocabulary}")
        if not all(isinstance(text, str) and text.isprintable() and text.strip() == text for text in self.vocabulary):
            raise ValueError(f"OCR texts must be printable one-line strings without outer spaces: {self.vocabulary}")
        if self.font_size < 8:
            raise ValueError(f"{max(self.vocabulary, key=len)!r} does not fit an {self.image_size}-pixel image")

    @functools.cached_property
    def font_size(self) -> int:
        """The font size of every text: the largest at which each vocabulary entry fits in at most 3/5 of the
        height and leaves at least 1/8 of the width free for jitter; 0 if none of at least 8 fits."""
        width = self.image_size - 2 * self.margin - self.image_size // 8
        height = self.image_size * 3 // 5
        for size in range(self.image_size, 7, -1):
            boxes = [_font(size).getbbox(text) for text in self.vocabulary]
            if all(right - left <= width and bottom - top <= height for left, top, right, bottom in boxes):
                return size
        return 0

    @property
    def answers(self) -> tuple[str, ...]:
        return self.vocabulary

    def sample(self, rng: random.Random, answer: str) -> _Text:
        left, top, right, bottom = _font(self.font_size).getbbox(answer)
        far = self.image_size - self.margin
        x = rng.randint(self.margin, far - (right - left))
        y = rng.randint(self.margin, far - (bottom - top))
        return _Text(answer, x, y, rng.choice(_INKS), rng.choice(_PAPERS))

    def render(self, params: _Text) -> dict:
        font = _font(self.font_size)
        left, top, _, _ = font.getbbox(params.text)
        image = Image.new("RGB", (self.image_size, self.image_size), params.paper)
        ImageDraw.Draw(image).text((params.x - left, params.y - top), params.text, fill=params.ink, font=font)
        return {"type": "image", "image": image}


class _Bars(NamedTuple):
    colours: tuple[str, ...]  # left to right
    heights: tuple[int, ...]  # pixels


@dataclasses.dataclass(frozen=True)
class ChartTask(SyntheticTask):
    """Name the colour of the tallest bar of a small bar chart (see the module docstring)."""

    image_size: int = 56
    min_bars: int = 2
    max_bars: int = 4
    min_margin: float = 0.15

    name: ClassVar[str] = "chart"
    question: ClassVar[str] = "Which colour is the tallest bar?"

    def __post_init__(self) -> None:
        _check_side("image_size", self.image_size, 2 * PATCH_MULTIPLE)
        if not 2 <= self.min_bars <= self.max_bars <= len(COLOURS):
            raise ValueError(
                f"need 2 <= min_bars <= max_bars <= {len(COLOURS)} (one colour each), "
                f"got {self.min_bars} and {self.max_bars}"
            )
        if not 0 < self.min_margin <= 0.4:
            raise ValueError(f"min_margin is a fraction of the plot height in (0, 0.4], got {self.min_margin}")

    @property
    def pad(self) -> int:
        """Pixels between the plot and the image's edges."""
        return max(2, self.image_size // 14)

    @property
    def baseline(self) -> int:
        """The row of the axis; bars stand on it."""
        return self.image_size - self.pad - 1

    @property
    def plot_height(self) -> int:
        """The tallest a bar can be."""
        return self.baseline - self.pad

    @property
    def answers(self) -> tuple[str, ...]:
        return tuple(COLOURS)

    def sample(self, rng: random.Random, answer: str) -> _Bars:
        count = rng.randint(self.min_bars, self.max_bars)
        colours = rng.sample([colour for colour in COLOURS if colour != answer], count - 1)
        tallest = rng.randrange(count)
        colours.insert(tallest, answer)
        top = rng.randint(self.plot_height * 3 // 5, self.plot_height)
        lowest, highest = self.plot_height // 6, top - math.ceil(self.min_margin * self.plot_height)
        heights = [top if i == tallest else rng.randint(lowest, highest) for i in range(count)]
        return _Bars(tuple(colours), tuple(heights))

    def render(self, params: _Bars) -> dict:
        size, pad = self.image_size, self.pad
        image = Image.new("RGB", (size, size), _WHITE)
        draw = ImageDraw.Draw(image)
        slot = (size - 2 * pad) // len(params.colours)
        width = max(3, slot * 2 // 3)
        for i, (colour, height) in enumerate(zip(params.colours, params.heights)):
            left = pad + i * slot + (slot - width) // 2
            draw.rectangle((left, self.baseline - height, left + width - 1, self.baseline - 1), fill=COLOURS[colour])
        draw.line((pad, self.baseline, size - pad - 1, self.baseline), fill=_BLACK)
        return {"type": "image", "image": image}


class _Shape(NamedTuple):
    kind: str  # "square" or "circle"
    colour: str
    x: int
    y: int
    size: int


class _Shapes(NamedTuple):
    paper: tuple[int, int, int]
    shapes: tuple[_Shape, ...]


@dataclasses.dataclass(frozen=True)
class CountingTask(SyntheticTask):
    """Count 1 to ``max_count`` non-touching squares and circles (see the module docstring)."""

    image_size: int = 56
    max_count: int = 5

    name: ClassVar[str] = "counting"
    question: ClassVar[str] = "How many shapes are there?"

    def __post_init__(self) -> None:
        _check_side("image_size", self.image_size, 2 * PATCH_MULTIPLE)
        if not isinstance(self.max_count, int) or self.max_count < 1:
            raise ValueError(f"max_count must be a positive integer, got {self.max_count!r}")
        if self.cell < 8:
            raise ValueError(f"{self.max_count} shapes do not fit an {self.image_size}-pixel image")

    @property
    def grid(self) -> int:
        """Cells per side; shapes go into distinct cells (at least twice as many cells as shapes)."""
        return max(3, math.ceil(math.sqrt(2 * self.max_count)))

    @property
    def cell(self) -> int:
        """A cell's side in pixels."""
        return self.image_size // self.grid

    @property
    def answers(self) -> tuple[str, ...]:
        return tuple(str(count) for count in range(1, self.max_count + 1))

    def sample(self, rng: random.Random, answer: str) -> _Shapes:
        cell, origin = self.cell, (self.image_size - self.grid * self.cell) // 2
        shapes = []
        for index in sorted(rng.sample(range(self.grid**2), int(answer))):
            size = rng.randint(max(4, cell // 2), cell - 2)
            # one clear pixel on each side inside the cell: shapes in neighbouring cells are 2 pixels apart
            x = origin + (index % self.grid) * cell + 1 + rng.randint(0, cell - 2 - size)
            y = origin + (index // self.grid) * cell + 1 + rng.randint(0, cell - 2 - size)
            shapes.append(_Shape(rng.choice(("square", "circle")), rng.choice(list(COLOURS)), x, y, size))
        return _Shapes(rng.choice(_PAPERS), tuple(shapes))

    def render(self, params: _Shapes) -> dict:
        image = Image.new("RGB", (self.image_size, self.image_size), params.paper)
        draw = ImageDraw.Draw(image)
        for shape in params.shapes:
            box = (shape.x, shape.y, shape.x + shape.size - 1, shape.y + shape.size - 1)
            (draw.rectangle if shape.kind == "square" else draw.ellipse)(box, fill=COLOURS[shape.colour])
        return {"type": "image", "image": image}


class _Square(NamedTuple):
    colour: str
    x: int
    y: int
    size: int


class _Clip(NamedTuple):
    cue_start: int  # the cue's first frame (even); it shows in frames cue_start and cue_start + 1
    colour: str
    cx: int
    cy: int
    radius: int
    squares: tuple[_Square, ...]  # one per other pair of frames, in order


@dataclasses.dataclass(frozen=True)
class VideoMemoryTask(SyntheticTask):
    """Recall the colour of a disc shown a given number of frames before a video's end (see the module docstring)."""

    frames: int = 8
    frame_size: int = 56
    min_distance: int = 4
    max_distance: int | None = None
    fps: float = 2.0

    name: ClassVar[str] = "video_memory"
    question: ClassVar[str] = "What colour was the circle?"

    def __post_init__(self) -> None:
        _check_side("frame_size", self.frame_size, PATCH_MULTIPLE)
        _check_video(self.frames, self.min_distance, self.max_distance)
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps!r}")

    @property
    def answers(self) -> tuple[str, ...]:
        return tuple(COLOURS)

    @property
    def distances(self) -> range:
        """Every distance the cue is drawn at: the even frame counts from ``min_distance`` to ``max_distance``."""
        top = self.frames - 2 if self.max_distance is None else self.max_distance
        return range(self.min_distance + self.min_distance % 2, top + 1, 2)

    def distance(self, params: _Clip) -> int:
        """Frames between the cue of ``params`` and the video's end."""
        return self.frames - 2 - params.cue_start

    def meta(self, params: _Clip) -> dict[str, Any]:
        """``{"distance": frames}``: the cue's :meth:`distance`."""
        return {"distance": self.distance(params)}

    def sample(self, rng: random.Random, answer: str) -> _Clip:
        size = self.frame_size
        farthest, nearest = self.distances[-1], self.distances[0]
        cue_start = 2 * rng.randint((self.frames - 2 - farthest) // 2, (self.frames - 2 - nearest) // 2)
        radius = rng.randint(size // 6, size // 3)
        cx, cy = (rng.randint(radius + 2, size - radius - 3) for _ in range(2))
        squares = []
        for _ in range(self.frames // 2 - 1):
            side = rng.randint(size // 4, size // 2)
            squares.append(
                _Square(rng.choice(list(COLOURS)), rng.randint(0, size - side), rng.randint(0, size - side), side)
            )
        return _Clip(cue_start, answer, cx, cy, radius, tuple(squares))

    def render(self, params: _Clip) -> dict:
        size = self.frame_size
        cue = Image.new("RGB", (size, size), _WHITE)
        r = params.radius
        ImageDraw.Draw(cue).ellipse(
            (params.cx - r, params.cy - r, params.cx + r, params.cy + r), fill=COLOURS[params.colour]
        )
        pictures = []
        for square in params.squares:
            picture = Image.new("RGB", (size, size), _BLACK)
            box = (square.x, square.y, square.x + square.size - 1, square.y + square.size - 1)
            ImageDraw.Draw(picture).rectangle(box, fill=COLOURS[square.colour])
            pictures.append(picture)
        pictures.insert(params.cue_start // 2, cue)
        frames = np.repeat(np.stack([np.asarray(picture) for picture in pictures]), 2, axis=0)  # [T, H, W, 3]
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
        return {"type": "video", "video": video, "fps": float(self.fps)}


class _Page(NamedTuple):
    names: tuple[str, ...]  # the keys, top line first
    values: tuple[str, ...]  # line i reads "names[i]: values[i]"
    asked: tuple[int, ...]  # the lines the question names, in its order: one (read) or two (compare)
    x: int  # the horizontal origin of every key
    ink: tuple[int, int, int]
    paper: tuple[int, int, int]


class _Layout(NamedTuple):
    font_size: int
    ascent: int  # from a text's origin down to the top of its line's band
    height: int  # of every line's band: all of a key's or value's ink lies in it
    indent: int  # from a key's origin to its value's
    left: int  # from a key's origin to the leftmost ink of any key
    right: int  # from a key's origin to the rightmost ink of any value


@dataclasses.dataclass(frozen=True)
class DocumentTask(SyntheticTask):
    """Read a value off a page of key-value lines, or compare two of them (see the module docstring).

    Line ``i`` is drawn in the ``i``-th of ``lines`` equal bands between the page's margins, keys in one column and
    values in the next, in the largest font whose ink fills at most 3/5 of a band and whose widest line leaves 1/8
    of the page's width free for jitter; its ink lies in the rows :meth:`line_box` gives.
    """

    page_size: int = 224
    lines: int = 6
    names: tuple[str, ...] = DOCUMENT_NAMES
    values: tuple[str, ...] = DOCUMENT_VALUES

    name: ClassVar[str] = "document"

    def __post_init__(self) -> None:
        _check_side("page_size", self.page_size, 2 * PATCH_MULTIPLE)
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "values", tuple(self.values))
        if len(set(self.names)) != len(self.names) or not all(
            isinstance(name, str) and name.isascii() and name.isalpha() for name in self.names
        ):
            raise ValueError(f"document names must be distinct words of ASCII letters, got {self.names}")
        if not all(isinstance(value, str) and value.isascii() and value.isdigit() for value in self.values) or len(
            {int(value) for value in self.values}
        ) != len(self.values):
            raise ValueError(f"document values must be distinct whole numbers written in digits, got {self.values}")
        most = min(len(self.names), len(self.values))
        if not isinstance(self.lines, int) or not 2 <= self.lines <= most:
            raise ValueError(
                f"lines must be an integer from 2 (a comparison needs two) to {most} (a page's names and values are "
                f"distinct; there are {len(self.names)} names and {len(self.values)} values), got {self.lines!r}"
            )
        if self._layout is None:
            raise ValueError(
                f"{self.lines} lines do not fit a {self.page_size}-pixel page with glyphs at least {_MIN_GLYPH_HEIGHT} "
                "pixels tall: use a larger page_size or fewer lines"
            )

    @property
    def margin(self) -> int:
        """Pixels kept clear along every edge."""
        return self.page_size // 16

    @property
    def pitch(self) -> int:
        """The height of each line's band in pixels."""
        return (self.page_size - 2 * self.margin) // self.lines

    @functools.cached_property
    def _layout(self) -> _Layout | None:
        room = self.page_size - 2 * self.margin - self.page_size // 8
        for size in range(self.pitch, 0, -1):
            font = _font(size)
            keys = [font.getbbox(f"{name}:") for name in self.names]
            values = [font.getbbox(value) for value in self.values]
            top, bottom = min(box[1] for box in keys + values), max(box[3] for box in keys + values)
            if bottom - top < _MIN_GLYPH_HEIGHT:
                return None
            indent = max(box[2] for box in keys) + math.ceil(font.getlength(" "))
            left, right = min(box[0] for box in keys), indent + max(box[2] for box in values)
            if bottom - top <= self.pitch * 3 // 5 and right - left <= room:
                return _Layout(size, top, bottom - top, indent, left, right)
        return None

    @property
    def font_size(self) -> int:
        """The font size of every key and value."""
        return self._layout.font_size

    def line_box(self, line: int) -> tuple[int, int]:
        """``(top, bottom)``: the pixel rows (``bottom`` excluded) that hold all the ink of line ``line``."""
        if not 0 <= line < self.lines:
            raise IndexError(f"line {line} is out of range for a page of {self.lines} lines")
        top = self.margin + line * self.pitch + (self.pitch - self._layout.height) // 2
        return top, top + self._layout.height

    @property
    def answers(self) -> tuple[str, ...]:
        return self.values + self.names

    @property
    def chance(self) -> float:
        """Without the page a read question is a guess among the values and a comparison one between the two
        names it asks about; the balanced answers ask them in the proportion of values to names."""
        reads = len(self.values) / len(self.answers)
        return reads / len(self.values) + (1 - reads) / 2

    def question_for(self, params: _Page) -> str:
        """The value of the one line asked ("What is the value of FIG?") or the larger of two ("Which is larger,
        FIG or OAK?")."""
        names = [params.names[line] for line in params.asked]
        return f"What is the value of {names[0]}?" if len(names) == 1 else f"Which is larger, {names[0]} or {names[1]}?"

    def meta(self, params: _Page) -> dict[str, Any]:
        """``{"kind": "read" | "compare", "lines": (line, ...)}``: the question's kind and the lines that hold its
        evidence, top first (the first is the farthest from the question)."""
        return {"kind": "read" if len(params.asked) == 1 else "compare", "lines": tuple(sorted(params.asked))}

    def sample(self, rng: random.Random, answer: str) -> _Page:
        count = self.lines
        if answer in self.values:  # read the answer off a random line
            asked = (rng.randrange(count),)
            values = rng.sample([value for value in self.values if value != answer], count - 1)
            values.insert(asked[0], answer)
            names = rng.sample(self.names, count)
        else:  # compare two random lines; the answer's holds the larger value
            values = rng.sample(self.values, count)
            asked = tuple(rng.sample(range(count), 2))
            names = rng.sample([name for name in self.names if name != answer], count - 1)
            names.insert(max(asked, key=lambda line: int(values[line])), answer)
        layout = self._layout
        x = rng.randint(self.margin - layout.left, self.page_size - self.margin - layout.right)
        return _Page(tuple(names), tuple(values), asked, x, rng.choice(_INKS), rng.choice(_PAPERS))

    def render(self, params: _Page) -> dict:
        layout = self._layout
        font = _font(layout.font_size)
        image = Image.new("RGB", (self.page_size, self.page_size), params.paper)
        draw = ImageDraw.Draw(image)
        for line, (name, value) in enumerate(zip(params.names, params.values)):
            y = self.line_box(line)[0] - layout.ascent
            draw.text((params.x, y), f"{name}:", fill=params.ink, font=font)
            draw.text((params.x + layout.indent, y), value, fill=params.ink, font=font)
        return {"type": "image", "image": image}


def build_task(
    name: str,
    *,
    image_size: int = 56,
    video_frames: int = 8,
    video_size: int = 56,
    min_distance: int = 4,
    max_distance: int | None = None,
    page_size: int = 224,
    page_lines: int = 6,
) -> SyntheticTask:
    """The task called ``name`` (one of :data:`TASK_NAMES`) with the given sizes and its other knobs' defaults."""
    if name == "ocr":
        return OCRTask(image_size=image_size)
    if name == "chart":
        return ChartTask(image_size=image_size)
    if name == "counting":
        return CountingTask(image_size=image_size)
    if name == "video_memory":
        return VideoMemoryTask(
            frames=video_frames, frame_size=video_size, min_distance=min_distance, max_distance=max_distance
        )
    if name == "document":
        return DocumentTask(page_size=page_size, lines=page_lines)
    raise ValueError(f"unknown synthetic task {name!r}; known tasks: {', '.join(TASK_NAMES)}")


def _content_split(task: str, params: Hashable) -> str:
    digest = hashlib.blake2b(f"{task}:{params!r}".encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 100
    return next(split for split, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


class SyntheticSuite(Dataset[Conversation]):
    """The synthetic tasks interleaved: index ``i`` is sample ``i // len(tasks)`` of task ``tasks[i % len(tasks)]``.

    Args:
        tasks: task names (:data:`TASK_NAMES`) or :class:`SyntheticTask` instances (for other knobs), in the order
            they interleave.
        size_per_task: samples of each task; the suite has ``size_per_task * len(tasks)``.
        seed: a different seed draws different samples; the split partition does not depend on it.
        split: ``"train"``, ``"val"`` or ``"test"``: which part of each task's content space to draw from.
        image_size: side of the ``ocr``, ``chart`` and ``counting`` images (a multiple of 28, at least 56).
        video_frames: frames of each ``video_memory`` video (even).
        video_size: side of the video frames (a multiple of 28).
        min_distance: frames at least between the video's cue and its end (at most ``video_frames - 2``).
        max_distance: frames at most between the cue and the end: even, from ``min_distance`` to
            ``video_frames - 2``; ``None`` for ``video_frames - 2``.
        page_size: side of the ``document`` pages (a multiple of 28, at least 56).
        page_lines: key-value lines on each ``document`` page (2 to 8).

    The size arguments apply to tasks given by name and are validated whether or not such a task is listed.
    """

    def __init__(
        self,
        tasks: Sequence[str | SyntheticTask] = DEFAULT_TASKS,
        size_per_task: int = 256,
        seed: int = 0,
        split: str = "train",
        image_size: int = 56,
        video_frames: int = 8,
        video_size: int = 56,
        min_distance: int = 4,
        max_distance: int | None = None,
        page_size: int = 224,
        page_lines: int = 6,
    ) -> None:
        if isinstance(tasks, str | SyntheticTask):
            tasks = (tasks,)
        if not tasks:
            raise ValueError("the synthetic suite needs at least one task")
        if not isinstance(size_per_task, int) or size_per_task < 1:
            raise ValueError(f"size_per_task must be a positive integer, got {size_per_task!r}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        _check_side("image_size", image_size, 2 * PATCH_MULTIPLE)
        _check_side("video_size", video_size, PATCH_MULTIPLE)
        _check_video(video_frames, min_distance, max_distance)
        DocumentTask(page_size=page_size, lines=page_lines)  # checks that the lines fit the page
        sizes = dict(
            image_size=image_size,
            video_frames=video_frames,
            video_size=video_size,
            min_distance=min_distance,
            max_distance=max_distance,
            page_size=page_size,
            page_lines=page_lines,
        )
        self.tasks: tuple[SyntheticTask, ...] = tuple(
            build_task(task, **sizes) if isinstance(task, str) else task for task in tasks
        )
        if len(set(self.task_names)) != len(self.tasks):
            raise ValueError(f"tasks are listed more than once: {list(self.task_names)}")
        self.size_per_task = size_per_task
        self.seed = seed
        self.split = split

    @property
    def task_names(self) -> tuple[str, ...]:
        """The tasks' names, in interleaving order."""
        return tuple(task.name for task in self.tasks)

    def __len__(self) -> int:
        return self.size_per_task * len(self.tasks)

    def __getitem__(self, index: int) -> Conversation:
        index = operator.index(index)
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(f"index {index} is out of range for a synthetic suite of {len(self)} samples")
        task = self.tasks[position % len(self.tasks)]
        number = position // len(self.tasks)
        answer = self._answer(task, number)
        rng = random.Random(f"{_NAMESPACE}/{self.seed}/{self.split}/{task.name}/{number}")
        for _ in range(_MAX_DRAWS):
            params = task.sample(rng, answer)
            if _content_split(task.name, params) == self.split:
                break
        else:
            raise RuntimeError(
                f"task {task.name!r} found no {self.split} content for {answer!r}; its space is too small"
            )
        return Conversation(
            messages=[
                {"role": "user", "content": [task.render(params), {"type": "text", "text": task.question_for(params)}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
            task=task.name,
            answer=answer,
            source=f"synthetic:{task.name}:{self.split}:{position}",
            meta=task.meta(params),
        )

    def _answer(self, task: SyntheticTask, number: int) -> str:
        answers = task.answers
        block, offset = divmod(number, len(answers))
        order = random.Random(f"{_NAMESPACE}/{self.seed}/{self.split}/{task.name}/order/{block}")
        return order.sample(answers, len(answers))[offset]
