"""Every bad input is named: layouts, mixer arguments, states, cu_seqlens, generation options, media, LLaVA JSON,
data configs and the ``hybridvl`` command line each raise (or print in one line, with exit status 2) an error
that names the problem; hypothesis fuzzes layouts, mixer arguments and data source dicts."""

from __future__ import annotations

import inspect
import json
import logging
import re
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from media import make_test_video, render_text_image

from hybridvl import mixers
from hybridvl.lit.ablation.schema import StudyError, parse_study
from hybridvl.lit.cli import main
from hybridvl.lit.data.conversations import ConversationDataset, DataError
from hybridvl.lit.datamodule import HybridDataModule, check_source
from hybridvl.models.generation import check_generation_options, sample_next_token
from hybridvl.vision import VisionInputError, iter_video_frames, load_image, probe_video, read_video
from hybridvl.vision.processing import VisionPreprocessor

HIDDEN = 32
TINY = {
    "D": {"num_heads": 2, "head_dim": 16},
    "S": {"num_heads": 2, "window": 4},
    "A": {"num_heads": 2},
    "M": {"d_state": 8, "headdim": 16},
    "G": {"num_heads": 2},
    "L": {"num_heads": 2, "head_dim": 16},
}
KINDS = list(TINY)


def tiny(kind: str, **options) -> torch.nn.Module:
    return mixers.build_mixer(kind, HIDDEN, **{**TINY[kind], **options})


# --- layouts ------------------------------------------------------------------------------------------------------

LAYOUTS = [
    ("", "empty layout"),
    ("   ", "empty layout"),
    ("S,,D", "empty item"),
    ("S,D,", "trailing comma"),
    (",S", "empty item"),
    ("(S,D", "'(' is never closed"),
    ("S,D)", "')' without a matching '('"),
    ("()", "empty group"),
    ("S,Q", "unknown mixer kind 'Q'"),
    ("S x0", "repeat count must be at least 1"),
    ("x3", "a repeat needs a mixer or a group before it"),
    ("S!D", "unexpected character '!'"),
    ("S,D x999999999", "more than MAX_LAYERS = 1024 layers"),
    ("(S x1000) x1000", "more than MAX_LAYERS = 1024 layers"),
    ("(S x1000),(D x1000)", "more than MAX_LAYERS = 1024 layers"),
    ("S x" + "9" * 5000, "more than MAX_LAYERS = 1024 layers"),
]


@pytest.mark.parametrize(("layout", "message"), LAYOUTS)
def test_bad_layouts(layout: str, message: str):
    with pytest.raises(mixers.LayoutError, match=re.escape(message)):
        mixers.parse_layout(layout)


def test_layout_layer_count_must_match():
    with pytest.raises(mixers.LayoutError, match="gives 6 layers but the model declares 8"):
        mixers.parse_layout("S,D x3", num_layers=8)


def test_layout_must_be_a_string():
    with pytest.raises(TypeError, match="a layout must be a string, got list"):
        mixers.parse_layout(["S", "D"])


@pytest.mark.parametrize(
    ("num_layers", "ratio", "message"),
    [(8, "a quarter", "attention ratio must be a number"), (10**9, "1/4", "num_layers must be an integer in")],
)
def test_bad_spread_layouts(num_layers, ratio, message: str):
    with pytest.raises(ValueError, match=message):
        mixers.spread_layout(num_layers, ratio)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("SDAMGLsdgx*() ,0123456789٣\t") | st.characters(), max_size=40))
def test_fuzzed_layouts_parse_or_raise_layout_error(layout: str):
    try:
        kinds = mixers.parse_layout(layout)
    except mixers.LayoutError as error:
        assert error.reason and 0 <= error.position <= len(layout)
        return
    assert 1 <= len(kinds) <= mixers.MAX_LAYERS
    assert mixers.parse_layout(mixers.format_layout(kinds)) == kinds


# --- mixer arguments ----------------------------------------------------------------------------------------------

MIXER_ARGUMENTS = [
    ("A", 100, {"num_heads": 3}, ValueError, "hidden_size 100 is not divisible by num_heads 3"),
    ("A", 64, {"num_heads": 0}, ValueError, "num_heads must be an integer >= 1, got num_heads=0"),
    ("A", 64, {"num_heads": 4, "num_kv_heads": 3}, ValueError, "num_kv_heads 3 must divide num_heads 4"),
    ("A", 64, {"num_heads": 2, "head_dim": 33}, ValueError, "head_dim must be even"),
    ("A", 64, {"num_heads": 2, "mrope_section": [4, 4]}, ValueError, "mrope_section must be three sizes"),
    ("A", 64, {"num_heads": 2, "mrope_section": 16}, ValueError, "mrope_section must be three sizes"),
    ("A", 64, {"num_heads": 2, "rope_theta": -1.0}, ValueError, "rope_theta must be a positive finite number"),
    ("A", 64, {"num_heads": 2, "qkv_bias": "yes"}, ValueError, "qkv_bias must be True or False"),
    ("S", 64, {"num_heads": 2, "window": 128.5}, ValueError, "window must be an integer >= 1, got window=128.5"),
    ("S", 64, {"num_heads": 2, "window": 0}, ValueError, "window must be an integer >= 1"),
    ("S", 64, {"num_heads": 2, "window": True}, ValueError, "window must be an integer >= 1, got window=True"),
    ("S", 64, {"backend": "magic"}, ValueError, "got backend='magic'"),
    ("D", 64, {"num_heads": 0}, ValueError, "num_heads must be an integer >= 1"),
    ("D", 64, {"head_dim": 0}, ValueError, "head_dim must be an integer >= 1"),
    ("D", 64, {"head_dim": 32, "expand_v": 0.3}, ValueError, "head_dim * expand_v must be a positive integer"),
    ("D", 64, {"conv_size": -1}, ValueError, "conv_size must be a non-negative integer"),
    ("D", 64, {"mode": "fast"}, ValueError, "mode must be 'auto', 'chunk' or 'recurrent'"),
    ("D", 64, {"chunk_size": 0}, ValueError, "chunk_size must be an integer >= 1"),
    ("D", 64, {"norm_eps": 0.0}, ValueError, "norm_eps must be a positive finite number"),
    ("D", "64", {}, ValueError, "hidden_size must be an integer >= 1, got hidden_size='64'"),
    ("D", 0, {}, ValueError, "hidden_size must be an integer >= 1, got hidden_size=0"),
    ("G", 64, {"num_heads": 0}, ValueError, "num_heads must be an integer >= 1"),
    ("G", 64, {"expand_k": 0.3}, ValueError, "hidden_size * expand_k must be a positive whole number"),
    ("G", 64, {"num_heads": 3}, ValueError, "must divide into 3 heads"),
    ("G", 64, {"gate_logit_normalizer": float("nan")}, ValueError, "gate_logit_normalizer must be a positive"),
    ("M", 64, {"headdim": 0}, ValueError, "headdim must be an integer >= 1"),
    ("M", 64, {"ngroups": 0}, ValueError, "ngroups must be an integer >= 1"),
    ("M", 64, {"headdim": 48}, ValueError, "inner width 128 must be a multiple of headdim 48"),
    ("M", 64, {"d_state": 2.5}, ValueError, "d_state must be an integer >= 1"),
    ("L", 64, {"feature_map": "relu"}, ValueError, "feature_map must be one of"),
    ("L", 64, {"normalize": True}, ValueError, "normalize=True needs positive features"),
    ("Q", 64, {}, mixers.UnknownMixerError, "unknown mixer kind 'Q'"),
    ("D", 64, {"heads": 2}, TypeError, "building mixer D (gdn) with options ['heads']"),
]


