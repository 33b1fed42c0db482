"""Model FLOPs of a training batch (lit/flops.py), counted by hand on small models."""

from __future__ import annotations

import pytest
import torch

from hybridvl.lit import flops
from hybridvl.lit.data.types import PackedBatch, Sample
from hybridvl.models.config import HybridConfig
from hybridvl.models.hybrid import HybridVLM

WIDTH, HEADS, HEAD_DIM, MLP, VOCAB = 32, 4, 8, 64, 100


def model(layout: str, window: int = 3) -> HybridVLM:
    config = HybridConfig(
        layout=layout,
        num_hidden_layers=len(layout.split(",")),
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        sliding_window=window,
        mrope_section=None,
        vision_config=None,
        tie_word_embeddings=False,
        mixer_options={"D": {"num_heads": 2, "head_dim": 8}},
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return HybridVLM(config)


def batch(lengths: list[int]) -> PackedBatch:
    samples = [Sample(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.long), 1) for n in lengths]
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return PackedBatch(
        torch.zeros(1, total, dtype=torch.long), torch.zeros(1, total, dtype=torch.long), cu, {}, samples
    )


def test_causal_keys_counts_each_querys_visible_keys():
    assert flops.causal_keys([4], None) == 1 + 2 + 3 + 4
    assert flops.causal_keys([4], 2) == 1 + 2 + 2 + 2
    assert flops.causal_keys([4, 1], 8) == 10 + 1
    assert flops.causal_keys([3], 3) == flops.causal_keys([3], None)


def test_an_attention_layer_counts_its_weights_and_its_score_and_value_products():
    net = model("A")
    lengths = [5, 3]
    counted = flops.forward_flops(flops.model_shape(net), lengths)
    layer = net.language_model.layers[0]
    weights = sum(p.numel() for p in layer.parameters() if p.ndim == 2)  # q, k, v, o and the MLP's three matrices
    q, kv = HEADS * HEAD_DIM, 2 * HEAD_DIM
    assert weights == WIDTH * (q + 2 * kv) + q * WIDTH + 3 * WIDTH * MLP
    pairs = (5 * 6 // 2) + (3 * 4 // 2)
    assert counted.layers[0] == 2 * weights * 8 + 4 * pairs * HEADS * HEAD_DIM
    assert counted.head == 2 * WIDTH * VOCAB * 8 and counted.vision == 0


def test_a_window_limits_the_products_and_a_recurrent_layer_counts_only_its_weights():
    shape = flops.model_shape(model("S,D", window=3))
    counted = flops.forward_flops(shape, [6])
    sliding, recurrent = shape.layers
    assert sliding.attention == (HEADS, HEAD_DIM, 3) and recurrent.attention is None
    assert counted.layers[0] == 2 * sliding.matrix_parameters * 6 + 4 * (1 + 2 + 3 + 3 + 3 + 3) * HEADS * HEAD_DIM
    assert counted.layers[1] == 2 * recurrent.matrix_parameters * 6
    conv = [p for name, p in model("D").language_model.layers[0].named_parameters() if "conv" in name]
    assert conv and recurrent.matrix_parameters > sum(p.numel() for p in conv)  # short convolutions counted


def test_stages_count_backward_as_twice_forward_for_what_trains():
    student, teacher = model("S,D"), model("A,A")
    for parameter in student.language_model.layers[0].parameters():
        parameter.requires_grad_(False)  # the shared attention layer stays
    s, t = flops.model_shape(student), flops.model_shape(teacher)
    data = batch([4, 4])
    forward_s, forward_t = flops.forward_flops(s, [4, 4]), flops.forward_flops(t, [4, 4])
    assert flops.fine_tuning_flops(s, data) == pytest.approx(3 * (forward_s.decoder + forward_s.head))
    assert flops.layerwise_distillation_flops(s, t, data) == pytest.approx(forward_t.decoder + 3 * forward_s.layers[1])
    assert flops.end_to_end_distillation_flops(s, t, data) == pytest.approx(
        forward_t.decoder + forward_t.head + 3 * (forward_s.decoder + forward_s.head)
    )


def test_vision_patches_are_read_from_the_samples_grids():
    data = batch([4])
    data.samples[0].vision = {"image_grid_thw": torch.tensor([[1, 4, 6]]), "video_grid_thw": torch.tensor([[2, 2, 2]])}
    assert flops.vision_patches(data) == 24 + 8
