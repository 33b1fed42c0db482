"""The synthetic suite: determinism, splits, shapes, balance, answers that can be read back from the pixels, and
where the evidence lies: document lines and video cues against a sliding window."""

from __future__ import annotations

import collections
import hashlib
import itertools
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from hybridvl.lit.data.encoding import encode
from hybridvl.lit.data.synthetic import (
    COLOURS,
    DEFAULT_TASKS,
    DOCUMENT_NAMES,
    DOCUMENT_VALUES,
    TASK_NAMES,
    ChartTask,
    CountingTask,
    DocumentTask,
    OCRTask,
    SyntheticSuite,
    VideoMemoryTask,
    build_task,
)
from hybridvl.lit.data.types import Conversation
from hybridvl.models.chat import load_processor
from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl

WINDOW = 32
"""The sliding window of the ablation models, in tokens: a query sees the keys fewer than this many positions back."""


def _media(conversation: Conversation) -> np.ndarray:
    """The conversation's one image ``[H, W, 3]`` or video ``[T, 3, H, W]`` as an array."""
    (item,) = [item for item in conversation.messages[0]["content"] if item["type"] != "text"]
    return np.asarray(item["image"]) if item["type"] == "image" else item["video"].numpy()


def _digest(conversation: Conversation) -> str:
    return hashlib.sha256(_media(conversation).tobytes()).hexdigest()


def _by_task(suite: SyntheticSuite, task: str) -> list[Conversation]:
    return [suite[i] for i in range(suite.task_names.index(task), len(suite), len(suite.task_names))]


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(COLOURS, key=lambda name: float(np.abs(np.subtract(COLOURS[name], rgb, dtype=float)).sum()))