@pytest.mark.parametrize(("kind", "hidden_size", "options", "error", "message"), MIXER_ARGUMENTS)
def test_bad_mixer_arguments(kind: str, hidden_size, options: dict, error: type, message: str):
    with pytest.raises(error, match=re.escape(message)):
        mixers.build_mixer(kind, hidden_size, **options)


def _option_names(kind: str) -> list[str]:
    """The options of a kind's constructor (``S`` passes ``**options`` on to ``A``), and one it does not know."""
    factories = [mixers.get_spec(kind).factory] + ([mixers.Attention] if kind == "S" else [])
    names = [name for factory in factories for name in inspect.signature(factory).parameters]
    return [name for name in names if name not in ("hidden_size", "options")] + ["unknown_option"]


ODD_VALUES = st.one_of(
    st.integers(-2, 70),
    st.floats(-2, 70) | st.sampled_from([float("nan"), float("inf")]),
    st.none(),
    st.booleans(),
    st.sampled_from(["auto", "torch", "chunk", "elu1", "identity", "l2", "none", "x", ""]),
    st.lists(st.integers(-1, 16), max_size=4),
)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_fuzzed_mixer_arguments_build_or_name_the_problem(data):
    kind = data.draw(st.sampled_from(KINDS))
    hidden_size = data.draw(st.integers(-1, 96) | ODD_VALUES)
    names = data.draw(st.lists(st.sampled_from(_option_names(kind)), max_size=4, unique=True))
    options = {name: data.draw(ODD_VALUES) for name in names}
    try:
        with torch.device("meta"):
            mixers.build_mixer(kind, hidden_size, **options)
    except (ValueError, TypeError) as error:
        assert "mixer" in str(error), (kind, hidden_size, options, error)


# --- states -------------------------------------------------------------------------------------------------------

X = torch.randn(1, 6, HIDDEN)


def state_of(kind: str, **options) -> mixers.MixerState:
    return tiny(kind, **options)(X)[1]


@pytest.mark.parametrize(("kind", "other"), [("D", "S"), ("S", "D"), ("A", "M"), ("M", "A"), ("G", "S"), ("L", "A")])
def test_a_state_of_another_kind_is_a_type_error(kind: str, other: str):
    with pytest.raises(
        TypeError, match=f"mixer {kind} .*expects a .*got a .*every mixer needs a state of its own kind"
    ):
        tiny(kind)(X, state_of(other))


