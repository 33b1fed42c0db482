"""A tiny, random-weight but complete Qwen2.5-VL checkpoint, built offline.

.. code-block:: python

    from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl

    path = make_tiny_qwen2_5_vl("/tmp/tiny-qwen2.5-vl", seed=0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)

The directory holds what a real ``Qwen/Qwen2.5-VL-*-Instruct`` checkpoint holds, with tiny dimensions:

* ``config.json`` and ``model.safetensors``: a ``Qwen2_5_VLForConditionalGeneration`` with random weights
  (4 text layers of width 64, a 2-block vision tower of width 32, 448 vocabulary rows), tied word embeddings
  like the 3B model;
* ``generation_config.json`` with Qwen's bos/eos/pad ids (greedy decoding);
* a ``Qwen2Tokenizer`` (a ``PreTrainedTokenizerFast``): byte-level BPE with Qwen2's pre-tokenizer, trained
  in-process on :data:`CORPUS`, followed by Qwen2.5-VL's added tokens in Qwen's order;
* a ``Qwen2_5_VLProcessor`` (``Qwen2VLImageProcessor``, ``Qwen2VLVideoProcessor``, the tokenizer and
  :data:`CHAT_TEMPLATE`, which renders conversations exactly like Qwen2.5-VL's template).

Nothing is downloaded; building takes about a second on CPU. The same ``seed`` gives the same weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from hybridvl.models.files import check_output, remove_stale_weights, staged_folder

__all__ = [
    "ADDED_TOKENS",
    "CHAT_TEMPLATE",
    "CORPUS",
    "SPECIAL_TOKENS",
    "TinyQwenDims",
    "build_tiny_config",
    "build_tiny_generation_config",
    "build_tiny_model",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "make_tiny_qwen2_5_vl",
    "save_tiny_qwen2_5_vl",
]

# Qwen2.5-VL's special tokens, in the order (and so with the relative ids) of the real tokenizer, where they
# follow the byte-level BPE vocabulary: <|endoftext|> is 151643 there, <|image_pad|> 151655.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Added tokens that are not special (not skipped when decoding), again in Qwen's order.
ADDED_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Training text for the BPE merges. Any ASCII text round-trips (the BPE is byte-level); this only decides which
# character groups become single tokens.
CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "A picture of a red square and a blue circle on a white background.",
    "Describe this image in detail.",
    "What is shown in the video?",
    "The video shows a small ball rolling from the left to the right.",
    "There are three people standing in front of a building.",
    "The cat is sitting on the table next to a green cup.",
    "Please answer the question using a single word or phrase.",
    "How many objects are there in the picture?",
    "The sky is blue and the grass is green.",
    "A man is riding a bicycle along the road in the morning.",
    "The woman is reading a book under a tall tree.",
    "Is there a dog in this image? Yes, there is a brown dog.",
    "What color is the car? The car is red.",
    "The text on the sign says: stop.",
    "In the first frame the door is closed; in the last frame it is open.",
    "You are a helpful assistant.",
    "Hello, how can I help you today?",
    "Thank you! Here is a short summary of the scene.",
    "The chart shows the number of visitors for each month of the year.",
    "Two children are playing with a yellow kite on the beach.",
    "The image contains a table with four rows and three columns.",
    "A train is arriving at the station while people wait on the platform.",
    "The person in the video picks up a cup and drinks from it.",
    "Where is the ball at the end of the video? It is under the chair.",
    "Read the numbers: 1, 2, 3, 4, 5, 10, 20, 100 and 2025.",
    "The answer is (B) because the square is larger than the circle.",
    "Explain step by step what happens in this scene.",
)

# Qwen2.5-VL's chat template, written out piece by piece. A conversation without a system turn gets Qwen's default
# system prompt; each image item renders as <|vision_start|><|image_pad|><|vision_end|> and each video item as
# <|vision_start|><|video_pad|><|vision_end|>, optionally numbered with ``add_vision_id=True``; the processor then
# repeats each pad token once per merged vision patch.
CHAT_TEMPLATE = "".join(
    (
        "{% set image_count = namespace(value=0) %}",
        "{% set video_count = namespace(value=0) %}",
        "{% for message in messages %}",
        "{% if loop.first and message['role'] != 'system' %}",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        "{% endif %}",
        "<|im_start|>{{ message['role'] }}\n",
        "{% if message['content'] is string %}",
        "{{ message['content'] }}<|im_end|>\n",
        "{% else %}",
        "{% for content in message['content'] %}",
        "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}",
        "{% set image_count.value = image_count.value + 1 %}",
        "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}",
        "<|vision_start|><|image_pad|><|vision_end|>",
        "{% elif content['type'] == 'video' or 'video' in content %}",
        "{% set video_count.value = video_count.value + 1 %}",
        "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}",
        "<|vision_start|><|video_pad|><|vision_end|>",
        "{% elif 'text' in content %}",
        "{{ content['text'] }}",
        "{% endif %}",
        "{% endfor %}",
        "<|im_end|>\n",
        "{% endif %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
)


@dataclass(frozen=True)
class TinyQwenDims:
    """Dimensions of the tiny model and its processor; the defaults give about 0.26M parameters (1 MB).

    ``head_dim``, ``mrope_section`` and ``fullatt_block_indexes`` are derived: ``hidden_size /
    num_attention_heads``, ``head_dim / 2`` split like Qwen's ``[16, 24, 24]`` of 64 (``[2, 3, 3]`` of 8), and
    the last vision block.
    """

    # text decoder
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    # vision tower
    vision_depth: int = 2
    vision_hidden_size: int = 32
    vision_num_heads: int = 2
    vision_intermediate_size: int = 64
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    tokens_per_second: int = 2
    # processor: pixel bounds per image and per video frame
    image_min_pixels: int = 28 * 28 * 4
    image_max_pixels: int = 224 * 224
    video_min_pixels: int = 28 * 28 * 4
    video_max_pixels: int = 112 * 112
    # tokenizer: BPE training target (bytes + merges) and the multiple the embedding rows are padded to
    bpe_vocab_size: int = 512
    vocab_multiple: int = 64

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2 or self.head_dim < 8:
            raise ValueError(f"head_dim {self.head_dim} must be even and at least 8 for M-RoPE")
        if self.vision_hidden_size % self.vision_num_heads or (self.vision_hidden_size // self.vision_num_heads) % 4:
            raise ValueError(
                f"vision head size {self.vision_hidden_size} / {self.vision_num_heads} must be a multiple of 4"
            )
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(f"window_size {self.window_size} is not a multiple of patch_size * spatial_merge_size")
        if self.bpe_vocab_size < 256:
            raise ValueError(f"bpe_vocab_size {self.bpe_vocab_size} is below the 256 byte tokens")

    @property
    def head_dim(self) -> int:
        """Size of one text attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def mrope_section(self) -> list[int]:
        """Rotary frequency pairs for (time, height, width); sums to ``head_dim / 2``."""
        half = self.head_dim // 2
        time = half // 4
        height = (half - time) // 2
        return [time, height, half - time - height]

    @property
    def fullatt_block_indexes(self) -> list[int]:
        """Vision blocks with full (not windowed) attention: the last one, as Qwen ends each group of 8."""
        return [self.vision_depth - 1]