def _components(mask: np.ndarray) -> int:
    """The number of 8-connected components of ``mask``."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            y, x = stack.pop()
            for ny in range(max(0, y - 1), min(mask.shape[0], y + 2)):
                for nx in range(max(0, x - 1), min(mask.shape[1], x + 2)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
    return count


def _alpha(pixels: np.ndarray) -> np.ndarray:
    """How much ink each pixel of an image of one ink on one paper (its top-left pixel) shows, 0 to 255."""
    pixels = pixels.astype(float)
    paper = pixels[0, 0]
    ink = pixels.reshape(-1, 3)[np.abs(pixels - paper).sum(-1).argmax()]
    return 255 * ((pixels - paper) @ (ink - paper)) / ((ink - paper) @ (ink - paper))


def _template(text: str, size: int) -> np.ndarray:
    """The ink of ``text`` in the default font of ``size``, cropped to the pixels it touches, 0 to 255."""
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    ink = np.asarray(mask, dtype=float)
    rows, columns = np.nonzero(ink.any(1))[0], np.nonzero(ink.any(0))[0]
    return ink[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]


@pytest.fixture(scope="module")
def train() -> SyntheticSuite:
    return SyntheticSuite(size_per_task=60, seed=0, split="train")


@pytest.fixture(scope="module")
def documents() -> SyntheticSuite:
    return SyntheticSuite("document", size_per_task=48, seed=0, split="train")


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return load_processor(make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen"), seed=0))


def test_conversation_layout(train):
    assert len(train) == 240
    assert train.task_names == DEFAULT_TASKS == TASK_NAMES[:4]
    for index in range(len(train)):
        conversation = train[index]
        assert conversation.task == TASK_NAMES[index % 4]
        assert set(conversation.meta) == ({"distance"} if conversation.task == "video_memory" else set())
        assert conversation.source == f"synthetic:{conversation.task}:train:{index}"
        user, assistant = conversation.messages
        assert user["role"] == "user" and assistant["role"] == "assistant"
        media, question = user["content"]
        assert media["type"] == ("video" if conversation.task == "video_memory" else "image")
        assert question["type"] == "text" and question["text"].endswith("?")
        assert assistant["content"] == [{"type": "text", "text": conversation.answer}]
        assert conversation.answer in build_task(conversation.task).answers


def test_images_and_videos_fit_qwen_patches(train):
    for conversation in train:
        for image in conversation.images:
            assert image.mode == "RGB" and image.size == (56, 56)
        for video, fps in conversation.videos:
            assert video.dtype == torch.uint8 and video.shape == (8, 3, 56, 56) and video.is_contiguous()
            assert fps == 2.0
    big = SyntheticSuite(size_per_task=2, image_size=84, video_frames=12, video_size=28, min_distance=6)
    for conversation in big:
        for image in conversation.images:
            assert image.size == (84, 84)
        for video, _ in conversation.videos:
            assert video.shape == (12, 3, 28, 28)


def test_deterministic_by_seed_split_and_index(train):
    again = SyntheticSuite(size_per_task=60, seed=0, split="train")
    for index in (0, 1, 2, 3, 117, 239):
        first, second = train[index], again[index]
        assert (first.task, first.answer, first.source) == (second.task, second.answer, second.source)
        assert np.array_equal(_media(first), _media(second))
        assert _digest(train[index]) == _digest(first)
    other = SyntheticSuite(size_per_task=60, seed=1, split="train")
    assert all(_digest(train[i]) != _digest(other[i]) for i in range(40))


def test_global_random_state_is_untouched():
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    list(SyntheticSuite(size_per_task=4))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == python_state
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))


def test_splits_share_no_sample(train, documents):
    seen = {_digest(conversation) for conversation in [*train, *documents]}
    assert len(seen) == len(train) + len(documents)
    for split in ("val", "test"):
        for seed in (0, 1):
            held_out = SyntheticSuite(TASK_NAMES, size_per_task=30, seed=seed, split=split)
            assert not seen & {_digest(conversation) for conversation in held_out}


@pytest.mark.parametrize("size", [60, 61, 7])
def test_answers_are_balanced(size):
    suite = SyntheticSuite(TASK_NAMES, size_per_task=size, split="val")
    for task in suite.tasks:
        counts = collections.Counter(conversation.answer for conversation in _by_task(suite, task.name))
        assert set(counts) <= set(task.answers)
        full = {answer: counts.get(answer, 0) for answer in task.answers}
        assert max(full.values()) - min(full.values()) <= 1, (task.name, counts)


def test_ocr_text_is_drawn_as_the_answer(train):
    task = OCRTask()
    templates = {text: _template(text, task.font_size) for text in task.vocabulary}
    for conversation in _by_task(train, "ocr"):
        alpha = _alpha(_media(conversation))

        def mismatch(template: np.ndarray, alpha: np.ndarray = alpha) -> float:
            height, width = template.shape
            if height > alpha.shape[0] or width > alpha.shape[1]:
                return np.inf
            windows = np.lib.stride_tricks.sliding_window_view(alpha, (height, width))
            return float(np.abs(windows - template).max(axis=(-2, -1)).min())

        scores = {text: mismatch(template) for text, template in templates.items()}
        assert scores[conversation.answer] <= 3, scores  # the answer's glyphs, up to rounding of the blend
        assert min(score for text, score in scores.items() if text != conversation.answer) > 60


def test_chart_tallest_bar_has_the_answer_colour(train):
    for conversation in _by_task(train, "chart"):
        pixels = _media(conversation)
        heights = {}
        for name, rgb in COLOURS.items():
            rows = np.nonzero((pixels == rgb).all(-1).any(1))[0]
            if len(rows):
                heights[name] = len(rows)
        assert 2 <= len(heights) <= 4
        ranked = sorted(heights, key=heights.get, reverse=True)
        assert ranked[0] == conversation.answer
        assert heights[ranked[0]] - heights[ranked[1]] >= 0.15 * ChartTask().plot_height


def test_counting_draws_answer_many_separate_shapes(train):
    counts = collections.Counter()
    for conversation in _by_task(train, "counting"):
        pixels = _media(conversation)
        shapes = _components((pixels != pixels[0, 0]).any(-1))
        assert shapes == int(conversation.answer)
        counts[shapes] += 1
    assert sorted(counts) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("frames", "min_distance", "max_distance"),
    [(8, 4, None), (8, 0, None), (8, 6, None), (16, 9, None), (24, 0, 6), (24, 8, 14), (24, 16, 22), (24, 10, 10)],
)
def test_video_cue_distance_is_in_its_range(frames, min_distance, max_distance):
    suite = SyntheticSuite(
        ("video_memory",), size_per_task=30, video_frames=frames, min_distance=min_distance, max_distance=max_distance
    )
    distances = set()
    for conversation in suite:
        ((video, _),) = conversation.videos
        frames_hwc = video.permute(0, 2, 3, 1).numpy()
        cue = [t for t in range(frames) if (frames_hwc[t, 0, 0] == 255).all()]
        assert len(cue) == 2 and cue[0] % 2 == 0 and cue[1] == cue[0] + 1
        assert np.array_equal(frames_hwc[cue[0]], frames_hwc[cue[1]])
        distance = frames - cue[1] - 1
        assert min_distance <= distance <= (frames - 2 if max_distance is None else max_distance)
        assert conversation.meta == {"distance": distance}
        distances.add(distance)
        disc = frames_hwc[cue[0]][(frames_hwc[cue[0]] != 255).any(-1)]
        assert _nearest_colour(disc.mean(0)) == conversation.answer
        others = [t for t in range(frames) if t not in cue]
        assert all((frames_hwc[t] == 0).all(-1).any() for t in others)  # distractors: squares on black
    assert distances == set(suite.tasks[0].distances)  # every even distance of the range, and no other


def _read_line(band: np.ndarray, templates: dict[str, np.ndarray], left: int) -> tuple[str, int]:
    """The text of ``templates`` whose ink starts at column ``left`` of ``band`` (at any row), and its width; its
    match is exact up to rounding and every other text's far off."""

    def mismatch(template: np.ndarray) -> float:
        height, width = template.shape
        if height > band.shape[0] or left + width > band.shape[1]:
            return np.inf
        return min(
            float(np.abs(band[top : top + height, left : left + width] - template).max())
            for top in range(band.shape[0] - height + 1)
        )

    scores = {text: mismatch(template) for text, template in templates.items()}
    best = min(scores, key=scores.get)
    assert scores[best] <= 3 and min(score for text, score in scores.items() if text != best) > 60, scores
    return best, templates[best].shape[1]


