"""Selective activation checkpointing: every selection trains to the same gradients as storing everything, keeps
less than storing everything and more than recomputing whole layers, and a bad selection is named."""

from __future__ import annotations

import pytest
import torch

from hybridvl.models.config import HybridConfig
from hybridvl.models.hybrid import HybridVLM, checkpoint_selection

LAYOUT = "S,D,A,D"


def _model() -> HybridVLM:
    torch.manual_seed(0)
    config = HybridConfig(
        layout=LAYOUT,
        vocab_size=128,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        mrope_section=None,
        sliding_window=8,
        mixer_options={"D": {"num_heads": 2, "head_dim": 16}},
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return HybridVLM(config).double().train()


def _step(model: HybridVLM, selection: bool | str) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one step with ``selection``, and the bytes autograd kept from the forward pass (outside the
    recomputed parts)."""
    model.zero_grad(set_to_none=True)
    model.language_model.gradient_checkpointing = selection
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    kept = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(input_ids=ids).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, sum(kept)


def test_every_selection_gives_the_gradients_of_storing_everything():
    model = _model()
    expected, _ = _step(model, False)
    for selection in (True, "layers", "mlp", "mlp,S", "D", "S,A,D", "mlp,S,A,D"):
        grads, _ = _step(model, selection)
        assert grads.keys() == expected.keys(), selection
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-12, msg=f"{selection}: {name}")


def test_selective_checkpointing_keeps_less_than_storing_and_more_than_whole_layers():
    model = _model()
    kept = {selection: _step(model, selection)[1] for selection in (False, "mlp", "mlp,S", "mlp,S,A,D", True)}
    assert kept[False] > kept["mlp"] > kept["mlp,S"] > kept["mlp,S,A,D"] > 0
    assert kept["mlp"] > kept[True]  # recomputing whole layers keeps only each layer's input


def test_a_selection_names_what_is_wrong():
    assert checkpoint_selection(False, "SD") == frozenset()
    assert checkpoint_selection(True, "SD") == checkpoint_selection("layers", "SD") == {"layers"}
    assert checkpoint_selection(" mlp , S", "SD") == {"mlp", "S"}
    with pytest.raises(ValueError, match=r"unknown part 'M'.*'mlp' and mixer letters of the layout \(D, S\)"):
        checkpoint_selection("mlp,M", "SD")
    with pytest.raises(ValueError, match="'layers' recomputes whole layers, name it alone"):
        checkpoint_selection("layers,mlp", "SD")
    with pytest.raises(ValueError, match="unknown part ''"):
        checkpoint_selection("mlp,", "SD")


def test_evaluation_and_no_grad_recompute_nothing(monkeypatch):
    from hybridvl.models import hybrid

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint called outside training")

    model = _model()
    model.language_model.gradient_checkpointing = "mlp,S,A,D"
    monkeypatch.setattr(hybrid, "checkpoint", refuse)
    ids = torch.randint(1, 128, (1, 12))
    with torch.no_grad():
        model(input_ids=ids)  # training mode, but no gradients
    model.eval()(input_ids=ids)
    with pytest.raises(AssertionError, match="outside training"):
        model.train()(input_ids=ids)
