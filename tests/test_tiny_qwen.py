"""The tiny Qwen2.5-VL checkpoint loads offline like a real one and runs images, videos and generation."""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.video_utils import VideoMetadata

from hybridvl.models.tiny_qwen import (
    ADDED_TOKENS,
    SPECIAL_TOKENS,
    TinyQwenDims,
    build_tiny_tokenizer,
    make_tiny_qwen2_5_vl,
)

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def _no_network(*args, **kwargs):
    raise OSError("network access attempted while building or loading the tiny checkpoint")


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Offline mode (the env variable and the hub's constant read at import) and no outgoing connections."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        yield


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny") / "qwen2.5-vl", seed=0)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> Qwen2_5_VLForConditionalGeneration:
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_dir: Path) -> Qwen2_5_VLProcessor:
    return AutoProcessor.from_pretrained(tiny_dir)


def _image() -> Image.Image:
    image = Image.new("RGB", (120, 80), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((10, 10, 50, 50), fill="red")
    draw.ellipse((60, 20, 110, 70), fill="blue")
    return image


def _frames(num_frames: int = 4, height: int = 56, width: int = 84) -> list[Image.Image]:
    frames = []
    for t in range(num_frames):
        frame = Image.new("RGB", (width, height), "black")
        ImageDraw.Draw(frame).ellipse((10 * t, 10, 10 * t + 20, 30), fill="yellow")
        frames.append(frame)
    return frames


def _chat(processor: Qwen2_5_VLProcessor, item: dict, **kwargs) -> dict:
    messages = [{"role": "user", "content": [item, {"type": "text", "text": "Describe it."}]}]
    return processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True, **kwargs
    )


def test_directory_holds_a_complete_checkpoint(tiny_dir: Path):
    names = {path.name for path in tiny_dir.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    expected |= {"tokenizer_config.json", "processor_config.json", "chat_template.jinja"}
    assert expected <= names


def test_loads_offline_with_every_weight(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, like Qwen2.5-VL-3B
    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert isinstance(processor, Qwen2_5_VLProcessor)
    assert isinstance(processor.image_processor, Qwen2VLImageProcessor)
    assert isinstance(processor.video_processor, Qwen2VLVideoProcessor)
    assert isinstance(processor.tokenizer, PreTrainedTokenizerFast)
    assert type(AutoTokenizer.from_pretrained(tiny_dir)) is type(processor.tokenizer)


def test_config_has_tiny_dims_and_tokenizer_ids(tiny_dir: Path, processor: Qwen2_5_VLProcessor):
    config, tokenizer = AutoConfig.from_pretrained(tiny_dir), processor.tokenizer
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (64, 128, 4)
    assert (text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (4, 2, 16)
    assert text.rope_parameters["rope_type"] == "default" and text.rope_parameters["rope_theta"] == 1e6
    assert text.rope_parameters["mrope_section"] == [2, 3, 3]
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (2, 32, 2, 64)
    assert vision.out_hidden_size == text.hidden_size and vision.fullatt_block_indexes == [1]
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert (vision.window_size, vision.tokens_per_second) == (112, 2)
    assert config.tie_word_embeddings

    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))))
    base = ids["<|endoftext|>"]
    assert list(ids.values()) == list(range(base, base + len(SPECIAL_TOKENS)))  # Qwen's order after the BPE
    assert tokenizer.convert_tokens_to_ids(list(ADDED_TOKENS))[0] == base + len(SPECIAL_TOKENS)
    assert config.image_token_id == ids["<|image_pad|>"] == processor.image_token_id
    assert config.video_token_id == ids["<|video_pad|>"] == processor.video_token_id
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.vision_end_token_id == ids["<|vision_end|>"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None and tokenizer.unk_token is None
    assert text.eos_token_id == tokenizer.eos_token_id and text.pad_token_id == tokenizer.pad_token_id
    assert text.bos_token_id == ids["<|endoftext|>"]
    assert text.vocab_size >= len(tokenizer) and text.vocab_size % 64 == 0 and text.vocab_size - len(tokenizer) < 64
    assert 300 < len(tokenizer) < 600

    generation = GenerationConfig.from_pretrained(tiny_dir)
    assert generation.eos_token_id == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert generation.pad_token_id == ids["<|endoftext|>"]


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "Zebras quietly vexed 17 jumping wizards; why? (Because: 3.5% < 42!)",
        "  leading and trailing spaces, tabs\tand\nnew lines\n\n",
        "Don't stop: it's Mary's cat, isn't it? {\"json\": [1, 2]} ~ @ # $ ^ & * _ + = | \\ /",
    ],
)
def test_tokenizer_round_trips_ascii(processor: Qwen2_5_VLProcessor, text: str):
    tokenizer = processor.tokenizer
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(i < tokenizer.convert_tokens_to_ids("<|endoftext|>") for i in ids)  # plain text, no added tokens


