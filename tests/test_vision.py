"""The vision front end: preprocessing equals transformers' Qwen2-VL processors; files decode and fail cleanly."""

from __future__ import annotations

import math
import random
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from media import frame_index, make_test_video, render_text_image, write_video
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

from hybridvl.vision import (
    VideoInfo,
    VisionInputError,
    VisionPreprocessor,
    iter_video_frames,
    load_image,
    probe_video,
    read_video,
)

av = pytest.importorskip("av", reason="PyAV (a dependency of hybridvl) is not installed")

NUM_FRAMES, NATIVE_FPS, SIZE = 40, 10, (64, 48)


@pytest.fixture(scope="module")
def preprocessor() -> VisionPreprocessor:
    return VisionPreprocessor()


@pytest.fixture(scope="module")
def video_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_video(tmp_path_factory.mktemp("video") / "index.mp4", NUM_FRAMES, SIZE, NATIVE_FPS)


def random_frames(num_frames: int, height: int = 64, width: int = 80) -> torch.Tensor:
    return torch.randint(0, 256, (num_frames, 3, height, width), dtype=torch.uint8)


def transformers_image_processor(pre: VisionPreprocessor) -> Qwen2VLImageProcessor:
    """Built the way a user of transformers would, independently of ``VisionPreprocessor``'s own builders."""
    return Qwen2VLImageProcessor(
        min_pixels=pre.min_pixels,
        max_pixels=pre.max_pixels,
        patch_size=pre.patch_size,
        merge_size=pre.merge_size,
        temporal_patch_size=pre.temporal_patch_size,
    )


def transformers_video_processor(pre: VisionPreprocessor) -> Qwen2VLVideoProcessor:
    return Qwen2VLVideoProcessor(
        min_pixels=pre.video_min_pixels,
        max_pixels=pre.video_max_pixels,
        patch_size=pre.patch_size,
        merge_size=pre.merge_size,
        temporal_patch_size=pre.temporal_patch_size,
        cap_pixels_per_frame=pre.cap_video_pixels,
    )


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


# --- preprocessing -------------------------------------------------------------------------------------------------


def test_defaults_are_qwen25vl(preprocessor: VisionPreprocessor):
    assert preprocessor.min_pixels == Qwen2VLImageProcessor.size["shortest_edge"] == 56 * 56
    assert preprocessor.max_pixels == 1344 * 1344
    assert (preprocessor.video_min_pixels, preprocessor.video_max_pixels) == (128 * 28 * 28, 768 * 28 * 28)
    assert (preprocessor.patch_size, preprocessor.merge_size, preprocessor.temporal_patch_size) == (14, 2, 2)
    image_processor = preprocessor.build_image_processor()
    assert image_processor.size == {"shortest_edge": 56 * 56, "longest_edge": 1344 * 1344}
    assert preprocessor.build_video_processor().cap_pixels_per_frame is True


@pytest.mark.parametrize(
    "pre",
    [VisionPreprocessor(), VisionPreprocessor(min_pixels=32 * 28 * 28, max_pixels=224 * 224)],
    ids=["defaults", "small"],
)
def test_images_equal_transformers(pre: VisionPreprocessor):
    images = [
        render_text_image("a", (448, 448)),
        render_text_image("wide", (300, 200)),
        render_text_image("s", (64, 64)),
        render_text_image("grey", (90, 20)).convert("L"),
    ]
    expected = transformers_image_processor(pre)(images, return_tensors="pt")
    assert_same_tensors(pre.images(images), dict(expected))


