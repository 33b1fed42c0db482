"""CUDA-graph decoding and frame prefill against the eager model and the one-pass parallel forward.

Tiny float32 models on CUDA with a short sliding window, so the ring buffers wrap many times. Graph replay runs
the eager step's kernels, so it must match the eager path to float32 rounding; the one-pass forward uses the
chunked kernels, so it matches to a looser bound. Most of the suite's time is Triton compiling fla's kernels
for these shapes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err

from hybridvl.models.config import HybridConfig
from hybridvl.models.cuda_graphs import GraphedDecoder, GraphedFramePrefill
from hybridvl.models.generation import generate
from hybridvl.models.hybrid import HybridVLM
from hybridvl.models.sampling import sample_next_token
from hybridvl.models.tiny_qwen import init_tiny_vision_tower

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _attention_without_tilelang(monkeypatch):
    """With tilelang installed, fla runs parallel attention through it on Hopper, and its compile failed for
    these float32 head_dim-32 shapes ("Layout infer conflict"). These tests only run forward passes, which need
    no tilelang kernel."""
    monkeypatch.setenv("FLA_TILELANG", "0")


WINDOW = 16
VISION = dict(
    depth=2,
    hidden_size=32,
    num_heads=2,
    intermediate_size=64,
    out_hidden_size=64,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
    tokens_per_second=2,
    in_channels=3,
)


def tiny_model(layout: str, vision: bool = False) -> HybridVLM:
    torch.manual_seed(0)
    config = HybridConfig(
        layout=layout,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(layout.split(",")),
        num_attention_heads=2,
        num_key_value_heads=1,
        mrope_section=[8, 4, 4],
        sliding_window=WINDOW,
        mixer_options={
            "D": {"num_heads": 2, "head_dim": 32},
            "L": {"num_heads": 2, "head_dim": 32},
            "G": {"num_heads": 2},
            "M": {"d_state": 16, "headdim": 16},
        },
        vision_config=VISION if vision else None,
        image_token_id=500,
        video_token_id=501,
        vision_start_token_id=502,
        vision_end_token_id=503,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = HybridVLM(config)
    if vision:
        init_tiny_vision_tower(model.visual)
    return model.to("cuda").eval()


@torch.no_grad()
def test_graph_decoding_equals_eager_through_window_wraparound():
    model = tiny_model("S,D,A,L,M")  # every kind but G in one model: fewer kernels to compile
    prompt = torch.randint(0, 500, (2, 11), device="cuda")
    out = model(prompt, logits_to_keep=1)
    steps = 8 * WINDOW
    decoder = GraphedDecoder(model, batch_size=2, max_context=prompt.shape[1] + steps)
    decoder.load(out.state)
    eager_state = out.state
    tokens = torch.randint(0, 500, (steps, 2), device="cuda")
    for token in tokens:
        graph_logits = decoder.step(token).clone()
        eager = model(token[:, None], state=eager_state, logits_to_keep=1)
        eager_state = eager.state
        assert rel_err(graph_logits, eager.logits[:, -1]) < 1e-5
    # and both equal the one-pass forward over prompt + tokens
    full = model(torch.cat([prompt, tokens.T], 1))
    assert rel_err(graph_logits, full.logits[:, -1]) < 5e-3  # chunked kernels (tf32 dots) vs the token loop
    # generation through the graph gives the eager tokens
    prompt = torch.randint(0, 500, (2, 5), device="cuda")
    assert torch.equal(
        generate(model, prompt, max_new_tokens=20, decoder=decoder), generate(model, prompt, max_new_tokens=20)
    )


@pytest.mark.parametrize("sampling", [{}, dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)])
@torch.no_grad()
def test_graph_picks_the_next_token_as_eager_over_1000_steps(sampling):
    """With next_token=True the LM head and the choice of the token run inside the graph: over 1,000 steps (the
    ring buffers wrap 60 times) the graph picks the tokens eager decoding picks from its logits with a generator
    seeded alike, and generate through the graph gives eager generate's tokens."""
    model = tiny_model("S,D,A")
    prompt = torch.randint(0, 500, (2, 11), device="cuda")
    steps = 1000
    generator = torch.Generator("cuda") if sampling else None
    decoder = GraphedDecoder(
        model, batch_size=2, max_context=prompt.shape[1] + steps + 64, next_token=True, generator=generator, **sampling
    )
    eager_generator = torch.Generator("cuda").manual_seed(5) if sampling else None
    if sampling:
        generator.manual_seed(5)  # the capture's warm-up drew from it
    out = model(prompt, logits_to_keep=1)
    decoder.load(out.state)
    state, token = out.state, prompt[:, -1]
    for step in range(steps):
        picked = decoder.step(token).clone()
        eager = model(token[:, None], state=state, logits_to_keep=1)
        state = eager.state
        assert torch.equal(picked, sample_next_token(eager.logits[:, -1], **sampling, generator=eager_generator)), step
        token = picked
    prompt = torch.randint(0, 500, (2, 5), device="cuda")
    if sampling:
        generator.manual_seed(9)
        eager_generator.manual_seed(9)
    graphed = generate(model, prompt, max_new_tokens=20, decoder=decoder, **sampling)
    assert torch.equal(graphed, generate(model, prompt, max_new_tokens=20, generator=eager_generator, **sampling))