def build_tiny_tokenizer(dims: TinyQwenDims | None = None) -> Qwen2Tokenizer:
    """Train a byte-level BPE on :data:`CORPUS` and wrap it as Qwen2.5-VL's tokenizer.

    Pre-tokenization, normalization and decoding are Qwen2's (``Qwen2Tokenizer`` builds them from the vocabulary
    and merges). The ids run: 256 byte tokens and the merges, then :data:`SPECIAL_TOKENS` and :data:`ADDED_TOKENS`.
    ``eos_token`` is ``<|im_end|>``, ``pad_token`` ``<|endoftext|>``; there is no bos or unk token, as in Qwen.
    Training is deterministic, so every call returns the same tokenizer.
    """
    dims = dims or TinyQwenDims()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=dims.bpe_vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" ")) for pair in trained["merges"]]

    # Qwen2Tokenizer adds <|endoftext|> (its default unk/eos/pad) first; the rest follow in Qwen's order.
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=merges,
        clean_up_tokenization_spaces=False,
        model_max_length=dims.max_position_embeddings,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.add_tokens(list(ADDED_TOKENS))
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.unk_token = None
    expected = list(range(len(trained["vocab"]), len(trained["vocab"]) + len(SPECIAL_TOKENS) + len(ADDED_TOKENS)))
    if tokenizer.convert_tokens_to_ids([*SPECIAL_TOKENS, *ADDED_TOKENS]) != expected:
        raise RuntimeError("added tokens did not get consecutive ids after the BPE vocabulary")
    return tokenizer