def test_document_pages_hold_their_lines_in_their_boxes(documents):
    task = DocumentTask()
    boxes = [task.line_box(line) for line in range(task.lines)]
    assert boxes[0][0] >= 0 and boxes[-1][1] <= task.page_size
    assert all(above[1] < below[0] for above, below in itertools.pairwise(boxes))  # blank rows between lines
    assert all(bottom - top >= 10 for top, bottom in boxes)  # glyphs at least 10 pixels tall
    inside = np.zeros(task.page_size, dtype=bool)
    for top, bottom in boxes:
        inside[top:bottom] = True
    for conversation in documents:
        (image,) = conversation.images
        assert image.mode == "RGB" and image.size == (224, 224)
        ink = (_media(conversation) != _media(conversation)[0, 0]).any(-1)
        rows, columns = ink.any(1), np.nonzero(ink.any(0))[0]
        assert not (rows & ~inside).any()
        assert all(rows[top:bottom].any() for top, bottom in boxes)
        assert columns[0] >= task.margin and columns[-1] < task.page_size - task.margin


def test_document_answers_read_back_from_the_pixels(documents):
    task = DocumentTask()
    keys = {name: _template(f"{name}:", task.font_size) for name in DOCUMENT_NAMES}
    numbers = {value: _template(value, task.font_size) for value in DOCUMENT_VALUES}
    kinds = collections.Counter()
    for conversation in documents:
        alpha = _alpha(_media(conversation))
        page = []
        for line in range(task.lines):
            band = alpha[slice(*task.line_box(line))]
            columns = np.nonzero((band > 0).any(0))[0]
            name, width = _read_line(band, keys, int(columns[0]))
            value, _ = _read_line(band, numbers, int(columns[columns >= columns[0] + width][0]))
            page.append((name, int(value)))
        names = [name for name, _ in page]
        assert len(set(page)) == len(set(names)) == len({value for _, value in page}) == task.lines
        question = conversation.messages[0]["content"][1]["text"]
        if question.startswith("What is the value of "):
            (asked,) = [names.index(question.removeprefix("What is the value of ").removesuffix("?"))]
            assert conversation.answer == str(page[asked][1])
            assert conversation.meta == {"kind": "read", "lines": (asked,)}
        else:
            first, second = question.removeprefix("Which is larger, ").removesuffix("?").split(" or ")
            lines = names.index(first), names.index(second)
            assert conversation.answer == page[max(lines, key=lambda line: page[line][1])][0]
            assert conversation.meta == {"kind": "compare", "lines": tuple(sorted(lines))}
        kinds[conversation.meta["kind"]] += 1
    assert kinds == {"read": 24, "compare": 24}  # 8 values and 8 names, each answer as often


