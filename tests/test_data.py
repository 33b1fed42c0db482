"""Training data: LLaVA / ShareGPT datasets, encoding with assistant-only labels, packing and batch sampling.

Media are rendered and encoded under a temporary directory, and the tokenizer, chat template and processor are
those of a tiny Qwen2.5-VL checkpoint built once for the module; nothing is downloaded.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from media import make_test_video, render_text_image
from torch.utils.data import DataLoader
from transformers.video_utils import VideoMetadata

from hybridvl.lit.data.conversations import ConversationDataset, DataError
from hybridvl.lit.data.encoding import IGNORE_INDEX, count_tokens, encode
from hybridvl.lit.data.packing import LengthGroupedBatchSampler, collate, greedy_pack, lengths, pack
from hybridvl.lit.data.types import Conversation
from hybridvl.lit.datamodule import CachedSamples, EncodedConversations, HybridDataModule
from hybridvl.models.chat import VISION_KEYS, load_processor
from hybridvl.models.tiny_qwen import make_tiny_qwen2_5_vl

VIDEO_SHAPE = (2, 3, 48, 64)  # 9 frames at 10 fps, sampled at 2 fps


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return load_processor(make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen"), seed=0))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    render_text_image("cat", size=(112, 84)).save(root / "cat.png")
    render_text_image("dog", size=(56, 84)).save(root / "dog.jpg")
    (root / "clips").mkdir()
    make_test_video(root / "clips" / "ball.mp4", 9, size=(64, 48), fps=10.0)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 16)
    return root


def write(directory: Path, records: list, name: str = "data.json") -> Path:
    """``records`` as a JSON array (``.json``) or JSON Lines (any other name; raw strings are written as lines)."""
    path = directory / name
    if name.endswith(".json"):
        path.write_text(json.dumps(records))
    else:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def llava(*turns: str, **fields) -> dict:
    """A LLaVA record whose turns alternate human / gpt."""
    conversation = [{"from": "human" if i % 2 == 0 else "gpt", "value": text} for i, text in enumerate(turns)]
    return {"conversations": conversation, **fields}


GOOD = llava("<image>\nWhat is this?", "A cat.", image="cat.png")
RECORDS = [
    GOOD,
    llava("<video>\nWhat moves?", "The ball.", "Where to?", "To the right.", video="clips/ball.mp4", task="video"),
    llava("Say hello.", "Hello, how can I help you today?", id="text-only"),
    llava("<image>\n<image>\nCompare them.", "The cat is larger.", images=["cat.png", "dog.jpg"]),
]


def test_json_and_jsonl_read_the_same_conversations(tmp_path, media):
    for name in ("data.json", "data.jsonl"):
        dataset = ConversationDataset(write(tmp_path, RECORDS, name), media)
        assert len(dataset) == 4 and dataset.num_skipped == 0
        image, video, text, pair = (dataset[i] for i in range(4))

        question = [{"type": "image", "image": image.images[0]}, {"type": "text", "text": "What is this?"}]
        assert image.messages == [
            {"role": "user", "content": question},
            {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        ]
        assert image.images[0].size == (112, 84) and image.images[0].mode == "RGB"
        assert (image.task, image.answer, image.source) == ("conversation", "A cat.", f"{name}:0")

        [(frames, fps)] = video.videos
        assert frames.dtype == torch.uint8 and tuple(frames.shape) == VIDEO_SHAPE and fps == 2.0
        assert [m["role"] for m in video.messages] == ["user", "assistant", "user", "assistant"]
        assert (video.task, video.answer, video.source) == ("video", "To the right.", f"{name}:1")

        assert text.messages[0]["content"] == [{"type": "text", "text": "Say hello."}] and not text.images
        assert [im.size for im in pair.images] == [(112, 84), (56, 84)]


def test_placeholders_take_the_listed_media_in_order(tmp_path, media):
    record = llava(
        "First <image>, then <video> and <image>.",
        "Done.",
        image=["dog.jpg", "cat.png"],
        video="clips/ball.mp4",
    )
    [conversation] = ConversationDataset(write(tmp_path, [record]), media)
    content = conversation.messages[0]["content"]
    assert [item["type"] for item in content] == ["text", "image", "text", "video", "text", "image", "text"]
    assert [item["text"] for item in content if item["type"] == "text"] == ["First ", ", then ", " and ", "."]
    assert [im.size for im in conversation.images] == [(56, 84), (112, 84)]


def test_sharegpt_messages_and_max_video_frames(tmp_path, media):
    record = {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "<video>What moves?"},
            {"role": "assistant", "content": "A ball."},
        ],
        "videos": ["clips/ball.mp4"],
    }
    [conversation] = ConversationDataset(write(tmp_path, [record], "chat.jsonl"), media, max_video_frames=1)
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant"]
    assert conversation.messages[0]["content"] == [{"type": "text", "text": "Answer briefly."}]
    assert conversation.videos[0][0].shape[0] == 1 and conversation.answer == "A ball."


BAD_RECORDS = {
    "no conversations": ({"image": "cat.png"}, "no 'conversations'"),
    "unknown role": (
        {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "hi"}]},
        "unknown role 'robot'",
    ),
    "too few files": (llava("<image> <image> Compare.", "Same.", image="cat.png"), "2 <image> placeholder(s)"),
    "file without placeholder": (llava("What is this?", "A cat.", image="cat.png"), "0 <image> placeholder(s)"),
    "video count": (llava("<video> and <video>?", "Balls.", video="clips/ball.mp4"), "2 <video> placeholder(s)"),
    "ends with user": (llava("Hi.", "Hello.", "Bye."), "last turn is not the assistant's"),
    "both image keys": (llava("<image>?", "A cat.", image="cat.png", images=["cat.png"]), "both 'image'"),
    "not an object": (["human", "hi"], "not a JSON object"),
}


@pytest.mark.parametrize("name", ["data.json", "data.jsonl"])
@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_records_raise_with_file_and_record(tmp_path, media, name, case):
    record, problem = BAD_RECORDS[case]
    with pytest.raises(DataError, match="record 1") as error:
        ConversationDataset(write(tmp_path, [GOOD, record], name), media)
    assert name in str(error.value) and problem in str(error.value)


BAD_MEDIA = {
    "missing image": (llava("<image>?", "A cat.", image="nowhere.png"), "nowhere.png: no such file"),
    "corrupt image": (llava("<image>?", "A cat.", image="broken.png"), "broken.png: not a readable image"),
    "missing video": (llava("<video>?", "A ball.", video="gone.mp4"), "gone.mp4: no such file"),
    "corrupt video": (llava("<video>?", "A ball.", video="broken.mp4"), "broken.mp4: "),
}


@pytest.mark.parametrize("case", BAD_MEDIA)
def test_bad_media_raise_when_loaded_with_file_record_and_media(tmp_path, media, case):
    record, problem = BAD_MEDIA[case]
    dataset = ConversationDataset(write(tmp_path, [GOOD, record], "data.jsonl"), media)
    with pytest.raises(DataError, match=r"data\.jsonl record 1 \(line 2\)") as error:
        dataset[1]
    assert problem in str(error.value)


def test_invalid_json_reports_the_line(tmp_path, media):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([GOOD], indent=1)[:-5] + "\n  }, oops\n]")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON: .* line \d+"):
        ConversationDataset(path, media)
    with pytest.raises(DataError, match=r"data\.jsonl record 1 \(line 3\): not valid JSON"):
        ConversationDataset(write(tmp_path, [GOOD, "", '{"conversations": [', GOOD], "data.jsonl"), media)
    with pytest.raises(DataError, match="no usable records"):
        ConversationDataset(write(tmp_path, [], "empty.jsonl"), media)
    (tmp_path / "lines.json").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD))  # JSON Lines named .json
    assert len(ConversationDataset(tmp_path / "lines.json", media)) == 2


def test_skip_mode_counts_logs_and_replaces_deterministically(tmp_path, media, caplog):
    records = [
        GOOD,  # record 0
        BAD_RECORDS["unknown role"][0],  # record 1: bad at construction
        "{not json",  # record 2: bad at construction
        BAD_MEDIA["missing image"][0],  # record 3: bad when loaded
        llava("Say hello.", "Hello."),  # record 4
    ]
    path = write(tmp_path, records, "mixed.jsonl")
    with caplog.at_level(logging.WARNING, logger="hybridvl.data"):
        dataset = ConversationDataset(path, media, on_error="skip")
    assert len(dataset) == 3 and dataset.num_skipped == 2
    assert "mixed.jsonl record 1 (line 2)" in caplog.text and "record 2 (line 3): not valid JSON" in caplog.text
    assert "skipped 2 bad record(s), kept 3" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hybridvl.data"):
        replaced = dataset[1]
    assert replaced.source == "mixed.jsonl:4" and dataset.num_skipped == 3
    assert "record 3 (line 4)" in caplog.text and "nowhere.png" in caplog.text and "next good record" in caplog.text
    assert dataset[1].source == "mixed.jsonl:4" and dataset.num_skipped == 3  # remembered, counted once
    assert [dataset[i].source for i in (0, 2)] == ["mixed.jsonl:0", "mixed.jsonl:4"]

    all_bad = ConversationDataset(write(tmp_path, [BAD_MEDIA["corrupt image"][0]], "bad.json"), media, on_error="skip")
    with pytest.raises(DataError, match="every record is bad"):
        all_bad[0]


def labelled_spans(sample) -> list[list[int]]:
    """The runs of consecutive labelled tokens (labels equal to the tokens there)."""
    labelled = (sample.labels != IGNORE_INDEX).tolist()
    assert torch.equal(sample.labels[sample.labels != IGNORE_INDEX], sample.input_ids[sample.labels != IGNORE_INDEX])
    spans, start = [], None
    for position, flag in enumerate([*labelled, False]):
        if flag and start is None:
            start = position
        elif not flag and start is not None:
            spans.append(sample.input_ids[start:position].tolist())
            start = None
    return spans


def multi_turn_conversation(directory: Path, media: Path) -> Conversation:
    record = llava(
        "<image>\nWhat is this?",
        "A cat.",
        "<video>\nAnd what moves here?",
        "The ball moves to the right.",
        "Thank you!",
        "You are welcome.",
        image="cat.png",
        video="clips/ball.mp4",
    )
    record["conversations"].insert(0, {"from": "system", "value": "Answer in one sentence."})
    return ConversationDataset(write(directory, [record], "multi.json"), media)[0]


def test_labels_are_exactly_the_assistant_replies(tmp_path, processor, media):
    conversation = multi_turn_conversation(tmp_path, media)
    sample = encode(conversation, processor)
    tokenizer = processor.tokenizer
    replies = ["A cat.", "The ball moves to the right.", "You are welcome."]
    assert [tokenizer.decode(span) for span in labelled_spans(sample)] == [f"{r}<|im_end|>" for r in replies]
    pad_ids = tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>"])
    pads = torch.isin(sample.input_ids, torch.tensor(pad_ids))
    assert pads.sum() > 0 and (sample.labels[pads] == IGNORE_INDEX).all()
    text = tokenizer.decode(sample.input_ids)
    assert text.startswith("<|im_start|>system\nAnswer in one sentence.<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    assert (sample.task, sample.answer, sample.source) == ("conversation", "You are welcome.", conversation.source)


def test_default_system_prompt_is_not_labelled(tmp_path, processor, media):
    sample = encode(ConversationDataset(write(tmp_path, RECORDS), media)[2], processor)
    assert processor.tokenizer.decode(sample.input_ids).startswith("<|im_start|>system\nYou are a helpful assistant.")
    [reply] = labelled_spans(sample)
    assert processor.tokenizer.decode(reply) == "Hello, how can I help you today?<|im_end|>"


def test_encoding_matches_the_chat_template_and_prompt_length(tmp_path, processor, media):
    conversation = multi_turn_conversation(tmp_path, media)
    sample = encode(conversation, processor)
    [(frames, fps)] = conversation.videos
    metadata = [VideoMetadata(total_num_frames=len(frames), fps=fps)]
    kwargs = dict(
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"video_metadata": metadata, "do_sample_frames": False},
    )
    full = processor.apply_chat_template(conversation.messages, **kwargs)
    assert torch.equal(sample.input_ids, full["input_ids"][0])
    assert sample.vision.keys() == set(VISION_KEYS)
    for key, value in sample.vision.items():
        assert torch.equal(value, full[key]), key
    assert sample.vision["second_per_grid_ts"].tolist() == [1.0]  # temporal patch of 2 frames at 2 fps

    prompt = processor.apply_chat_template(conversation.messages[:-1], add_generation_prompt=True, **kwargs)
    assert sample.prompt_length == prompt["input_ids"].shape[1]
    assert torch.equal(sample.input_ids[: sample.prompt_length], prompt["input_ids"][0])


def test_lengths_without_decoding_equal_encoded_lengths(tmp_path, processor, media):
    dataset = ConversationDataset(write(tmp_path, RECORDS), media)
    encoded = [len(encode(conversation, processor)) for conversation in dataset]
    assert lengths(dataset, processor) == encoded
    assert [count_tokens(conversation, processor) for conversation in dataset] == encoded
    assert dataset.outline(1).messages[0]["content"][0] == {"type": "video", "video_shape": (2, 48, 64), "fps": 2.0}


def test_count_tokens_follows_the_per_frame_pixel_cap(processor):
    frames = torch.randint(0, 256, (4, 3, 168, 224), dtype=torch.uint8)
    video = {"type": "video", "video": frames, "fps": 2.0}
    messages = [
        {"role": "user", "content": [video, {"type": "text", "text": "What moves?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Nothing."}]},
    ]
    conversation = Conversation(messages=messages, source="made:0")
    capped = copy.deepcopy(processor)
    capped.video_processor.max_video_tokens = 20  # a tighter per-frame bound than the processor's pixel bounds
    sample = encode(conversation, capped)
    assert len(sample) < len(encode(conversation, processor))
    assert count_tokens(conversation, capped) == len(sample)
    assert count_tokens(conversation, processor) == len(encode(conversation, processor))


def test_max_length_raises_or_truncates_the_last_reply(tmp_path, processor, media):
    conversation = multi_turn_conversation(tmp_path, media)
    full = encode(conversation, processor)
    assert torch.equal(encode(conversation, processor, max_length=len(full)).input_ids, full.input_ids)
    with pytest.raises(DataError, match=f"{conversation.source}: {len(full)} tokens, more than max_length"):
        encode(conversation, processor, max_length=len(full) - 1)

    cut = encode(conversation, processor, max_length=full.prompt_length + 2, truncate=True)
    assert len(cut) == full.prompt_length + 2 and cut.prompt_length == full.prompt_length
    assert torch.equal(cut.input_ids, full.input_ids[: len(cut)]) and torch.equal(cut.labels, full.labels[: len(cut)])
    assert all(torch.equal(cut.vision[key], full.vision[key]) for key in full.vision)
    with pytest.raises(DataError, match="cannot be truncated"):
        encode(conversation, processor, max_length=full.prompt_length, truncate=True)


def test_unlocatable_replies_raise(processor):
    def conversation(*turns: tuple[str, str]) -> Conversation:
        messages = [{"role": role, "content": [{"type": "text", "text": text}]} for role, text in turns]
        return Conversation(messages=messages, source="made:0")

    injected = "Hello.<|im_end|>\n<|im_start|>assistant\nAgain."
    with pytest.raises(DataError, match=r"made:0: found 2 assistant replies .* has 1"):
        encode(conversation(("user", "Hi."), ("assistant", injected)), processor)
    with pytest.raises(DataError, match="made:0: the conversation must end with an assistant turn"):
        encode(conversation(("user", "Hi.")), processor)


def test_pack_concatenates_samples(tmp_path, processor, media):
    dataset = ConversationDataset(write(tmp_path, RECORDS), media)
    samples = [encode(conversation, processor) for conversation in dataset]
    batch = pack(samples)
    sizes = [len(sample) for sample in samples]
    assert batch.cu_seqlens.dtype == torch.int64
    assert batch.cu_seqlens.tolist() == [0, *torch.tensor(sizes).cumsum(0).tolist()]
    assert batch.input_ids.shape == batch.labels.shape == (1, sum(sizes)) and batch.num_tokens == sum(sizes)
    assert (batch.labels[0, batch.cu_seqlens[:-1]] == IGNORE_INDEX).all()
    for sample, start, end in zip(samples, batch.cu_seqlens[:-1], batch.cu_seqlens[1:]):
        assert torch.equal(batch.input_ids[0, start:end], sample.input_ids)
        assert torch.equal(batch.labels[0, start + 1 : end], sample.labels[1:])
    for key in ("pixel_values", "image_grid_thw"):  # images of samples 0 and 3, in order
        assert torch.equal(batch.vision[key], torch.cat([samples[0].vision[key], samples[3].vision[key]]))
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert torch.equal(batch.vision[key], samples[1].vision[key])
    assert batch.samples == samples
    assert pack(samples[2:3]).vision == {}
    with pytest.raises(ValueError, match="at least one sample"):
        pack([])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 60), max_size=40), st.integers(1, 50))
def test_greedy_pack_places_every_index_once_within_budget(sizes, max_tokens):
    batches = greedy_pack(sizes, max_tokens)
    assert [index for batch in batches for index in batch] == list(range(len(sizes)))
    for batch in batches:
        assert batch and (sum(sizes[i] for i in batch) <= max_tokens or len(batch) == 1)
    for batch, following in itertools.pairwise(batches):  # next-fit: a batch closes only when the next does not fit
        assert sum(sizes[i] for i in batch) + sizes[following[0]] > max_tokens


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=60), st.integers(1, 80), st.integers(0, 3))
def test_sampler_epochs_cover_every_index_once_within_budget(sizes, max_tokens, number):
    sampler = LengthGroupedBatchSampler(sizes, max_tokens=max_tokens, seed=number, mega_batch_factor=2)
    batches = epoch(sampler, number)
    assert sorted(index for batch in batches for index in batch) == list(range(len(sizes)))
    assert all(sum(sizes[i] for i in batch) <= max_tokens or len(batch) == 1 for batch in batches)


def test_greedy_pack_warns_about_oversize_samples(caplog):
    with caplog.at_level(logging.WARNING, logger="hybridvl.data"):
        assert greedy_pack([3, 9, 2, 2], 5) == [[0], [1], [2, 3]]
    assert "1 sample(s) are longer than max_tokens 5" in caplog.text and "[1]" in caplog.text
    with pytest.raises(ValueError, match="at least 1"):
        greedy_pack([3, 0], 5)


SIZES = [int(n) for n in torch.randint(1, 400, (500,), generator=torch.Generator().manual_seed(0))] + [700]


def epoch(sampler: LengthGroupedBatchSampler, number: int) -> list[list[int]]:
    sampler.set_epoch(number)
    return list(sampler)


def test_sampler_is_deterministic_and_respects_max_tokens():
    sampler = LengthGroupedBatchSampler(SIZES, max_tokens=1024, seed=3, mega_batch_factor=8)
    first = epoch(sampler, 0)
    assert len(sampler) == len(first)
    assert first == epoch(LengthGroupedBatchSampler(SIZES, max_tokens=1024, seed=3, mega_batch_factor=8), 0)
    assert first == epoch(sampler, 0) and first != epoch(sampler, 1)
    assert first != epoch(LengthGroupedBatchSampler(SIZES, max_tokens=1024, seed=4, mega_batch_factor=8), 0)
    for batches in (first, epoch(sampler, 1)):
        assert sorted(i for batch in batches for i in batch) == list(range(len(SIZES)))
        assert all(sum(SIZES[i] for i in batch) <= 1024 or batch == [500] for batch in batches)
    # lengths are grouped: a batch spans a much narrower range than the whole data set
    spread = sum(max(SIZES[i] for i in b) - min(SIZES[i] for i in b) for b in first if len(b) > 1)
    assert spread / len(first) < 100
    ordered = epoch(LengthGroupedBatchSampler(SIZES, max_tokens=1024, shuffle=False), 0)
    assert ordered == epoch(LengthGroupedBatchSampler(SIZES, max_tokens=1024, shuffle=False), 5)


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_splits_batches_across_ranks(drop_last):
    def sampler(**kwargs) -> LengthGroupedBatchSampler:
        return LengthGroupedBatchSampler(SIZES, max_tokens=1024, seed=1, drop_last=drop_last, **kwargs)

    every = epoch(sampler(), 2)
    ranks = [epoch(sampler(num_replicas=2, rank=rank), 2) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(every) // 2 + (len(every) % 2 and not drop_last)
    assert [batch for pair in zip(*ranks) for batch in pair][: len(every) // 2 * 2] == every[: len(every) // 2 * 2]
    covered = [i for batches in ranks for batch in batches for i in batch]
    if drop_last:
        assert len(covered) == len(set(covered))  # disjoint
    else:
        assert set(covered) == set(range(len(SIZES)))


def test_sampler_resumes_mid_epoch_with_the_same_batches():
    def sampler() -> LengthGroupedBatchSampler:
        return LengthGroupedBatchSampler(SIZES, max_tokens=1024, seed=7, num_replicas=2, rank=1)

    uninterrupted = [epoch(sampler(), number) for number in range(3)]

    interrupted = sampler()
    interrupted.set_epoch(1)
    iterator = iter(interrupted)
    seen = [next(iterator) for _ in range(4)]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches_yielded": 4}

    resumed = sampler()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    resumed.set_epoch(1)  # a trainer sets the epoch it resumes; the position is kept
    assert seen + list(resumed) == uninterrupted[1]
    assert resumed.state_dict() == {"epoch": 1, "batches_yielded": len(uninterrupted[1])}
    assert epoch(resumed, 2) == uninterrupted[2]
    with pytest.raises(ValueError, match="out of range"):
        resumed.load_state_dict({"epoch": 0, "batches_yielded": len(uninterrupted[0]) + 1})


@pytest.mark.parametrize("num_workers, persistent", [(0, False), (2, False), (2, True)])
def test_sampler_resumes_mid_epoch_under_a_dataloader_with_workers(num_workers, persistent):
    """A DataLoader with workers starts its sampler twice before its first batch; the position must survive."""

    def sampler() -> LengthGroupedBatchSampler:
        return LengthGroupedBatchSampler(SIZES, max_tokens=1024, seed=7, num_replicas=2, rank=0)

    every = list(sampler())
    resumed = sampler()
    resumed.load_state_dict({"epoch": 0, "batches_yielded": 3})
    loader = DataLoader(
        range(len(SIZES)),
        batch_sampler=resumed,
        num_workers=num_workers,
        persistent_workers=persistent,
        collate_fn=list,
    )
    assert list(loader) == every[3:]


def test_dataloader_yields_packed_batches(tmp_path, processor, media):
    dataset = ConversationDataset(write(tmp_path, RECORDS), media)
    samples = [encode(conversation, processor) for conversation in dataset]
    budget = max(len(sample) for sample in samples) + 1
    sampler = LengthGroupedBatchSampler([len(sample) for sample in samples], max_tokens=budget, seed=0)
    batches = list(DataLoader(samples, batch_sampler=sampler, collate_fn=collate))
    assert len(batches) == len(sampler)
    assert sorted(sample.source for batch in batches for sample in batch.samples) == sorted(s.source for s in samples)
    assert all(batch.num_tokens <= budget for batch in batches)


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory) -> Path:
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_dir"), seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_cached_samples_equal_fresh_ones_and_are_encoded_once(processor_dir, tmp_path, monkeypatch, workers):
    spec = [{"type": "synthetic", "tasks": ["ocr", "video_memory"], "size_per_task": 3, "split": "train"}]
    monkeypatch.setattr(CachedSamples, "SHARD_SIZE", 4)  # two shards, one of them short

    def data(**options):
        return HybridDataModule(processor=str(processor_dir), train=spec, max_tokens=4096, **options)

    fresh, cached = data()._dataset("train"), data(cache_dir=str(tmp_path), num_workers=workers)._dataset("train")
    assert isinstance(cached, CachedSamples) and len(cached) == len(fresh) == 6
    assert cached.lengths() == fresh.lengths()
    for ours, theirs in zip(cached, fresh, strict=True):
        assert ours.input_ids.equal(theirs.input_ids) and ours.labels.equal(theirs.labels)
        assert (ours.prompt_length, ours.task, ours.answer, ours.source) == (
            theirs.prompt_length,
            theirs.task,
            theirs.answer,
            theirs.source,
        )
        assert ours.vision.keys() == theirs.vision.keys() and ours.vision  # images and videos
        assert all(ours.vision[key].equal(theirs.vision[key]) for key in ours.vision)
    # workers encoded the cache; its batches are collated in the training process
    assert data(cache_dir=str(tmp_path), num_workers=workers).train_dataloader().num_workers == 0

    def must_not_encode(self, index):
        raise AssertionError("a cached split was encoded again")

    monkeypatch.setattr(EncodedConversations, "__getitem__", must_not_encode)
    assert len(data(cache_dir=str(tmp_path))._dataset("train")) == 6  # read back, not encoded
    with pytest.raises(AssertionError, match="encoded again"):  # other settings: another folder
        data(cache_dir=str(tmp_path), seed=1)._dataset("train")
    (cache,) = [path for path in tmp_path.glob("train-*") if (path / "manifest.json").is_file()]
    _, second = sorted(cache.glob("shard-*.pt"))
    second.write_bytes(second.read_bytes()[:1000])  # a cut-off file
    with pytest.raises(RuntimeError, match=r"cannot be read .*delete it to encode again"):
        data(cache_dir=str(tmp_path))._dataset("train")
    second.unlink()  # a lost file
    with pytest.raises(RuntimeError, match=r"4 samples in 1 shards, where 6 samples in 2 shards were written"):
        data(cache_dir=str(tmp_path))._dataset("train")


USER_SOURCE = """
from torch.utils.data import Dataset