def test_448_image_is_a_32x32_grid_and_256_tokens(preprocessor: VisionPreprocessor):
    out = preprocessor.images([render_text_image("448")])
    assert out["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert out["pixel_values"].shape == (32 * 32, 3 * 2 * 14 * 14)
    assert out["pixel_values"].dtype == torch.float32
    assert preprocessor.num_tokens(out["image_grid_thw"][0]) == 256


def test_large_image_is_shrunk_under_max_pixels(preprocessor: VisionPreprocessor):
    t, grid_h, grid_w = preprocessor.images([render_text_image("big", (2000, 1500))])["image_grid_thw"][0].tolist()
    height, width = grid_h * 14, grid_w * 14
    assert t == 1 and height % 28 == 0 and width % 28 == 0
    assert 0.9 * preprocessor.max_pixels < height * width <= preprocessor.max_pixels
    assert abs(width / height - 2000 / 1500) < 0.05


def test_tiny_image_is_grown_to_min_pixels(preprocessor: VisionPreprocessor):
    grid = preprocessor.images([render_text_image("", (20, 20))])["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 4]]  # 56 x 56 = min_pixels


@pytest.mark.parametrize("cap_video_pixels", [True, False])
@pytest.mark.parametrize("num_frames", [2, 6])
def test_video_equals_transformers(num_frames: int, cap_video_pixels: bool):
    pre = VisionPreprocessor(cap_video_pixels=cap_video_pixels)
    frames = random_frames(num_frames)
    expected = dict(transformers_video_processor(pre)([frames], return_tensors="pt"))
    out = pre.video(frames, fps=2.0)
    assert out.pop("second_per_grid_ts").tolist() == [1.0]
    assert_same_tensors(out, expected)
    assert out["video_grid_thw"].tolist() == [[num_frames // 2, 22, 26]]  # 64 x 80 grown to >= 128 * 28 * 28 pixels


def test_odd_frame_count_repeats_the_last_frame(preprocessor: VisionPreprocessor):
    frames = random_frames(5)
    out = preprocessor.video(frames, fps=2.0)
    padded = preprocessor.video(torch.cat([frames, frames[-1:]]), fps=2.0)
    expected = dict(transformers_video_processor(preprocessor)([frames], return_tensors="pt"))
    assert out["video_grid_thw"].tolist() == [[3, 22, 26]]
    assert_same_tensors({k: out[k] for k in expected}, expected)
    assert_same_tensors(out, padded)


def test_settings_reach_the_processors():
    pre = VisionPreprocessor(max_pixels=224 * 224, video_max_pixels=112 * 112, video_min_pixels=56 * 56)
    assert pre.images([render_text_image("x")])["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert pre.video(random_frames(4, 448, 448), fps=1.0)["video_grid_thw"].tolist() == [[2, 8, 8]]


def test_second_per_grid_ts_and_tokens_equal_qwen25vl_processor(preprocessor: VisionPreprocessor):
    vocab = {"<unk>": 0, "<|image_pad|>": 1, "<|video_pad|>": 2, "look": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", additional_special_tokens=["<|image_pad|>", "<|video_pad|>"]
    )
    processor = preprocessor.build_processor(tokenizer)
    image, frames, fps = render_text_image("q", (112, 168)), random_frames(5), 4.0
    expected = processor(
        text=["look <|image_pad|> look <|video_pad|>"],
        images=[image],
        videos=[frames],
        video_metadata=[{"fps": fps, "total_num_frames": len(frames)}],
        return_tensors="pt",
    )
    image_out, video_out = preprocessor.images([image]), preprocessor.video(frames, fps)
    assert_same_tensors({**image_out, **video_out}, {k: expected[k] for k in [*image_out, *video_out]})
    assert video_out["second_per_grid_ts"].tolist() == [2 / fps]
    ids = expected["input_ids"][0]
    assert (ids == 1).sum() == preprocessor.num_tokens(image_out["image_grid_thw"])
    assert (ids == 2).sum() == preprocessor.num_tokens(video_out["video_grid_thw"])


def test_num_tokens(preprocessor: VisionPreprocessor):
    assert preprocessor.num_tokens((1, 32, 32)) == 256
    assert preprocessor.num_tokens(torch.tensor([[1, 32, 32], [3, 22, 26]])) == 256 + 3 * 11 * 13
    assert VisionPreprocessor(merge_size=1).num_tokens([2, 4, 6]) == 48
    with pytest.raises(ValueError, match=r"shape \[3\] or \[N, 3\]"):
        preprocessor.num_tokens([1, 32])
    with pytest.raises(ValueError, match="whole 2x2 blocks"):
        preprocessor.num_tokens([1, 3, 3])
    with pytest.raises(ValueError, match="whole 2x2 blocks"):
        preprocessor.num_tokens([[1, 3, 3], [1, 1, 3]])  # 9 + 3 patches: a multiple of 4 only in total


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"min_pixels": 0}, "min_pixels must be a positive integer"),
        ({"patch_size": 14.0}, "patch_size must be a positive integer"),
        ({"merge_size": True}, "merge_size must be a positive integer"),
        ({"min_pixels": 100, "max_pixels": 99}, r"min_pixels \(100\) exceeds max_pixels \(99\)"),
        ({"video_min_pixels": 100, "video_max_pixels": 99}, "video_min_pixels"),
    ],
)
def test_invalid_settings(settings: dict, message: str):
    with pytest.raises(ValueError, match=message):
        VisionPreprocessor(**settings)


def test_invalid_inputs(preprocessor: VisionPreprocessor):
    with pytest.raises(ValueError, match="at least one image"):
        preprocessor.images([])
    with pytest.raises(TypeError, match=r"images\[1\] is a Tensor"):
        preprocessor.images([render_text_image("a", (64, 64)), torch.zeros(3, 64, 64)])
    with pytest.raises(ValueError, match=r"uint8 tensor \[T, 3, H, W\]"):
        preprocessor.video(random_frames(2).float(), fps=2.0)
    with pytest.raises(ValueError, match=r"uint8 tensor \[T, 3, H, W\]"):
        preprocessor.video(random_frames(2).permute(0, 2, 3, 1), fps=2.0)
    with pytest.raises(ValueError, match=r"uint8 tensor \[T, 3, H, W\]"):
        preprocessor.video(random_frames(0), fps=2.0)
    for fps in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="fps must be a positive finite number"):
            preprocessor.video(random_frames(2), fps=fps)