def build_tiny_config(tokenizer: Qwen2Tokenizer, dims: TinyQwenDims | None = None) -> Qwen2_5_VLConfig:
    """The model configuration: ``dims`` for the sizes, ``tokenizer`` for the vocabulary size and token ids.

    ``vocab_size`` is ``len(tokenizer)`` rounded up to ``dims.vocab_multiple`` (Qwen pads its embedding too), so
    the model may emit ids the tokenizer lacks; ``bos_token_id`` is ``<|endoftext|>`` as in Qwen's config.
    """
    dims = dims or TinyQwenDims()
    ids = dict(zip(SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))))
    vocab_size = -(-len(tokenizer) // dims.vocab_multiple) * dims.vocab_multiple
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": dims.hidden_size,
        "intermediate_size": dims.intermediate_size,
        "num_hidden_layers": dims.num_hidden_layers,
        "num_attention_heads": dims.num_attention_heads,
        "num_key_value_heads": dims.num_key_value_heads,
        "head_dim": dims.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": dims.max_position_embeddings,
        "rms_norm_eps": dims.rms_norm_eps,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "max_window_layers": dims.num_hidden_layers,
        "attention_dropout": 0.0,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": dims.rope_theta,
            "mrope_section": dims.mrope_section,
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": dims.vision_depth,
        "hidden_size": dims.vision_hidden_size,
        "hidden_act": "silu",
        "intermediate_size": dims.vision_intermediate_size,
        "num_heads": dims.vision_num_heads,
        "in_channels": 3,
        "patch_size": dims.patch_size,
        "spatial_merge_size": dims.spatial_merge_size,
        "temporal_patch_size": dims.temporal_patch_size,
        "tokens_per_second": dims.tokens_per_second,
        "window_size": dims.window_size,
        "out_hidden_size": dims.hidden_size,
        "fullatt_block_indexes": dims.fullatt_block_indexes,
        "initializer_range": 0.02,
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_tiny_generation_config(config: Qwen2_5_VLConfig) -> GenerationConfig:
    """Greedy decoding that stops at ``<|im_end|>`` or ``<|endoftext|>``, as Qwen2.5-VL-Instruct's config does."""
    text = config.text_config
    return GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=[text.eos_token_id, text.pad_token_id],
        pad_token_id=text.pad_token_id,
        do_sample=False,
    )


def init_tiny_vision_tower(visual: torch.nn.Module) -> None:
    """Give a tiny vision tower's linear and convolution layers PyTorch's fan-in scaled initialisation: with
    transformers' std 0.02 its output hardly depends on the image at these widths, and a model trained from it
    learns to ignore the pixels."""
    for module in visual.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)):
            module.reset_parameters()