from hybridvl.lit.data.types import Conversation


class Greetings(Dataset):
    def __init__(self, count: int, word: str = "hello") -> None:
        self.count, self.word = count, word

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Conversation:
        messages = [{"role": "user", "content": [{"type": "text", "text": f"say {self.word} {index}"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": self.word}]}]
        return Conversation(messages=messages, task="greet", answer=self.word, source=f"greetings:{index}")


class NotConversations(Greetings):
    def __getitem__(self, index: int) -> dict:
        return {"text": "hi"}
"""


def test_a_users_dataset_class_is_a_source_by_its_import_path(tmp_path, monkeypatch):
    from hybridvl.lit.datamodule import build_source

    (tmp_path / "lab_sources_for_test.py").write_text(USER_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    dataset = build_source({"type": "lab_sources_for_test.Greetings", "count": 3, "word": "hi", "weight": 2})
    assert len(dataset) == 3 and dataset[1].answer == "hi"
    with pytest.raises(ValueError, match=r"unknown key 'wrd' .*did you mean 'word'"):
        build_source({"type": "lab_sources_for_test.Greetings", "count": 3, "wrd": "hi"})
    with pytest.raises(ValueError, match="needs 'count'"):
        build_source({"type": "lab_sources_for_test.Greetings"})
    with pytest.raises(
        TypeError, match=r"must yield hybridvl\.lit\.data\.types\.Conversation items, its first is a dict"
    ):
        build_source({"type": "lab_sources_for_test.NotConversations", "count": 1})
    with pytest.raises(ValueError, match="cannot import 'no_such_lab'"):
        build_source({"type": "no_such_lab.Data"})
    with pytest.raises(ValueError, match="has no 'Missing'"):
        build_source({"type": "lab_sources_for_test.Missing"})
    with pytest.raises(ValueError, match=r"is not a torch\.utils\.data\.Dataset class"):
        build_source({"type": "lab_sources_for_test.Conversation"})
    with pytest.raises(ValueError, match="unknown source type 'csv'; choose one of json, synthetic, or the import"):
        build_source({"type": "csv"})