# --- video and image files -----------------------------------------------------------------------------------------


def nearest_indices(fps: float, max_frames: int | None = None) -> list[int]:
    """The source frames the nearest-frame rule picks from the test video, ties going to the earlier frame."""
    step, duration = 1 / Fraction(fps), Fraction(NUM_FRAMES, NATIVE_FPS)
    times = [k * step for k in range(math.ceil(duration / step))]
    return [math.ceil(t * NATIVE_FPS - Fraction(1, 2)) for t in times][:max_frames]


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_probe_video(tmp_path: Path, suffix: str):
    path = make_test_video(tmp_path / f"v{suffix}", 20, (80, 32), 5.0)
    assert probe_video(path) == VideoInfo(fps=5.0, duration=4.0, num_frames=20, width=80, height=32)


@pytest.mark.parametrize(("fps", "max_frames"), [(2.0, None), (3.0, None), (10.0, None), (20.0, 9), (0.3, None)])
def test_read_video_takes_the_nearest_frames(video_path: Path, fps: float, max_frames: int | None):
    frames, timestamps = read_video(video_path, fps=fps, max_frames=max_frames)
    expected = nearest_indices(fps, max_frames)
    assert frames.dtype == torch.uint8 and frames.shape == (len(expected), 3, SIZE[1], SIZE[0])
    assert [frame_index(frame) for frame in frames] == expected
    assert timestamps == pytest.approx([index / NATIVE_FPS for index in expected])


def test_read_video_frames_are_the_decoded_frames(video_path: Path):
    every, _ = read_video(video_path, fps=NATIVE_FPS)
    sampled, _ = read_video(video_path, fps=2.0, max_frames=3)
    assert torch.equal(sampled, every[[0, 5, 10]])


def test_iter_video_frames_equals_read_video(video_path: Path):
    frames, timestamps = read_video(video_path, fps=3.0)
    streamed = list(iter_video_frames(video_path, fps=3.0))
    assert [time for time, _ in streamed] == timestamps
    assert torch.equal(torch.stack([frame for _, frame in streamed]), frames)


class CountingContainer:
    """Wraps a PyAV input container, counting the frames decoded from it and noting when it is closed."""

    def __init__(self, container: av.container.InputContainer) -> None:
        self.container, self.decoded, self.closed = container, 0, False

    def __getattr__(self, name: str):
        return getattr(self.container, name)

    def __enter__(self) -> CountingContainer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.closed = True
        self.container.__exit__(*exc_info)

    def decode(self, *args, **kwargs):
        for frame in self.container.decode(*args, **kwargs):
            self.decoded += 1
            yield frame