@pytest.mark.parametrize("lines", [2, 5, 8])
def test_document_params_give_the_answer(lines):
    task = DocumentTask(lines=lines)
    rng = random.Random(0)
    evidence = collections.Counter()
    for answer in task.answers * 20:
        page = task.sample(rng, answer)
        assert len(set(page.names)) == len(set(page.values)) == lines
        if answer in DOCUMENT_VALUES:
            (line,) = page.asked
            assert page.values[line] == answer
            assert task.question_for(page) == f"What is the value of {page.names[line]}?"
        else:
            first, second = page.asked
            larger = first if int(page.values[first]) > int(page.values[second]) else second
            assert page.names[larger] == answer
            assert task.question_for(page) == f"Which is larger, {page.names[first]} or {page.names[second]}?"
        assert task.meta(page)["lines"] == tuple(sorted(page.asked))
        evidence.update(page.asked)
    assert sorted(evidence) == list(range(lines))  # the evidence can be on any line


def test_document_evidence_lies_beyond_the_window(documents, processor):
    task = DocumentTask()
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merge = processor.image_processor.merge_size
    beyond = 0
    for conversation in documents:
        sample = encode(conversation, processor)
        t, height, width = sample.vision["image_grid_thw"][0].tolist()
        assert (t, height * 14, width * 14) == (1, task.page_size, task.page_size)  # the page is not resized
        rows, columns = height // merge, width // merge
        positions = torch.nonzero(sample.input_ids == pad).flatten()
        assert len(positions) == rows * columns > WINDOW
        assert torch.equal(positions, torch.arange(positions[0], positions[0] + len(positions)))
        query = sample.prompt_length - 1  # the last prompt token predicts the answer's first
        row_pixels = task.page_size // rows
        distances = []
        for line in range(task.lines):
            last_row = (task.line_box(line)[1] - 1) // row_pixels
            distances.append(query - int(positions[(last_row + 1) * columns - 1]))
        assert distances == sorted(distances, reverse=True)
        assert sum(distance >= WINDOW for distance in distances) > task.lines // 2, distances
        beyond += distances[conversation.meta["lines"][0]] >= WINDOW
    assert beyond > len(documents) * 3 // 4  # the evidence of most questions lies beyond one window


def test_task_instances_carry_their_own_knobs():
    suite = SyntheticSuite(
        [CountingTask(max_count=3), OCRTask(vocabulary=["1", "2"]), VideoMemoryTask(frames=4, min_distance=2)],
        size_per_task=6,
    )
    assert suite.task_names == ("counting", "ocr", "video_memory")
    assert {c.answer for c in _by_task(suite, "counting")} == {"1", "2", "3"}
    assert {c.answer for c in _by_task(suite, "ocr")} == {"1", "2"}
    assert all(c.videos[0][0].shape[0] == 4 for c in _by_task(suite, "video_memory"))
    assert SyntheticSuite("chart", size_per_task=3).task_names == ("chart",)