@torch.no_grad()
def test_graph_next_token_checks_its_options():
    model = tiny_model("S,D")
    with pytest.raises(ValueError, match="generator goes with next_token=True and do_sample=True"):
        GraphedDecoder(model, generator=torch.Generator("cuda"))
    with pytest.raises(ValueError, match="top_p must lie"):
        GraphedDecoder(model, next_token=True, do_sample=True, top_p=1.5)
    greedy = GraphedDecoder(model, next_token=True)
    assert greedy.next_token and not GraphedDecoder(model).next_token
    with pytest.raises(ValueError, match="picks tokens with"):
        generate(model, torch.randint(0, 500, (1, 5), device="cuda"), do_sample=True, decoder=greedy)


@torch.no_grad()
def test_graph_decoding_refuses_a_full_attention_cache_beyond_its_reservation():
    model = tiny_model("S,D,A,D")
    with pytest.raises(ValueError, match="max_context"):
        GraphedDecoder(model)
    decoder = GraphedDecoder(model, max_context=4)
    decoder.load(model(torch.randint(0, 500, (1, 4), device="cuda")).state)
    with pytest.raises(ValueError, match="reserved max_context=4"):
        decoder.step(torch.tensor([1], device="cuda"))


def frame_tokens(model: HybridVLM, features: int) -> torch.Tensor:
    config = model.config
    return torch.tensor(
        [[config.vision_start_token_id, *[config.image_token_id] * features, config.vision_end_token_id]],
        device="cuda",
    )


@torch.no_grad()
def test_graph_frame_prefill_equals_eager_and_one_pass_over_1000_frames():
    model = tiny_model("S,D,D,D", vision=True)
    grid = (1, 4, 4)  # 56x56 frames: 16 patches, 4 merged features, 6 tokens per frame
    patches = grid[0] * grid[1] * grid[2]
    patch_dim = 3 * 2 * 14 * 14
    frames = 1000
    pixels = torch.randn(frames, patches, patch_dim, device="cuda")
    graph = GraphedFramePrefill(model, grid)
    ids = frame_tokens(model, graph.num_features)
    grid_thw = torch.tensor([grid], device="cuda")
    # eager from an empty state, as the graph: a call without state attends through the fla kernel (tf32 dots)
    eager_state = model.init_state(1, "cuda")
    state_bytes = None
    for n in range(frames):
        logits = graph.feed(pixels[n]).clone()
        eager = model(ids, pixel_values=pixels[n], image_grid_thw=grid_thw, state=eager_state, logits_to_keep=1)
        eager_state = eager.state
        if n % 50 == 0 or n == frames - 1:  # the graph's state and output follow the eager ones frame by frame
            assert rel_err(logits, eager.logits[:, -1]) < 1e-5
            assert torch.equal(graph.state.next_position, eager_state.next_position)
        state_bytes = state_bytes or graph.state.nbytes
        assert graph.state.nbytes == state_bytes
    one_pass = model(
        ids.repeat(1, frames),
        pixel_values=pixels.flatten(0, 1),
        image_grid_thw=grid_thw.repeat(frames, 1),
        logits_to_keep=1,
    )
    assert rel_err(logits, one_pass.logits[:, -1]) < 5e-3  # chunked kernels (tf32 dots) vs frame by frame
    assert torch.equal(graph.state.next_position, one_pass.state.next_position)