def test_tokenizer_keeps_special_tokens_whole(processor: Qwen2_5_VLProcessor):
    tokenizer = processor.tokenizer
    ids = tokenizer.encode("<|im_start|>user\nhi<|image_pad|><|im_end|>")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[-2:] == tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|im_end|>"])
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_tokenizer_is_deterministic():
    assert build_tiny_tokenizer().backend_tokenizer.to_str() == build_tiny_tokenizer().backend_tokenizer.to_str()


def test_chat_template_renders_like_qwen2_5_vl(processor: Qwen2_5_VLProcessor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And this?"}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == (
        SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA square.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>And this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not processor.apply_chat_template(messages).endswith("<|im_start|>assistant\n")

    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(with_system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    numbered = processor.apply_chat_template(messages, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in numbered and "Video 1: <|vision_start|>" in numbered


def test_image_chat_forward_and_generate(model, processor: Qwen2_5_VLProcessor):
    inputs = _chat(processor, {"type": "image", "image": _image()})
    grid = inputs["image_grid_thw"]
    assert grid.shape == (1, 3) and inputs["pixel_values"].shape[0] == grid.prod()
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == grid.prod() // 4
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()

    generated = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 5)
    assert torch.equal(generated[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("kind", ["tensor", "array", "pil_frames"])
def test_video_chat_forward(model, processor: Qwen2_5_VLProcessor, kind: str):
    frames = _frames()
    video = {
        "tensor": torch.stack([torch.tensor(np.asarray(f)).permute(2, 0, 1) for f in frames]),  # T, C, H, W
        "array": np.stack([np.asarray(f) for f in frames]),  # T, H, W, C
        "pil_frames": frames,
    }[kind]
    inputs = _chat(processor, {"type": "video", "video": video})
    grid = inputs["video_grid_thw"]
    assert grid.tolist() == [[2, 4, 6]]  # 4 frames / temporal patch 2; 56 x 84 pixels / patch 14
    assert (inputs["input_ids"] == model.config.video_token_id).sum() == grid.prod() // 4
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(logits).all()
    if kind == "tensor":
        generated = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5)
        assert generated.shape[1] == inputs["input_ids"].shape[1] + 5


def test_video_fps_comes_from_metadata(processor: Qwen2_5_VLProcessor):
    metadata = [VideoMetadata(total_num_frames=4, fps=2.0)]
    video = {"type": "video", "video": _frames()}
    inputs = _chat(processor, video, processor_kwargs={"video_metadata": metadata})
    assert inputs["second_per_grid_ts"].tolist() == [1.0]  # temporal patch of 2 frames at 2 fps


def test_seed_decides_the_weights(tiny_dir: Path, tmp_path: Path):
    before = torch.random.get_rng_state()
    again = load_file(make_tiny_qwen2_5_vl(tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(make_tiny_qwen2_5_vl(tmp_path / "other", seed=1) / "model.safetensors")
    assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is left alone
    first = load_file(tiny_dir / "model.safetensors")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert "model.embed_tokens.weight" in first and "visual.patch_embed.proj.weight" in first  # Qwen's key names
    assert "lm_head.weight" not in first  # tied
    assert all(tensor.std() > 0 for tensor in first.values())  # biases and norm scales are random too
    assert all(not torch.equal(first[name], other[name]) for name in first)


def test_other_dims(tmp_path: Path):
    path = make_tiny_qwen2_5_vl(tmp_path, hidden_size=96, num_hidden_layers=2, num_attention_heads=4)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    text = model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim) == (96, 2, 24)
    assert sum(text.rope_parameters["mrope_section"]) == 12
    assert model.config.vision_config.out_hidden_size == 96
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.shape == (1, 3, text.vocab_size)


def test_dims_are_checked():
    assert TinyQwenDims(hidden_size=1024, num_attention_heads=8).mrope_section == [16, 24, 24]  # Qwen's split of 128
    with pytest.raises(ValueError, match="multiple"):
        TinyQwenDims(hidden_size=60, num_attention_heads=8)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TinyQwenDims(num_key_value_heads=3)
