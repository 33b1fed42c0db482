"""The vision tower over packed batches: one attention call per chunk length, equal to transformers' tower."""

from __future__ import annotations

import pytest
import torch

TOWER = dict(
    depth=2,
    hidden_size=32,
    num_heads=2,
    intermediate_size=64,
    out_hidden_size=48,
    window_size=112,
    fullatt_block_indexes=[1],
)
# images of one and several 8x8-patch windows, a video of 3 frame pairs, and an image again (two chunk lengths
# interleaved with others, so stacking by length has to restore the packing order)
GRIDS = [(1, 6, 6), (1, 12, 20), (3, 8, 4), (1, 6, 6), (1, 4, 10)]


def _towers() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours and transformers' plain SDPA tower, with the same weights."""
    from hybridvl.models.tiny_qwen import init_tiny_vision_tower
    from hybridvl.vision.tower import build_vision_tower

    torch.manual_seed(0)
    ours = build_vision_tower(TOWER)
    init_tiny_vision_tower(ours)
    plain = build_vision_tower(TOWER)
    plain.load_state_dict(ours.state_dict())
    plain.config._attn_implementation = "sdpa"
    return ours, plain


def _run(tower: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor, **tables) -> tuple[torch.Tensor, dict]:
    tower.zero_grad()
    out = tower(pixels, grid_thw=grid, **tables).pooler_output
    (out * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in tower.named_parameters()}


def test_packed_tower_equals_transformers_tower_with_one_attention_call_per_chunk_length(monkeypatch):
    from hybridvl.vision.tower import vision_inputs

    ours, plain = _towers()
    grid = torch.tensor(GRIDS)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    expected, expected_grads = _run(plain, pixels, grid)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k)
    )
    actual, grads = _run(ours, pixels, grid, **vision_inputs(ours, grid, "cpu"))
    torch.testing.assert_close(actual, expected)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
    tables = vision_inputs(ours, grid, "cpu")
    lengths = [{int(n) for n in (tables[key][1:] - tables[key][:-1])} for key in ("cu_window_seqlens", "cu_seqlens")]
    assert len(lengths[0]) > 1 and len(lengths[1]) > 1  # the batch does have chunks of several lengths
    assert len(calls) == len(lengths[0]) + len(lengths[1])  # window block, then full-attention block
    assert sum(shape[0] for shape in calls) == len(tables["cu_window_seqlens"]) - 1 + len(tables["cu_seqlens"]) - 1


def test_packed_vision_attention_refuses_what_it_does_not_compute():
    from hybridvl.vision.tower import packed_vision_attention, vision_inputs

    q = torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 6])
    for options, message in (
        ({"attention_mask": torch.ones(1, 1, 6, 6, dtype=torch.bool)}, "without a mask"),
        ({"attention_mask": None, "is_causal": True}, "is_causal=True"),
        ({"attention_mask": None, "dropout": 0.1}, "dropout=0.1"),
        ({"attention_mask": None, "cu_seq_lens_k": torch.tensor([0, 3, 6])}, "same chunks"),
    ):
        with pytest.raises(ValueError, match=message):
            packed_vision_attention(None, q, q, q, cu_seq_lens_q=cu, **options)
    ours, _ = _towers()
    with pytest.raises(ValueError, match="grid_thw on the CPU"):
        vision_inputs(ours, torch.tensor(GRIDS, device="meta"), "cpu")


@pytest.mark.gpu
def test_packed_tower_equals_transformers_tower_on_cuda():
    from hybridvl.vision.tower import vision_inputs

    ours, plain = (tower.cuda() for tower in _towers())
    grid = torch.tensor(GRIDS)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 14 * 14, device="cuda")
    expected, expected_grads = _run(plain, pixels, grid.cuda())
    actual, grads = _run(ours, pixels, grid.cuda(), **vision_inputs(ours, grid, "cuda"))
    torch.testing.assert_close(actual, expected)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)