@torch.no_grad()
def test_graph_frame_prefill_with_windows_of_several_sizes():
    """224x168 frames: 16x12 patches in vision windows of 8x8 and 8x4 patches, alternating, whose attention
    gathers the windows of each size together; the graph captures that with the index tensors of its warm-up."""
    model = tiny_model("S,D", vision=True)
    grid = (1, 16, 12)
    graph = GraphedFramePrefill(model, grid)
    ids = frame_tokens(model, graph.num_features)
    pixels = torch.randn(3, 16 * 12, 3 * 2 * 14 * 14, device="cuda")
    state = model.init_state(1, "cuda")
    for frame in pixels:
        logits = graph.feed(frame).clone()
        eager = model(ids, pixel_values=frame, image_grid_thw=torch.tensor([grid], device="cuda"), state=state)
        state = eager.state
        assert rel_err(logits, eager.logits[:, -1]) < 1e-5


@torch.no_grad()
def test_graph_frame_prefill_checks_its_inputs():
    model = tiny_model("S,D", vision=True)
    with pytest.raises(ValueError, match="divisible by the merge size"):
        GraphedFramePrefill(model, (1, 3, 4))
    graph = GraphedFramePrefill(model, (1, 4, 4))
    with pytest.raises(ValueError, match="takes frames with patches"):
        graph.feed(torch.randn(4, 1176, device="cuda"))
    with pytest.raises(ValueError, match="vision tower"):
        GraphedFramePrefill(tiny_model("S,D"), (1, 4, 4))


@torch.no_grad()
def test_compiled_graphs_decode_and_prefill_frames_as_eager():
    """``compile=True``: the graphs capture the compiled forward (vision tower included) and follow eager decoding
    over 300 steps (the rings wrap) and eager frame prefill over 20 frames, to float32 rounding."""
    model = tiny_model("S,D,A,L,M")
    prompt = torch.randint(0, 500, (2, 11), device="cuda")
    out = model(prompt, logits_to_keep=1)
    decoder = GraphedDecoder(model, batch_size=2, max_context=prompt.shape[1] + 300, compile=True)
    assert decoder.compiled
    decoder.load(out.state)
    state = out.state
    for token in torch.randint(0, 500, (300, 2), device="cuda"):
        graph_logits = decoder.step(token).clone()
        eager = model(token[:, None], state=state, logits_to_keep=1)
        state = eager.state
        assert rel_err(graph_logits, eager.logits[:, -1]) < 1e-4
    model = tiny_model("S,D,D,D", vision=True)
    grid = (1, 4, 4)
    graph = GraphedFramePrefill(model, grid, compile=True)
    ids, state = frame_tokens(model, graph.num_features), model.init_state(1, "cuda")
    for frame in torch.randn(20, 16, 3 * 2 * 14 * 14, device="cuda"):
        logits = graph.feed(frame).clone()
        eager = model(ids, pixel_values=frame, image_grid_thw=torch.tensor([grid], device="cuda"), state=state)
        state = eager.state
        assert rel_err(logits, eager.logits[:, -1]) < 1e-4
