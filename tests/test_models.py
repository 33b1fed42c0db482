"""The hybrid model against transformers' Qwen2.5-VL (the oracle), conversion, save/load and generation.

A tiny random Qwen2.5-VL is built and saved once per session; every check runs in fp32 on CPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from media import render_text_image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from transformers.video_utils import VideoMetadata

from hybridvl import mixers
from hybridvl.mixers.ops.varlen import seqlens_to_cu_seqlens
from hybridvl.models.checkpoint import CheckpointMismatchError, load_weights_strict
from hybridvl.models.config import HybridConfig
from hybridvl.models.convert import convert_checkpoint, convert_directory
from hybridvl.models.generation import generate
from hybridvl.models.hybrid import HybridVLM, residual_stream
from hybridvl.models.qwen import ConversionError
from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl

ATOL = 1e-4


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen"), seed=0)


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(teacher_dir).eval()


@pytest.fixture(scope="module")
def processor(teacher_dir):
    return AutoProcessor.from_pretrained(teacher_dir)


def image_chat(text: str, image_text: str = "cat 7", size=(112, 84)) -> list[dict]:
    image = render_text_image(image_text, size=size)
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def video_frames(num_frames: int = 6, size: int = 56) -> torch.Tensor:
    frames = torch.zeros(num_frames, 3, size, size, dtype=torch.uint8)
    for t in range(num_frames):
        frames[t, t % 3, t * 4 : t * 4 + 20, 10:40] = 200
    return frames


def image_inputs(processor):
    return processor.apply_chat_template(
        image_chat("what is written here?"),
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=True,
    )


def video_inputs(processor):
    frames = video_frames()
    messages = [
        {"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "what moves?"}]}
    ]
    return processor.apply_chat_template(
        messages,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        add_generation_prompt=True,
        processor_kwargs={"video_metadata": [VideoMetadata(total_num_frames=len(frames), fps=2.0)]},
    )


def padded_inputs(processor, side: str):
    processor.tokenizer.padding_side = side
    texts = [
        processor.apply_chat_template(image_chat("read it"), add_generation_prompt=True),
        processor.apply_chat_template(
            image_chat("what is the word in the picture, please?", "dog 3", (84, 56)), add_generation_prompt=True
        ),
    ]
    images = [render_text_image("cat 7", size=(112, 84)), render_text_image("dog 3", size=(84, 56))]
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def hybrid_inputs(inputs) -> dict:
    keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    return {k: inputs[k] for k in keys if k in inputs}


def convert(teacher_dir, layout: str, **kwargs) -> HybridVLM:
    student, _ = convert_checkpoint(teacher_dir, layout, **kwargs)
    return student.eval()


@pytest.mark.parametrize("layout, options", [("A x4", {}), ("S x4", {"sliding_window": 4096})])
@pytest.mark.parametrize("case", ["image", "video"])
def test_attention_layouts_reproduce_transformers(teacher_dir, teacher, processor, layout, options, case):
    inputs = image_inputs(processor) if case == "image" else video_inputs(processor)
    student = convert(teacher_dir, layout, **options)
    with torch.no_grad():
        expected = teacher(**inputs).logits
        actual = student(inputs["input_ids"], **hybrid_inputs(inputs)).logits
    assert (actual - expected).abs().max() <= ATOL


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_reproduces_transformers(teacher_dir, teacher, processor, side):
    inputs = padded_inputs(processor, side)
    assert not bool(inputs["attention_mask"].all())
    student = convert(teacher_dir, "A x4")
    with torch.no_grad():
        expected = teacher(**inputs).logits
        actual = student(inputs["input_ids"], attention_mask=inputs["attention_mask"], **hybrid_inputs(inputs)).logits
    valid = inputs["attention_mask"].bool()
    assert (actual[valid] - expected[valid]).abs().max() <= ATOL
    assert actual[~valid].abs().max() == 0


def test_mrope_positions_equal_transformers(teacher, processor):
    for inputs in (image_inputs(processor), video_inputs(processor)):
        expected, _ = teacher.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            second_per_grid_ts=inputs.get("second_per_grid_ts"),
        )
        student = HybridVLM(HybridConfig(**{**_tiny_config_fields(teacher), "layout": "A x4"}))
        length = inputs["input_ids"].shape[1]
        actual, _ = student.positions(
            inputs["input_ids"],
            seqlens_to_cu_seqlens([length]),
            torch.zeros(1, dtype=torch.long),
            inputs.get("image_grid_thw"),
            inputs.get("video_grid_thw"),
            inputs.get("second_per_grid_ts"),
        )
        assert torch.equal(actual, expected)


def _tiny_config_fields(teacher) -> dict:
    text, vision = teacher.config.text_config, teacher.config.vision_config
    return dict(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        mrope_section=text.rope_parameters["mrope_section"],
        vision_config={
            "spatial_merge_size": vision.spatial_merge_size,
            "tokens_per_second": vision.tokens_per_second,
            "depth": 1,
            "hidden_size": 16,
            "num_heads": 1,
            "intermediate_size": 16,
            "out_hidden_size": text.hidden_size,
        },
        image_token_id=teacher.config.image_token_id,
        video_token_id=teacher.config.video_token_id,
        vision_start_token_id=teacher.config.vision_start_token_id,
        vision_end_token_id=teacher.config.vision_end_token_id,
        pad_token_id=text.pad_token_id,
        bos_token_id=getattr(text, "bos_token_id", None),
        eos_token_id=getattr(text, "eos_token_id", None),
        mixer_options={},
    )


def test_hybrid_layout_converts_runs_and_reports(teacher_dir, processor):
    student, report = convert_checkpoint(teacher_dir, "S,D,D,D")
    assert student.kinds == ["S", "D", "D", "D"]
    assert isinstance(student.language_model.layers[1].self_attn, mixers.GatedDeltaNet)
    names = set(student.state_dict()) - {"lm_head.weight"}
    mixer_names = {n for n in names if n.split(".")[2] in ("1", "2", "3") and ".self_attn." in n}
    assert set(report.inherited) == names - mixer_names
    assert set(report.fresh) == mixer_names and not report.transferred
    dropped_layers = {int(n.split(".")[2]) for n in report.dropped}
    assert dropped_layers == {1, 2, 3} and all(".self_attn." in n for n in report.dropped)
    assert "language_model.layers.0.self_attn.q_proj.bias" in report.inherited  # the S layer keeps its attention
    mixer = student.language_model.layers[1].self_attn  # mimic init
    weights = mixer.state_dict()
    assert (
        torch.all(mixer.A_log == 0)
        and torch.all(weights["a_proj.weight"] == 0)
        and torch.all(weights["b_proj.weight"] == 0)
    )
    assert torch.allclose(torch.nn.functional.softplus(mixer.dt_bias), torch.full_like(mixer.dt_bias, 1e-3))
    assert torch.all(mixer.q_conv1d.weight[:, 0, -1] == 1) and torch.all(mixer.q_conv1d.weight[:, 0, :-1] == 0)
    inputs = image_inputs(processor)
    with torch.no_grad():
        logits = student.eval()(inputs["input_ids"], **hybrid_inputs(inputs)).logits
    assert torch.isfinite(logits).all()
    assert "inherited" in report.summary() and "D layers" in report.summary()


def test_transfer_init_carries_attention_weights(teacher_dir, teacher):
    student, report = convert_checkpoint(
        teacher_dir,
        "S,D,M,L",
        init="transfer",
        mixer_options={
            "D": {"num_heads": 4, "head_dim": 16, "expand_v": 2.0},
            "M": {"expand": 1, "headdim": 16, "ngroups": 4, "d_state": 16},
            "L": {"num_heads": 4, "head_dim": 16, "expand_v": 1.0},
        },
    )
    layers = teacher.model.language_model.layers
    gdn = student.language_model.layers[1].self_attn
    saved = gdn.state_dict()  # the projections under their own names (rows of the fused in_proj)
    attention = layers[1].self_attn
    assert torch.equal(saved["q_proj.weight"], attention.q_proj.weight)
    # 2 KV heads expanded to 4 heads: head h reads KV head h // 2
    k = attention.k_proj.weight.unflatten(0, (2, 16))
    assert torch.equal(saved["k_proj.weight"].unflatten(0, (4, 16))[3], k[1])
    assert torch.equal(saved["k_proj.weight"].unflatten(0, (4, 16))[1], k[0])
    # value heads tiled to head_v_dim 32 and the output projection halved: o(v) is preserved
    v = attention.v_proj.weight.unflatten(0, (2, 16)).repeat_interleave(2, 0)
    assert torch.equal(saved["v_proj.weight"].unflatten(0, (4, 32))[:, 16:], v)
    x = torch.randn(3, 64)
    expected = attention.o_proj(torch.nn.functional.linear(x, v.flatten(0, 1)))
    assert torch.allclose(gdn.o_proj(torch.nn.functional.linear(x, saved["v_proj.weight"])), expected, atol=1e-6)
    mamba = student.language_model.layers[2].self_attn
    rows = mamba.in_proj.weight
    assert torch.equal(rows[2 * 64 + 64 : 2 * 64 + 128], layers[2].self_attn.q_proj.weight)  # C <- Q
    assert "language_model.layers.1.self_attn.q_proj.weight" in report.transferred
    assert "language_model.layers.1.self_attn.q_proj.bias" in report.dropped


def test_transfer_init_rejects_mismatched_shapes(teacher_dir):
    with pytest.raises(ConversionError, match="transfer init into Mamba2 maps Q->C, K->B, V->x and needs ngroups=4"):
        convert_checkpoint(teacher_dir, "S,M,M,M", init="transfer", mixer_options={"M": {"d_state": 8, "headdim": 16}})


def test_conversion_errors_name_the_problem(teacher_dir, tmp_path):
    with pytest.raises(ConversionError, match="does not fit the teacher's 4 layers"):
        convert_checkpoint(teacher_dir, "S,D,D,D x2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(tmp_path / "missing", "A x4")
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match=r"model_type .llama.; HybridVLM loads 'hybridvl' .* 'qwen2_5_vl'"):
        convert_checkpoint(tmp_path / "llama", "A x4")
    with pytest.raises(ConversionError, match="init must be one of mimic, transfer"):
        convert_checkpoint(teacher_dir, "A x4", init="copy")


def test_save_load_round_trip_is_bit_exact_and_keeps_layout(teacher_dir, tmp_path, processor):
    student = convert(teacher_dir, "S,D,G,M")
    student.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layout"] == "S,D,G,M" and saved["model_type"] == "hybridvl"
    loaded = HybridVLM.from_pretrained(tmp_path).eval()
    assert loaded.kinds == ["S", "D", "G", "M"]
    for (name, a), b in zip(student.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    inputs = image_inputs(processor)
    with torch.no_grad():
        assert torch.equal(
            student(inputs["input_ids"], **hybrid_inputs(inputs)).logits,
            loaded(inputs["input_ids"], **hybrid_inputs(inputs)).logits,
        )


def test_loading_mismatched_weights_names_the_tensors(teacher_dir, tmp_path):
    student = convert(teacher_dir, "S,D,D,D")
    fields = {k: v for k, v in student.config.to_dict().items() if k != "model_type"}
    other = HybridVLM(HybridConfig(**{**fields, "layout": "S,D,A,D"}))
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights_strict(other, student.state_dict(), "test checkpoint")
    message = str(info.value)
    assert "missing" in message and "language_model.layers.2.self_attn.q_proj.bias" in message
    assert "unexpected" in message and "language_model.layers.2.self_attn.A_log" in message
    student.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["layout"] = "S,D,A,D"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"saved with the layout 'S,D,D,D'"):  # the weights' metadata
        HybridVLM.from_pretrained(tmp_path)


def test_convert_save_reload_generate(teacher_dir, tmp_path, processor):
    report = convert_directory(teacher_dir, tmp_path, "S,D,D,D")
    assert (tmp_path / "conversion_report.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    assert json.loads((tmp_path / "conversion_report.json").read_text())["layout"] == report.layout
    model = HybridVLM.from_pretrained(tmp_path).eval()
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    inputs = image_inputs(reloaded_processor)
    tokens = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6)
    prompt = inputs["input_ids"].shape[1]
    assert tokens.shape == (1, prompt + 6) and torch.equal(tokens[:, :prompt], inputs["input_ids"])
    text = reloaded_processor.batch_decode(tokens[:, prompt:])
    assert isinstance(text[0], str)


@pytest.fixture(scope="module")
def hybrid(teacher_dir):
    return convert(teacher_dir, "S,D,M,A", sliding_window=8)


@pytest.mark.parametrize(
    "bounds, problem",
    [([0, 4, 4, 6], "rise strictly"), ([0, 5], "sequence length 6"), ([[0, 6]], "1-D tensor"), ([0.0, 6.0], "int32")],
)
def test_the_model_checks_a_packing_where_it_enters(hybrid, bounds, problem):
    """The values of cu_seqlens are checked once by the model, eagerly (compiled blocks check only shape and
    dtype), with the same message a mixer gives."""
    with pytest.raises(ValueError, match=problem):
        hybrid(input_ids=torch.randint(0, 100, (1, 6)), cu_seqlens=torch.tensor(bounds))


def test_chunked_prefill_equals_one_prefill(hybrid, processor):
    inputs = image_inputs(processor)
    kwargs = dict(max_new_tokens=8, eos_token_id=[])
    one = generate(hybrid, inputs["input_ids"], **hybrid_inputs(inputs), **kwargs)
    for chunk in (1, 5, 16):
        assert torch.equal(
            generate(hybrid, inputs["input_ids"], **hybrid_inputs(inputs), prefill_chunk_size=chunk, **kwargs), one
        )


def _parallel_and_stepped_logits(model: HybridVLM, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``ids`` in one pass, and of the first 10 tokens then one token at a time from the state."""
    with torch.no_grad():
        parallel = model(ids).logits
        out = model(ids[:, :10])
        state, steps = out.state, [out.logits]
        for t in range(10, ids.shape[1]):
            out = model(ids[:, t : t + 1], state=state)
            state = out.state
            steps.append(out.logits)
    return parallel, torch.cat(steps, 1)