@pytest.mark.parametrize(
    ("kind", "options", "state", "message"),
    [
        ("S", {}, lambda: state_of("A"), "window None (this mixer: 4)"),
        ("A", {}, lambda: state_of("S"), "window 4 (this mixer: None)"),
        ("S", {"window": 8}, lambda: state_of("S"), "window 4 (this mixer: 8)"),
        ("D", {"num_heads": 4, "head_dim": 8}, lambda: state_of("D"), "recurrent [N, 2, 16, 32] (this mixer"),
        ("M", {}, lambda: state_of("D"), "conv.xBC absent"),
        ("D", {"conv_size": 0}, lambda: state_of("D"), "conv.q [N, 32, 4] (this mixer: absent)"),
        ("D", {}, lambda: tiny("D").init_state(2), "the state holds 2 sequences but the input has 1"),
        ("S", {}, lambda: state_of("S").to("meta"), "the state is on meta but the input on cpu"),
    ],
)
def test_a_state_of_other_options_names_what_differs(kind: str, options: dict, state, message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny(kind, **options)(X, state())


@pytest.mark.parametrize("state", [{"recurrent": torch.zeros(1)}, torch.zeros(1, 2, 16, 32)])
def test_a_state_that_is_no_state(state):
    with pytest.raises(TypeError, match=r"mixer D \(gdn\): expects a RecurrentState .* got a (dict|Tensor)"):
        tiny("D")(X, state)


# --- cu_seqlens -------------------------------------------------------------------------------------------------

CU_SEQLENS = [
    (lambda: torch.tensor([0, 4]), ValueError, "must rise strictly from 0 to the sequence length 6"),
    (lambda: torch.tensor([0, 4, 4, 6]), ValueError, "every packed sequence at least one token"),
    (lambda: torch.tensor([0.0, 6.0]), ValueError, "cu_seqlens must be int32 or int64"),
    (lambda: torch.tensor([[0, 6]]), ValueError, "cu_seqlens must be a 1-D tensor"),
    (lambda: [0, 6], TypeError, "cu_seqlens must be a tensor, got list"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("cu_seqlens", "error", "message"), CU_SEQLENS)
def test_bad_cu_seqlens_are_named_for_every_mixer(kind: str, cu_seqlens, error: type, message: str):
    with pytest.raises(error, match=rf"^mixer {kind} .*{re.escape(message)}"):
        tiny(kind)(X, cu_seqlens=cu_seqlens())


def test_packed_input_needs_batch_size_one():
    with pytest.raises(ValueError, match="must have batch size 1, got 2"):
        tiny("S")(torch.randn(2, 6, HIDDEN), cu_seqlens=torch.tensor([0, 6]))


# --- generation options -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer >= 1, got True"),
        ({"top_k": 0}, "top_k must be an integer >= 1 when given, got 0"),
        ({"top_p": 0.0}, "top_p must lie in (0, 1] when given, got 0.0"),
        ({"top_p": 1.5}, "top_p must lie in (0, 1] when given, got 1.5"),
        ({"temperature": 0.0}, "temperature must be a positive finite number, got 0.0"),
        ({"temperature": float("nan")}, "temperature must be a positive finite number, got nan"),
    ],
)
def test_bad_generation_options(options: dict, message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_generation_options(**options)


def test_sampling_checks_top_k():
    with pytest.raises(ValueError, match="top_k must be an integer >= 1"):
        sample_next_token(torch.randn(1, 10), do_sample=True, top_k=0)


# --- media --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """A folder of good and bad images and videos."""
    folder = tmp_path_factory.mktemp("media")
    render_text_image("ok", (64, 64)).save(folder / "good.png")
    (folder / "truncated.png").write_bytes((folder / "good.png").read_bytes()[:-200])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image at all")
    make_test_video(folder / "good.mp4", 20)
    with av.open(str(folder / "faststart.mp4"), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("h264" if "h264" in av.codecs_available else "mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for index in range(40):
            frame = np.asarray(render_text_image(str(index), (64, 48)))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = (folder / "faststart.mp4").read_bytes()
    (folder / "truncated_faststart.mp4").write_bytes(data[: len(data) * 9 // 10])
    make_test_video(folder / "good.mkv", 40)
    data = (folder / "good.mkv").read_bytes()
    (folder / "truncated.mkv").write_bytes(data[: len(data) * 2 // 3])
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "random.mp4").write_bytes(bytes(range(256)) * 16)
    return folder


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.png", "no such file"),
        ("empty.jpg", "file is empty (0 bytes)"),
        ("text.jpg", "not a readable image: cannot identify image file"),
        ("truncated.png", "not a readable image: image file is truncated"),
        ("good.mp4", "not a readable image"),
        (".", "not a regular file"),
    ],
)
def test_bad_images(media: Path, name: str, message: str):
    with pytest.raises(VisionInputError, match=re.escape(message)) as caught:
        load_image(media / name)
    assert caught.value.path == media / name


@pytest.mark.parametrize(
    ("name", "reader", "message"),
    [
        ("missing.mp4", probe_video, "no such file"),
        ("empty.mp4", read_video, "file is empty (0 bytes)"),
        ("random.mp4", read_video, "not a readable video: Invalid data"),
        ("text.jpg", read_video, "not a readable video"),
        ("truncated_faststart.mp4", read_video, "truncated or corrupt: decoded"),
        ("truncated_faststart.mp4", lambda path: list(iter_video_frames(path)), "of the 40 frames its header lists"),
        ("truncated.mkv", read_video, "s of the 4.00 s its header promises"),
    ],
)
def test_bad_videos(media: Path, name: str, reader, message: str):
    with pytest.raises(VisionInputError, match=re.escape(message)) as caught:
        reader(media / name)
    assert str(caught.value).startswith(str(media / name))


def test_whole_videos_decode_every_frame(media: Path):
    assert read_video(media / "faststart.mp4", fps=10)[0].shape[0] == 40
    assert read_video(media / "good.mkv", fps=10)[0].shape[0] == 40


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: VisionPreprocessor().images(["photo.png"]), TypeError, "images[0] is a str, expected a PIL"),
        (lambda: VisionPreprocessor().video(torch.zeros(2, 3, 8, 8), 2.0), ValueError, "non-empty uint8 tensor"),
        (lambda: read_video("clip.mp4", fps=0.0), ValueError, "fps must be a positive finite number"),
    ],
)
def test_media_of_the_wrong_type(call, error: type, message: str):
    with pytest.raises(error, match=re.escape(message)):
        call()


# --- LLaVA JSON conversations -------------------------------------------------------------------------------------


def user(text: str = "What is this?") -> dict:
    return {"from": "human", "value": text}


def gpt(text: str = "A cat.") -> dict:
    return {"from": "gpt", "value": text}


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"conversations": [gpt(), user(), gpt()]}], "turn 0 is the assistant's; a conversation opens with a user"),
        (
            [{"conversations": [{"from": "system", "value": "Be brief."}, gpt()]}],
            "turn 1 is the assistant's; a conversation opens with a user turn",
        ),
        ([{"conversations": [{"from": "robot", "value": "hi"}, gpt()]}], "turn 0 has unknown role 'robot'"),
        ([{"conversations": [user(), {"from": "system", "value": "x"}, gpt()]}], "only the first turn may be"),
        ([{"conversations": [user()]}], "the last turn is not the assistant's"),
        ([{"conversations": []}], "has no 'conversations' (or 'messages') list of turns"),
        ([{"conversations": [user("<image>\nWhat?"), gpt()]}], "has 1 <image> placeholder(s) but lists 0 image"),
        ([{"conversations": [user(), gpt()], "image": "a.png", "images": ["b.png"]}], "has both 'image' and 'images'"),
        ([{"conversations": [user(), gpt()], "task": ""}], "'task' must be a non-empty string"),
        ([{"conversations": [user(), "A cat."]}], "turn 1 is not an object"),
        ([], "no usable records"),
    ],
)
def test_bad_conversations(tmp_path: Path, records: list, message: str):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=re.escape(message)) as caught:
        ConversationDataset(path, tmp_path)
    assert str(path) in str(caught.value)


def test_a_missing_image_file_is_named(tmp_path: Path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"conversations": [user("<image>\nWhat?"), gpt()], "image": "cats/a.jpg"}) + "\n")
    dataset = ConversationDataset(path, tmp_path)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'cats' / 'a.jpg'}: no such file")):
        dataset[0]


@pytest.mark.parametrize(("text", "message"), [(b"", "no usable records"), (b"[{]", "not valid JSON")])
def test_empty_and_broken_json_files(tmp_path: Path, text: bytes, message: str):
    path = tmp_path / "data.json"
    path.write_bytes(text)
    with pytest.raises(DataError, match=re.escape(message)):
        ConversationDataset(path, tmp_path)


# --- data configs -------------------------------------------------------------------------------------------------