def build_tiny_model(
    config: Qwen2_5_VLConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Qwen2_5_VLForConditionalGeneration:
    """A ``Qwen2_5_VLForConditionalGeneration`` with random weights drawn under ``seed``.

    Decoder matrices come from transformers' initialisation (normal, std ``initializer_range``). The vision
    tower's linear and convolution layers get PyTorch's default (fan-in scaled) initialisation instead: at
    these tiny widths std 0.02 makes its output nearly the same for every image, and a model trained from it
    learns to ignore the pixels. transformers sets biases to 0 and norm scales to 1, so vectors then get
    normal noise of std ``initializer_range``: every tensor carries information, as in a trained checkpoint,
    and a conversion that drops a bias or a norm shows in the outputs. The global random state is left as it
    was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
        with torch.no_grad():
            init_tiny_vision_tower(model.model.visual)
            for param in model.parameters():
                if param.ndim == 1:
                    param.add_(torch.randn_like(param), alpha=config.text_config.initializer_range)
    model.generation_config = build_tiny_generation_config(config)
    return model.to(dtype).eval()


def build_tiny_processor(tokenizer: Qwen2Tokenizer, dims: TinyQwenDims | None = None) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL's processor around ``tokenizer``, with small pixel bounds and :data:`CHAT_TEMPLATE`.

    Images are resized to between ``dims.image_min_pixels`` and ``dims.image_max_pixels`` pixels (sides multiple
    of 28), video frames to between ``dims.video_min_pixels`` and ``dims.video_max_pixels``.
    """
    dims = dims or TinyQwenDims()
    patches = {
        "patch_size": dims.patch_size,
        "temporal_patch_size": dims.temporal_patch_size,
        "merge_size": dims.spatial_merge_size,
    }
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": dims.image_min_pixels, "longest_edge": dims.image_max_pixels}, **patches
    )
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": dims.video_min_pixels, "longest_edge": dims.video_max_pixels},
        cap_pixels_per_frame=True,  # the reference (qwen-vl-utils) behaviour; silences transformers' warning
        **patches,
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny_qwen2_5_vl(
    out_dir: str | Path,
    dims: TinyQwenDims | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write the checkpoint for ``dims`` to ``out_dir``, which must be new or empty unless ``overwrite`` (then its
    files of the same names are replaced and stale weight shards removed). The files are written into a temporary
    folder inside ``out_dir`` and renamed into place.

    Raises:
        hybridvl.models.files.OutputExistsError: ``out_dir`` holds files and ``overwrite`` is false.
    """
    dims = dims or TinyQwenDims()
    out = Path(out_dir)
    check_output(out, overwrite=overwrite)
    tokenizer = build_tiny_tokenizer(dims)
    config = build_tiny_config(tokenizer, dims)
    with staged_folder(out) as staging:
        build_tiny_model(config, seed=seed, dtype=dtype).save_pretrained(staging)
        build_tiny_processor(tokenizer, dims).save_pretrained(staging)
        remove_stale_weights(out)
    return out


def make_tiny_qwen2_5_vl(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = TinyQwenDims.hidden_size,
    intermediate_size: int = TinyQwenDims.intermediate_size,
    num_hidden_layers: int = TinyQwenDims.num_hidden_layers,
    num_attention_heads: int = TinyQwenDims.num_attention_heads,
    num_key_value_heads: int = TinyQwenDims.num_key_value_heads,
    vision_depth: int = TinyQwenDims.vision_depth,
    vision_hidden_size: int = TinyQwenDims.vision_hidden_size,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Build a tiny random Qwen2.5-VL checkpoint in ``out_dir`` (new or empty unless ``overwrite``, as
    :func:`save_tiny_qwen2_5_vl`) and return its path.

    Load it with ``Qwen2_5_VLForConditionalGeneration.from_pretrained(path)`` and
    ``AutoProcessor.from_pretrained(path)``, offline. Other sizes: :class:`TinyQwenDims` with
    :func:`save_tiny_qwen2_5_vl`.
    """
    dims = TinyQwenDims(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vision_depth=vision_depth,
        vision_hidden_size=vision_hidden_size,
    )
    return save_tiny_qwen2_5_vl(out_dir, dims, seed=seed, dtype=dtype, overwrite=overwrite)
