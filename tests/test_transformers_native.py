"""The model as a transformers model: Auto classes, ``model.generate`` over the fixed-size state (with
``generation_config.json``, streamers, stop strings, repetition penalty), the one loading entry (directories,
hub ids in the local cache, dtype, device_map) and sharded saving.

A tiny random Qwen2.5-VL is built once per module; every check runs in fp32 on CPU.
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch
from safetensors import safe_open
from test_models import hybrid_inputs, image_inputs, padded_inputs
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    PretrainedConfig,
    Qwen2_5_VLForConditionalGeneration,
    TextIteratorStreamer,
)

import hybridvl
from hybridvl.models.cache import HybridCache
from hybridvl.models.checkpoint import CheckpointReadError
from hybridvl.models.config import HybridConfig
from hybridvl.models.convert import convert_directory
from hybridvl.models.generation import generate
from hybridvl.models.hybrid import HybridVLM
from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl
from hybridvl.vision.tower import build_vision_tower


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen"), seed=0)


@pytest.fixture(scope="module")
def processor(teacher_dir):
    return AutoProcessor.from_pretrained(teacher_dir)


@pytest.fixture(scope="module")
def converted_dir(teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "student"
    convert_directory(teacher_dir, out, "S,D,M,A", sliding_window=8)
    return out


@pytest.fixture(scope="module")
def model(converted_dir):
    return HybridVLM.from_pretrained(converted_dir)


def new_tokens(tokens: torch.Tensor, inputs) -> torch.Tensor:
    return tokens[:, inputs["input_ids"].shape[1] :]


# --- Auto classes ------------------------------------------------------------------------------------


def test_auto_classes_load_a_converted_model(converted_dir, model):
    loaded = AutoModelForImageTextToText.from_pretrained(converted_dir)
    assert type(loaded) is HybridVLM and not loaded.training and loaded.kinds == ["S", "D", "M", "A"]
    assert type(AutoModel.from_pretrained(converted_dir)) is HybridVLM
    config = AutoConfig.from_pretrained(converted_dir)
    assert type(config) is HybridConfig and isinstance(config, PretrainedConfig)
    assert config.fields() == model.config.fields()
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert hybridvl.HybridVLM is HybridVLM


def test_generation_config_json_is_followed(converted_dir, processor, tmp_path):
    honoured = tmp_path / "honoured"
    shutil.copytree(converted_dir, honoured)
    settings = json.loads((converted_dir / "generation_config.json").read_text())
    settings.update(do_sample=False, repetition_penalty=1.3)
    (honoured / "generation_config.json").write_text(json.dumps(settings))
    inputs = image_inputs(processor)
    from_file = AutoModelForImageTextToText.from_pretrained(honoured).generate(**inputs, max_new_tokens=8)
    plain = AutoModelForImageTextToText.from_pretrained(converted_dir)
    explicit = plain.generate(**inputs, max_new_tokens=8, do_sample=False, repetition_penalty=1.3)
    assert torch.equal(from_file, explicit)
    assert not torch.equal(new_tokens(explicit, inputs), new_tokens(plain.generate(**inputs, max_new_tokens=8), inputs))


def test_a_config_saved_before_transformers_keys_loads(converted_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(converted_dir, old)
    saved = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({"model_type": "hybridvl", **HybridConfig(**saved).fields()}))
    assert AutoConfig.from_pretrained(old).fields() == HybridConfig.from_dict(saved).fields()
    assert HybridVLM.from_pretrained(old).kinds == ["S", "D", "M", "A"]


# --- generate ----------------------------------------------------------------------------------------


def test_greedy_generate_equals_our_decoding_loop(model, processor):
    text = processor(text=["a cat sat on the mat"], return_tensors="pt")
    for inputs in (text, image_inputs(processor)):
        ours = generate(model, inputs["input_ids"], **hybrid_inputs(inputs), max_new_tokens=8, eos_token_id=[])
        theirs = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert torch.equal(new_tokens(theirs, inputs), ours)
        assert len(set(ours[0].tolist())) > 1  # the check means something: not one token repeated


def test_greedy_generate_of_a_left_padded_batch_equals_our_decoding_loop(model, processor):
    inputs = padded_inputs(processor, "left")
    ours = generate(
        model,
        inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        **hybrid_inputs(inputs),
        max_new_tokens=6,
        eos_token_id=[],
    )
    theirs = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(new_tokens(theirs, inputs), ours)


def test_all_attention_model_generates_what_qwen2_5_vl_generates(teacher_dir, processor):
    teacher = Qwen2_5_VLForConditionalGeneration.from_pretrained(teacher_dir).eval()
    ours = HybridVLM.from_pretrained(teacher_dir)
    assert ours.kinds == ["A"] * 4
    inputs = image_inputs(processor)
    settings = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(ours.generate(**inputs, **settings), teacher.generate(**inputs, **settings))


def test_streamers_and_stop_strings(model, processor):
    inputs = image_inputs(processor)
    greedy = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8)
    tokenizer = processor.tokenizer
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = threading.Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=8, streamer=streamer))
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed == tokenizer.decode(new_tokens(greedy, inputs)[0])
    stop = tokenizer.decode(new_tokens(greedy, inputs)[0, 2])
    stopped = model.generate(**inputs, max_new_tokens=8, stop_strings=[stop], tokenizer=tokenizer)
    assert stopped.shape[1] < greedy.shape[1] and tokenizer.decode(stopped[0]).endswith(stop)


def test_sampling_repeats_with_the_seed_and_beam_search_runs(model, processor):
    inputs = image_inputs(processor)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(model.generate(**inputs, max_new_tokens=6, do_sample=True, top_k=20, temperature=1.5))
    assert torch.equal(*runs)
    beams = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False)
    assert beams.shape == (1, inputs["input_ids"].shape[1] + 4)


# --- the cache ---------------------------------------------------------------------------------------


def test_cache_continues_as_one_pass(model):
    ids = torch.randint(3, 400, (2, 12))
    with torch.no_grad():
        whole = model(ids).logits
        first = model(ids[:, :7])
        cache = first.cache
        assert isinstance(cache, HybridCache) and cache.get_seq_length() == 7 and first.state is cache.state
        rest = model(ids[:, 7:], past_key_values=cache)
        assert rest.cache is cache and cache.get_seq_length() == 12
        torch.testing.assert_close(rest.logits, whole[:, 7:], atol=1e-5, rtol=1e-5)
        assert model(ids, use_cache=False).cache is None
        logits, returned = model(ids[:, :3], return_dict=False)
        assert isinstance(returned, HybridCache) and logits.shape == (2, 3, model.config.vocab_size)
    with pytest.raises(TypeError, match="continues from a HybridCache"):
        model(ids, cache=object())
    with pytest.raises(NotImplementedError, match="cannot be rolled back"):
        cache.crop(3)


# --- loading -----------------------------------------------------------------------------------------


def test_hub_ids_load_from_the_local_cache_only(converted_dir, tmp_path):
    cache = tmp_path / "hub"
    snapshot = cache / "models--lab--tiny-hybrid" / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(converted_dir, snapshot)
    (cache / "models--lab--tiny-hybrid" / "refs").mkdir()
    (cache / "models--lab--tiny-hybrid" / "refs" / "main").write_text(snapshot.name)
    assert HybridVLM.from_pretrained("lab/tiny-hybrid", cache_dir=cache).kinds == ["S", "D", "M", "A"]
    missing = r"no model 'lab/absent' is in the local Hugging Face cache.*hf download"
    with pytest.raises(FileNotFoundError, match=missing):
        HybridVLM.from_pretrained("lab/absent", cache_dir=cache)


def test_dtype_and_device_map(converted_dir, tmp_path):
    half = HybridVLM.from_pretrained(converted_dir, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and half.device.type == "cpu"
    half.save_pretrained(tmp_path / "bf16")
    auto = HybridVLM.from_pretrained(tmp_path / "bf16", torch_dtype="auto", device_map={"": "cpu"})
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in HybridVLM.from_pretrained(tmp_path / "bf16").parameters()} == {torch.float32}
    with pytest.raises(ValueError, match="splits the model across devices"):
        HybridVLM.from_pretrained(converted_dir, device_map={"visual": "cpu", "language_model": "cuda:0"})
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        HybridVLM.from_pretrained(converted_dir, low_cpu_mem_usage=True)


def test_building_leaves_the_vision_tower_as_built(model):
    torch.manual_seed(5)
    tower = build_vision_tower(model.config.vision_config)
    torch.manual_seed(5)
    built = HybridVLM(model.config)
    for (name, a), b in zip(tower.state_dict().items(), built.visual.state_dict().values()):
        assert torch.equal(a, b), name
    assert built.lm_head.weight is built.language_model.embed_tokens.weight


# --- saving ------------------------------------------------------------------------------------------


def test_large_models_save_in_shards_that_load(model, processor, tmp_path):
    out = model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert index["metadata"]["layout"] == model.config.layout
    for name in shards:
        with safe_open(out / name, framework="pt") as handle:
            assert handle.metadata()["layout"] == model.config.layout
    loaded = HybridVLM.from_pretrained(out)
    inputs = image_inputs(processor)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    model.save_pretrained(out, overwrite=True)  # one file again: the index and the shards go
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointReadError, match=r"holds both model\.safetensors and the shard index"):
        HybridVLM.from_pretrained(out)
    with pytest.raises(ValueError, match="max_shard_size must be a positive"):
        model.save_pretrained(tmp_path / "bad", max_shard_size="lots")