HERE = Path(__file__)
ROOT = HERE.resolve().parents[1]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"type": "json", "path": "nowhere/data.jsonl", "media_root": "."}, "path 'nowhere/data.jsonl' is not an"),
        ({"type": "json", "path": str(HERE), "media_root": "no_media"}, "media_root 'no_media' is not an existing"),
        ({"type": "json", "pth": str(HERE), "media_root": "."}, "unknown key 'pth' for a 'json' source (did you mean"),
        ({"type": "json", "media_root": "."}, "a 'json' source needs 'path'"),
        ({"type": "csv", "path": str(HERE)}, "unknown source type 'csv'; choose one of json, synthetic"),
        ({"path": str(HERE)}, "unknown source type None"),
        ({"type": "synthetic", "size": 3}, "unknown key 'size' for a 'synthetic' source"),
        ({"type": "synthetic", "weight": 0}, "weight must be a positive number, got 0"),
        ({"type": "synthetic", "weight": "high"}, "weight must be a positive number, got 'high'"),
        ({"type": "json", "path": "a\0b", "media_root": "."}, "path must be the path of a file"),
        (["json", "data.jsonl"], "a source must be a mapping"),
    ],
)
def test_bad_data_sources(spec, message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_source(spec, "data.train[0]")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"train": [{"type": "synthetic"}, {"type": "json", "path": "gone.json", "media_root": "."}]}, "data.train[1]"),
        ({"val": [{"type": "synthetic", "tasks": ["ocr"], "splits": "val"}]}, "data.val[0]: unknown key 'splits'"),
        ({"train": {"type": "synthetic"}}, "data.train must be a list of sources"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0, got -1"),
    ],
)
def test_bad_data_module_configs(options: dict, message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        HybridDataModule(processor="model", **options)


def test_an_unknown_key_inside_a_study_grid_is_named():
    raw = {
        "name": "x",
        "arms": ["S,D"],
        "grid": {"d_model": [8], "seeds": [0], "learning_rate": [1e-3]},
        "tasks": [{"type": "mqar", "vocab_size": 64, "seq_len": 16, "num_kv_pairs": 2}],
    }
    with pytest.raises(StudyError, match="grid: unknown key 'seeds'"):
        parse_study(raw)


SOURCE_KEYS = ["type", "path", "media_root", "video_fps", "on_error", "weight", "tasks", "size_per_task", "pth", "x"]
SOURCE_VALUES = st.one_of(
    st.sampled_from(["json", "synthetic", "csv", str(HERE), str(HERE.parent), "missing.jsonl", "", "a\0b"]),
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.text(max_size=3), max_size=2),
    st.text(max_size=5),
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(SOURCE_KEYS) | st.text(max_size=4), SOURCE_VALUES, max_size=5))
def test_fuzzed_data_sources_pass_or_raise_value_error(spec: dict):
    try:
        check_source(spec, "data.train[0]")
    except ValueError as error:
        assert str(error).startswith("data.train[0]: ")


# --- the command line ---------------------------------------------------------------------------------------------


def run(capsys, *argv: str) -> tuple[int, list[str]]:
    """``hybridvl argv`` in this process: the exit status and the lines it wrote to stderr."""
    status = main(list(argv))
    return status, capsys.readouterr().err.splitlines()