def test_indexing_and_pickling():
    suite = SyntheticSuite(size_per_task=3, seed=5, split="test")
    assert suite[-1].source == suite[len(suite) - 1].source
    assert suite[np.int64(2)].source == suite[2].source
    with pytest.raises(IndexError):
        suite[len(suite)]
    with pytest.raises(IndexError):
        suite[-len(suite) - 1]
    assert len(list(suite)) == len(suite)
    copy = pickle.loads(pickle.dumps(suite))
    assert np.array_equal(_media(copy[3]), _media(suite[3]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ("ocr", "maths")}, "unknown synthetic task 'maths'"),
        ({"tasks": ()}, "at least one task"),
        ({"tasks": ("ocr", "ocr")}, "more than once"),
        ({"size_per_task": 0}, "size_per_task"),
        ({"size_per_task": -3}, "size_per_task"),
        ({"split": "dev"}, "unknown split"),
        ({"seed": 1.5}, "seed"),
        ({"image_size": 0}, "image_size"),
        ({"image_size": 60}, "image_size"),
        ({"image_size": 28}, "image_size"),
        ({"video_size": 0}, "video_size"),
        ({"video_frames": 7}, "even"),
        ({"video_frames": 0}, "even"),
        ({"min_distance": 7}, "min_distance"),
        ({"min_distance": -1}, "min_distance"),
        ({"max_distance": 3}, "max_distance must be an even number"),
        ({"max_distance": 2.0}, "max_distance must be an even number"),
        ({"min_distance": 6, "max_distance": 4}, "raise max_distance or lower min_distance"),
        ({"max_distance": 8}, "use at least 10 video frames"),
        ({"page_size": 230}, "page_size must be a multiple of 28"),
        ({"page_size": 28}, "page_size"),
        ({"page_size": 112}, "6 lines do not fit a 112-pixel page.*use a larger page_size or fewer lines"),
        ({"page_lines": 1}, "lines must be an integer from 2"),
        ({"page_lines": 9}, "lines must be an integer from 2 .* to 8"),
        ({"page_lines": 8, "page_size": 140}, "fewer lines"),
    ],
)
def test_bad_suite_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticSuite(**kwargs)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: OCRTask(vocabulary=()), "non-empty"),
        (lambda: OCRTask(vocabulary=("A", "A")), "duplicates"),
        (lambda: OCRTask(vocabulary=("two\nlines",)), "one-line"),
        (lambda: OCRTask(vocabulary=("ANTIDISESTABLISHMENTARIANISM",)), "does not fit"),
        (lambda: ChartTask(max_bars=7), "max_bars"),
        (lambda: ChartTask(min_bars=1), "min_bars"),
        (lambda: ChartTask(min_margin=0), "min_margin"),
        (lambda: CountingTask(max_count=0), "max_count"),
        (lambda: CountingTask(max_count=40), "do not fit"),
        (lambda: VideoMemoryTask(fps=0), "fps"),
        (lambda: VideoMemoryTask(frame_size=42), "frame_size"),
        (lambda: VideoMemoryTask(frames=16, min_distance=4, max_distance=15), "even"),
        (lambda: VideoMemoryTask(frames=16, min_distance=5, max_distance=4), "below min_distance"),
        (lambda: VideoMemoryTask(frames=16, max_distance=16), "exceeds frames - 2 = 14"),
        (lambda: DocumentTask(lines=2.5), "lines must be an integer"),
        (lambda: DocumentTask(names=("FIG", "FIG", "OAK")), "names must be distinct"),
        (lambda: DocumentTask(names=("FIG", "OAK", "A1")), "ASCII letters"),
        (lambda: DocumentTask(values=("7", "07", "12")), "distinct whole numbers"),
        (lambda: DocumentTask(values=("7", "-3", "12")), "written in digits"),
        (lambda: DocumentTask(names=("FIG", "OAK", "ELM"), lines=4), "there are 3 names"),
        (lambda: DocumentTask(names=("W" * 20, *DOCUMENT_NAMES)), "6 lines do not fit a 224-pixel page"),
    ],
)
def test_bad_task_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()