def test_token_by_token_logits_equal_parallel_forward(hybrid):
    parallel, stepped = _parallel_and_stepped_logits(hybrid, torch.randint(0, 400, (2, 30)))
    assert (stepped - parallel).abs().max() <= ATOL


def test_padded_generation_equals_separate_rows(hybrid):
    rows = [torch.randint(0, 400, (1, 9)), torch.randint(0, 400, (1, 14))]
    padded = torch.zeros(2, 14, dtype=torch.long)
    mask = torch.zeros(2, 14, dtype=torch.long)
    padded[0, 5:], mask[0, 5:] = rows[0][0], 1
    padded[1], mask[1] = rows[1][0], 1
    together = generate(hybrid, padded, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    for i, row in enumerate(rows):
        assert torch.equal(together[i], generate(hybrid, row, max_new_tokens=5, eos_token_id=[])[0])


def test_sampling_and_stop_tokens(hybrid):
    ids = torch.randint(0, 400, (2, 8))
    sampling = dict(do_sample=True, top_k=20, top_p=0.9, temperature=0.8, max_new_tokens=6, eos_token_id=[])
    a = generate(hybrid, ids, generator=torch.Generator().manual_seed(1), **sampling)
    b = generate(hybrid, ids, generator=torch.Generator().manual_seed(1), **sampling)
    assert torch.equal(a, b)
    greedy = generate(hybrid, ids, max_new_tokens=6, eos_token_id=[])
    stop = int(greedy[0, 2])
    stopped = generate(hybrid, ids, max_new_tokens=6, eos_token_id=stop, pad_token_id=0)
    first = int((stopped[0] == stop).nonzero()[0])
    assert torch.all(stopped[0, first + 1 :] == 0)


def test_state_is_constant_size_without_full_attention(teacher_dir):
    student = convert(teacher_dir, "S,D,M,L", sliding_window=64)
    sizes = {}
    with torch.no_grad():
        for length in (1024, 8192):  # both far past the window of 64
            state = student(torch.randint(0, 400, (1, length))).state
            sizes[length] = state.nbytes
    assert sizes[1024] == sizes[8192]
    with_attention = convert(teacher_dir, "S,D,M,A", sliding_window=64)
    with torch.no_grad():
        small = with_attention(torch.randint(0, 400, (1, 100))).state.nbytes
        large = with_attention(torch.randint(0, 400, (1, 1000))).state.nbytes
    assert large > small


def _no_mlp_model(layout: str = "S,L", intermediate_size: int = 0) -> HybridVLM:
    """Zoology's recall-model shape: two layers, the sequence mixer alone (``intermediate_size=0``; given a width,
    the same layers with MLPs)."""
    torch.manual_seed(0)
    config = HybridConfig(
        layout=layout,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=len(layout.split(",")),
        num_attention_heads=2,
        num_key_value_heads=1,
        mrope_section=None,
        sliding_window=8,
        mixer_options={"L": {"num_heads": 2, "head_dim": 32, **mixers.LinearAttention.TEXTBOOK}},
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return HybridVLM(config).eval()


@pytest.mark.parametrize("intermediate_size", [0, 96])
def test_a_layer_alone_gives_the_next_hidden_state(intermediate_size):
    """Given the hidden state before it, a layer's ``(x, update)`` summed by :func:`residual_stream` is the decoder's
    hidden state after it (what Stage I holds each layer to), with and without an MLP."""
    model = _no_mlp_model("S,L,S", intermediate_size)
    ids = torch.randint(1, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
        for i, layer in enumerate(model.language_model.layers):
            stream, update, _ = layer(hidden[i], None, None, None)
            assert torch.allclose(residual_stream(stream, update), hidden[i + 1], atol=1e-6)


def test_layers_without_mlp_are_the_mixer_alone():
    model = _no_mlp_model()
    names = list(model.state_dict())
    assert not any(".mlp." in n or ".post_attention_layernorm." in n for n in names)
    assert "language_model.layers.1.input_layernorm.weight" in names
    layer = model.language_model.layers[1]
    assert layer.mlp is None and layer.post_attention_layernorm is None
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        stream, update, _ = layer(x, None, None, None)
        assert torch.equal(stream, x) and torch.equal(update, layer.self_attn(layer.input_layernorm(x))[0])
    with pytest.raises(
        ValueError, match=r"intermediate_size must be positive \(the MLP width\) or 0 \(no MLP\), got -1"
    ):
        HybridConfig(layout="D x2", num_hidden_layers=2, vocab_size=512, intermediate_size=-1, pad_token_id=0)


def test_model_without_mlp_continues_from_its_state_exactly():
    parallel, stepped = _parallel_and_stepped_logits(_no_mlp_model(), torch.randint(0, 512, (2, 30)))
    assert torch.isfinite(parallel).all()
    assert (stepped - parallel).abs().max() <= ATOL


def test_model_without_mlp_saves_and_loads(tmp_path):
    model = _no_mlp_model()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["intermediate_size"] == 0
    loaded = HybridVLM.from_pretrained(tmp_path).eval()
    assert loaded.language_model.layers[0].mlp is None
    assert loaded.language_model.layers[1].self_attn.normalize  # the textbook options came back
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def _infinitevl_checkpoint(student: HybridVLM, directory, layer_types: list[str]) -> None:
    """Write ``student`` in the public InfiniteVL format: legacy Qwen names, InfiniteVL config fields."""
    from safetensors.torch import save_file

    config = student.config
    tensors = {}
    for name, tensor in student.state_dict().items():
        if name == "lm_head.weight":
            continue
        legacy = "model." + name[len("language_model.") :] if name.startswith("language_model.") else name
        tensors[legacy] = tensor.contiguous()
    directory.mkdir(exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    gdn = config.mixer_options["D"]
    (directory / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["InfiniteVLQwen2_5_VLForConditionalGeneration"],
                "model_type": "infinite_vl",
                "hidden_size": config.hidden_size,
                "intermediate_size": config.intermediate_size,
                "num_hidden_layers": config.num_hidden_layers,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads,
                "rms_norm_eps": config.rms_norm_eps,
                "vocab_size": config.vocab_size,
                "tie_word_embeddings": True,
                "rope_theta": config.rope_theta,
                "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": config.mrope_section},
                "sliding_window": config.sliding_window,
                "use_sliding_window": True,
                "layer_types": layer_types,
                "num_linear_heads": gdn["num_heads"],
                "num_linear_key_value_heads": gdn["num_heads"],
                "linear_head_dim": gdn["head_dim"],
                "expand_v": gdn["expand_v"],
                "conv_size": 4,
                "use_gate": True,
                "use_short_conv": True,
                "norm_eps": 1e-6,
                "mode": "chunk",
                "vision_config": {**config.vision_config, "model_type": "infinite_vl"},
                "image_token_id": config.image_token_id,
                "video_token_id": config.video_token_id,
                "vision_start_token_id": config.vision_start_token_id,
                "vision_end_token_id": config.vision_end_token_id,
                "bos_token_id": config.bos_token_id,
                "eos_token_id": config.eos_token_id,
            }
        )
    )


@pytest.mark.parametrize("declared", ["right", "all_full_attention"])
def test_loads_infinitevl_format(teacher_dir, tmp_path, processor, declared, caplog):
    student = convert(teacher_dir, "S,D,D,D")
    layer_types = ["sliding_attention"] + ["linear_attention"] * 3 if declared == "right" else ["full_attention"] * 4
    _infinitevl_checkpoint(student, tmp_path / "ivl", layer_types)
    with caplog.at_level("WARNING", logger="hybridvl.models"):
        loaded = HybridVLM.from_pretrained(tmp_path / "ivl").eval()
    # the layout comes from the weights even where the config lost it
    assert loaded.kinds[1:] == ["D", "D", "D"]
    warnings = [r for r in caplog.records if "using the weights" in r.getMessage()]
    assert len(warnings) == (3 if declared == "all_full_attention" else 0)
    inputs = image_inputs(processor)
    with torch.no_grad():  # layer 0 may load as A when the config lost the layout: same as S below the window
        expected = student(inputs["input_ids"], **hybrid_inputs(inputs)).logits
        assert torch.equal(loaded(inputs["input_ids"], **hybrid_inputs(inputs)).logits, expected)


def test_config_rejects_special_tokens_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"pad_token_id=600 lies outside the vocabulary \(vocab_size 512\)"):
        HybridConfig(
            layout="D x2", num_hidden_layers=2, vocab_size=512, bos_token_id=None, eos_token_id=1, pad_token_id=600
        )
    with pytest.raises(ValueError, match=r"eos_token_id=\[1, 512\]"):
        HybridConfig(
            layout="D x2", num_hidden_layers=2, vocab_size=512, bos_token_id=None, eos_token_id=[1, 512], pad_token_id=0
        )
    # a text-only model ignores the vision placeholders; a vision model checks them
    text_only = dict(
        layout="D x2", num_hidden_layers=2, vocab_size=512, bos_token_id=None, eos_token_id=1, pad_token_id=0
    )
    HybridConfig(**text_only)
    with pytest.raises(ValueError, match="image_token_id=151655"):
        HybridConfig(**text_only, vision_config={"depth": 1})