def only_line(lines: list[str], command: str) -> str:
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"hybridvl {command}: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["layout", "S,D,,D"], "empty item: a mixer is missing before this ',' (at character 5 of 'S,D,,D')"),
        (["layout", "S,D x999999999"], "expands the layout to more than MAX_LAYERS = 1024 layers"),
        (["layout", "S,D", "--mixer-options", "{S: 1}"], "argument --mixer-options: not valid JSON"),
        (["layout", "S,D", "--mixer-options", '{"S": {"window": 0.5}}'], "window must be an integer >= 1"),
        (["layout", "S,D", "--mixer-options", '{"Q": {}}'], "unknown mixer kind 'Q'"),
        (["layout", "S,D", "--dtype", "float8"], "argument --dtype: unknown dtype 'float8'"),
        (["layout", "S,D", "--context", "-1"], "--context must be at least 0 tokens"),
        (["generate", "--model", "m", "--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be an integer"),
        (["generate", "--model", "m", "--prompt", "hi", "--top-k", "0"], "top_k must be an integer >= 1"),
        (["generate", "--model", "m", "--prompt", "hi", "--top-p", "2"], "top_p must lie in (0, 1]"),
        (["generate", "--model", "m", "--prompt", "hi", "--device", "meta"], "argument --device: unsupported device"),
        (["generate", "--model", "m", "--prompt", "hi", "--device", "tpu"], "argument --device: unknown device 'tpu'"),
        (["generate", "--model", "nowhere", "--prompt", "hi"], "nowhere"),
        (["generate", "--model", "m", "--prompt", "hi", "--image", "gone.png"], "gone.png: no such file"),
        (["stream", "--model", "m", "--video", "v.mp4", "--ask", "0:hi"], "--ask takes FRAME:QUESTION with FRAME >= 1"),
        (["stream", "--model", "m", "--video", "gone.mp4"], "gone.mp4: no such file"),
        (["stream", "--model", "m", "--video", "v.mp4", "--device", "cpu", "--compile"], "--compile needs a CUDA"),
        (["stream", "--model", "m", "--video", "v.mp4", "--device", "cpu", "--cuda-graphs"], "--cuda-graphs needs a"),
        (["demo", "--decode", "0"], "--decode must lie in [1, --seq-len - 1]"),
        (["ablate", "--config", "gone.yaml"], "study config gone.yaml does not exist"),
    ],
)
def test_the_cli_names_bad_inputs_in_one_line(capsys, argv: list[str], message: str):
    status, lines = run(capsys, *argv)
    assert status == 2
    assert message in only_line(lines, argv[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_cli_names_a_missing_gpu(capsys):
    status, lines = run(capsys, "generate", "--model", "m", "--prompt", "hi", "--device", "cuda")
    assert status == 2 and "'cuda': no CUDA GPU is available here; use --device cpu" in only_line(lines, "generate")


def _tiny_model():
    from hybridvl.models.config import HybridConfig
    from hybridvl.models.hybrid import HybridVLM

    config = HybridConfig(
        layout="S,D",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        mrope_section=[4, 2, 2],
        mixer_options={"D": {"num_heads": 2, "head_dim": 16}},
        image_token_id=60,
        video_token_id=61,
        vision_start_token_id=62,
        vision_end_token_id=63,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    return HybridVLM(config)


def _save_tiny_model(directory: Path) -> None:
    _tiny_model().save_pretrained(directory)


def test_the_cli_names_a_truncated_safetensors_file(capsys, tmp_path: Path):
    _save_tiny_model(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    status, lines = run(capsys, "generate", "--model", str(tmp_path / "model"), "--prompt", "hi")
    assert status == 2
    line = only_line(lines, "generate")
    assert str(tmp_path / "model") in line and re.search("truncated|damaged", line)


def test_the_cli_refuses_nan_weights_naming_the_tensor(capsys, tmp_path: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _save_tiny_model(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    with safe_open(weights, "pt") as opened:
        metadata = opened.metadata()
    tensors = load_file(weights)
    name = next(key for key in sorted(tensors) if key.endswith("embed_tokens.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights, metadata=metadata)
    status, lines = run(capsys, "generate", "--model", str(tmp_path / "model"), "--prompt", "hi")
    assert status == 2 and name in only_line(lines, "generate") and "--allow-nonfinite" in lines[0]


def test_the_cli_names_a_missing_data_path_in_yaml(capsys, tmp_path: Path):
    config = tmp_path / "stage.yaml"
    config.write_text(
        "trainer: {accelerator: cpu, devices: 1, max_steps: 1, logger: false}\n"
        f"model: {{class_path: hybridvl.lit.modules.SFT, init_args: {{model: {tmp_path / 'model'}}}}}\n"
        f"data: {{processor: {tmp_path / 'model'}, train: [{{type: json, path: {tmp_path / 'gone.jsonl'}, "
        f"media_root: {tmp_path}}}]}}\n"
    )
    status, lines = run(capsys, "fit", "--config", str(config))
    assert status == 2
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1
    assert errors[0].startswith(f"hybridvl fit: error: data.train[0]: path '{tmp_path / 'gone.jsonl'}' is not an")


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("trainer: {max_stepz: 3}\n", "does not accept option 'trainer.max_stepz'"),
        ("trainer: {max_steps: many}\n", "trainer.max_steps"),
    ],
)
def test_a_stage_yaml_that_does_not_parse_is_one_line(capsys, tmp_path: Path, yaml: str, message: str):
    config = tmp_path / "stage.yaml"
    config.write_text(yaml)
    status, lines = run(capsys, "fit", "--config", str(config))
    assert status == 2 and message in only_line(lines, "fit")


def test_an_unknown_command_is_one_line(capsys):
    status, lines = run(capsys, "frobnicate")
    assert status == 2 and lines == ["hybridvl: error: unknown command 'frobnicate' (see hybridvl --help)"]


def test_debug_shows_the_traceback(capsys):
    status, lines = run(capsys, "--debug", "layout", "S,D,,D")
    assert status == 2
    assert lines[0] == "Traceback (most recent call last):" and any("mixers/layout.py" in line for line in lines)
    assert lines[-1].startswith("hybridvl layout: error: empty item")


@pytest.mark.parametrize(
    ("bug", "error"),
    [(lambda: torch.zeros(2) @ torch.zeros(3), RuntimeError), (lambda: json.loads("{"), json.JSONDecodeError)],
)
def test_internal_errors_keep_their_traceback(monkeypatch, bug, error: type):
    """An exception the project did not raise on purpose (here a library's ValueError too) is a bug: it propagates."""
    from hybridvl.lit.commands import layout

    monkeypatch.setattr(layout, "main", lambda argv: bug())
    with pytest.raises(error):
        main(["layout", "S,D"])


def test_the_cli_reads_no_image_it_cannot_name(capsys, media: Path):
    """A file that is not an image is named before any model is loaded."""
    status, lines = run(capsys, "generate", "--model", "m", "--prompt", "hi", "--image", str(media / "text.jpg"))
    assert status == 2 and f"{media / 'text.jpg'}: not a readable image" in only_line(lines, "generate")


def test_import_loads_a_module_before_the_command_and_names_one_that_is_missing(capsys, tmp_path: Path, monkeypatch):
    (tmp_path / "lab_plugin_for_import_test.py").write_text("IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    status, _ = run(capsys, "layout", "S,D", "--import", "lab_plugin_for_import_test")
    assert status == 0 and sys.modules["lab_plugin_for_import_test"].IMPORTED
    status, lines = run(capsys, "layout", "S,D", "--import", "no_such_lab_module")
    assert status == 2 and "--import no_such_lab_module: cannot import it" in only_line(lines, "layout")
    status, lines = run(capsys, "layout", "S,D", "--import")
    assert status == 2 and "--import needs a module name" in only_line(lines, "layout")


# --- the newest surfaces: commands, benchmarks, streaming and ops --------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "--teacher", "t", "--layout", "S,D", "--out", "o", "--mixer-options", "[1]"], "JSON object of"),
        (["convert", "--teacher", "t", "--layout", "S,D", "--out", "o", "--mixer-options", '{"D": 5}'], "JSON object"),
        (["convert", "--teacher", "t", "--layout", "A,A", "--out", "o", "--sliding-window", "64"], "has none: drop it"),
        (["tiny-qwen", "--out", "o", "--layers", "0"], "--layers must be at least 1, got 0"),
        (["tiny-qwen", "--out", "o", "--hidden-size", "-8"], "--hidden-size must be at least 1, got -8"),
        (["quickstart", "--scale", "0"], "--scale must be a positive number"),
        (["quickstart", "--scale", "nan"], "--scale must be a positive number"),
        (["quickstart", "--window", "0"], "--window must be at least 1, got 0"),
        (["quickstart", "--val-size", "0"], "--val-size must be at least 1, got 0"),
        (["quickstart", "--layout", "S,D"], "the layout gives 2 layers but the model declares 4"),
        (["generate", "--model", "m", "--prompt", " "], "--prompt is empty"),
        (["generate", "--model", "m", "--prompt", "hi", "--repetition-penalty", "inf"], "positive finite number"),
        (["generate", "--model", "m", "--prompt", "hi", "--fps", "-1"], "--fps must be a positive finite number"),
        (["generate", "--model", "m", "--prompt", "hi", "--max-frames", "2"], "--max-frames limits the frames of"),
        (["demo", "--seq-len", "1"], "--seq-len must be at least 2"),
        (["demo", "--hidden-size", "100"], "head_dim must be even for rotary embeddings, got 25"),
        (["ablate", "--config", "s.yaml", "--time-budget", "nan"], "--time-budget must be a finite number"),
        (["ablate", "--config", str(HERE.parent)], "is a folder; give a study YAML"),
        (["ablate", "--config", "s.yaml", "--out", str(HERE)], "is a file; give the folder for the study's results"),
    ],
)
def test_newer_commands_name_bad_options_in_one_line(capsys, argv: list[str], message: str):
    status, lines = run(capsys, *argv)
    assert status == 2
    assert message in only_line(lines, argv[0])


def _cells_folder(results: Path, name: str, text: str) -> None:
    (results / "s" / "cells").mkdir(parents=True)
    (results / "s" / name).write_text(text)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("cells/c.json", "{cut off", "cells/c.json is not valid JSON"),
        ("cells/c.json", "[1, 2]", "cells/c.json holds a JSON list, not the object"),
        ("cells/c.json", '{"layout": "S"}', "cells/c.json is not a cell result (it lacks task, d_model"),
        ("summary.json", "{cut off", "summary.json is not valid JSON"),
    ],
)
def test_ablate_report_names_a_damaged_result_file(capsys, tmp_path: Path, name: str, text: str, message: str):
    _cells_folder(tmp_path / "results", name, text)
    status, lines = run(
        capsys, "ablate-report", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "R.md")
    )
    assert status == 2 and message in only_line(lines, "ablate-report") and "delete it" in lines[0]
    assert not (tmp_path / "R.md").exists()


def test_ablate_report_refuses_a_results_file_and_an_out_folder_before_writing(capsys, tmp_path: Path):
    status, lines = run(capsys, "ablate-report", "--results", str(HERE), "--out", str(tmp_path / "R.md"))
    assert status == 2 and "is a file; give the folder" in only_line(lines, "ablate-report")
    status, lines = run(capsys, "ablate-report", "--out", str(tmp_path))
    assert status == 2 and f"--out {tmp_path} is a folder" in only_line(lines, "ablate-report")
    assert not (tmp_path.parent / "figures").exists()


def test_train_compile_on_a_machine_without_a_gpu_is_logged(tmp_path: Path, caplog, monkeypatch):
    from hybridvl.lit.ablation.runner import run_study

    raw = yaml.safe_load((ROOT / "experiments" / "ablations" / "recall.yaml").read_text())
    raw["train"]["compile"] = True
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(raw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no cell of study recall matches 'none'"):
        run_study(config, smoke=True, out=tmp_path / "out", only="none")
    assert "train.compile: true compiles MQAR steps on a GPU only" in caplog.text


def run_benchmark(capsys, monkeypatch, module: str, *argv: str) -> str:
    """``python -m benchmarks.<module> argv`` in this process, which must end with status 2; its last stderr line."""
    import importlib

    monkeypatch.setattr(sys, "argv", [f"{module}.py", *argv])
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(f"benchmarks.{module}").main()
    assert stop.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        ("inference", ["--contexts", "4096", "0"], "argument --contexts: must be at least 1, got 0"),
        ("inference", ["--decode-steps", "x"], "argument --decode-steps: expected an integer >= 1, got 'x'"),
        ("inference", ["--plot-only", "--out", "/nonexistent/run"], "--plot-only redraws /nonexistent/run.json, which"),
        ("train_step", ["--flavor", "tiny", "--steps", "0"], "argument --steps: must be at least 1, got 0"),
        ("train_step", ["--flavor", "tiny", "--checkpointing", "bogus"], "--checkpointing: gradient_checkpointing"),
        ("train_step", ["--stages", ""], "--stages: unknown stages ['']"),
        ("train_step", ["--peak-tflops", "0"], "--peak-tflops must be a positive number"),
        ("train_step", ["--workdir", str(HERE)], "is a file; give a folder for the benchmark's model folders"),
        ("recall_throughput", ["--arms", "D,Q"], "--arms: no arm 'Q' in recall.yaml"),
        ("recall_throughput", ["--steps", "3"], "argument --steps: must be at least 5, got 3"),
        ("mixers", ["--seq-lens", "0"], "argument --seq-lens: must be at least 1, got 0"),
    ],
)
def test_benchmarks_name_bad_options(capsys, monkeypatch, module: str, argv: list[str], message: str):
    line = run_benchmark(capsys, monkeypatch, module, *argv)
    assert line.startswith(f"benchmarks.{module}: error: ") and message in line


def test_inference_benchmark_keeps_parts_that_only_leaves_out(capsys, monkeypatch, tmp_path: Path):
    earlier = tmp_path / "inference.json"
    earlier.write_text(json.dumps({"parts": ["prefill", "serving"]}))
    line = run_benchmark(capsys, monkeypatch, "inference", "--only", "serving", "--out", str(tmp_path / "inference"))
    assert f"{earlier} holds the prefill measurements of an earlier run" in line and "give another --out" in line
    assert json.loads(earlier.read_text()) == {"parts": ["prefill", "serving"]}


def test_train_step_benchmark_keeps_model_folders_it_did_not_write(capsys, monkeypatch, tmp_path: Path):
    (tmp_path / "hybrid").mkdir()
    (tmp_path / "hybrid" / "config.json").write_text("{}")
    line = run_benchmark(capsys, monkeypatch, "train_step", "--workdir", str(tmp_path), "--out", str(tmp_path / "r"))
    assert f"--workdir {tmp_path} holds hybrid, which this benchmark did not write" in line
    assert (tmp_path / "hybrid" / "config.json").read_text() == "{}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("module", ["inference", "mixers", "recall_throughput"])
def test_benchmarks_that_need_a_gpu_say_so_in_one_line(capsys, monkeypatch, tmp_path: Path, module: str):
    line = run_benchmark(capsys, monkeypatch, module, "--out", str(tmp_path / module))
    assert line.startswith(f"benchmarks.{module}: error: measuring needs a CUDA device and this machine has none")


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: tiny("L")(torch.ones(1, 4, HIDDEN, dtype=torch.long)), TypeError, "x must be floating point"),
        (lambda: tiny("D")(torch.randn(1, 4, HIDDEN, dtype=torch.float64)), TypeError, "x is torch.float64 but the"),
        (lambda: mixers.ops.linear_attention(*[torch.randn(8, 2, 16)] * 3), ValueError, "q must be [B, T, H, D] (4"),
        (lambda: mixers.ops.linear_attention(*[torch.ones(1, 8, 2, 16, dtype=torch.long)] * 3), TypeError, "floating"),
        (
            lambda: mixers.ops.linear_attention(
                torch.randn(1, 8, 2, 16), torch.randn(1, 8, 2, 16).double(), torch.randn(1, 8, 2, 16)
            ),
            TypeError,
            "k is torch.float64 on cpu but q is torch.float32 on cpu",
        ),
        (lambda: mixers.ops.linear_attention(*[torch.randn(1, 8, 2, 16)] * 3, chunk_size=0), ValueError, "chunk_size"),
        (lambda: mixers.ops.swiglu(*[torch.ones(2, 8, dtype=torch.long)] * 2), TypeError, "swiglu: gate must be float"),
        (lambda: mixers.ops.l2norm(torch.ones(2, 8, dtype=torch.long)), TypeError, "l2norm: x must be floating point"),
        (
            lambda: mixers.ops.gated_rms_norm(torch.randn(2, 8), torch.ones(2, 8, dtype=torch.long), torch.ones(8)),
            TypeError,
            "gated_rms_norm: gate must be floating point",
        ),
        (
            lambda: mixers.ops.causal_attention(*[torch.ones(1, 4, 2, 8, dtype=torch.long)] * 3),
            TypeError,
            "causal_attention: q must be floating point",
        ),
        (
            lambda: mixers.ops.gated_delta_rule(
                *[torch.randn(1, 8, 2, 16).half()] * 2,
                torch.randn(1, 8, 2, 16),
                torch.zeros(1, 8, 2),
                torch.zeros(1, 8, 2),
            ),
            TypeError,
            "v is torch.float32 on cpu but q is torch.float16",
        ),
    ],
)
def test_mixers_and_ops_name_inputs_of_the_wrong_kind(call, error: type, message: str):
    with pytest.raises(error, match=re.escape(message)):
        call()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compile": True}, "compile=True compiles the forward the CUDA graphs capture: it needs cuda_graphs=True"),
        ({"cuda_graphs": True}, "cuda_graphs=True needs the model on a CUDA device; it is on cpu"),
        ({"graphed_decoder": True}, "CUDA graphs need the model on a CUDA device; it is on cpu"),
    ],
)
def test_cuda_graph_and_streaming_requests_on_cpu_are_named(options: dict, message: str):
    from types import SimpleNamespace

    from hybridvl.models.cuda_graphs import GraphedDecoder
    from hybridvl.models.streaming import StreamingSession

    model = _tiny_model()
    with pytest.raises(ValueError, match=re.escape(message)):
        if options.pop("graphed_decoder", False):
            GraphedDecoder(model, compile=True)
        else:
            StreamingSession(model, SimpleNamespace(tokenizer=None), **options)