def test_iter_video_frames_decodes_lazily(video_path: Path, monkeypatch: pytest.MonkeyPatch):
    opened: list[CountingContainer] = []
    real_open = av.open

    def counting_open(*args, **kwargs) -> CountingContainer:
        opened.append(CountingContainer(real_open(*args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(av, "open", counting_open)
    samples = iter_video_frames(video_path, fps=2.0)
    time, frame = next(samples)
    assert (time, frame_index(frame)) == (0.0, 0)
    assert opened[-1].decoded <= 2  # the sampled frame and the one after it, which shows it is the nearest
    time, frame = next(samples)
    assert (time, frame_index(frame)) == (0.5, 5)
    assert opened[-1].decoded <= 7
    samples.close()
    assert all(container.closed for container in opened)


def test_write_video_round_trip(tmp_path: Path):
    images = [render_text_image(str(i), (64, 64)) for i in range(3)]
    tensor = torch.stack([torch.from_numpy(np.array(image)) for image in images])
    for name, frames in [("pil.mp4", images), ("tensor.mp4", tensor)]:
        path = write_video(tmp_path / name, frames, fps=5.0)
        assert probe_video(path) == VideoInfo(fps=5.0, duration=0.6, num_frames=3, width=64, height=64)
        decoded, timestamps = read_video(path, fps=5.0)
        assert timestamps == pytest.approx([0.0, 0.2, 0.4])
        assert (decoded.permute(0, 2, 3, 1).float() - tensor.float()).abs().mean() < 8


def test_media_helpers(tmp_path: Path):
    image = render_text_image("hello")
    assert image.size == (448, 448) and image.mode == "RGB" and len(image.getcolors(maxcolors=448 * 448)) > 3
    with pytest.raises(ValueError, match="num_frames"):
        make_test_video(tmp_path / "v.mp4", 0)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        write_video(tmp_path / "v.mp4", torch.zeros(2, 3, 8, 8, dtype=torch.uint8), fps=1.0)


@pytest.mark.parametrize("fps", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_fps(video_path: Path, fps: float):
    with pytest.raises(ValueError, match="fps must be a positive finite number"):
        read_video(video_path, fps=fps)
    with pytest.raises(ValueError, match="fps must be a positive finite number"):
        iter_video_frames(video_path, fps=fps)


def test_bad_max_frames(video_path: Path):
    with pytest.raises(ValueError, match="max_frames must be at least 1"):
        read_video(video_path, max_frames=0)


def write_garbage_packets(path: Path) -> Path:
    """An mp4 with a valid header whose H.264 packets are random bytes."""
    rng = random.Random(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(5):
            packet = av.Packet(rng.randbytes(300))
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, index, index, Fraction(1, 10)
            container.mux(packet)
    return path


def write_without_frames(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=10)
        stream.width, stream.height = 64, 48
        container.start_encoding()
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def bad_video(case: str, directory: Path, good: Path) -> Path:
    match case:
        case "missing":
            return directory / "missing.mp4"
        case "directory":
            return directory
        case "zero bytes":
            return write_bytes(directory / "empty.mp4", b"")
        case "random bytes":
            return write_bytes(directory / "random.mp4", random.Random(0).randbytes(4096))
        case "truncated":
            return write_bytes(directory / "truncated.mp4", good.read_bytes()[:1000])
        case "no video stream":
            return write_without_frames(directory / "no_stream.mp4")
    raise AssertionError(case)


BAD_VIDEO_PROBLEMS = {
    "missing": "no such file",
    "directory": "not a regular file",
    "zero bytes": "file is empty",
    "random bytes": "not a readable video: Invalid data",
    "truncated": "not a readable video: Invalid data",
    "no video stream": "has no video stream",
}


@pytest.mark.parametrize("case", list(BAD_VIDEO_PROBLEMS))
@pytest.mark.parametrize("reader", [probe_video, read_video, iter_video_frames])
def test_bad_video_files_raise_vision_input_error(tmp_path: Path, video_path: Path, case: str, reader):
    path = bad_video(case, tmp_path, video_path)
    with pytest.raises(VisionInputError, match=BAD_VIDEO_PROBLEMS[case]) as caught:
        reader(path)
    assert str(caught.value).startswith(f"{path}: ") and caught.value.path == path
    assert isinstance(caught.value, ValueError)


def test_corrupt_frame_data_raises_while_streaming(tmp_path: Path):
    path = write_garbage_packets(tmp_path / "garbage.mp4")
    assert probe_video(path).num_frames == 5  # the headers are fine
    samples = iter_video_frames(path)
    with pytest.raises(VisionInputError, match=re.escape(f"{path}: not a readable video")):
        next(samples)
    with pytest.raises(VisionInputError, match=re.escape(f"{path}: not a readable video")):
        read_video(path)


def test_load_image_converts_to_rgb(tmp_path: Path):
    rgba = Image.new("RGBA", (8, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (8, 4), 77).save(tmp_path / "grey.png")
    image = load_image(tmp_path / "rgba.png")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 0)) == (255, 0, 0)
    assert load_image(str(tmp_path / "grey.png")).getpixel((3, 3)) == (77, 77, 77)


def test_load_image_reads_the_whole_file(tmp_path: Path):
    path = tmp_path / "image.jpg"
    render_text_image("jpeg", (64, 64)).save(path)
    image = load_image(path)
    path.unlink()
    assert image.size == (64, 64) and image.tobytes()


def bad_image(case: str, directory: Path, video: Path) -> Path:
    match case:
        case "missing":
            return directory / "missing.png"
        case "zero bytes":
            return write_bytes(directory / "empty.png", b"")
        case "random bytes":
            return write_bytes(directory / "random.png", random.Random(0).randbytes(4096))
        case "truncated":
            render_text_image("png", (64, 64)).save(directory / "good.png")
            return write_bytes(directory / "truncated.png", (directory / "good.png").read_bytes()[:-200])
        case "a video":
            return video
    raise AssertionError(case)


BAD_IMAGE_PROBLEMS = {
    "missing": "no such file",
    "zero bytes": "file is empty",
    "random bytes": "not a readable image: cannot identify image file",
    "truncated": "not a readable image: image file is truncated",
    "a video": "not a readable image",
}


@pytest.mark.parametrize("case", list(BAD_IMAGE_PROBLEMS))
def test_bad_image_files_raise_vision_input_error(tmp_path: Path, video_path: Path, case: str):
    path = bad_image(case, tmp_path, video_path)
    with pytest.raises(VisionInputError, match=BAD_IMAGE_PROBLEMS[case]) as caught:
        load_image(path)
    assert str(caught.value).startswith(f"{path}: ")
