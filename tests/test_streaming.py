"""Streaming sessions on a tiny model (CPU): forks leave the stream alone, memory stays flat."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from media import make_test_video, render_text_image

from hybridvl.models.chat import load_processor
from hybridvl.models.convert import convert_directory
from hybridvl.models.hybrid import HybridVLM
from hybridvl.models.streaming import StreamingSession
from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    make_tiny_qwen2_5_vl(root / "qwen")
    convert_directory(root / "qwen", root / "student", "S,D,D,D", sliding_window=16)
    convert_directory(root / "qwen", root / "attention", "S,D,A,D", sliding_window=16)
    return root


def session(directory) -> StreamingSession:
    return StreamingSession(HybridVLM.from_pretrained(directory), load_processor(directory))


def frames(count: int) -> list[torch.Tensor]:
    images = [render_text_image(str(i), size=(56, 56)) for i in range(count)]
    return [torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous() for image in images]


def test_asking_forks_and_leaves_the_stream_unchanged(student_dir):
    asking, silent = session(student_dir / "student"), session(student_dir / "student")
    video = frames(10)
    for i, frame in enumerate(video):
        asking.feed_frame(frame)
        silent.feed_frame(frame)
        if i in (2, 6):
            first = asking.ask("What number is shown?", max_new_tokens=4)
            again = asking.ask("What number is shown?", max_new_tokens=4)
            assert first.text == again.text and first.tokens == again.tokens
    for a, b in zip(asking.state.layers, silent.state.layers):
        for field in ("recurrent", "key", "value"):
            if hasattr(a, field):
                assert torch.equal(getattr(a, field), getattr(b, field))
    assert torch.equal(asking.state.next_position, silent.state.next_position)
    assert asking.frames == 10 and asking.tokens == silent.tokens


def test_state_stays_constant_over_ten_thousand_tokens(student_dir):
    stream = session(student_dir / "student")
    sentence = "the quick brown fox jumps over the lazy dog and keeps running along the river bank " * 4
    sizes = []
    while stream.tokens < 10_000:
        stream.feed_text(sentence)
        sizes.append(stream.state_bytes)
    assert stream.tokens >= 10_000 and len(set(sizes)) == 1, sorted(set(sizes))
    growing = session(student_dir / "attention")
    growing.feed_text(sentence)
    small = growing.state_bytes
    for _ in range(20):
        growing.feed_text(sentence)
    assert growing.state_bytes > small  # a full-attention layer's cache grows


def test_asking_before_anything_and_text_streams(student_dir):
    stream = session(student_dir / "student")
    answer = stream.ask("Hello?", max_new_tokens=3)
    assert stream.state is None and answer.tokens == 3
    stream.feed_text("A subtitle.")
    stream.feed_frame(render_text_image("7", size=(56, 56)))
    assert stream.frames == 1 and stream.state_bytes > 0
    with pytest.raises(ValueError, match="uint8 tensor"):
        stream.feed_frame(torch.zeros(56, 56, 3))


def test_stream_command_answers_with_timings(student_dir, tmp_path):
    video = tmp_path / "clip.mp4"
    make_test_video(video, num_frames=20, size=(64, 48), fps=10.0)
    command = [
        sys.executable,
        "-m",
        "hybridvl.lit.cli",
        "stream",
        "--model",
        str(student_dir / "student"),
        "--video",
        str(video),
        "--fps",
        "5",
        "--ask",
        "2:What is on screen?",
        "--ask",
        "99:Too late?",
        "--max-new-tokens",
        "3",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "[frame 2, 0.2 s] What is on screen?" in result.stdout and "tokens in" in result.stdout
    assert "not asked: 'Too late?'" in result.stdout
    assert "frames/s fed" in result.stderr and "state" in result.stderr
    bad = subprocess.run([*command[:-4], "--ask", "two:What?"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "FRAME:QUESTION" in bad.stderr


def test_compile_goes_with_cuda_graphs(student_dir):
    directory = student_dir / "student"
    with pytest.raises(ValueError, match="compile=True compiles the forward the CUDA graphs capture"):
        StreamingSession(HybridVLM.from_pretrained(directory), load_processor(directory), compile=True)