# --- stage configs, streaming and generation with real tiny models -------------------------------------------------


def _stage(kind: str, **options):
    from hybridvl.lit import modules

    distilled = {"teacher": "teacher"} if kind.startswith("Distill") else {}
    return getattr(modules, kind)(**{"model": "model", **distilled, **options})


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        ("SFT", {"learning_rate": 0.0}, "learning_rate must be a positive finite number, got 0.0"),
        ("SFT", {"learning_rate": -1e-3}, "learning_rate must be a positive finite number, got -0.001"),
        ("SFT", {"learning_rate": float("nan")}, "learning_rate must be a positive finite number, got nan"),
        ("SFT", {"vision_learning_rate": -1e-4}, "vision_learning_rate must be a finite number >= 0, got -0.0001"),
        ("SFT", {"warmup_ratio": 1.5}, "warmup_ratio must be a finite number in [0, 1], got 1.5"),
        ("SFT", {"warmup_ratio": -0.1}, "warmup_ratio must be a finite number in [0, 1], got -0.1"),
        ("SFT", {"min_lr_ratio": -0.5}, "min_lr_ratio must be a finite number in [0, 1], got -0.5"),
        ("SFT", {"weight_decay": -1.0}, "weight_decay must be a finite number >= 0, got -1.0"),
        ("SFT", {"compile": "yes"}, "compile must be true or false, got 'yes'"),
        ("SFT", {"trainable": "mixers:new"}, "trainable must be a non-empty list of patterns"),
        ("SFT", {"trainable": []}, "trainable must be a non-empty list of patterns"),
        ("SFT", {"loss_chunk_size": 0}, "loss_chunk_size must be an integer >= 1, got 0"),
        ("SFT", {"generation_max_new_tokens": -1}, "generation_max_new_tokens must be an integer >= 0, got -1"),
        ("SFT", {"model": str(HERE)}, "is a file, not a model directory or a stage's .ckpt checkpoint"),
        ("SFT", {"tokenizer_dir": "nowhere"}, "tokenizer_dir 'nowhere' is not an existing folder"),
        ("DistillEndToEnd", {"temperature": 0.0}, "temperature must be a positive finite number, got 0.0"),
        ("DistillEndToEnd", {"temperature": -2.0}, "temperature must be a positive finite number, got -2.0"),
        ("DistillEndToEnd", {"ce_weight": -1.0}, "ce_weight must be a finite number >= 0, got -1.0"),
        ("DistillEndToEnd", {"teacher": str(HERE)}, "teacher '"),
        ("DistillLayerwise", {"mse_factor": 0.0}, "mse_factor must be a positive finite number, got 0.0"),
        ("LongSFT", {"lora_rank": 0}, "lora_rank must be an integer >= 1, got 0"),
        ("LongSFT", {"lora_alpha": 0.0}, "lora_alpha must be a positive finite number, got 0.0"),
        ("LongSFT", {"lora_dropout": 1.0}, "lora_dropout must be a finite number in [0, 1), got 1.0"),
        ("LongSFT", {"lora_targets": []}, "lora_targets must be a non-empty list of module names"),
    ],
)
def test_bad_stage_options(kind: str, options: dict, message: str):
    from hybridvl.lit.modules import StageOptionError

    with pytest.raises(StageOptionError, match=re.escape(message)):
        _stage(kind, **options)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """The tiny hybrid model of ``_tiny_model`` and one with a larger vocabulary, saved."""
    folder = tmp_path_factory.mktemp("tiny_models")
    _tiny_model().save_pretrained(folder / "student")
    other = _tiny_model().config.to_dict()
    other["vocab_size"] = 80
    from hybridvl.models.config import HybridConfig
    from hybridvl.models.hybrid import HybridVLM

    HybridVLM(HybridConfig.from_dict(other)).save_pretrained(folder / "wide_vocab")
    HybridVLM(HybridConfig.from_dict({**_tiny_model().config.to_dict(), "layout": "A,A"})).save_pretrained(
        folder / "attention_only"
    )
    return folder


