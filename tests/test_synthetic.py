"""The synthetic suite: determinism, splits, shapes, balance, and answers that can be read back from the pixels."""

from __future__ import annotations

import collections
import hashlib
import pickle
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from lit.data.synthetic import (
    COLOURS,
    TASK_NAMES,
    ChartTask,
    CountingTask,
    OCRTask,
    SyntheticSuite,
    VideoMemoryTask,
    build_task,
)
from lit.data.types import Conversation


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


@pytest.fixture(scope="module")
def train() -> SyntheticSuite:
    return SyntheticSuite(size_per_task=60, seed=0, split="train")


def test_conversation_layout(train):
    assert len(train) == 240
    assert train.task_names == TASK_NAMES
    for index in range(len(train)):
        conversation = train[index]
        assert conversation.task == TASK_NAMES[index % 4]
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


def test_splits_share_no_sample(train):
    seen = {_digest(conversation) for conversation in train}
    assert len(seen) == len(train)
    for split in ("val", "test"):
        for seed in (0, 1):
            held_out = SyntheticSuite(size_per_task=30, seed=seed, split=split)
            assert not seen & {_digest(conversation) for conversation in held_out}


@pytest.mark.parametrize("size", [60, 61, 7])
def test_answers_are_balanced(size):
    suite = SyntheticSuite(size_per_task=size, split="val")
    for task in suite.tasks:
        counts = collections.Counter(conversation.answer for conversation in _by_task(suite, task.name))
        assert set(counts) <= set(task.answers)
        full = {answer: counts.get(answer, 0) for answer in task.answers}
        assert max(full.values()) - min(full.values()) <= 1, (task.name, counts)


def test_ocr_text_is_drawn_as_the_answer(train):
    task = OCRTask()
    font = ImageFont.load_default(size=task.font_size)
    templates = {}
    for text in task.vocabulary:
        mask = Image.new("L", (task.image_size, task.image_size))
        left, top, right, bottom = font.getbbox(text)
        ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
        templates[text] = np.asarray(mask, dtype=float)[: bottom - top, : right - left]
    for conversation in _by_task(train, "ocr"):
        pixels = _media(conversation).astype(float)
        paper = pixels[0, 0]
        ink = pixels.reshape(-1, 3)[np.abs(pixels - paper).sum(-1).argmax()]
        alpha = 255 * ((pixels - paper) @ (ink - paper)) / ((ink - paper) @ (ink - paper))

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


@pytest.mark.parametrize(("frames", "min_distance"), [(8, 4), (8, 0), (8, 6), (16, 9)])
def test_video_cue_is_at_least_min_distance_before_the_end(frames, min_distance):
    suite = SyntheticSuite(("video_memory",), size_per_task=30, video_frames=frames, min_distance=min_distance)
    distances = set()
    for conversation in suite:
        ((video, _),) = conversation.videos
        frames_hwc = video.permute(0, 2, 3, 1).numpy()
        cue = [t for t in range(frames) if (frames_hwc[t, 0, 0] == 255).all()]
        assert len(cue) == 2 and cue[0] % 2 == 0 and cue[1] == cue[0] + 1
        assert np.array_equal(frames_hwc[cue[0]], frames_hwc[cue[1]])
        distance = frames - cue[1] - 1
        assert distance >= min_distance
        distances.add(distance)
        disc = frames_hwc[cue[0]][(frames_hwc[cue[0]] != 255).any(-1)]
        assert _nearest_colour(disc.mean(0)) == conversation.answer
        others = [t for t in range(frames) if t not in cue]
        assert all((frames_hwc[t] == 0).all(-1).any() for t in others)  # distractors: squares on black
    assert len(distances) > 1 or frames - 2 - min_distance < 2


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
    ],
)
def test_bad_task_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()