@pytest.mark.parametrize("kind", ["DistillEndToEnd", "DistillLayerwise"])
def test_a_teacher_of_another_vocabulary_is_named(tiny_models: Path, kind: str):
    from hybridvl.lit.modules import StageOptionError

    stage = _stage(kind, model=str(tiny_models / "student"), teacher=str(tiny_models / "wide_vocab"))
    with pytest.raises(StageOptionError, match=r"has vocab_size 80 but the student .* has 64"):
        stage.configure_model()


def test_lora_targets_that_name_no_module_are_named(tiny_models: Path):
    stage = _stage("LongSFT", model=str(tiny_models / "student"), lora_targets=["qkv_proj", "nonexistent_proj"])
    with pytest.raises(ValueError, match=r"the LoRA targets nonexistent_proj name no module .* qkv_proj"):
        stage.configure_model()
    stage = _stage("LongSFT", model=str(tiny_models / "attention_only"), lora_targets=["in_proj"])
    with pytest.raises(ValueError, match=r"the LoRA targets in_proj name no module of a model with layout 'A,A'"):
        stage.configure_model()


def test_default_lora_targets_a_layout_lacks_are_logged_and_left_out(tiny_models: Path, caplog):
    """One target list serves every layout: in_proj (of D and M layers) is left out of an all-attention model."""
    stage = _stage("LongSFT", model=str(tiny_models / "attention_only"), lora_targets=["in_proj", "qkv_proj"])
    with caplog.at_level(logging.INFO, logger="hybridvl.train"):
        stage.configure_model()
    assert "LoRA targets in_proj name no module of layout 'A,A'; adapters go on qkv_proj" in caplog.text
    assert any("lora_A" in name for name, _ in stage.student.named_parameters())


def test_a_lora_checkpoint_is_not_a_model(tmp_path: Path):
    from hybridvl.models.hybrid import HybridVLM
    from hybridvl.models.loading import LORA_KEY, STAGE_CONFIG_KEY

    torch.save(
        {STAGE_CONFIG_KEY: _tiny_model().config.to_diff_dict(), LORA_KEY: True, "state_dict": {}}, tmp_path / "a.ckpt"
    )
    with pytest.raises(ValueError, match=r"is a checkpoint of LoRA adapters .* load the stage.s export instead"):
        HybridVLM.from_pretrained(tmp_path / "a.ckpt")


def _stage_yaml(tmp_path: Path, model: dict, data: dict | None = None, trainer: dict | None = None) -> str:
    config = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 1,
            "default_root_dir": str(tmp_path),
            **(trainer or {}),
        },
        "model": {"class_path": "hybridvl.lit.modules.SFT", "init_args": {"model": str(tmp_path), **model}},
        "data": {"processor": str(tmp_path), "train": [{"type": "synthetic"}], **(data or {})},
    }
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize(
    ("model", "data", "message"),
    [
        ({"learning_rate": 0.0}, {}, "model: learning_rate must be a positive finite number, got 0.0"),
        ({"warmup_ratio": 2.0}, {}, "model: warmup_ratio must be a finite number in [0, 1], got 2.0"),
        ({"lernig_rate": 1e-3}, {}, "Option 'lernig_rate' is not accepted"),
        ({"optimizer": {"class_path": "torch.optim.NoSuch"}}, {}, "module 'torch.optim' has no attribute 'NoSuch'"),
        ({}, {"batch_size": 4}, "does not accept option 'data.batch_size'"),
        ({}, {"max_tokens": "lots"}, "Parser key \"data.max_tokens\": Expected a <class 'int'>. Got value: lots"),
        ({}, {"num_workers": 1.5}, "Parser key \"data.num_workers\": Expected a <class 'int'>"),
    ],
)
def test_a_bad_stage_yaml_is_one_line(capsys, tmp_path: Path, model: dict, data: dict, message: str):
    status, lines = run(capsys, "fit", "--config", _stage_yaml(tmp_path, model, data))
    assert status == 2 and message in only_line(lines, "fit")


@pytest.mark.parametrize(("command", "message"), [("test", "data.val"), ("predict", "hybridvl generate")])
def test_commands_no_stage_defines_say_what_to_run(capsys, tmp_path: Path, command: str, message: str):
    status, lines = run(capsys, command, "--config", _stage_yaml(tmp_path, {}))
    assert status == 2 and f"the stages define no {command} step" in only_line(lines, command) and message in lines[0]


def test_validate_without_val_sources_is_named(capsys, tiny_models: Path, tmp_path: Path):
    config = _stage_yaml(tmp_path, {"model": str(tiny_models / "student")}, trainer={"logger": False})
    status, lines = run(capsys, "validate", "--config", config)
    assert status == 2
    assert "validating needs sources under data.val" in only_line(
        [line for line in lines if "error" in line], "validate"
    )


def test_a_stage_without_a_logger_trains_without_the_learning_rate_monitor(capsys, monkeypatch, tmp_path: Path):
    from lightning.pytorch.callbacks import LearningRateMonitor

    from hybridvl.lit.commands import train

    callbacks = []
    monkeypatch.setattr(train.HybridCLI, "fit", lambda self, model, **kwargs: callbacks.extend(self.trainer.callbacks))
    status, lines = run(capsys, "fit", "--config", _stage_yaml(tmp_path, {}, trainer={"logger": False}))
    assert status == 0 and callbacks and not any(isinstance(c, LearningRateMonitor) for c in callbacks)
    assert any("trainer.logger is false: learning rates and throughput are not logged" in line for line in lines)


def test_sampling_a_video_above_its_frame_rate_is_logged(media: Path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="hybridvl.vision"):
        frames, _ = read_video(media / "good.mp4", fps=20.0)
    assert frames.shape[0] == 40 and "above the video's own 10 fps, repeats each frame about 2.0 times" in caplog.text


def test_placeholders_typed_into_a_prompt_are_named():
    from types import SimpleNamespace

    from hybridvl.models.chat import chat_inputs
    from hybridvl.models.streaming import StreamingSession

    processor = SimpleNamespace(tokenizer=None, image_token="<|image_pad|>", video_token="<|video_pad|>")
    with pytest.raises(ValueError, match=re.escape("the prompt holds the placeholder <|image_pad|>")):
        chat_inputs(processor, "<|image_pad|> What is this?")
    session = StreamingSession(_tiny_model(), processor)
    with pytest.raises(ValueError, match=re.escape("the question holds the placeholder <|video_pad|>")):
        session.ask("<|video_pad|>?")
    with pytest.raises(ValueError, match=re.escape("the text holds the placeholder <|image_pad|>")):
        session.feed_text("<|image_pad|>")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL teacher converted into a hybrid student with its processor files."""
    folder = tmp_path_factory.mktemp("converted")
    assert main(["tiny-qwen", "--out", str(folder / "teacher"), "--layers", "2", "--hidden-size", "32"]) == 0
    assert (
        main(["convert", "--teacher", str(folder / "teacher"), "--layout", "S,D", "--out", str(folder / "student")])
        == 0
    )
    return folder / "student"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "--prompt", "<|image_pad|> What?"], "the prompt holds the placeholder <|image_pad|>"),
        (["generate", "--prompt", "hi", "--max-new-tokens", str(10**10)], "exceeds the model's context of 32768"),
        (["stream", "--video", "good.mp4", "--max-new-tokens", str(10**10)], "exceeds the model's context of 32768"),
    ],
)
def test_generate_and_stream_name_bad_inputs_with_a_real_model(capsys, converted: Path, media: Path, argv, message):
    argv = [str(media / arg) if arg.endswith(".mp4") else arg for arg in argv]
    capsys.readouterr()
    status, lines = run(capsys, argv[0], "--model", str(converted), "--device", "cpu", *argv[1:])
    assert status == 2 and message in only_line([line for line in lines if "error" in line], argv[0])
